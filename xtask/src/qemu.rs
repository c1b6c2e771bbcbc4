//! Runs QEMU for one guest: its own process group, the serial console streamed to a log file
//! and parsed line by line, a wall-clock timeout, and always killed on exit.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Which accelerator a guest runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// A machine profile: what the guest looks like and what it exercises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub name: &'static str,
    pub about: &'static str,
    /// `-machine` value.
    pub machine: &'static str,
    /// Extra `-machine` options under KVM (intremap needs a split irqchip there).
    pub kvm_machine: &'static str,
    /// Always under TCG: the profile needs a CPU model the host's KVM cannot offer (TCG
    /// emulates SVM for the kvm profiles; a KVM rig guest has SVM only with nested on).
    pub tcg_only: bool,
    /// Guest memory in MiB and CPUs, when the profile needs other than the rig's default
    /// (0: the default).
    pub memory_mib: u32,
    /// CPUs (0: one).
    pub smp: u32,
    /// Device arguments.
    pub devices: Vec<String>,
    /// Extra kernel command line.
    pub cmdline: Vec<String>,
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The rig's profiles.
pub fn profiles() -> Vec<Profile> {
    vec![
        Profile {
            name: "mock",
            about: "no vIOMMU; the iommufd selftest mock IOMMU (dirty tracking) and the mtty \
                    migration sample: iommufd objects, HWPT dirty tracking, auto domains, the \
                    VFIO migration FSM and data path",
            machine: "q35",
            kvm_machine: "",
            tcg_only: false,
            memory_mib: 0,
            smp: 0,
            devices: vec![],
            cmdline: args(&["livemig.profile=mock"]),
        },
        Profile {
            name: "vtd",
            about: "q35 + emulated Intel VT-d (intremap, caching mode) + QEMU's edu DMA device \
                    + a plain PCI device: vfio-pci on a real IOMMU, GET_HW_INFO, the dirty-HWPT \
                    refusal and auto-domain fallback, DMA through the IOMMU, faults, the legacy \
                    container path",
            machine: "q35",
            kvm_machine: "kernel-irqchip=split",
            tcg_only: false,
            memory_mib: 0,
            smp: 0,
            devices: args(&[
                "-device",
                "intel-iommu,intremap=on,caching-mode=on",
                "-device",
                "edu,dma_mask=0xffffffff",
                "-device",
                "pci-testdev",
            ]),
            cmdline: args(&["intel_iommu=on", "livemig.profile=vtd"]),
        },
        Profile {
            name: "amdvi",
            about: "q35 + emulated AMD-Vi + edu: the same checks on the AMD IOMMU driver. \
                    QEMU 10.0 quirks handled: its IVRS table has no IOAPIC entry, so the guest \
                    disables interrupt remapping and IO-APIC routing fails under TCG (legacy \
                    IRQs go through the PIC: noapic; iommufd binds without MSI isolation: \
                    iommufd.allow_unsafe_interrupts=1); with pass-through support on (pt=on, \
                    the default) QEMU keeps edu on a direct address space after the guest \
                    switches its DTE to translation, so DMA bypasses the IOMMU: pt=off; and it \
                    logs no IO_PAGE_FAULT event for a blocked DMA, so only VT-d checks the \
                    guest's fault report",
            machine: "q35",
            kvm_machine: "",
            tcg_only: false,
            memory_mib: 0,
            smp: 0,
            devices: args(&[
                "-device",
                "amd-iommu,intremap=off,pt=off",
                "-device",
                "edu,dma_mask=0xffffffff",
            ]),
            cmdline: args(&[
                "noapic",
                "iommufd.allow_unsafe_interrupts=1",
                "livemig.profile=amdvi",
            ]),
        },
        Profile {
            name: "kvm",
            about: "KVM inside the rig guest (../shared/recipes/kvm-in-rig.md): TCG emulates AMD \
                    SVM with nested paging, so with -cpu EPYC (SVM, NPT, XSAVE; TCG drops a \
                    few bits such as NRIPS with a warning) kvm_amd runs in the guest and \
                    `livemig vm` migrates the KVM test VM between two processes over TLS in \
                    one real kernel",
            machine: "q35",
            kvm_machine: "",
            tcg_only: true,
            memory_mib: 2048,
            // One CPU. With -smp 2 (the recipe's machine) two things were seen (issue 30's
            // note): test-VM vCPUs exiting KVM_EXIT_SHUTDOWN at rip 0xfff0, cr0 0x10 (a
            // triple fault, after which kvm_amd INITs the vCPU: svm.c,
            // shutdown_interception), before the guest reported its exceptions; and two
            // processes getting different KVM_GET_SUPPORTED_CPUID (XSAVE in one, not the
            // other), which livemig refuses at compat.
            smp: 1,
            devices: args(&["-cpu", "EPYC"]),
            cmdline: args(&["livemig.profile=kvm"]),
        },
        Profile {
            name: "kvm-noxsave",
            about: "the kvm profile on a CPU model without XSAVE (-cpu qemu64,+svm,+npt,+nx): \
                    the vCPU state holds the legacy FPU and no XCRs",
            machine: "q35",
            kvm_machine: "",
            tcg_only: true,
            memory_mib: 2048,
            // One CPU: with -smp 2 the test VM's AP was found in its INIT state (rip 0xfff0,
            // cr0 0x10) at its first entry after the VMM set its registers (issue 30's note).
            smp: 1,
            devices: args(&["-cpu", "qemu64,+svm,+npt,+nx"]),
            cmdline: args(&["livemig.profile=kvm-noxsave"]),
        },
        Profile {
            name: "vtd-fw",
            about: "q35 + emulated Intel VT-d in scalable mode with first-stage translation \
                    (x-flts=on) + edu, the kernel's IOMMU driver off: a hw-tests program owns \
                    the unit through /dev/mem (base from the ACPI DMAR table) and a reserved \
                    RAM range (memmap=) for its tables, makes edu DMA through its first-stage \
                    tables and reads back the Accessed/Dirty bits and fault records QEMU wrote \
                    (../shared/recipes/vtd-firmware.md)",
            machine: "q35",
            kvm_machine: "",
            tcg_only: false,
            memory_mib: 0,
            smp: 0,
            devices: args(&[
                "-cpu",
                "max",
                "-device",
                "intel-iommu,x-scalable-mode=on,x-flts=on,intremap=off",
                "-device",
                "edu,addr=04.0,dma_mask=0xffffffffffff",
            ]),
            cmdline: args(&[
                "intel_iommu=off",
                "intremap=off",
                // 16 MiB at 256 MiB (inside the rig's 512 MiB of RAM) for tables and DMA pages.
                "memmap=16M$0x10000000",
                "livemig.profile=vtd-fw",
            ]),
        },
        Profile {
            name: "vtd-fw-legacy",
            about: "q35 + emulated Intel VT-d in legacy mode (second-stage tables, 48-bit) + \
                    edu, the kernel's IOMMU driver off: the second-stage half of vtd-fw (the \
                    first-stage machine advertises no second stage)",
            machine: "q35",
            kvm_machine: "",
            tcg_only: false,
            memory_mib: 0,
            smp: 0,
            devices: args(&[
                "-device",
                "intel-iommu,intremap=off,aw-bits=48",
                "-device",
                "edu,addr=04.0,dma_mask=0xffffffffffff",
            ]),
            cmdline: args(&[
                "intel_iommu=off",
                "intremap=off",
                "memmap=16M$0x10000000",
                "livemig.profile=vtd-fw-legacy",
            ]),
        },
        Profile {
            name: "amdvi-fw",
            about: "q35 + emulated AMD IOMMU + edu, the kernel's IOMMU driver off: a hw-tests \
                    program owns the unit (device table, command buffer, event log, v1 tables) \
                    through /dev/mem, base from the ACPI IVRS table",
            machine: "q35",
            kvm_machine: "",
            tcg_only: false,
            memory_mib: 0,
            smp: 0,
            devices: args(&[
                "-device",
                "amd-iommu,intremap=off,pt=off",
                "-device",
                "edu,addr=04.0,dma_mask=0xffffffffffff",
            ]),
            cmdline: args(&[
                "amd_iommu=off",
                "noapic",
                "memmap=16M$0x10000000",
                "livemig.profile=amdvi-fw",
            ]),
        },
    ]
}

/// The full QEMU command line for a guest.
pub fn command_line(
    qemu: &str,
    accel: Accel,
    memory_mib: u32,
    kernel: &Path,
    initrd: &Path,
    profile: &Profile,
    extra_cmdline: &[String],
) -> Vec<String> {
    let mut c = vec![qemu.to_string(), "-accel".into(), accel.name().into()];
    let mut machine = profile.machine.to_string();
    if accel == Accel::Kvm {
        c.extend(args(&["-cpu", "host"]));
        if !profile.kvm_machine.is_empty() {
            machine = format!("{machine},{}", profile.kvm_machine);
        }
    }
    c.extend(["-machine".to_string(), machine]);
    c.extend(profile.devices.iter().cloned());
    let mut cmdline = args(&["console=ttyS0", "panic=-1", "oops=panic", "loglevel=4"]);
    cmdline.extend(profile.cmdline.iter().cloned());
    cmdline.extend(extra_cmdline.iter().cloned());
    c.extend([
        "-m".into(),
        if profile.memory_mib > 0 {
            profile.memory_mib
        } else {
            memory_mib
        }
        .to_string(),
        "-smp".into(),
        profile.smp.max(1).to_string(),
        "-nodefaults".into(),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        cmdline.join(" "),
    ]);
    c
}

/// The virtio-9p shares of the mock profile: this machine's root read-only as `hostroot`
/// (../shared/recipes/qemu-in-rig.md), and `out` writable for results.
pub fn shares(out: &Path) -> Vec<String> {
    vec![
        "-virtfs".into(),
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap".into(),
        "-virtfs".into(),
        format!(
            "local,path={},mount_tag=out,security_model=none",
            out.display()
        ),
    ]
}

/// How a guest run ended.
#[derive(Debug)]
pub struct Run {
    /// Console lines.
    pub lines: Vec<String>,
    /// QEMU exited by itself (the guest rebooted or crashed QEMU) rather than being killed.
    pub exited: bool,
    /// The wall-clock limit was hit.
    pub timed_out: bool,
    /// Elapsed time.
    pub elapsed: Duration,
    /// Where the console log is.
    pub log: PathBuf,
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let pid = self.0.id() as i32;
        // SAFETY: signals QEMU's own process group (created with process_group(0)).
        unsafe { libc::killpg(pid, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// Runs `argv`, streaming the console to `log` and to `on_line`; stops early when `done`
/// returns true for a line (then QEMU is still given a moment to exit on its own).
pub fn run(
    argv: &[String],
    log: &Path,
    timeout: Duration,
    mut on_line: impl FnMut(&str),
    done: impl Fn(&str) -> bool,
) -> Result<Run> {
    let mut file = File::create(log).with_context(|| format!("create {}", log.display()))?;
    writeln!(file, "# {}", argv.join(" "))?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = KillOnDrop(
        cmd.spawn()
            .with_context(|| format!("cannot start {}", argv[0]))?,
    );
    let (tx, rx) = mpsc::channel::<String>();
    let out = child.0.stdout.take().context("stdout")?;
    let err = child.0.stderr.take().context("stderr")?;
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).split(b'\n').map_while(Result::ok) {
            let s = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_string();
            if tx.send(s).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx2.send(format!("qemu: {line}")).is_err() {
                break;
            }
        }
    });

    let start = Instant::now();
    let mut lines = Vec::new();
    let mut finished_at: Option<Instant> = None;
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Ok(Run {
                lines,
                exited: false,
                timed_out: true,
                elapsed: start.elapsed(),
                log: log.to_path_buf(),
            });
        }
        let wait = finished_at.map_or(left, |t| {
            Duration::from_secs(10)
                .saturating_sub(t.elapsed())
                .min(left)
        });
        match rx.recv_timeout(wait.min(Duration::from_millis(500))) {
            Ok(line) => {
                writeln!(file, "{line}")?;
                on_line(&line);
                if done(&line) {
                    finished_at.get_or_insert_with(Instant::now);
                }
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = child.0.wait();
                return Ok(Run {
                    lines,
                    exited: true,
                    timed_out: false,
                    elapsed: start.elapsed(),
                    log: log.to_path_buf(),
                });
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(t) = finished_at
                    && t.elapsed() >= Duration::from_secs(10)
                {
                    // Results are in but the guest did not power off: stop it.
                    return Ok(Run {
                        lines,
                        exited: false,
                        timed_out: false,
                        elapsed: start.elapsed(),
                        log: log.to_path_buf(),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_per_profile() {
        let p = profiles();
        assert_eq!(
            p.iter().map(|p| p.name).collect::<Vec<_>>(),
            [
                "mock",
                "vtd",
                "amdvi",
                "kvm",
                "kvm-noxsave",
                "vtd-fw",
                "vtd-fw-legacy",
                "amdvi-fw"
            ]
        );
        // The kvm profile: its own CPU model and memory, whatever the rig's default.
        let k = command_line(
            "q",
            Accel::Tcg,
            512,
            Path::new("/k"),
            Path::new("/i"),
            &p[3],
            &[],
        )
        .join(" ");
        assert!(
            k.contains("-cpu EPYC") && k.contains("-m 2048 -smp 1"),
            "{k}"
        );
        assert!(p[3].tcg_only && p[4].tcg_only && !p[0].tcg_only);
        let c = command_line(
            "qemu-system-x86_64",
            Accel::Tcg,
            512,
            Path::new("/k/bzImage"),
            Path::new("/i.cpio"),
            &p[1],
            &[],
        );
        let s = c.join(" ");
        assert!(s.starts_with("qemu-system-x86_64 -accel tcg -machine q35 -device intel-iommu,intremap=on,caching-mode=on -device edu"));
        let kvm = command_line(
            "q",
            Accel::Kvm,
            512,
            Path::new("k"),
            Path::new("i"),
            &p[1],
            &[],
        );
        assert!(kvm.join(" ").contains("-machine q35,kernel-irqchip=split"));
        assert!(s.contains("-no-reboot"));
        assert!(s.contains("-append console=ttyS0 panic=-1 oops=panic loglevel=4 intel_iommu=on livemig.profile=vtd"));
        // The vIOMMU comes before every PCI device.
        let iommu = c.iter().position(|a| a.starts_with("intel-iommu")).unwrap();
        let edu = c.iter().position(|a| a.starts_with("edu")).unwrap();
        assert!(iommu < edu);
        let k = command_line(
            "q",
            Accel::Kvm,
            512,
            Path::new("k"),
            Path::new("i"),
            &p[0],
            &["x=1".into()],
        );
        assert!(k.join(" ").contains("-accel kvm -cpu host -machine q35"));
        assert!(k.last().unwrap().ends_with("livemig.profile=mock x=1"));
        let mock = command_line(
            "q",
            Accel::Tcg,
            512,
            Path::new("k"),
            Path::new("i"),
            &p[0],
            &[],
        );
        assert!(
            !mock.iter().any(|a| a.contains("iommu,")),
            "mock has no vIOMMU"
        );
    }

    #[test]
    fn a_hanging_process_is_killed_at_the_timeout() {
        let dir = std::env::temp_dir().join(format!("xtask-qemu-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        let argv: Vec<String> = ["sh", "-c", "echo hello; exec sleep 600"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let r = run(&argv, &log, Duration::from_millis(700), |_| {}, |_| false).unwrap();
        assert!(r.timed_out && !r.exited);
        assert_eq!(r.lines, vec!["hello".to_string()]);
        assert!(std::fs::read_to_string(&log).unwrap().contains("hello"));
        let r = run(
            &argv[..1]
                .iter()
                .cloned()
                .chain(["-c".into(), "echo bye".into()])
                .collect::<Vec<_>>(),
            &log,
            Duration::from_secs(20),
            |_| {},
            |_| false,
        )
        .unwrap();
        assert!(r.exited && !r.timed_out);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
