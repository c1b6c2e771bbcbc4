//! `cargo xtask examples` (a ci step after the tests): builds every example of the workspace
//! with all features, runs each one whose main use works on a CI machine (it checks its own
//! result and exits non-zero when it is wrong), and fails when an example file is in none of
//! the lists below, so a new example cannot be skipped by accident.
//!
//! The examples run from the one build (`cargo build --workspace --examples --all-features`,
//! the feature set of the test step, so nothing is compiled again): `cargo run -p CRATE
//! --example NAME` per example would resolve each crate's features anew and rebuild its
//! dependencies every time.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::rig;

/// Run in CI: (package, example, the features `cargo run` needs for it).
const RUN: &[(&str, &str, &str)] = &[
    ("livemig", "engine", ""),
    ("livemig-sim", "simulate", ""),
    ("livemig-kvm", "migrate_vm", ""),
    ("livemig-vfio", "sim_migrate", "sim"),
    ("livemig-stream", "roundtrip", ""),
    ("livemig-iommu-pt", "harvest", "model"),
    ("livemig-hisi-qm", "vf_migrate", "model,vfio"),
    ("livemig-viommu", "requests", ""),
    ("livemig-viommu", "virtqueue", "virtio-queue"),
    ("livemig-tls", "pinned", ""),
];

/// Built only: their main use needs `/dev/iommu` and VFIO cdevs, which CI machines do not
/// have (the rig guest does). Run without them they say so and exit non-zero.
const BUILD_ONLY: &[(&str, &str)] = &[
    ("livemig-iommufd", "dirty_domain"),
    ("livemig-host", "vf_to_vf"),
];

/// Fixture generators (they write files under fixtures/): built, not run.
const GENERATORS: &[(&str, &str)] = &[
    ("livemig-stream", "make_golden"),
    ("livemig-hisi-qm", "make_golden_qm"),
];

/// Every `crates/*/examples/*.rs` must be listed.
fn check_listed(root: &Path) -> Result<()> {
    let listed = |name: &str| {
        RUN.iter().any(|r| r.1 == name)
            || BUILD_ONLY.iter().any(|r| r.1 == name)
            || GENERATORS.iter().any(|r| r.1 == name)
    };
    let mut missing = Vec::new();
    for krate in std::fs::read_dir(root.join("crates")).context("reading crates/")? {
        let dir = krate?.path().join("examples");
        let Ok(files) = std::fs::read_dir(&dir) else {
            continue;
        };
        for f in files {
            let p = f?.path();
            if p.extension().is_some_and(|e| e == "rs") {
                let name = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
                if !listed(name) {
                    missing.push(p.display().to_string());
                }
            }
        }
    }
    if !missing.is_empty() {
        bail!(
            "examples in no list of xtask/src/examples.rs (run, build-only or generator): {}",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Builds all examples and runs the runnable ones.
pub fn examples() -> Result<()> {
    let root = rig::workspace_root();
    check_listed(&root)?;
    crate::cargo(
        &["build", "--workspace", "--examples", "--all-features"],
        &[],
    )?;
    let bin = rig::target_dir().join("debug/examples");
    for (pkg, name, features) in RUN {
        let features = if features.is_empty() {
            String::new()
        } else {
            format!(" --features {features}")
        };
        eprintln!("==> example {name} (cargo run -p {pkg} --example {name}{features})");
        let t = Instant::now();
        let out = Command::new(bin.join(name))
            .current_dir(&root)
            .output()
            .with_context(|| format!("cannot run example {name} from {}", bin.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!(
                "example {name} of {pkg} failed ({}):\n{stdout}{stderr}",
                out.status
            );
        }
        let last = stdout.lines().last().unwrap_or_default();
        eprintln!("    {last} ({:.2} s)", t.elapsed().as_secs_f64());
    }
    for (pkg, name) in BUILD_ONLY {
        eprintln!("==> example {name} of {pkg}: built, not run (needs /dev/iommu and VFIO cdevs)");
    }
    Ok(())
}
