//! Guest init, DMA buffers and sysfs helpers.

use std::ffi::CString;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

fn mount(src: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f) = (
        CString::new(src).expect("no NUL"),
        CString::new(target).expect("no NUL"),
        CString::new(fstype).expect("no NUL"),
    );
    // SAFETY: all pointers are valid NUL-terminated strings; data is NULL.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        eprintln!(
            "hw-tests init: mount {fstype} on {target}: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn reboot() -> ! {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    // SAFETY: reboot(RB_AUTOBOOT) restarts the machine; QEMU runs with -no-reboot and exits.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    // Only reached if reboot failed: PID 1 must never exit normally.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Brings `lo` up (SIOCSIFFLAGS with IFF_UP): the end-to-end cases migrate over loopback TCP.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: a plain socket(2); the result is checked and closed below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, c) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *c as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own; `s` is our socket.
    let rc = unsafe { libc::ioctl(s, libc::SIOCSIFFLAGS as _, &ifr as *const libc::ifreq) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(s) };
    if rc < 0 { Err(err) } else { Ok(()) }
}

/// PID 1 in the rig guest: mount the pseudo filesystems, run the profile named on the kernel
/// command line, print the results, reboot. Never returns.
pub fn init_guest() -> ! {
    mount("devtmpfs", "/dev", "devtmpfs");
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    if let Err(e) = loopback_up() {
        println!("{} loopback interface: {e}", crate::harness::TAG);
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|w| w == "livemig.probe=1") {
        // The accelerator probe only needs to see that the guest reached userspace.
        println!("{} probe ok", crate::harness::TAG);
        reboot();
    }
    let profile = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("livemig.profile="))
        .unwrap_or("mock")
        .to_string();
    let filter = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("livemig.filter="))
        .map(str::to_string);
    println!("{} profile {profile}", crate::harness::TAG);
    let mut runner = crate::harness::Runner::new(filter);
    let plan = crate::Plan::Profile(profile);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if let Err(e) = crate::run_plan(&plan, &mut runner) {
            println!("{} FAIL profile: {e:#}", crate::harness::TAG);
        }
    }));
    if outcome.is_err() {
        println!("{} FAIL profile: the runner panicked", crate::harness::TAG);
    }
    runner.finish();
    reboot()
}

/// Anonymous memory for DMA, page-aligned, optionally backed by transparent huge pages. The
/// device may write it at any time: it is only read and written through volatile copies.
pub struct DmaBuf {
    ptr: *mut u8,
    len: usize,
}

impl DmaBuf {
    pub fn new(len: usize) -> Result<DmaBuf> {
        DmaBuf::with_alignment(len, 4096, false)
    }

    /// `len` bytes at an address aligned to `align` (a power of two); `huge` asks for THP.
    pub fn with_alignment(len: usize, align: usize, huge: bool) -> Result<DmaBuf> {
        let total = len + align;
        // SAFETY: anonymous private mapping; no address hint.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            bail!("mmap {total} bytes: {}", std::io::Error::last_os_error());
        }
        let base = raw as usize;
        let start = (base + align - 1) & !(align - 1);
        // Trim the unaligned head and the tail so `munmap(ptr, len)` releases everything.
        // SAFETY: both ranges lie inside the mapping just created.
        unsafe {
            if start > base {
                libc::munmap(raw, start - base);
            }
            let end = start + len;
            if base + total > end {
                libc::munmap(end as *mut libc::c_void, base + total - end);
            }
        }
        let ptr = start as *mut u8;
        if huge {
            // SAFETY: the range is our mapping.
            unsafe { libc::madvise(ptr.cast(), len, libc::MADV_HUGEPAGE) };
        }
        // Touch every page so it is populated (and, with THP, backed by huge pages).
        for off in (0..len).step_by(4096) {
            // SAFETY: `off < len`, inside the mapping.
            unsafe { ptr.add(off).write_volatile(0) };
        }
        Ok(DmaBuf { ptr, len })
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        for (i, b) in data.iter().enumerate() {
            // SAFETY: bounds checked above.
            unsafe { self.ptr.add(off + i).write_volatile(*b) };
        }
    }

    /// The physical address of the byte at `off` (from /proc/self/pagemap: bit 63 present,
    /// bits 0-54 the page frame; Documentation/admin-guide/mm/pagemap.rst). Root only.
    pub fn phys(&self, off: usize) -> Result<u64> {
        use std::os::unix::fs::FileExt;
        assert!(off < self.len);
        let va = self.ptr as u64 + off as u64;
        let f = std::fs::File::open("/proc/self/pagemap")?;
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, va / 4096 * 8)?;
        let v = u64::from_le_bytes(e);
        if v & (1 << 63) == 0 {
            bail!("page at {va:#x} is not present");
        }
        let pfn = v & ((1 << 55) - 1);
        if pfn == 0 {
            bail!("pagemap hides the frame of {va:#x} (not root?)");
        }
        Ok(pfn * 4096 + va % 4096)
    }

    pub fn read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.len);
        // SAFETY: bounds checked above.
        (0..len)
            .map(|i| unsafe { self.ptr.add(off + i).read_volatile() })
            .collect()
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+len` is exactly the mapping this value owns.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Polls `f` every few milliseconds until it returns `Some`, or fails after `timeout` naming
/// `what`.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn write_sysfs(path: impl AsRef<Path>, value: &str) -> Result<()> {
    let path = path.as_ref();
    std::fs::write(path, value).with_context(|| format!("write {value:?} to {}", path.display()))
}

pub fn read_sysfs(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("read {}", path.display()))?
        .trim()
        .to_string())
}

/// A fresh random-looking UUID (v4 layout) from the kernel's random source.
pub fn uuid() -> Result<String> {
    let mut b = [0u8; 16];
    // SAFETY: `b` is writable for 16 bytes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 16 {
        bail!("getrandom: {}", std::io::Error::last_os_error());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// A step trace for the console log (stderr: the rig echoes only result lines), so a hang
/// inside a case shows which kernel call it is in.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut e = std::io::stderr().lock();
        let _ = writeln!(e, "[trace] {}", format!($($arg)*));
        let _ = e.flush();
    }};
}

/// Where the mtty sample offers its mdev types.
const MDEV_TYPES: &str = "/sys/class/mdev_bus/mtty/mdev_supported_types";

/// An mtty mdev, removed on drop (after every user closed it). The e2e, P2P and kvm cases
/// all make theirs here (e2e adds region access).
pub(crate) struct Mdev {
    pub(crate) uuid: String,
}

impl Mdev {
    pub(crate) fn create(ty: &str) -> Result<Mdev> {
        let uuid = uuid()?;
        write_sysfs(Path::new(MDEV_TYPES).join(ty).join("create"), &uuid)
            .with_context(|| format!("creating an {ty} mdev"))?;
        Ok(Mdev { uuid })
    }
}

impl Drop for Mdev {
    fn drop(&mut self) {
        let _ = write_sysfs(format!("/sys/bus/mdev/devices/{}/remove", self.uuid), "1");
    }
}

/// Waits for `child` at most `limit` (then kills it); whether it exited successfully.
pub(crate) fn wait(child: &mut Child, what: &str, limit: Duration) -> Result<bool> {
    let until = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s.success());
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
