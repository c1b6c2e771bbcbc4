//! `cargo xtask rig`: build a Linux kernel with iommufd, the iommufd selftest mock, VFIO and
//! mtty; boot it under QEMU for each machine profile with `hw-tests` as `/init`; report.
//!
//! Artifacts live under `<target>/rig/`: the extracted kernel source per package version, the
//! kernel cache keyed by package version and config-fragment hash (so it is reused across
//! runs), the initramfs, and one console log per profile.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::apt;
use crate::cpio::Cpio;
use crate::qemu::{self, Accel, Profile};

/// The kernel config fragment, merged onto `make tinyconfig`.
pub const KERNEL_FRAGMENT: &str = include_str!("../rig/kernel.config");

/// Where a kernel's source comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelSource {
    /// A Debian package the host installs (from its release's backports suite, see
    /// [`apt::NEEDS`]); the tarball is under `/usr/src`.
    Installed,
    /// A package of another Debian suite: downloaded with a private APT state under
    /// `<target>/rig/apt-<suite>` (the host's sources are not touched) and unpacked there.
    Downloaded {
        /// The suite, e.g. `trixie-backports`.
        suite: &'static str,
    },
}

/// One kernel of the rig's matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSpec {
    /// Its name in options, case lists (`@7.3`) and log names.
    pub name: &'static str,
    /// The `linux-source-*` package.
    pub package: &'static str,
    /// Where the package comes from.
    pub source: KernelSource,
    /// Fragment options this kernel no longer has, with where that is seen in its source: the
    /// check that every fragment option survived `olddefconfig` skips them here.
    pub absent: &'static [(&'static str, &'static str)],
}

/// The kernel matrix: what distributions ship (6.12) and the newest Debian packages (7.3).
pub const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        name: "6.12",
        package: "linux-source-6.12",
        source: KernelSource::Installed,
        absent: &[],
    },
    KernelSpec {
        name: "7.3",
        package: "linux-source-7.3",
        source: KernelSource::Downloaded {
            suite: "trixie-backports",
        },
        absent: &[(
            "CONFIG_PROC_SYSCTL",
            "folded into CONFIG_SYSCTL (7.3.4 fs/proc/Kconfig:83), which tinyconfig keeps on",
        )],
    },
];

/// The kernel named `name`.
pub fn kernel_spec(name: &str) -> Result<&'static KernelSpec> {
    KERNELS.iter().find(|k| k.name == name).with_context(|| {
        format!(
            "unknown kernel {name:?} (have: {})",
            KERNELS
                .iter()
                .map(|k| k.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}
const QEMU: &str = "qemu-system-x86_64";
const GUEST_MEMORY_MIB: u32 = 512;

/// Options of `cargo xtask rig`.
#[derive(Debug, Clone)]
pub struct Options {
    pub profiles: Vec<String>,
    /// Kernels of [`KERNELS`] to run on (empty: all).
    pub kernels: Vec<String>,
    pub accel: AccelChoice,
    pub keep_artifacts: bool,
    pub timeout: Duration,
    pub filter: Option<String>,
}

/// `--accel auto|kvm|tcg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => AccelChoice::Auto,
            "kvm" => AccelChoice::Kvm,
            "tcg" => AccelChoice::Tcg,
            other => bail!("--accel {other:?}: expected auto, kvm or tcg"),
        })
    }
}

/// FNV-1a 64 of the fragment: a stable content key for the kernel cache.
pub fn fragment_hash(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The options a fragment turns on (`CONFIG_X=y`) and off (`# CONFIG_X is not set`).
pub fn fragment_options(text: &str) -> (Vec<String>, Vec<String>) {
    let mut on = Vec::new();
    let mut off = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(opt) = line.strip_suffix("=y") {
            if opt.starts_with("CONFIG_") {
                on.push(opt.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("# ")
            && let Some(opt) = rest.strip_suffix(" is not set")
            && opt.starts_with("CONFIG_")
            && !opt.contains(' ')
        {
            off.push(opt.to_string());
        }
    }
    (on, off)
}

/// Options of the fragment that `.config` does not have as asked.
pub fn config_mismatches(fragment: &str, config: &str) -> Vec<String> {
    let (on, off) = fragment_options(fragment);
    let mut bad = Vec::new();
    for o in on {
        if !config.lines().any(|l| l == format!("{o}=y")) {
            bad.push(format!("{o}=y"));
        }
    }
    for o in off {
        if config.lines().any(|l| l.starts_with(&format!("{o}="))) {
            bad.push(format!("{o} unset"));
        }
    }
    bad
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn sh(cmd: &mut Command, log: &Path) -> Result<()> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let status = cmd
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        bail!(
            "{cmd:?} failed ({status}); log {}:\n{}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

fn package_version(pkg: &str) -> Result<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", pkg])
        .output()
        .context("cannot run dpkg-query")?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || v.is_empty() {
        bail!("package {pkg} is not installed");
    }
    Ok(v)
}

fn jobs() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// The source tarball and package version of `spec`, fetching it if needed.
fn kernel_tarball(rig: &Path, spec: &KernelSpec) -> Result<(PathBuf, String)> {
    let series = spec.package.trim_start_matches("linux-source-");
    match spec.source {
        KernelSource::Installed => Ok((
            PathBuf::from(format!("/usr/src/{}.tar.xz", spec.package)),
            package_version(spec.package)?,
        )),
        KernelSource::Downloaded { suite } => {
            let dir = rig.join("pkgs").join(spec.package);
            let tarball = dir.join(format!("linux-source-{series}.tar.xz"));
            let version_file = dir.join("version");
            if let (true, Ok(v)) = (tarball.exists(), std::fs::read_to_string(&version_file)) {
                return Ok((tarball, v.trim().to_string()));
            }
            let deb =
                apt::download_from_suite(spec.package, suite, &rig.join(format!("apt-{suite}")))?;
            let version = apt::deb_version(&deb)?;
            std::fs::create_dir_all(&dir)?;
            let log = rig.join("kernel-fetch.log");
            let member = format!("./usr/src/linux-source-{series}.tar.xz");
            sh(
                Command::new("sh").arg("-c").arg(format!(
                    "dpkg-deb --fsys-tarfile '{}' | tar -x -O '{member}' > '{}.partial'",
                    deb.display(),
                    tarball.display()
                )),
                &log,
            )?;
            std::fs::rename(tarball.with_extension("xz.partial"), &tarball)?;
            std::fs::write(&version_file, &version)?;
            let _ = std::fs::remove_file(&deb);
            Ok((tarball, version))
        }
    }
}

/// Builds the rig kernel `spec`, or returns the cached one.
pub fn kernel(rig: &Path, spec: &KernelSpec) -> Result<PathBuf> {
    let (tarball, version) = kernel_tarball(rig, spec)?;
    let key = format!("{version}-{:016x}", fragment_hash(KERNEL_FRAGMENT)).replace(['~', '+'], "_");
    let cached = rig.join("kernel").join(&key).join("bzImage");
    if cached.exists() {
        eprintln!("rig: kernel {} {key} (cached)", spec.name);
        return Ok(cached);
    }
    let start = Instant::now();
    let src = rig.join("linux").join(version.replace(['~', '+'], "_"));
    let log = rig.join(format!("kernel-build-{}.log", spec.name));
    let _ = std::fs::remove_file(&log);
    if !src.join("Makefile").exists() {
        eprintln!("rig: extracting {}", tarball.display());
        let tmp = src.with_extension("partial");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        sh(
            Command::new("tar")
                .arg("xf")
                .arg(&tarball)
                .arg("-C")
                .arg(&tmp)
                .arg("--strip-components=1"),
            &log,
        )?;
        std::fs::rename(&tmp, &src)?;
    }
    eprintln!(
        "rig: configuring kernel {} (tinyconfig + xtask/rig/kernel.config)",
        spec.name
    );
    let frag = rig.join("kernel.config");
    std::fs::write(&frag, KERNEL_FRAGMENT)?;
    sh(
        Command::new("make").arg("-C").arg(&src).arg("tinyconfig"),
        &log,
    )?;
    sh(
        Command::new(src.join("scripts/kconfig/merge_config.sh"))
            .current_dir(&src)
            .args(["-m", ".config"])
            .arg(&frag),
        &log,
    )?;
    sh(
        Command::new("make").arg("-C").arg(&src).arg("olddefconfig"),
        &log,
    )?;
    let config = std::fs::read_to_string(src.join(".config"))?;
    let bad: Vec<String> = config_mismatches(KERNEL_FRAGMENT, &config)
        .into_iter()
        .filter(|b| {
            !spec
                .absent
                .iter()
                .any(|(o, _)| b.split(['=', ' ']).next() == Some(*o))
        })
        .collect();
    if !bad.is_empty() {
        bail!(
            "kernel {}: these options did not survive olddefconfig (dependencies missing?): {}",
            spec.name,
            bad.join(", ")
        );
    }
    eprintln!(
        "rig: building kernel {} bzImage with {} jobs (log: {})",
        spec.name,
        jobs(),
        log.display()
    );
    sh(
        Command::new("make")
            .arg("-C")
            .arg(&src)
            .arg(format!("-j{}", jobs()))
            .arg("bzImage"),
        &log,
    )?;
    std::fs::create_dir_all(cached.parent().expect("has parent"))?;
    std::fs::copy(src.join("arch/x86/boot/bzImage"), &cached)?;
    std::fs::write(cached.with_file_name("config"), config)?;
    eprintln!("rig: kernel {} built in {:.0?}", spec.name, start.elapsed());
    Ok(cached)
}

/// Builds hw-tests and the `livemig` CLI as static binaries (glibc with crt-static: no new
/// rustup target needed); returns hw-tests' path ([`livemig_static`] has the other).
pub fn hw_tests_static() -> Result<PathBuf> {
    let triple = "x86_64-unknown-linux-gnu";
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("rig: building hw-tests (static)");
    let status = Command::new(&cargo)
        .current_dir(workspace_root())
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "hw-tests",
            "--bin",
            "hw-tests",
            "-p",
            "livemig-cli",
            "--bin",
            "livemig",
            "--target",
            triple,
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .status()
        .with_context(|| format!("cannot run {cargo}"))?;
    if !status.success() {
        bail!("building hw-tests failed ({status})");
    }
    for name in ["hw-tests", "livemig"] {
        let bin = target_dir().join(triple).join("release").join(name);
        let bytes = std::fs::read(&bin).with_context(|| format!("read {}", bin.display()))?;
        if has_interp(&bytes) {
            bail!(
                "{} is dynamically linked (PT_INTERP present)",
                bin.display()
            );
        }
    }
    Ok(target_dir().join(triple).join("release").join("hw-tests"))
}

/// The static `livemig` binary [`hw_tests_static`] built.
pub fn livemig_static() -> PathBuf {
    target_dir()
        .join("x86_64-unknown-linux-gnu")
        .join("release")
        .join("livemig")
}

/// Whether an ELF64 file has a PT_INTERP program header (a dynamic loader).
pub fn has_interp(elf: &[u8]) -> bool {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().expect("8 bytes")) as usize;
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        at + 4 <= elf.len() && u32::from_le_bytes(elf[at..at + 4].try_into().expect("4")) == 3
    })
}

/// The initramfs: `/init` (hw-tests), `/dev/console` for its output, mount points, and any
/// extra files (`(path, contents)`; those under `bin/` are executable).
pub fn initramfs(init: &[u8], extra: &[(&str, &[u8])]) -> Vec<u8> {
    let mut c = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "tmp"] {
        c.dir(d);
    }
    c.char_dev("dev/console", 5, 1);
    c.file("init", 0o755, init);
    for (path, data) in extra {
        c.file(
            path,
            if path.starts_with("bin/") {
                0o755
            } else {
                0o644
            },
            data,
        );
    }
    c.finish()
}

/// One profile's parsed results.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub failures: Vec<String>,
    /// The closing `N passed, N failed` line was seen.
    pub complete: bool,
    /// The case announced last without a result (where a hang or crash happened).
    pub last_started: Option<String>,
    /// The last case that reported a result.
    pub last_finished: Option<String>,
    /// The kernel panicked.
    pub panicked: bool,
    /// Every case that reported a result, with its verdict.
    pub results: Vec<(String, Verdict)>,
}

/// A case's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Passed.
    Ok,
    /// Skipped (with a reason on the console).
    Skip,
    /// Failed.
    Fail,
}

/// The committed list of cases a profile must run on `kernel`
/// (`xtask/rig/cases/<profile>.txt`): every line is a case name, optionally followed by the
/// kernels it runs on (`name @7.3`); a line without kernels applies to all of them.
pub fn case_list(profile: &str, kernel: &str) -> Result<Vec<String>> {
    let path = workspace_root()
        .join("xtask/rig/cases")
        .join(format!("{profile}.txt"));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the case list {}", path.display()))?;
    cases_for(&text, kernel).with_context(|| format!("in {}", path.display()))
}

/// The cases of a case-list text that apply to `kernel`.
pub fn cases_for(text: &str, kernel: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for l in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let mut words = l.split_whitespace();
        let name = words.next().expect("a non-empty line has a word");
        let mut kernels = Vec::new();
        for w in words {
            let k = w.strip_prefix('@').with_context(|| {
                format!("{l:?}: expected @KERNEL after the case name, got {w:?}")
            })?;
            kernel_spec(k).with_context(|| format!("{l:?}"))?;
            kernels.push(k);
        }
        if kernels.is_empty() || kernels.contains(&kernel) {
            out.push(name.to_string());
        }
    }
    Ok(out)
}

/// Compares what a profile ran with its committed list: a case missing or extra is a
/// problem, and so is a skipped one when `strict` (under `CI=true`).
pub fn check_cases(
    expected: &[String],
    results: &[(String, Verdict)],
    strict: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    for e in expected {
        if !results.iter().any(|(n, _)| n == e) {
            problems.push(format!("case {e} did not run"));
        }
    }
    for (n, v) in results {
        if !expected.contains(n) {
            problems.push(format!("case {n} is not in the committed list"));
        }
        if strict && *v == Verdict::Skip {
            problems.push(format!("case {n} was skipped (not allowed under CI=true)"));
        }
    }
    problems
}

/// Parses hw-tests' console lines.
pub fn parse(lines: &[String]) -> Outcome {
    let mut o = Outcome::default();
    let tag = "[hw-tests] ";
    for line in lines {
        if line.contains("Kernel panic") {
            o.panicked = true;
        }
        let Some(rest) = line.find(tag).map(|i| &line[i + tag.len()..]) else {
            continue;
        };
        if let Some(name) = rest.strip_prefix("run ") {
            o.last_started = Some(name.to_string());
        } else if rest.starts_with("ok ") || rest.starts_with("skip ") || rest.starts_with("FAIL ")
        {
            if let Some(done) = o.last_started.take() {
                o.last_finished = Some(done);
            }
            if let Some(why) = rest.strip_prefix("FAIL ") {
                o.failures.push(why.to_string());
            }
            let (verdict, body) = if let Some(b) = rest.strip_prefix("ok ") {
                (Verdict::Ok, b)
            } else if let Some(b) = rest.strip_prefix("skip ") {
                (Verdict::Skip, b)
            } else {
                (Verdict::Fail, &rest[5..])
            };
            let name = body
                .split(|c: char| c == ':' || c.is_whitespace())
                .next()
                .unwrap_or(body);
            o.results.push((name.to_string(), verdict));
        } else if let Some((p, f)) = rest.split_once(" passed, ") {
            if let (Ok(p), Some(Ok(f))) = (
                p.trim().parse::<usize>(),
                f.strip_suffix(" failed").map(|x| x.trim().parse::<usize>()),
            ) {
                o.passed = p;
                o.failed = f;
                o.complete = true;
            }
        } else if let Some(n) = rest.strip_suffix(" skipped") {
            o.skipped = n.trim().parse().unwrap_or(0);
        }
    }
    o
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Boots the rig kernel under KVM with a probe init that only prints a marker; KVM is used
/// only if the marker appears within a short timeout (a KVM guest was seen to hang here).
fn probe_kvm(kernel: &Path, initrd: &Path, logs: &Path) -> bool {
    if !kvm_usable() {
        eprintln!("rig: /dev/kvm not usable, using TCG");
        return false;
    }
    let p = qemu::profiles().remove(0);
    let argv = qemu::command_line(
        QEMU,
        Accel::Kvm,
        GUEST_MEMORY_MIB,
        kernel,
        initrd,
        &p,
        &["livemig.probe=1".into()],
    );
    let ok = qemu::run(
        &argv,
        &logs.join("kvm-probe.log"),
        Duration::from_secs(15),
        |_| {},
        |l| l.contains("[hw-tests] probe ok"),
    )
    .map(|r| r.lines.iter().any(|l| l.contains("[hw-tests] probe ok")))
    .unwrap_or(false);
    eprintln!(
        "rig: KVM probe {}",
        if ok {
            "booted: using KVM"
        } else {
            "did not boot within 15 s: using TCG"
        }
    );
    ok
}

/// Runs the rig; returns Err if anything failed.
pub fn rig(opts: &Options) -> Result<()> {
    let start = Instant::now();
    let all = qemu::profiles();
    let chosen: Vec<&Profile> = if opts.profiles.is_empty() {
        all.iter().collect()
    } else {
        opts.profiles
            .iter()
            .map(|n| {
                all.iter().find(|p| p.name == n).with_context(|| {
                    format!(
                        "unknown profile {n:?} (have: {})",
                        all.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
                    )
                })
            })
            .collect::<Result<_>>()?
    };
    apt::ensure_prerequisites()?;
    let rig = target_dir().join("rig");
    let logs = rig.join("logs");
    std::fs::create_dir_all(&logs)?;
    let kernels: Vec<&KernelSpec> = if opts.kernels.is_empty() {
        KERNELS.iter().collect()
    } else {
        opts.kernels
            .iter()
            .map(|k| kernel_spec(k))
            .collect::<Result<_>>()?
    };
    let mut images = Vec::new();
    for spec in &kernels {
        images.push((*spec, kernel(&rig, spec)?));
    }
    let init = std::fs::read(hw_tests_static()?)?;
    let cli = std::fs::read(livemig_static())?;
    let initrd = rig.join("initramfs.cpio");
    std::fs::write(&initrd, initramfs(&init, &[("bin/livemig", &cli)]))?;

    let accel = match opts.accel {
        AccelChoice::Tcg => Accel::Tcg,
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Auto => {
            if probe_kvm(&images[0].1, &initrd, &logs) {
                Accel::Kvm
            } else {
                Accel::Tcg
            }
        }
    };

    let mut total = (0usize, 0usize, 0usize);
    let mut problems = Vec::new();
    for (spec, kernel) in &images {
        for p in &chosen {
            let kname = spec.name;
            let accel = if p.tcg_only { Accel::Tcg } else { accel };
            if case_list(p.name, kname)?.is_empty() {
                // A profile the matrix runs on other kernels only (kvm-noxsave: one CPU model
                // on one kernel, to fit the budget).
                eprintln!(
                    "rig: profile {} on {kname}: no case is listed for this kernel; not booted",
                    p.name
                );
                continue;
            }
            eprintln!("rig: profile {} on {kname} ({})", p.name, accel.name());
            let mut extra = Vec::new();
            if let Some(f) = &opts.filter {
                extra.push(format!("livemig.filter={f}"));
            }
            let mut argv =
                qemu::command_line(QEMU, accel, GUEST_MEMORY_MIB, kernel, &initrd, p, &extra);
            if p.name == "mock" {
                // QEMU as a migration peer inside the guest (hw-tests qemu_peer): this machine's
                // root, read-only, so the guest runs the very QEMU and libraries installed here,
                // and a writable directory for the files it writes (kept as fixtures).
                let out = rig.join("out");
                std::fs::create_dir_all(&out)?;
                argv.extend(qemu::shares(&out));
            }
            let log = logs.join(format!("{}-{kname}.log", p.name));
            if opts.keep_artifacts {
                eprintln!("rig: {}", argv.join(" "));
            }
            let name = p.name;
            let run = qemu::run(
                &argv,
                &log,
                opts.timeout,
                |line| {
                    if let Some(i) = line.find("[hw-tests] ") {
                        let rest = &line[i + 11..];
                        if !rest.starts_with("run ") {
                            eprintln!("  {name}@{kname}: {rest}");
                        }
                    }
                },
                |line| {
                    line.contains("[hw-tests] ")
                        && line.ends_with(" failed")
                        && line.contains(" passed, ")
                },
            )?;
            let o = parse(&run.lines);
            total.0 += o.passed;
            total.1 += o.failed;
            total.2 += o.skipped;
            let whence = |what: &str| {
                format!(
                    "profile {name} on {kname}: {what}{}; console log {}",
                    match (&o.last_started, &o.last_finished) {
                        (Some(c), _) => format!(" (during case {c})"),
                        (None, Some(c)) => format!(" (after case {c})"),
                        (None, None) => " (before the first case)".to_string(),
                    },
                    run.log.display()
                )
            };
            if run.timed_out && !o.complete {
                problems.push(whence(&format!(
                    "no result within {:?}: guest hung, QEMU killed",
                    opts.timeout
                )));
                total.1 += 1;
            } else if !o.complete {
                let what = if o.panicked {
                    "the guest kernel panicked before hw-tests finished"
                } else if run.exited {
                    "the guest stopped before hw-tests printed its results"
                } else {
                    "QEMU had to be stopped before hw-tests printed its results"
                };
                problems.push(whence(what));
                total.1 += 1;
            } else if o.failed > 0 {
                problems.push(format!(
                    "profile {name} on {kname}: {} failed: {}; console log {}",
                    o.failed,
                    o.failures.join("; "),
                    run.log.display()
                ));
            }
            if opts.filter.is_none() && o.complete {
                let strict = std::env::var("CI").is_ok_and(|v| v == "true");
                let listed = check_cases(&case_list(name, kname)?, &o.results, strict);
                if !listed.is_empty() {
                    total.1 += 1;
                    problems.push(format!(
                        "profile {name} on {kname}: {} (xtask/rig/cases/{name}.txt)",
                        listed.join("; ")
                    ));
                }
            }
            eprintln!(
                "rig: profile {name} on {kname}: {} passed, {} failed, {} skipped in {:.1?}",
                o.passed, o.failed, o.skipped, run.elapsed
            );
        }
    }
    if !opts.keep_artifacts {
        let _ = std::fs::remove_file(&initrd);
    }
    // The KVM test guest's image, booted by QEMU's own multiboot loader: the same image
    // livemig-kvm runs, so QEMU can run the identical workload.
    match guest_under_qemu(&rig, accel, &logs) {
        Ok(()) => {
            eprintln!("rig: ok guest.multiboot_under_qemu ({})", accel.name());
            total.0 += 1;
        }
        Err(e) => {
            problems.push(format!("guest.multiboot_under_qemu: {e:#}"));
            total.1 += 1;
        }
    }
    eprintln!("rig: finished in {:.0?}", start.elapsed());
    for p in &problems {
        eprintln!("rig: {p}");
    }
    println!("{} passed, {} failed", total.0, total.1);
    if total.1 > 0 || !problems.is_empty() {
        bail!("the conformance rig failed");
    }
    Ok(())
}

/// Boots the KVM test guest's image (`livemig vm image`) under QEMU's multiboot loader and
/// waits for the guest to report that it ran its workload over its whole working set.
fn guest_under_qemu(rig: &Path, accel: Accel, logs: &Path) -> Result<()> {
    let image = rig.join("guest.bin");
    let status = Command::new(livemig_static())
        .args(["vm", "image", "--output"])
        .arg(&image)
        .status()
        .context("running livemig vm image")?;
    if !status.success() {
        bail!("livemig vm image failed ({status})");
    }
    let argv: Vec<String> = [
        QEMU,
        "-accel",
        accel.name(),
        "-cpu",
        "qemu64",
        "-m",
        "64",
        "-nographic",
        "-no-reboot",
        "-kernel",
        &image.display().to_string(),
        "-append",
        "cpus=1 pages=256 period=0",
        "-device",
        "isa-debugcon,iobase=0xe9,chardev=d",
        "-chardev",
        "stdio,id=d",
        "-monitor",
        "none",
        "-serial",
        "none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let run = qemu::run(
        &argv,
        &logs.join("guest.log"),
        Duration::from_secs(60),
        |_| {},
        |line| line.contains("wrote its working set once"),
    )?;
    let text = run.lines.join("\n");
    for want in [
        "livemig-guest: 1 cpu(s), 256 pages each",
        "cpu0 wrote its working set once",
    ] {
        if !text.contains(want) {
            bail!(
                "QEMU's console lacks {want:?} (log {})",
                logs.join("guest.log").display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_case_list_catches_missing_extra_and_skipped_cases() {
        let lines: Vec<String> = [
            "[hw-tests] run a.one",
            "[hw-tests] ok a.one",
            "[hw-tests] run a.two",
            "[hw-tests] skip a.two: no device",
            "[hw-tests] run a.new",
            "[hw-tests] FAIL a.new: broke",
            "[hw-tests] 1 passed, 1 failed",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let o = parse(&lines);
        assert_eq!(
            o.results,
            [
                ("a.one".to_string(), Verdict::Ok),
                ("a.two".to_string(), Verdict::Skip),
                ("a.new".to_string(), Verdict::Fail)
            ]
        );
        let list = vec![
            "a.one".to_string(),
            "a.two".to_string(),
            "a.gone".to_string(),
        ];
        let p = check_cases(&list, &o.results, false);
        assert_eq!(
            p,
            [
                "case a.gone did not run",
                "case a.new is not in the committed list"
            ]
        );
        let p = check_cases(&list, &o.results, true);
        assert!(p.contains(&"case a.two was skipped (not allowed under CI=true)".to_string()));
        for profile in ["mock", "vtd", "amdvi", "kvm"] {
            for k in KERNELS {
                assert!(!case_list(profile, k.name).unwrap().is_empty(), "{profile}");
            }
        }
        let text = "a.all\nb.new @7.3\nc.old @6.12\n# comment\nd.both @6.12 @7.3\n";
        assert_eq!(
            cases_for(text, "6.12").unwrap(),
            ["a.all", "c.old", "d.both"]
        );
        assert_eq!(
            cases_for(text, "7.3").unwrap(),
            ["a.all", "b.new", "d.both"]
        );
        let e = cases_for("x @9.9\n", "7.3").unwrap_err();
        assert!(format!("{e:#}").contains("unknown kernel \"9.9\""), "{e:#}");
        let e = cases_for("x 7.3\n", "7.3").unwrap_err();
        assert!(format!("{e:#}").contains("expected @KERNEL"), "{e:#}");
    }

    #[test]
    fn fragment_options_and_mismatches() {
        let (on, off) = fragment_options(KERNEL_FRAGMENT);
        assert!(on.contains(&"CONFIG_IOMMUFD_TEST".to_string()));
        assert!(on.contains(&"CONFIG_SAMPLE_VFIO_MDEV_MTTY".to_string()));
        assert!(off.contains(&"CONFIG_MODULES".to_string()));
        assert!(off.contains(&"CONFIG_VFIO_CONTAINER".to_string()));
        let bad = config_mismatches(
            "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n",
            "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\n",
        );
        assert_eq!(
            bad,
            vec!["CONFIG_B=y".to_string(), "CONFIG_C unset".to_string()]
        );
        assert_ne!(fragment_hash("a"), fragment_hash("b"));
    }

    #[test]
    fn results_are_parsed_including_hangs() {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = parse(&l(&[
            "[    1.0] some kernel line",
            "[hw-tests] run a",
            "[hw-tests] ok a",
            "[hw-tests] run b",
            "[hw-tests] FAIL b: boom",
            "[hw-tests] run c",
            "[hw-tests] skip c: no device",
            "[hw-tests] 1 skipped",
            "[hw-tests] 1 passed, 1 failed",
        ]));
        assert_eq!((o.passed, o.failed, o.skipped, o.complete), (1, 1, 1, true));
        assert_eq!(o.failures, vec!["b: boom".to_string()]);
        assert_eq!(o.last_started, None);
        assert_eq!(o.last_finished.as_deref(), Some("c"));
        let hung = parse(&l(&[
            "[hw-tests] run a",
            "[hw-tests] ok a",
            "[hw-tests] run slow",
        ]));
        assert!(!hung.complete);
        assert_eq!(hung.last_started.as_deref(), Some("slow"));
        let panic = parse(&l(&[
            "[hw-tests] run x",
            "Kernel panic - not syncing: Attempted to kill init!",
        ]));
        assert!(panic.panicked && !panic.complete);
    }

    #[test]
    fn initramfs_has_init_and_console() {
        let a = initramfs(b"\x7fELF", &[("lab.toml", b"x")]);
        let s = String::from_utf8_lossy(&a);
        assert!(s.contains("dev/console") && s.contains("init") && s.contains("lab.toml"));
    }

    #[test]
    fn static_check_reads_program_headers() {
        // A minimal ELF64 header with one PT_INTERP program header.
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[32..40].copy_from_slice(&64u64.to_le_bytes());
        elf[54..56].copy_from_slice(&56u16.to_le_bytes());
        elf[56..58].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&3u32.to_le_bytes());
        assert!(has_interp(&elf));
        elf[64..68].copy_from_slice(&1u32.to_le_bytes());
        assert!(!has_interp(&elf));
    }
}
