//! `hw-tests`: conformance tests of the livemig crates against a real kernel.
//!
//! Two ways to run:
//! * **As `/init` of the rig guest** (`cargo xtask rig`): when it is PID 1 it mounts `/dev`,
//!   `/proc` and `/sys`, reads `livemig.profile=<mock|vtd|amdvi>` from the kernel command line,
//!   runs that profile and reboots (QEMU runs with `-no-reboot`, so it exits).
//! * **On a host** (`cargo xtask hw-test` on lab machines, or by hand):
//!   `hw-tests --profile <name> [--filter SUBSTRING]` or `hw-tests --lab CONFIG.toml`.
//!
//! Output: one line per case, `[hw-tests] ok NAME`, `[hw-tests] FAIL NAME: why` or
//! `[hw-tests] skip NAME: why` (each announced first by `[hw-tests] run NAME`, so a hang shows
//! where), and last `[hw-tests] N passed, N failed`.

mod amdvi_fw;
mod cli_cases;
mod e2e;
mod e2e_p2p;
mod fw;
mod harness;
mod iommufd_cases;
mod kvm_cases;
mod lab;
mod lab_e2e;
mod mock;
mod mtty;
mod pci;
mod qemu_peer;
mod util;
mod viommu_cases;
mod vtd_fw;
mod vtd_fw_legacy;

use anyhow::{Context, Result, bail};

use harness::Runner;

fn usage() -> &'static str {
    "usage: hw-tests --profile <mock|vtd|amdvi> [--filter SUBSTRING]\n       hw-tests --lab CONFIG.toml [--filter SUBSTRING]\n       hw-tests --list-profiles"
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Plan {
    Profile(String),
    Lab(String),
}

fn run_plan(plan: &Plan, runner: &mut Runner) -> Result<()> {
    match plan {
        Plan::Profile(p) => match p.as_str() {
            "mock" => {
                iommufd_cases::run(runner);
                viommu_cases::run(runner);
                mtty::run(runner);
                cli_cases::run(runner);
                e2e::run_cases(runner);
                qemu_peer::run(runner);
            }
            "vtd" => pci::run(runner, pci::Vendor::IntelVtd),
            "amdvi" => pci::run(runner, pci::Vendor::AmdVi),
            "vtd-fw" => vtd_fw::run(runner),
            "vtd-fw-legacy" => vtd_fw_legacy::run(runner),
            "amdvi-fw" => amdvi_fw::run(runner),
            "kvm" => {
                kvm_cases::run(runner, kvm_cases::Model::Epyc);
                kvm_cases::run_refusal(runner);
                kvm_cases::run_controls(runner);
                kvm_cases::run_devices(runner);
                kvm_cases::run_device_controls(runner);
                kvm_cases::run_lab(runner);
            }
            "kvm-noxsave" => kvm_cases::run(runner, kvm_cases::Model::Qemu64),
            // The L1 guest of `cargo xtask hw-test --nested`: its config is in the initramfs.
            "lab" => lab::run(runner, &lab::LabConfig::load("/lab.toml")?),
            other => bail!("unknown profile {other:?} (expected mock, vtd or amdvi)"),
        },
        Plan::Lab(path) => {
            let cfg = lab::LabConfig::load(path)?;
            lab::run(runner, &cfg);
        }
    }
    Ok(())
}

fn parse_args(args: &[String]) -> Result<(Plan, Option<String>)> {
    let mut plan = None;
    let mut filter = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--profile" => {
                plan = Some(Plan::Profile(
                    it.next().context("--profile needs a name")?.clone(),
                ))
            }
            "--lab" => plan = Some(Plan::Lab(it.next().context("--lab needs a path")?.clone())),
            "--filter" => filter = Some(it.next().context("--filter needs a substring")?.clone()),
            "--list-profiles" => {
                println!(
                    "mock\tiommufd selftest mock IOMMU (+ virtio-iommu listener) + mtty mdev migration"
                );
                println!("vtd\temulated Intel VT-d + edu behind vfio-pci");
                println!("amdvi\temulated AMD-Vi + edu behind vfio-pci");
                std::process::exit(0);
            }
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    Ok((plan.context(usage())?, filter))
}

fn main() {
    if std::process::id() == 1 {
        util::init_guest();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (plan, filter) = match parse_args(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("hw-tests: {e:#}");
            std::process::exit(2);
        }
    };
    let mut runner = Runner::new(filter);
    if let Err(e) = run_plan(&plan, &mut runner) {
        eprintln!("hw-tests: {e:#}");
        std::process::exit(2);
    }
    std::process::exit(if runner.finish() { 0 } else { 1 });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arguments() {
        assert_eq!(
            parse_args(&strings(&["--profile", "mock"])).unwrap(),
            (Plan::Profile("mock".into()), None)
        );
        assert_eq!(
            parse_args(&strings(&["--lab", "x.toml", "--filter", "hisi"])).unwrap(),
            (Plan::Lab("x.toml".into()), Some("hisi".into()))
        );
        assert!(parse_args(&strings(&[])).is_err());
        assert!(parse_args(&strings(&["--bogus"])).is_err());
    }
}
