//! QEMU 10.0 as a real migration peer inside the rig guest (../shared/recipes/qemu-in-rig.md):
//! the host's root is shared read-only over virtio-9p (`hostroot`) and QEMU runs chrooted into
//! it, with an mtty mdev assigned through `vfio-pci` on the iommufd backend and no vIOMMU.
//!
//! - QEMU migrates its (paused) VM to a file; the mtty was put in a distinctive UART state
//!   through its regions first, so its migration data carries that state.
//! - `livemig-stream`'s `qevm` reader reads QEMU's whole file; the VFIO section's device state is
//!   resumed into a second mtty through `livemig-vfio`, which then holds the registers QEMU's
//!   device had (negative control: a RESUMING that loads nothing does not).
//! - The other way: device state livemig saved from a third mtty is spliced into QEMU's file in
//!   place of QEMU's own, and a second QEMU loads it (`migrate_incoming file:`) into a fourth
//!   mtty, which then holds the third's registers (negative control: the unspliced file gives
//!   QEMU's source registers instead).
//! - The file is copied to the `out` share, so the host can keep it as a fixture.

use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use livemig_iommufd::{AutoDomains, Iommufd};
use livemig_stream::qemu::Item;
use livemig_stream::qevm::{self, Content, QevmLimits, VfioDevice as QevmDevice};
use livemig_vfio::{DeviceLocator, MigrationDevice, MigrationState, VfioDevice, data};

use crate::harness::{Outcome, Runner};
use crate::mtty::{set_uart, uart};
use crate::util::{uuid, write_sysfs};
use crate::{check_eq, trace};

const HOST: &str = "/host";
const OUT: &str = "/out";
const QEMU: &str = "/usr/bin/qemu-system-x86_64";
const MTTY_TYPE: &str = "/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2";
/// The UART state QEMU's device is given, another for the livemig side, and the state fresh
/// target devices start in.
const QEMU_UART: ([u8; 2], [u8; 2]) = ([0x71, 0x17], [0x1b, 0x0b]);
const LIVEMIG_UART: ([u8; 2], [u8; 2]) = ([0x4d, 0xd4], [0x1a, 0x0a]);
const FRESH_UART: ([u8; 2], [u8; 2]) = ([0x00, 0x00], [0x03, 0x03]);

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

fn mount(
    src: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: &str,
) -> Result<()> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, d) = (cstr(src), cstr(target), cstr(data));
    let f = fstype.map(cstr);
    // SAFETY: valid NUL-terminated strings (or NULL for the type) for the call.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            f.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            d.as_ptr().cast(),
        )
    };
    if rc != 0 {
        bail!(
            "mount {src} on {target}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The host's root at /host with this guest's /proc, /sys, /dev and a writable /tmp bound in;
/// the `out` share at /out.
fn host_root() -> Result<()> {
    if Path::new(HOST).join("usr/bin").exists() {
        return Ok(());
    }
    mount(
        "hostroot",
        HOST,
        Some("9p"),
        libc::MS_RDONLY,
        "trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose",
    )
    .context("the host's root over virtio-9p (mount_tag hostroot)")?;
    std::fs::create_dir_all("/tmp")?;
    for d in ["/proc", "/sys", "/dev", "/tmp"] {
        mount(
            d,
            &format!("{HOST}{d}"),
            None,
            libc::MS_BIND | libc::MS_REC,
            "",
        )?;
    }
    mount(
        "out",
        OUT,
        Some("9p"),
        0,
        "trans=virtio,version=9p2000.L,msize=512000",
    )
    .context("the results share (mount_tag out)")?;
    Ok(())
}

/// An mtty mdev in a given UART state; removed on drop.
struct Mdev(String);

impl Mdev {
    fn create(state: ([u8; 2], [u8; 2])) -> Result<Mdev> {
        let id = uuid()?;
        write_sysfs(Path::new(MTTY_TYPE).join("create"), &id)?;
        let m = Mdev(id);
        m.with(|d| set_uart(d, state.0, state.1))?;
        Ok(m)
    }

    fn with<T>(&self, f: impl FnOnce(&mut VfioDevice) -> Result<T>) -> Result<T> {
        let fd = Iommufd::open()?;
        let mut auto = AutoDomains::new(fd.alloc_ioas()?);
        let mut dev = VfioDevice::open(DeviceLocator::default().mdev_cdev(&self.0)?)?;
        let id = dev.bind_iommufd(fd.as_fd())?;
        auto.attach(&fd.probe_device(id), |pt| {
            dev.attach_pt(pt).map_err(std::io::Error::from)
        })?;
        f(&mut dev)
    }

    fn uart(&self) -> Result<[u8; 4]> {
        self.with(|d| uart(d))
    }
}

impl Drop for Mdev {
    fn drop(&mut self) {
        let _ = write_sysfs(format!("/sys/bus/mdev/devices/{}/remove", self.0), "1");
    }
}

/// QEMU on an mtty, driven through its monitor on stdin/stdout.
struct Qemu {
    child: std::process::Child,
    out: Arc<Mutex<String>>,
}

impl Qemu {
    fn start(dev: &Mdev, incoming: bool) -> Result<Qemu> {
        let mut cmd = Command::new(QEMU);
        cmd.args(["-accel", "tcg,tb-size=32", "-machine", "q35", "-m", "16"])
            .args(["-nodefaults", "-nographic", "-S", "-display", "none"])
            .args(["-object", "iommufd,id=iommufd0", "-device"])
            .arg(format!(
                "vfio-pci,sysfsdev=/sys/bus/mdev/devices/{},iommufd=iommufd0,enable-migration=on",
                dev.0
            ))
            .args(["-monitor", "stdio"]);
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let root = cstr(HOST);
        // SAFETY: chroot(2) and chdir(2) between fork and exec, with a string that lives until
        // the closure runs; no allocation or lock is taken there.
        unsafe {
            cmd.pre_exec(move || {
                if libc::chroot(root.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting QEMU in the host root")?;
        let out = Arc::new(Mutex::new(String::new()));
        for r in [
            Box::new(child.stdout.take().context("piped")?) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().context("piped")?),
        ] {
            let o = Arc::clone(&out);
            std::thread::spawn(move || {
                for l in BufReader::new(r).lines().map_while(|l| l.ok()) {
                    if let Ok(mut s) = o.lock() {
                        s.push_str(&l);
                        s.push('\n');
                    }
                }
            });
        }
        Ok(Qemu { child, out })
    }

    fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("QEMU's stdin")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    fn output(&self) -> String {
        self.out.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Polls `info migrate` until the migration completed (or failed, or the time is up).
    fn wait_migration(&mut self) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(90);
        loop {
            std::thread::sleep(Duration::from_millis(300));
            self.send("info migrate")?;
            std::thread::sleep(Duration::from_millis(200));
            let out = self.output();
            // HMP `info migrate` (QEMU 10.0 migration/migration-hmp-cmds.c) prints a
            // "Status:" line, padded with spaces or tabs.
            let status = out
                .lines()
                .rev()
                .find(|l| l.to_ascii_lowercase().contains("status:") && !l.contains("VM status"))
                .map(|l| l.to_ascii_lowercase())
                .unwrap_or_default();
            if status.contains("completed") {
                return Ok(());
            }
            if status.contains("failed") || status.contains("cancelled") {
                bail!("QEMU's migration failed:\n{}", tail(&out));
            }
            if let Some(s) = self.child.try_wait()? {
                bail!("QEMU exited ({s}):\n{}", tail(&out));
            }
            if Instant::now() > until {
                bail!("QEMU's migration did not complete:\n{}", tail(&out));
            }
        }
    }

    fn quit(mut self) -> Result<String> {
        let _ = self.send("quit");
        let until = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > until {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.wait();
        Ok(self.output())
    }
}

fn tail(s: &str) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(15)..].join("\n")
}

/// QEMU saves `dev` to `file` (a path inside the host root's /tmp, i.e. this guest's /tmp).
fn qemu_save(dev: &Mdev, file: &str) -> Result<Vec<u8>> {
    let _ = std::fs::remove_file(file);
    let mut q = Qemu::start(dev, false)?;
    q.send(&format!("migrate file:{file}"))?;
    let r = q.wait_migration();
    let out = q.quit()?;
    r?;
    trace!("QEMU (save): {}", tail(&out).replace('\n', " | "));
    std::fs::read(file).with_context(|| format!("reading QEMU's file {file}"))
}

/// A second QEMU loads `file` into `dev`.
fn qemu_load(dev: &Mdev, file: &str) -> Result<()> {
    let mut q = Qemu::start(dev, true)?;
    q.send(&format!("migrate_incoming file:{file}"))?;
    let mut r = q.wait_migration();
    if r.is_ok() {
        // QEMU leaves RESUMING (where mtty applies the state) when the VM starts: run it a
        // moment (firmware from the reset vector; it does not touch the mtty's UARTs), stop.
        r = q.send("cont").and_then(|_| {
            std::thread::sleep(Duration::from_millis(500));
            q.send("stop")
        });
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = q.quit()?;
    trace!("QEMU (load): {}", tail(&out).replace('\n', " | "));
    r
}

fn limits() -> QevmLimits {
    QevmLimits::default()
}

/// The VFIO device state in QEMU's file and where each DEV_DATA_STATE chunk lies in it.
fn vfio_chunks(file: &[u8]) -> Result<(String, Vec<(usize, usize)>)> {
    let f = qevm::read(file, limits()).map_err(|e| anyhow::anyhow!("reading QEMU's file: {e}"))?;
    let devs = f.vfio_devices();
    ensure!(devs.len() == 1, "VFIO devices in QEMU's file: {devs:?}");
    let mut chunks = Vec::new();
    for s in f.sections().iter().filter(|s| s.is_vfio()) {
        if let Content::Vfio { items, .. } = &s.content {
            for it in items {
                if let Item::Data(d) = it.item {
                    let at = d.as_ptr() as usize - file.as_ptr() as usize;
                    chunks.push((at, d.len()));
                }
            }
        }
    }
    Ok((devs[0].to_string(), chunks))
}

fn qemu_state(file: &[u8]) -> Result<Vec<u8>> {
    let f = qevm::read(file, limits()).map_err(|e| anyhow::anyhow!("reading QEMU's file: {e}"))?;
    qevm::vfio_device_state(&f, QevmDevice::Index(0)).context("no VFIO device state in QEMU's file")
}

/// Reads QEMU's whole file, then (only if it is valid) resumes its VFIO state into `dev`.
fn resume_from_file(dev: &Mdev, file: &[u8]) -> Result<([u8; 4], Result<()>)> {
    let state = qemu_state(file)?;
    resume(dev, Some(&state))
}

/// RESUMING with `state` (nothing when `None`), then RUNNING; returns the registers.
fn resume(dev: &Mdev, state: Option<&[u8]>) -> Result<([u8; 4], Result<()>)> {
    dev.with(|d| {
        d.reset()?;
        let mut t = d.transition(MigrationState::Resuming)?;
        if let Some(s) = state {
            data::write_resuming(t.data.as_mut().context("RESUMING opened no data fd")?, s)?;
        }
        let left = d
            .transition(MigrationState::Running)
            .map(|_| ())
            .map_err(anyhow::Error::from);
        if left.is_err() {
            d.reset()?;
        }
        Ok((uart(d)?, left))
    })
}

/// STOP_COPY from RUNNING through livemig-vfio, then back.
fn livemig_save(dev: &Mdev) -> Result<Vec<u8>> {
    dev.with(|d| {
        d.reset()?;
        let mut t = d.transition(MigrationState::StopCopy)?;
        let mut out = Vec::new();
        data::save_stop_copy(t.data.as_mut().context("no data fd")?, &mut out)?;
        d.transition(MigrationState::Running)?;
        Ok(out)
    })
}

fn pack(u: ([u8; 2], [u8; 2])) -> [u8; 4] {
    [u.0[0], u.1[0], u.0[1], u.1[1]]
}

pub fn run(r: &mut Runner) {
    const CASES: [&str; 8] = [
        "qemu.vfio_mtty_saved_to_file",
        "qemu.livemig_inspect_reads_qemu_file",
        "qemu.state_resumed_into_mtty_by_livemig",
        "qemu.negative_control_noop_resume",
        "qemu.loads_state_livemig_saved",
        "qemu.negative_control_unspliced_file",
        "qemu.truncated_file_refused_before_the_device",
        "qemu.livemig_inspect_names_the_offset_of_a_cut",
    ];
    if let Err(e) = host_root() {
        r.fail_all(&CASES, &format!("QEMU's host root: {e:#}"));
        return;
    }
    if !Path::new(HOST).join(&QEMU[1..]).exists() {
        r.fail_all(&CASES, &format!("{QEMU} is not in the host root"));
        return;
    }
    let file = "/tmp/qemu-mtty.qevm";
    let saved: Result<Vec<u8>> = (|| {
        let src = Mdev::create(QEMU_UART)?;
        check_eq!(
            src.uart()?,
            pack(QEMU_UART),
            "QEMU's device before QEMU opens it"
        );
        qemu_save(&src, file)
    })();
    let bytes = std::cell::RefCell::new(None);
    r.case(CASES[0], || {
        let b = saved?;
        let (idstr, chunks) = vfio_chunks(&b)?;
        ensure!(idstr.ends_with("/vfio"), "VFIO section idstr {idstr:?}");
        let sizes: Vec<usize> = chunks.iter().map(|c| c.1).collect();
        // mtty-2 (samples/vfio-mdev/mtty.c): a 24-byte header in PRE_COPY, both ports' state
        // (2 x 36 bytes) at STOP_COPY.
        check_eq!(sizes, vec![24usize, 72], "DEV_DATA_STATE chunk sizes");
        let state = qemu_state(&b)?;
        check_eq!(
            &state[..8],
            &0x7e9d09898c3e2c4eu64.to_le_bytes()[..],
            "mtty's magic"
        );
        let _ = std::fs::copy(file, Path::new(OUT).join("qemu-mtty.qevm"));
        *bytes.borrow_mut() = Some(b);
        Ok(Outcome::Pass)
    });
    let b = bytes.into_inner();
    let need = || {
        b.clone()
            .context("QEMU's file (see qemu.vfio_mtty_saved_to_file)")
    };

    r.case(CASES[1], || {
        need()?;
        let out = Command::new("/bin/livemig")
            .args(["inspect", "--json", file])
            .output()?;
        ensure!(
            out.status.success(),
            "livemig inspect: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let text = j.to_string();
        ensure!(
            text.contains("/vfio") && text.contains("qevm"),
            "inspect output lacks the VFIO section: {}",
            &text[..text.len().min(400)]
        );
        Ok(Outcome::Pass)
    });

    r.case(CASES[2], || {
        let b = need()?;
        let state = qemu_state(&b)?;
        let dst = Mdev::create(FRESH_UART)?;
        let (regs, left) = resume_from_file(&dst, &b)?;
        left?;
        check_eq!(regs, pack(QEMU_UART), "the resumed mtty's UART registers");
        // Saved again, it gives back what QEMU's device gave.
        check_eq!(
            livemig_save(&dst)?,
            state,
            "the resumed device's state saved again"
        );
        Ok(Outcome::Pass)
    });

    r.case(CASES[3], || {
        need()?;
        let dst = Mdev::create(FRESH_UART)?;
        let (regs, left) = resume(&dst, None)?;
        ensure!(
            regs != pack(QEMU_UART),
            "a RESUMING that loaded nothing shows QEMU's registers: the check cannot fail"
        );
        trace!(
            "negative control failed as expected: registers {regs:02x?}, leaving RESUMING {:?}",
            left.err().map(|e| e.to_string())
        );
        Ok(Outcome::Pass)
    });

    r.case(CASES[4], || {
        let b = need()?;
        let ours = Mdev::create(LIVEMIG_UART)?;
        let state = livemig_save(&ours)?;
        let (_, chunks) = vfio_chunks(&b)?;
        let total: usize = chunks.iter().map(|c| c.1).sum();
        check_eq!(state.len(), total, "livemig's state against QEMU's chunks");
        // Same lengths: the state goes in place of QEMU's, chunk by chunk.
        let mut spliced = b.clone();
        let mut at = 0;
        for (off, len) in chunks {
            spliced[off..off + len].copy_from_slice(&state[at..at + len]);
            at += len;
        }
        let path = "/tmp/qemu-mtty-spliced.qevm";
        std::fs::write(path, &spliced)?;
        check_eq!(qemu_state(&spliced)?, state);
        let dst = Mdev::create(FRESH_UART)?;
        qemu_load(&dst, path)?;
        check_eq!(
            dst.uart()?,
            pack(LIVEMIG_UART),
            "the device QEMU loaded livemig's state into"
        );
        Ok(Outcome::Pass)
    });

    r.case(CASES[5], || {
        need()?;
        let dst = Mdev::create(FRESH_UART)?;
        qemu_load(&dst, file)?;
        let got = dst.uart()?;
        ensure!(
            got != pack(LIVEMIG_UART),
            "without the splice QEMU still loaded livemig's registers"
        );
        check_eq!(got, pack(QEMU_UART), "QEMU loading its own file");
        trace!("negative control failed as expected: the unspliced file gives {got:02x?}");
        Ok(Outcome::Pass)
    });

    r.case(CASES[6], || {
        let b = need()?;
        let (_, chunks) = vfio_chunks(&b)?;
        let cut = chunks[1].0 + 10;
        let dst = Mdev::create(FRESH_UART)?;
        // The file is parsed whole before the device is touched: a cut file never reaches it.
        let err = match resume_from_file(&dst, &b[..cut]) {
            Ok(_) => bail!("a file cut inside the VFIO data was accepted"),
            Err(e) => e,
        };
        let text = format!("{err:#}");
        let at = (cut as u64).to_string();
        ensure!(
            text.contains("byte") || text.contains(&at),
            "the error names no offset: {text}"
        );
        check_eq!(
            dst.with(|d| Ok(d.migration_state()?))?,
            MigrationState::Running
        );
        check_eq!(dst.uart()?, pack(FRESH_UART), "the device was written");
        trace!("truncated file refused: {text}");
        Ok(Outcome::Pass)
    });

    r.case(CASES[7], || {
        let b = need()?;
        let (_, chunks) = vfio_chunks(&b)?;
        let cut = chunks[1].0 + 10;
        let path = "/tmp/qemu-mtty-cut.qevm";
        std::fs::write(path, &b[..cut])?;
        let out = Command::new("/bin/livemig")
            .args(["inspect", path])
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            !out.status.success(),
            "livemig inspect accepted a cut file:\n{text}"
        );
        ensure!(
            text.contains("/vfio") && text.contains("truncated"),
            "the error does not name the VFIO section and the truncation:\n{text}"
        );
        Ok(Outcome::Pass)
    });
}
