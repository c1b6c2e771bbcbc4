//! `cargo xtask deps`: pins every library crate's resolved normal dependency set.
//!
//! For each crate, with its default features and with `--no-default-features`, the set of
//! packages `cargo tree -e normal` resolves (name and enabled features, not versions: a
//! lockfile update does not change the set, a new dependency or feature does) must equal
//! `ci/deps/<crate>.txt`. A crate thus cannot gain a dependency, direct or transitive, by
//! accident; `--bless` rewrites the files after a deliberate change. Independently of the
//! files, the engine (`livemig`) must never resolve a CLI, JSON, a device model or the
//! iommufd selftest uAPI.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::rig::workspace_root;

/// The library crates whose sets are pinned.
pub const LIBRARIES: &[&str] = &[
    "livemig",
    "livemig-hisi-qm",
    "livemig-host",
    "livemig-iommu-pt",
    "livemig-iommufd",
    "livemig-kvm",
    "livemig-sim",
    "livemig-stream",
    "livemig-vfio",
    "livemig-viommu",
];

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
];

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

/// The engine's forbidden packages (or package features) among `set`.
fn forbidden_hits<'a>(set: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut hits = Vec::new();
    for d in set {
        let (name, features) = d.split_once('|').unwrap_or((d, ""));
        for f in ENGINE_FORBIDDEN {
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
    for &krate in LIBRARIES {
        let (default, none) = (tree(krate, true)?, tree(krate, false)?);
        if krate == "livemig" {
            for h in forbidden_hits(default.iter().chain(&none)) {
                failures.push(format!(
                    "the engine resolves {h}, which it must never depend on"
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
        let hits = forbidden_hits(set.iter());
        assert_eq!(
            hits,
            [
                "serde_json|std",
                "livemig-iommufd|selftest",
                "livemig-hisi-qm|model"
            ]
        );
    }
}
