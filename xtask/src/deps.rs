//! `cargo xtask deps`: pins every library crate's resolved normal dependency set.
//!
//! For each crate, with its default features and with `--no-default-features`, the set of
//! packages `cargo tree -e normal` resolves (name and enabled features, not versions: a
//! lockfile update does not change the set, a new dependency or feature does) must equal
//! `ci/deps/<crate>.txt`. A crate thus cannot gain a dependency, direct or transitive, by
//! accident; `--bless` rewrites the files after a deliberate change. The library crates are
//! read from `cargo metadata` (every publishable workspace member with a library target), so a
//! new crate is checked from its first commit: without its file the check fails. Independently
//! of the files, no library but `livemig-sim` may resolve a device model, `livemig-vfio`'s
//! simulated device, `livemig-stream`'s `inspect` or serde_json; `livemig-stream` may not
//! resolve serde at all; and the engine (`livemig`) must never resolve a CLI, JSON, a device
//! model or the iommufd selftest uAPI.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::rig::workspace_root;

/// The library crates whose sets are pinned: the publishable workspace members with a library
/// target, sorted by name.
pub fn libraries() -> Result<Vec<String>> {
    libraries_in(&workspace_metadata()?)
}

/// `cargo metadata --no-deps` of the workspace, as JSON.
pub fn workspace_metadata() -> Result<serde_json::Value> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .current_dir(workspace_root())
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .with_context(|| format!("cannot run {cargo} metadata"))?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("cargo metadata printed no JSON")
}

fn libraries_in(meta: &serde_json::Value) -> Result<Vec<String>> {
    let packages = meta["packages"]
        .as_array()
        .context("cargo metadata: no packages")?;
    let mut libs = Vec::new();
    for p in packages {
        // `publish = false` reads as an empty registry list.
        let unpublished = p["publish"].as_array().is_some_and(|r| r.is_empty());
        let has_lib = p["targets"].as_array().into_iter().flatten().any(|t| {
            t["kind"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k == "lib")
        });
        if has_lib && !unpublished {
            libs.push(
                p["name"]
                    .as_str()
                    .context("a package without name")?
                    .to_string(),
            );
        }
    }
    libs.sort();
    Ok(libs)
}

/// What no library except the simulated platform may resolve: the opt-in models, the
/// simulated device, the inspection feature and JSON.
const OPT_IN_ONLY: &[&str] = &[
    "livemig-hisi-qm|model",
    "livemig-iommu-pt|model",
    "livemig-stream|inspect",
    "livemig-vfio|sim",
    "serde_json",
];

/// What `livemig-stream` must never resolve: its decoding is serde-free.
const STREAM_FORBIDDEN: &[&str] = &["serde", "serde_json"];

/// What the engine must never resolve (package names, or `package|feature`).
const ENGINE_FORBIDDEN: &[&str] = &[
    "clap",
    "indicatif",
    "anyhow",
    "serde_json",
    "livemig-hisi-qm",
    "livemig-iommu-pt",
    "livemig-sim",
    "livemig-kvm",
    "livemig-host",
    "livemig-iommufd|selftest",
    "livemig-vfio|sim",
];

/// The forbidden packages (or package features) of `krate`, with the reason.
fn forbidden_for(krate: &str) -> Vec<(&'static str, &'static str)> {
    let mut rules = Vec::new();
    if krate != "livemig-sim" {
        rules.extend(
            OPT_IN_ONLY
                .iter()
                .map(|f| (*f, "opt-in, for tools and tests only")),
        );
    }
    if krate == "livemig-stream" {
        rules.extend(
            STREAM_FORBIDDEN
                .iter()
                .map(|f| (*f, "stream decoding is serde-free")),
        );
    }
    if krate == "livemig" {
        rules.extend(
            ENGINE_FORBIDDEN
                .iter()
                .map(|f| (*f, "the engine stays lean")),
        );
    }
    rules
}

fn tree(krate: &str, default_features: bool) -> Result<BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace_root()).args([
        "tree", "--quiet", "-e", "normal", "-p", krate, "--prefix", "none", "--format", "{p}|{f}",
    ]);
    if !default_features {
        cmd.arg("--no-default-features");
    }
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cargo} tree"))?;
    if !out.status.success() {
        bail!(
            "cargo tree -p {krate} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut set = BTreeSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.trim().trim_end_matches(" (*)");
        if line.is_empty() {
            continue;
        }
        let (pkg, features) = line.split_once('|').unwrap_or((line, ""));
        let name = pkg.split_whitespace().next().unwrap_or(pkg);
        if name == krate {
            continue;
        }
        set.insert(format!("{name}|{features}"));
    }
    Ok(set)
}

fn render(default: &BTreeSet<String>, none: &BTreeSet<String>) -> String {
    let mut s = String::from(
        "# Resolved normal dependencies (name|enabled features); checked by `cargo xtask deps`.\n\
         # Regenerate with `cargo xtask deps --bless` after a deliberate change.\n[default]\n",
    );
    for d in default {
        s += d;
        s.push('\n');
    }
    s += "[no-default-features]\n";
    for d in none {
        s += d;
        s.push('\n');
    }
    s
}

fn path(krate: &str) -> PathBuf {
    workspace_root()
        .join("ci/deps")
        .join(format!("{krate}.txt"))
}

/// The entries of `set` that match one of `forbidden` (package names, or `package|feature`).
fn forbidden_hits<'a>(set: impl Iterator<Item = &'a String>, forbidden: &[&str]) -> Vec<String> {
    let mut hits = Vec::new();
    for d in set {
        let (name, features) = d.split_once('|').unwrap_or((d, ""));
        for f in forbidden {
            let hit = match f.split_once('|') {
                Some((n, feature)) => n == name && features.split(',').any(|x| x == feature),
                None => *f == name,
            };
            if hit && !hits.contains(d) {
                hits.push(d.clone());
            }
        }
    }
    hits
}

/// What changed between the pinned file and the resolved set, if anything.
fn difference(have: &str, want: &str) -> Option<String> {
    if have == want {
        return None;
    }
    let old: BTreeSet<&str> = have.lines().collect();
    let new: BTreeSet<&str> = want.lines().collect();
    let added: Vec<&&str> = new.difference(&old).collect();
    let removed: Vec<&&str> = old.difference(&new).collect();
    Some(format!("added {added:?}, removed {removed:?}"))
}

/// Checks (or with `bless`, rewrites) every pinned set.
pub fn deps(bless: bool) -> Result<()> {
    let mut failures = Vec::new();
    for krate in libraries()? {
        let krate = krate.as_str();
        let (default, none) = (tree(krate, true)?, tree(krate, false)?);
        for (f, why) in forbidden_for(krate) {
            for h in forbidden_hits(default.iter().chain(&none), &[f]) {
                failures.push(format!(
                    "{krate} resolves {h}, which it must never depend on ({why})"
                ));
            }
        }
        let want = render(&default, &none);
        let p = path(krate);
        if bless {
            std::fs::create_dir_all(p.parent().expect("ci/deps"))?;
            std::fs::write(&p, &want).with_context(|| format!("writing {}", p.display()))?;
            continue;
        }
        let have = std::fs::read_to_string(&p).unwrap_or_default();
        if let Some(change) = difference(&have, &want) {
            failures.push(format!(
                "{krate}: the resolved dependency set changed ({change}); if deliberate, run \
                 `cargo xtask deps --bless` and commit {}",
                p.display()
            ));
        }
        eprintln!(
            "deps: {krate}: {} default, {} without default features",
            default.len(),
            none.len()
        );
    }
    if !failures.is_empty() {
        bail!("dependency check failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_dependency_or_feature_fails_the_check() {
        let base: BTreeSet<String> = ["libc|default,std".to_string()].into();
        let pinned = render(&base, &base);
        assert_eq!(difference(&pinned, &pinned), None);
        let mut more = base.clone();
        more.insert("serde_json|std".into());
        let d = difference(&pinned, &render(&more, &base)).expect("a change");
        assert!(d.contains("serde_json|std"), "{d}");
        let mut feat = BTreeSet::new();
        feat.insert("libc|default,extra_traits,std".to_string());
        assert!(
            difference(&pinned, &render(&feat, &base)).is_some(),
            "a new feature counts"
        );
    }

    #[test]
    fn the_engine_may_not_resolve_a_cli_json_a_model_or_the_selftest_uapi() {
        let set: Vec<String> = [
            "libc|default,std",
            "serde_json|std",
            "livemig-iommufd|selftest",
            "livemig-iommufd|",
            "livemig-hisi-qm|model",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let engine: Vec<&str> = forbidden_for("livemig").iter().map(|r| r.0).collect();
        let hits = forbidden_hits(set.iter(), &engine);
        assert_eq!(
            hits,
            [
                "serde_json|std",
                "livemig-iommufd|selftest",
                "livemig-hisi-qm|model"
            ]
        );
    }

    #[test]
    fn only_the_simulated_platform_may_resolve_models_and_stream_decoding_has_no_serde() {
        let set: Vec<String> = [
            "livemig-vfio|sim",
            "livemig-iommu-pt|model,std",
            "serde|alloc,derive",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let rules = |k: &str| -> Vec<&str> { forbidden_for(k).iter().map(|r| r.0).collect() };
        assert_eq!(
            forbidden_hits(set.iter(), &rules("livemig-host")),
            ["livemig-vfio|sim", "livemig-iommu-pt|model,std"]
        );
        assert!(forbidden_hits(set.iter(), &rules("livemig-sim")).is_empty());
        assert_eq!(
            forbidden_hits(set.iter(), &rules("livemig-stream")),
            [
                "livemig-vfio|sim",
                "livemig-iommu-pt|model,std",
                "serde|alloc,derive"
            ]
        );
    }

    #[test]
    fn libraries_are_the_publishable_members_with_a_lib_target() {
        let meta = serde_json::json!({"packages": [
            {"name": "livemig-vfio", "publish": null,
             "targets": [{"kind": ["lib"]}, {"kind": ["test"]}]},
            {"name": "livemig-cli", "publish": null, "targets": [{"kind": ["bin"]}]},
            {"name": "hw-tests", "publish": [],
             "targets": [{"kind": ["lib"]}, {"kind": ["bin"]}]},
            {"name": "livemig", "publish": null, "targets": [{"kind": ["lib"]}]},
        ]});
        assert_eq!(libraries_in(&meta).unwrap(), ["livemig", "livemig-vfio"]);
    }
}
