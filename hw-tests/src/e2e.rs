//! Whole migrations through the engine against the rig kernel: `livemig host incoming` and
//! `livemig host migrate` as two processes over loopback TCP, each side with two mtty
//! devices (VFIO migration v2, P2P, PRE_COPY, device DMA logging) and guest RAM in an iommufd
//! IOAS, the source with the selftest mock device as an IOMMU-tracked DMA endpoint (its
//! writes are visible only through the dirty HWPT's bits, set by `IOMMU_TEST_OP_DIRTY`) and a
//! writer thread as the vCPU.
//!
//! Guest RAM is a shared file on each side, so after both processes exited the case compares
//! them page by page, and reopens the destination mdevs to read the UART registers the source
//! devices were programmed with. Fault cases kill or break the destination at exact protocol
//! points (the binary's hidden `--x-` options) and check the source's documented rule. Named
//! negative controls show the checks can fail.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use livemig_iommufd::{AutoDomains, Iommufd};
use livemig_vfio::{DeviceLocator, VfioDevice};
use serde_json::Value;

use crate::harness::{Outcome, Runner};
use crate::mtty::{set_uart, uart};
use crate::util::{Mdev, wait};
use crate::{check_eq, trace};

const LIVEMIG: &str = "/bin/livemig";
const DIR: &str = "/run/e2e";
/// Guest RAM: inside the mock domain's aperture (16 MiB .. 2 GiB), IOVA = GPA.
const RAM: &str = "32MiB@16MiB";
const RAM_BASE: u64 = 16 << 20;
const RAM_SIZE: u64 = 32 << 20;
const PAGE: u64 = 4096;

impl Mdev {
    /// Opens the device on its own iommufd for region access (the livemig processes must
    /// not hold it then: a VFIO cdev is opened once).
    fn with<T>(&self, f: impl FnOnce(&VfioDevice) -> Result<T>) -> Result<T> {
        let fd = Iommufd::open()?;
        let mut auto = AutoDomains::new(fd.alloc_ioas()?);
        let dev = VfioDevice::open(DeviceLocator::default().mdev_cdev(&self.uuid)?)?;
        let id = dev.bind_iommufd(fd.as_fd())?;
        auto.attach(&fd.probe_device(id), |pt| {
            dev.attach_pt(pt).map_err(std::io::Error::from)
        })?;
        let r = f(&dev);
        drop(dev);
        r
    }
}

/// Two source and two destination mtty-2 devices; the sources programmed with distinctive
/// UART states, the destinations with another.
struct Pairs {
    src: Vec<Mdev>,
    dst: Vec<Mdev>,
    want: Vec<[u8; 4]>,
}

const SRC_UART: [([u8; 2], [u8; 2]); 2] =
    [([0x5a, 0xa5], [0x1b, 0x0b]), ([0x3c, 0xc3], [0x1a, 0x0a])];
const DST_UART: ([u8; 2], [u8; 2]) = ([0x11, 0x22], [0x03, 0x03]);

fn pairs(dst_type: &str) -> Result<Pairs> {
    let mut p = Pairs {
        src: Vec::new(),
        dst: Vec::new(),
        want: Vec::new(),
    };
    for (scr, lcr) in SRC_UART {
        let m = Mdev::create("mtty-2")?;
        p.want.push(m.with(|d| {
            set_uart(d, scr, lcr)?;
            uart(d)
        })?);
        p.src.push(m);
        let d = Mdev::create(dst_type)?;
        d.with(|dev| {
            if dst_type == "mtty-2" {
                set_uart(dev, DST_UART.0, DST_UART.1)?;
            } else {
                let r = dev.region_info(0)?;
                dev.write_region(&r, 7, &[DST_UART.0[0]])?;
            }
            Ok(())
        })?;
        p.dst.push(d);
    }
    Ok(p)
}

impl Pairs {
    fn dest_uarts(&self) -> Result<Vec<[u8; 4]>> {
        self.dst.iter().map(|d| d.with(uart)).collect()
    }

    /// Port 0's scratch and line-control registers (every mtty type has port 0).
    fn dest_port0(&self) -> Result<Vec<[u8; 2]>> {
        self.dst
            .iter()
            .map(|d| {
                d.with(|dev| {
                    let r = dev.region_info(0)?;
                    let mut b = [0u8; 2];
                    dev.read_region(&r, 7, &mut b[..1])?;
                    dev.read_region(&r, 3, &mut b[1..])?;
                    Ok(b)
                })
            })
            .collect()
    }
}

/// Guest RAM files: the source's holds a pattern in every page (so the transfer moves real
/// data), the destination's another (so pages never written stay wrong and are caught).
fn ram_files() -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(DIR)?;
    let src = Path::new(DIR).join("src.ram");
    let dst = Path::new(DIR).join("dst.ram");
    let mut s = vec![0u8; RAM_SIZE as usize];
    for (i, page) in s.chunks_mut(PAGE as usize).enumerate() {
        // Every eighth page stays zero (the zero-page path).
        if i % 8 == 7 {
            continue;
        }
        page.fill((i % 251) as u8 | 1);
        page[..8].copy_from_slice(&(RAM_BASE + i as u64 * PAGE).to_le_bytes());
    }
    std::fs::write(&src, &s)?;
    std::fs::write(&dst, vec![0xeeu8; RAM_SIZE as usize])?;
    for f in ["src.json", "dst.json"] {
        let _ = std::fs::remove_file(Path::new(DIR).join(f));
    }
    Ok((src, dst))
}

/// Page-by-page comparison: `None` when equal, else the first differing GPA and how many
/// pages differ.
fn ram_diff(a: &Path, b: &Path) -> Result<Option<(u64, usize)>> {
    let a = std::fs::read(a).with_context(|| format!("reading {}", a.display()))?;
    let b = std::fs::read(b).with_context(|| format!("reading {}", b.display()))?;
    ensure!(a.len() == b.len(), "RAM files differ in size");
    let mut first = None;
    let mut n = 0;
    for (i, (x, y)) in a
        .chunks(PAGE as usize)
        .zip(b.chunks(PAGE as usize))
        .enumerate()
    {
        if x != y {
            if first.is_none() {
                let at = x.iter().zip(y).position(|(p, q)| p != q).unwrap_or(0) & !15;
                trace!(
                    "first differing page {:#x} at +{at:#x}: source {:02x?}, destination {:02x?}",
                    RAM_BASE + i as u64 * PAGE,
                    &x[at..at + 16],
                    &y[at..at + 16]
                );
            }
            first.get_or_insert(RAM_BASE + i as u64 * PAGE);
            n += 1;
        }
    }
    Ok(first.map(|f| (f, n)))
}

/// A run of both processes.
struct Run {
    src_ok: bool,
    dst_ok: bool,
    src: Value,
    dst: Value,
    src_err: String,
    dst_err: String,
    /// The destination was killed by the case (on a source event).
    killed: bool,
}

#[derive(Default)]
struct Opts<'a> {
    src: &'a [&'a str],
    dst: &'a [&'a str],
    /// Kill the destination when the source prints an event line containing this.
    kill_on: Option<&'a str>,
    /// Destination devices (default: as many as the source).
    dst_devices: Option<usize>,
    /// vCPU stand-in writes per second (default 1500).
    cpu_rate: Option<&'a str>,
    /// Mock-device DMA writes per second (default 400).
    dma_rate: Option<&'a str>,
}

fn spawn_reader(
    r: impl Read + Send + 'static,
) -> (Arc<Mutex<String>>, std::thread::JoinHandle<()>) {
    let out = Arc::new(Mutex::new(String::new()));
    let o = Arc::clone(&out);
    let t = std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(|l| l.ok()) {
            if let Ok(mut s) = o.lock() {
                s.push_str(&line);
                s.push('\n');
            }
        }
    });
    (out, t)
}

fn read_json(name: &str) -> Value {
    std::fs::read(Path::new(DIR).join(name))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

fn run(p: &Pairs, o: &Opts<'_>) -> Result<Run> {
    let (src_ram, dst_ram) = ram_files()?;
    let devs = |v: &[Mdev], n: usize| -> Vec<String> {
        v.iter()
            .take(n)
            .flat_map(|m| ["--device".to_string(), m.uuid.clone()])
            .collect()
    };
    let mut dst = Command::new(LIVEMIG)
        .args([
            "host",
            "incoming",
            "--listen",
            "127.0.0.1:0",
            "--plain",
            "--ram",
            RAM,
        ])
        .arg("--mem-file")
        .arg(&dst_ram)
        .arg("--report")
        .arg(Path::new(DIR).join("dst.json"))
        .arg("--save-again")
        .args(devs(&p.dst, o.dst_devices.unwrap_or(p.dst.len())))
        .args(o.dst)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting livemig host incoming")?;
    let mut line = String::new();
    let mut dst_out = BufReader::new(dst.stdout.take().context("piped")?);
    dst_out.read_line(&mut line)?;
    // Keep reading what it prints later (a closed pipe would fail its printing).
    let (_dst_stdout, dst_out_t) = spawn_reader(dst_out);
    let (dst_err, dst_t) = spawn_reader(dst.stderr.take().context("piped")?);
    let Some(addr) = line.trim().strip_prefix("listening on ") else {
        let _ = dst.kill();
        let _ = dst.wait();
        let _ = dst_t.join();
        bail!(
            "the destination said {line:?}; stderr: {}",
            dst_err.lock().map(|s| s.clone()).unwrap_or_default()
        );
    };
    let mut src = Command::new(LIVEMIG)
        .args([
            "host",
            "migrate",
            "--to",
            addr,
            "--plain",
            "--ram",
            RAM,
            "--mock-dma",
        ])
        .args(["--dma-rate", o.dma_rate.unwrap_or("400")])
        .args(["--cpu-rate", o.cpu_rate.unwrap_or("1500")])
        .args(["--events", "--save-again"])
        .arg("--mem-file")
        .arg(&src_ram)
        .arg("--report")
        .arg(Path::new(DIR).join("src.json"))
        .args(devs(&p.src, p.src.len()))
        .args(o.src)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting livemig host migrate")?;
    let src_stderr = src.stderr.take().context("piped")?;
    let dst_pid = dst.id();
    let kill_on = o.kill_on.map(str::to_string);
    let src_log = Arc::new(Mutex::new(String::new()));
    let log = Arc::clone(&src_log);
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let k = Arc::clone(&killed);
    let src_t = std::thread::spawn(move || {
        for l in BufReader::new(src_stderr).lines().map_while(|l| l.ok()) {
            if kill_on.as_deref().is_some_and(|w| l.contains(w))
                && !k.swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                // SAFETY: kill(2) of our own child process; no memory is involved.
                unsafe {
                    libc::kill(dst_pid as libc::pid_t, libc::SIGKILL);
                }
            }
            if let Ok(mut s) = log.lock() {
                s.push_str(&l);
                s.push('\n');
            }
        }
    });
    let src_ok = wait(&mut src, "livemig host migrate", Duration::from_secs(120));
    if src_ok.is_err() {
        let _ = dst.kill();
    }
    // The destination ends soon after the source (its link closes); one that does not is
    // killed and counts as failed.
    let dst_ok = wait(&mut dst, "livemig host incoming", Duration::from_secs(30)).or_else(|e| {
        trace!("{e:#}");
        Ok::<bool, anyhow::Error>(false)
    });
    let _ = src_t.join();
    let _ = dst_t.join();
    let _ = dst_out_t.join();
    let r = Run {
        src_ok: src_ok?,
        dst_ok: dst_ok?,
        src: read_json("src.json"),
        dst: read_json("dst.json"),
        src_err: src_log.lock().map(|s| s.clone()).unwrap_or_default(),
        dst_err: dst_err.lock().map(|s| s.clone()).unwrap_or_default(),
        killed: killed.load(std::sync::atomic::Ordering::SeqCst),
    };
    trace!(
        "source: ok {} outcome {} error {}; destination: ok {} outcome {} error {}",
        r.src_ok, r.src["outcome"], r.src["error"], r.dst_ok, r.dst["outcome"], r.dst["error"]
    );
    // Every e2e case, failed or not: the VM runs on one host, or on none with the reason said.
    one_host(&r.src, &r.dst, r.killed).with_context(|| r.context())?;
    Ok(r)
}

/// The two processes' engine decisions (`runs` in their reports): never both `here`; when
/// neither runs, one of them says why (or the case killed the destination).
fn one_host(src: &Value, dst: &Value, killed: bool) -> Result<()> {
    let runs = |v: &Value| v["runs"]["runs"].as_str().unwrap_or("absent").to_string();
    let why = |v: &Value| v["runs"]["why"].as_str().unwrap_or("").to_string();
    let (s, d) = (runs(src), runs(dst));
    ensure!(
        !(s == "here" && d == "here"),
        "the VM runs on both hosts (source: {}; destination: {})",
        why(src),
        why(dst)
    );
    if s != "here" && d != "here" {
        ensure!(
            killed || !why(src).is_empty() || !why(dst).is_empty(),
            "the VM runs on neither host (source {s}, destination {d}) and neither says why"
        );
    }
    Ok(())
}

impl Run {
    fn context(&self) -> String {
        format!(
            "source stderr:\n{}\ndestination stderr:\n{}",
            tail(&self.src_err),
            tail(&self.dst_err)
        )
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

fn no_fd_leak(side: &Value, name: &str) -> Result<()> {
    let (b, a) = (&side["fds_before"], &side["fds_after"]);
    ensure!(
        b.is_u64() && b == a,
        "{name}: {a} file descriptors open after the migration, {b} before (leak)"
    );
    Ok(())
}

/// The checks of a successful migration; `Err` names the first that failed.
fn verify_success(p: &Pairs, r: &Run) -> Result<()> {
    ensure!(r.src_ok && r.dst_ok, "a side failed\n{}", r.context());
    check_eq!(r.src["outcome"], "migrated");
    check_eq!(r.src["writer_error"], Value::Null);
    check_eq!(r.dst["outcome"], "running");
    let (src_ram, dst_ram) = (
        Path::new(DIR).join("src.ram"),
        Path::new(DIR).join("dst.ram"),
    );
    if let Some((gpa, n)) = ram_diff(&src_ram, &dst_ram)? {
        bail!("destination RAM differs from the source's in {n} page(s), first at GPA {gpa:#x}");
    }
    let sdev = r.src["devices"].as_array().context("source devices")?;
    let ddev = r.dst["devices"].as_array().context("destination devices")?;
    check_eq!(sdev.len(), ddev.len());
    for (i, (s, d)) in sdev.iter().zip(ddev).enumerate() {
        let (a, b) = (&s["saved_again"], &d["saved_again"]);
        ensure!(
            a.as_str().is_some_and(|x| !x.is_empty()),
            "device {i}: no saved state from the source"
        );
        ensure!(
            a == b,
            "device {i}: the destination's state saved again differs from the source's\n source {a}\n dest   {b}"
        );
        check_eq!(d["state"], "RUNNING", "destination device {i}");
        check_eq!(s["state"], "STOP", "source device {i} after the handover");
    }
    let got = p.dest_uarts()?;
    for (i, (g, w)) in got.iter().zip(&p.want).enumerate() {
        ensure!(
            g == w,
            "destination device {i}: UART registers {g:02x?}, the source held {w:02x?}"
        );
    }
    no_fd_leak(&r.src, "source")?;
    no_fd_leak(&r.dst, "destination")?;
    Ok(())
}

fn tracking(r: &Run) -> HashMap<String, String> {
    r.src["report"]["tracking"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| Some((e[0].as_str()?.to_string(), e[1].as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// The source's rule after a failure before End: it runs again (writers write, devices read
/// RUNNING back from the kernel), its RAM outside the writers' ranges is what it was, and no
/// descriptor leaked; the destination (if it lived) reset its devices.
fn verify_recovered(r: &Run, phases: &[&str]) -> Result<()> {
    ensure!(!r.src_ok, "the source reported success\n{}", r.context());
    check_eq!(r.src["outcome"], "recovered", "{}", r.context());
    let phase = r.src["error_phase"].as_str().unwrap_or("");
    ensure!(
        phases.iter().any(|p| phase.starts_with(p)),
        "failed in {phase:?}, expected one of {phases:?}: {}",
        r.src["error"]
    );
    for (i, d) in r.src["devices"]
        .as_array()
        .context("devices")?
        .iter()
        .enumerate()
    {
        check_eq!(d["state"], "RUNNING", "source device {i} after recovery");
    }
    ensure!(
        r.src["writes_after_recovery"].as_u64().unwrap_or(0) > 0,
        "the source's writers did not run again"
    );
    // The upper half of RAM is written by nobody: it must hold the pattern still.
    let s = std::fs::read(Path::new(DIR).join("src.ram"))?;
    let half = (RAM_SIZE / 2) as usize;
    for (i, page) in s[half..].chunks(PAGE as usize).enumerate() {
        let idx = half / PAGE as usize + i;
        let want_fill = if idx % 8 == 7 {
            0
        } else {
            (idx % 251) as u8 | 1
        };
        ensure!(
            page[8..].iter().all(|&b| b == want_fill),
            "source RAM page {:#x} changed",
            RAM_BASE + idx as u64 * PAGE
        );
    }
    no_fd_leak(&r.src, "source")?;
    if !r.dst.is_null() {
        check_eq!(r.dst["outcome"], "failed");
        for (i, d) in r.dst["devices"]
            .as_array()
            .context("devices")?
            .iter()
            .enumerate()
        {
            check_eq!(
                d["state"],
                "RUNNING",
                "destination device {i} after its reset"
            );
        }
        no_fd_leak(&r.dst, "destination")?;
    }
    Ok(())
}

fn skip_without_livemig() -> Option<Outcome> {
    (!Path::new(LIVEMIG).exists())
        .then(|| Outcome::Skip(format!("{LIVEMIG} is not in the initramfs")))
}

/// A case that needs `/bin/livemig`: skipped (with the reason) without it.
fn case(r: &mut Runner, name: &str, f: impl FnOnce() -> Result<()>) {
    r.case(name, || match skip_without_livemig() {
        Some(s) => Ok(s),
        None => f().map(|()| Outcome::Pass),
    });
}

/// A migration that must fail with the source recovered, in one of `phases`.
fn failing(ty: &str, o: &Opts<'_>, phases: &[&str]) -> Result<(Pairs, Run)> {
    let p = pairs(ty)?;
    let run = run(&p, o)?;
    verify_recovered(&run, phases)?;
    Ok((p, run))
}

/// The failure a no-op resume (`--x-noop-resume`: device 0 is given none of its state) must
/// produce: mtty refuses RESUMING -> STOP with EINVAL when its resume file holds less than the
/// state's size (samples/vfio-mdev/mtty.c, the RESUMING -> STOP arc), so the destination ends
/// in order (its report written, outcome `failed`) with that arc's error on device 0 at
/// resume, and the source, told so after End, runs again. A crash (no report), another
/// device, phase or error does not match.
fn noop_resume_failure(dst_ok: bool, dst: &Value, src: &Value) -> Result<()> {
    ensure!(!dst_ok, "the destination exited successfully");
    check_eq!(dst["outcome"], "failed", "the destination's report");
    let e = dst["error"].as_str().unwrap_or_default();
    for want in [
        "resume: device 0 (",
        "arc RESUMING -> STOP failed",
        "(os error 22)",
    ] {
        ensure!(
            e.contains(want),
            "the destination failed otherwise than by the no-op resume ({want:?} missing): {e}"
        );
    }
    check_eq!(
        src["outcome"],
        "recovered",
        "the source after the destination failed"
    );
    Ok(())
}

/// Negative control: a migration whose `tracker`'s final harvest is dropped must succeed and
/// then fail the RAM comparison, first in `range` (the pages only that tracker finds).
fn dropped_harvest(tracker: &str, o: Opts<'_>, range: std::ops::Range<u64>) -> Result<()> {
    let p = pairs("mtty-2")?;
    let src = ["--x-drop-final-harvest", tracker];
    let run = run(&p, &Opts { src: &src, ..o })?;
    ensure!(
        run.src_ok && run.dst_ok,
        "the migration itself must succeed\n{}",
        run.context()
    );
    match ram_diff(
        &Path::new(DIR).join("src.ram"),
        &Path::new(DIR).join("dst.ram"),
    )? {
        Some((gpa, n)) => {
            trace!("negative control failed as expected: {n} page(s) differ, first {gpa:#x}");
            ensure!(
                range.contains(&gpa),
                "the lost page {gpa:#x} is not in {range:#x?}"
            );
            Ok(())
        }
        None => bail!(
            "with the final {tracker} harvest dropped the RAM still compared equal: the check cannot fail"
        ),
    }
}

pub fn run_cases(r: &mut Runner) {
    case(r, "e2e.migrate_mtty_mock_hwpt_tcp", || {
        let p = pairs("mtty-2")?;
        let run = run(&p, &Opts::default())?;
        verify_success(&p, &run)?;
        let t = tracking(&run);
        let mock = t
            .iter()
            .find(|(k, _)| k.starts_with("selftest mock device"))
            .context("the mock endpoint is not in the tracking plan")?;
        check_eq!(mock.1.as_str(), "iommu", "the mock endpoint's tracker");
        for m in &p.src {
            check_eq!(
                t.get(&m.uuid).map(String::as_str),
                Some("device"),
                "mtty {} (an mdev has no IOMMU: its own DMA log)",
                m.uuid
            );
        }
        let setup = run.src["setup"].to_string();
        ensure!(
            setup.contains("the device has no IOMMU of its own (ENOENT)"),
            "the mtty attach did not meet the mock's HWPT first: {setup}"
        );
        Ok(())
    });

    case(r, "e2e.migrate_mtty_mock_hwpt_two_page_channels", || {
        // The same devices and trackers with pages spread over two page connections beside
        // the main one; the vCPU stand-in and the mock device keep writing, so later rounds
        // re-send pages on whichever channel the split gives them.
        let p = pairs("mtty-2")?;
        let run = run(
            &p,
            &Opts {
                src: &["--channels", "2"],
                cpu_rate: Some("4000"),
                dma_rate: Some("2000"),
                ..Opts::default()
            },
        )?;
        verify_success(&p, &run)?;
        let rounds = run.src["report"]["rounds"].as_array().map_or(0, Vec::len);
        ensure!(rounds >= 1, "no pre-copy round reported: {}", run.context());
        Ok(())
    });

    case(r, "e2e.negative_control_dropped_hwpt_harvest", || {
        // Expected to fail the RAM comparison: the pages the mock device wrote in the last
        // round are found only by the HWPT harvest that is dropped.
        let dma = (RAM_BASE + RAM_SIZE / 4)..(RAM_BASE + RAM_SIZE / 2);
        dropped_harvest(
            "iommu",
            Opts {
                dma_rate: Some("3000"),
                ..Opts::default()
            },
            dma,
        )
    });

    case(r, "e2e.negative_control_dropped_vcpu_harvest", || {
        // The same for the vCPU stand-in's pages: only the VMM write log finds them.
        let cpu = RAM_BASE..(RAM_BASE + RAM_SIZE / 4);
        dropped_harvest(
            "cpu",
            Opts {
                cpu_rate: Some("5000"),
                ..Opts::default()
            },
            cpu,
        )
    });

    case(r, "e2e.negative_control_noop_resume", || {
        let p = pairs("mtty-2")?;
        let run = run(
            &p,
            &Opts {
                dst: &["--x-noop-resume"],
                ..Opts::default()
            },
        )?;
        match verify_success(&p, &run) {
            Ok(()) => bail!("a destination device that loaded nothing passed the checks"),
            Err(e) => {
                // Failing is not enough: it must be the no-op resume's own failure, not a
                // crash or an unrelated error.
                noop_resume_failure(run.dst_ok, &run.dst, &run.src)
                    .with_context(|| run.context())?;
                trace!("negative control failed as expected: {e:#}");
                Ok(())
            }
        }
    });

    case(r, "e2e.fault_destination_killed_at_compat", || {
        failing(
            "mtty-2",
            &Opts {
                dst: &["--x-die-at", "compat"],
                ..Opts::default()
            },
            &["compat"],
        )?;
        Ok(())
    });

    case(r, "e2e.fault_destination_killed_in_precopy", || {
        failing(
            "mtty-2",
            &Opts {
                src: &["--downtime", "1ms", "--max-rounds", "50"],
                dst: &["--x-die-at", "round:1"],
                ..Opts::default()
            },
            &["pre-copy"],
        )?;
        Ok(())
    });

    case(r, "e2e.fault_destination_killed_in_stop_copy", || {
        // A large final round (a fast writer over 8 MiB, two rounds) keeps the source
        // sending when the destination dies, so it fails before End and must recover.
        let p = pairs("mtty-2")?;
        let run = run(
            &p,
            &Opts {
                src: &["--max-rounds", "1", "--downtime", "1ms"],
                cpu_rate: Some("400000"),
                kill_on: Some("event: phase stop-and-copy"),
                ..Opts::default()
            },
        )?;
        ensure!(
            run.killed,
            "the source never entered stop-and-copy\n{}",
            run.context()
        );
        if run.src["outcome"] == "stopped" {
            bail!(
                "the source had sent End before the kill landed (it stays stopped, correctly, but this case wants the failure before End): {}",
                run.src["error"]
            );
        }
        verify_recovered(&run, &["stop-and-copy"])?;
        Ok(())
    });

    case(r, "e2e.fault_destination_killed_at_handover", || {
        // After End the destination may already run: the source must stay stopped, keep its
        // state and say so.
        let p = pairs("mtty-2")?;
        let run = run(
            &p,
            &Opts {
                dst: &["--x-die-at", "resume"],
                ..Opts::default()
            },
        )?;
        ensure!(
            !run.src_ok,
            "the source reported success\n{}",
            run.context()
        );
        check_eq!(run.src["outcome"], "stopped", "{}", run.context());
        let err = run.src["error"].as_str().unwrap_or("");
        ensure!(
            err.contains("stays stopped with its state intact"),
            "the source did not say so: {err}"
        );
        // Stopped with the state intact: STOP_COPY (as stop-and-copy left it) or STOP.
        for (i, d) in run.src["devices"]
            .as_array()
            .context("devices")?
            .iter()
            .enumerate()
        {
            let st = d["state"].as_str().unwrap_or("");
            ensure!(
                st == "STOP_COPY" || st == "STOP",
                "source device {i} is {st} after a lost handover"
            );
        }
        check_eq!(run.src["writes_after_recovery"], 0);
        no_fd_leak(&run.src, "source")?;
        Ok(())
    });

    case(r, "e2e.fault_corrupted_stream", || {
        // One byte flipped well into the RAM pages: the record checksum refuses it.
        let (_, run) = failing(
            "mtty-2",
            &Opts {
                dst: &["--x-corrupt-stream-at", "1000000"],
                ..Opts::default()
            },
            &["pre-copy", "stop-and-copy", "start"],
        )?;
        let derr = run.dst["error"].as_str().unwrap_or("");
        ensure!(
            derr.contains("offset") || derr.contains("checksum") || derr.contains("CRC"),
            "destination error: {derr}"
        );
        Ok(())
    });

    case(r, "e2e.fault_device_error_in_resuming", || {
        // Device 0 gets a corrupted header: mtty refuses it, the destination resets its
        // devices and reports the failure, the source recovers.
        let (p, run) = failing(
            "mtty-2",
            &Opts {
                dst: &["--x-corrupt-device-state"],
                ..Opts::default()
            },
            &["pre-copy", "stop-and-copy", "handover"],
        )?;
        let derr = run.dst["error"].as_str().unwrap_or("");
        ensure!(
            derr.contains(&p.dst[0].uuid),
            "the destination's error does not name device 0: {derr}"
        );
        Ok(())
    });

    case(r, "e2e.wrong_mdev_type_refused_before_resuming", || {
        // mtty-1 devices on the destination: compat refuses them before any RESUMING.
        let p = pairs("mtty-1")?;
        let before = p.dest_port0()?;
        let run = run(&p, &Opts::default())?;
        verify_recovered(&run, &["compat"])?;
        let err = run.src["error"].as_str().unwrap_or("");
        ensure!(
            err.contains("mtty-1") && err.contains("mtty-2"),
            "the refusal does not name both types: {err}"
        );
        check_eq!(
            p.dest_port0()?,
            before,
            "the destination devices were written"
        );
        Ok(())
    });

    case(r, "e2e.device_count_mismatch_refused", || {
        // The destination offers one device for the source's two.
        failing(
            "mtty-2",
            &Opts {
                dst_devices: Some(1),
                ..Opts::default()
            },
            &["compat"],
        )?;
        Ok(())
    });

    case(r, "e2e.tracking_device_blocked_by_mock_endpoint", || {
        // `--tracking device`: the mock endpoint has no DMA log of its own, so migration is
        // blocked before anything moves, and the error names it.
        let (_, run) = failing(
            "mtty-2",
            &Opts {
                src: &["--tracking", "device"],
                ..Opts::default()
            },
            &["setup"],
        )?;
        let err = run.src["error"].as_str().unwrap_or("");
        ensure!(
            err.contains("selftest mock device"),
            "the error does not name the endpoint: {err}"
        );
        Ok(())
    });

    case(r, "e2e.migrate_mtty_without_precopy", || {
        // STOP_COPY only: the devices quiesce through RUNNING_P2P instead of PRE_COPY_P2P.
        let p = pairs("mtty-2")?;
        let run = run(
            &p,
            &Opts {
                src: &["--no-precopy"],
                ..Opts::default()
            },
        )?;
        verify_success(&p, &run)?;
        Ok(())
    });

    case(r, "e2e.tracking_iommu_blocked_by_mtty", || {
        // `--tracking iommu`: an mdev has no IOMMU domain of its own, so each mtty blocks the
        // migration, named with the auto-domain outcome.
        let (p, run) = failing(
            "mtty-2",
            &Opts {
                src: &["--tracking", "iommu"],
                ..Opts::default()
            },
            &["setup"],
        )?;
        let err = run.src["error"].as_str().unwrap_or("");
        for m in &p.src {
            ensure!(
                err.contains(&m.uuid),
                "the error does not name {}: {err}",
                m.uuid
            );
        }
        ensure!(
            err.contains("attached to IOAS"),
            "the error does not give the reason: {err}"
        );
        Ok(())
    });

    crate::e2e_p2p::run(r);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOOP: &str = "resume: device 0 (mtty 1234): arc RESUMING -> STOP failed on the way to \
                        STOP; device left in ERROR (reset required): VFIO_DEVICE_FEATURE(SET \
                        MIG_DEVICE_STATE) failed: Invalid argument (os error 22)";

    #[test]
    fn the_noop_resume_control_accepts_only_its_own_failure() {
        let src = json!({"outcome": "recovered"});
        let dst = json!({"outcome": "failed", "error": NOOP});
        noop_resume_failure(false, &dst, &src).unwrap();
        // A crash: no report at all.
        let e = noop_resume_failure(false, &Value::Null, &src).unwrap_err();
        assert!(e.to_string().contains("outcome"), "{e}");
        // An unrelated error.
        let other = json!({"outcome": "failed", "error": "receive: stream: truncated"});
        let e = noop_resume_failure(false, &other, &src).unwrap_err();
        assert!(
            e.to_string().contains("otherwise than by the no-op resume"),
            "{e}"
        );
        // The same arc failing on another device, or with another errno.
        for wrong in [
            NOOP.replace("device 0", "device 1"),
            NOOP.replace("os error 22", "os error 5"),
        ] {
            let dst = json!({"outcome": "failed", "error": wrong});
            assert!(noop_resume_failure(false, &dst, &src).is_err(), "{wrong}");
        }
        // A destination that said it succeeded, or a source that believes it migrated.
        assert!(noop_resume_failure(true, &dst, &src).is_err());
        let migrated = json!({"outcome": "migrated"});
        assert!(noop_resume_failure(false, &dst, &migrated).is_err());
    }
}

#[cfg(test)]
mod one_host_tests {
    use super::one_host;
    use serde_json::json;

    #[test]
    fn two_running_hosts_and_a_silent_none_fail() {
        let here = json!({"runs": {"runs": "here", "why": "resumed"}});
        let not = json!({"runs": {"runs": "not_here", "why": "failed"}});
        let undecided = json!({"runs": {"runs": "undecided", "why": ""}});
        assert!(one_host(&here, &not, false).is_ok());
        assert!(one_host(&not, &here, false).is_ok());
        assert!(one_host(&undecided, &not, false).is_ok());
        let e = one_host(&here, &here, false).unwrap_err();
        assert!(e.to_string().contains("runs on both hosts"), "{e}");
        let e = one_host(&undecided, &undecided, false).unwrap_err();
        assert!(e.to_string().contains("neither says why"), "{e}");
        assert!(one_host(&undecided, &json!({}), true).is_ok());
    }
}
