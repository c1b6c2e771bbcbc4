//! The kvm profiles: KVM inside the rig guest (`../shared/recipes/kvm-in-rig.md`). QEMU's TCG
//! emulates AMD SVM with nested paging, so the rig kernel (built with `CONFIG_KVM_AMD`) runs
//! kvm_amd, and the static `livemig` migrates the KVM test VM between two of its own processes
//! over mutual TLS (`livemig vm demo`) in one real kernel. Two CPU models: `kvm` (`-cpu EPYC`,
//! with XSAVE: the vCPU record holds the XSAVE area and XCR0) and `kvm-noxsave` (`-cpu
//! qemu64,+svm,+npt,+nx`: the legacy FPU, no XCRs).
//!
//! Everything the nested guest does is slow (TCG runs the rig guest, and the test VM runs
//! nested inside it): the test VM is small and every wait is generous.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::harness::{Outcome, Runner};
use crate::util::{Mdev, wait};
use crate::{check_eq, trace};

const LIVEMIG: &str = "/bin/livemig";

/// The test VM for the nested runs: 2 vCPUs, 256 working-set pages each, 32 MiB of RAM.
const VM: &[&str] = &[
    "--vcpus",
    "2",
    "--pages",
    "256",
    "--rate",
    "2000",
    "--ram",
    "32MiB",
    "--high-ram",
    "0",
];

/// Which CPU model the profile booted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    /// `-cpu EPYC`: XSAVE present.
    Epyc,
    /// `-cpu qemu64,+svm,+npt,+nx`: no XSAVE.
    Qemu64,
}

/// Runs `livemig ARGS`, killed after `limit`; returns (status ok, stdout, stderr).
fn livemig(args: &[&str], limit: Duration) -> Result<(bool, String, String)> {
    trace!("livemig {}", args.join(" "));
    let mut child = Command::new(LIVEMIG)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting /bin/livemig")?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let t0 = Instant::now();
    let ok = wait(&mut child, &format!("livemig {}", args.join(" ")), limit)?;
    let (o, e) = (o.join().unwrap_or_default(), e.join().unwrap_or_default());
    trace!(
        "livemig {} ended (success {ok}) after {:.1?}",
        args[..2.min(args.len())].join(" "),
        t0.elapsed()
    );
    for l in e.lines() {
        trace!("  {l}");
    }
    Ok((ok, o, e))
}

fn cpu_flags() -> Result<Vec<String>> {
    let c = std::fs::read_to_string("/proc/cpuinfo")?;
    let line = c
        .lines()
        .find(|l| l.starts_with("flags"))
        .context("no flags line in /proc/cpuinfo")?;
    Ok(line
        .split(':')
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .map(String::from)
        .collect())
}

pub fn run(r: &mut Runner, model: Model) {
    r.case("kvm.dev_kvm_nested_svm", || {
        let flags = cpu_flags()?;
        for f in ["svm", "npt", "nx"] {
            ensure!(
                flags.iter().any(|x| x == f),
                "the CPU model has no {f}: {flags:?}"
            );
        }
        check_eq!(
            flags.iter().any(|x| x == "xsave"),
            model == Model::Epyc,
            "XSAVE in the guest's CPU model"
        );
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .context("opening /dev/kvm (kvm_amd did not load?)")?;
        Ok(Outcome::Pass)
    });

    // Two livemig processes over mutual TLS, the guest verifying its memory on the
    // destination; the vCPU record holds what the CPU model has.
    r.case("kvm.vm_demo_tls", || {
        let mut args = vec!["vm", "demo", "--json"];
        args.extend_from_slice(VM);
        let (ok, out, err) = livemig(&args, Duration::from_secs(420))?;
        ensure!(ok, "vm demo failed: {}", tail(&err));
        let v: Value = serde_json::from_str(&out).with_context(|| format!("output {out:?}"))?;
        check_eq!(v["verified"].as_bool(), Some(true), "the guest verified");
        let d = &v["destination"]["verification"];
        ensure!(
            d["ok"].as_bool() == Some(true) && d["pages"].as_u64().unwrap_or(0) > 0,
            "destination verification: {d}"
        );
        trace!(
            "downtime {} us, {} rounds, {:.1} s",
            v["source"]["report"]["downtime_us"],
            v["source"]["report"]["rounds"]
                .as_array()
                .map_or(0, |r| r.len()),
            v["seconds"].as_f64().unwrap_or(0.0)
        );
        Ok(Outcome::Pass)
    });
}

/// Negative control: the destination drops the vCPU state record (`--x-drop-vcpu-state`), so
/// its vCPUs start in the state a new VM has; the guest's own check must fail there. Shows
/// that `kvm.vm_demo_tls` passing means the vCPU state arrived.
pub fn run_controls(r: &mut Runner) {
    // The control matrix runs on 6.12 only (issue 30's budget: 7.3 runs the positive case and
    // the refusal).
    if crate::harness::kernel_at_least(7, 0) {
        return;
    }
    r.case("kvm.control_vcpu_state_dropped", || {
        let mut args = vec!["vm", "demo", "--x-drop-vcpu-state"];
        args.extend_from_slice(VM);
        let (ok, _out, err) = livemig(&args, Duration::from_secs(240))?;
        ensure!(!ok, "vm demo passed with the vCPU state dropped");
        ensure!(
            err.contains("the guest made no progress"),
            "the control failed, but not at the guest's check: {}",
            tail(&err)
        );
        trace!("expected failure: {}", tail(&err));
        Ok(Outcome::Pass)
    });
}

/// The lab config the kvm profile writes: two mtty mdevs, the first resuming into the second,
/// so `lab.mtty0.migrate_engine` and `lab.mtty0.migrate_kvm_vm` (the code `cargo xtask
/// hw-test` runs on a lab host) run here before a lab host sees them.
fn lab_config(a: &Mdev, b: &Mdev) -> String {
    let dev = |name: &str, uuid: &str, into: &str| {
        format!(
            "[[device]]\nname = \"{name}\"\nkind = \"mdev\"\nmdev = \"{uuid}\"\n\
             expect_flags = [\"STOP_COPY\", \"P2P\", \"PRE_COPY\"]\n{into}\n"
        )
    };
    format!(
        "# Written by hw-tests (profile kvm): the mtty pair as a lab's devices.\n\
         [host]\nexpected_iommu = \"any\"\n\n{}{}",
        dev("mtty0", &a.uuid, "resume_into = \"mtty1\""),
        dev("mtty1", &b.uuid, "")
    )
}

/// The lab path for real (kvm profile): `lab.mtty0.migrate_engine` (writer threads as the
/// vCPU) and `lab.mtty0.migrate_kvm_vm` (the KVM test VM owning the mtty, its RAM in the IOAS,
/// the guest verifying itself on the destination).
pub fn run_lab(r: &mut Runner) {
    const CASES: [&str; 2] = ["lab.mtty0.migrate_engine", "lab.mtty0.migrate_kvm_vm"];
    let made = Mdev::create("mtty-2").and_then(|a| Ok((a, Mdev::create("mtty-2")?)));
    let (a, b) = match made {
        Ok(p) => p,
        Err(e) => return r.fail_all(&CASES, &format!("{e:#}")),
    };
    let text = lab_config(&a, &b);
    let path = "/run/lab-kvm.toml";
    let cfg = std::fs::create_dir_all("/run")
        .and_then(|()| std::fs::write(path, &text))
        .with_context(|| format!("writing {path}"))
        .and_then(|()| hw_tests::lab_config::LabConfig::load(path));
    match cfg {
        Ok(cfg) => {
            r.only(Some(&CASES));
            crate::lab::run(r, &cfg);
            r.only(None);
        }
        Err(e) => r.fail_all(&CASES, &format!("{e:#}")),
    }
    drop((a, b));
}

/// A destination whose CPUID has no XSAVE refuses the XSAVE record at compat, naming it; the
/// source keeps running (`vm migrate` reports the failure after resuming it).
pub fn run_refusal(r: &mut Runner) {
    r.case("kvm.vm_refused_without_xsave", || {
        let mut args = vec![
            "vm",
            "incoming",
            "--listen",
            "127.0.0.1:0",
            "--plain",
            "--x-no-xsave",
        ];
        args.extend_from_slice(VM);
        let mut child = Command::new(LIVEMIG)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the destination")?;
        let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("the destination said {line:?}"))?
            .to_string();
        let mut margs = vec!["vm", "migrate", "--to", &addr, "--plain"];
        margs.extend_from_slice(VM);
        let (ok, _out, err) = livemig(&margs, Duration::from_secs(240))?;
        let mut derr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut derr);
        }
        let status = child.wait()?;
        trace!("destination {status}: {}", tail(&derr));
        ensure!(
            !ok,
            "the migration to a destination without XSAVE succeeded"
        );
        ensure!(!status.success(), "the destination without XSAVE succeeded");
        let want = "vCPU state: XSAVE/XCR0 state (CPUID has XSAVE) on the source; vCPU state: \
                    legacy FPU state, no XCRs (CPUID has no XSAVE) on the destination";
        ensure!(
            err.contains(want),
            "the source's error does not name XSAVE: {}",
            tail(&err)
        );
        ensure!(
            err.contains("the VM runs on the source"),
            "the source does not say it runs the VM again: {}",
            tail(&err)
        );
        // One host: the destination says it does not run the VM, and no vCPU of its entered
        // the guest.
        ensure!(
            derr.contains("the VM does not run on the destination")
                && derr.contains("(guest entries per vCPU [0, 0])"),
            "the destination does not say it never ran the VM: {}",
            tail(&derr)
        );
        Ok(Outcome::Pass)
    });
}

/// The last lines of a process's error output, for a failure message.
fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(6)..].join(" | ")
}
