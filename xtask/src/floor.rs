//! The lower bound `cargo xtask bench-peer` holds both VMMs to: the fastest copy this machine
//! makes of an image's data from one process to another over the same number of loopback TCP
//! connections, into fresh anonymous memory, pipelined across the connections.
//!
//! Two processes of this binary, started by bench-peer (`xtask floor-recv`, `xtask floor-send`):
//! - the receiver maps anonymous memory of the image's size (fresh, fresh with `MADV_HUGEPAGE`,
//!   or with the data's pages written once before the clock starts), listens, accepts the connections, and on each reads records
//!   `offset u64 | length u64 | bytes` (little-endian) with `recv(2)`, either straight into
//!   the mapping at the offset (one copy, its page faults taken inside the socket read) or
//!   through a 256 KiB buffer and a copy into place (the faults taken outside the socket, as a
//!   VMM that parses records takes them);
//! - the sender finds the image's data with `SEEK_DATA`/`SEEK_HOLE` and connects every
//!   connection before its clock starts, then sends the data in 2 MiB pieces, round-robin over
//!   the connections, one thread each, with `sendfile(2)` from the page cache or `write(2)` from
//!   a shared mapping of the file populated beforehand.
//!
//! The clock is `CLOCK_MONOTONIC` (one clock for both processes on one machine): from the
//! sender's first byte to the receiver's last byte in memory. Everything a VMM does besides
//! moving those bytes (finding the data while it migrates, its framing, dirty tracking, device
//! and vCPU state, the handover, its connection set-up) is left out, so no migration of that
//! image over that many connections into fresh memory can take less; bench-peer runs ten
//! variants (two senders; in place or through a buffer into fresh memory with or without THP,
//! or in place into memory touched beforehand) and takes the fastest as the bound. The
//! touched-memory copies are what makes it a bound: whether fresh memory gets huge pages
//! quickly depends on the machine's state at that moment (QEMU's THP-backed destination once
//! beat every fresh-memory copy of the same run).
//!
//! After the clock stops the receiver writes a digest of every 2 MiB of what it holds
//! ([`digest_bytes`]); bench-peer compares it with the image's, so the bound is a copy that
//! really happened.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

/// The unit of every digest and of the sender's pieces.
pub const PIECE: u64 = 2 << 20;

/// How the sender moves the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendMode {
    /// `sendfile(2)` from the file (page cache to socket, no user copy).
    Sendfile,
    /// `write(2)` from a populated `MAP_SHARED` mapping of the file.
    Write,
}

impl SendMode {
    fn name(self) -> &'static str {
        match self {
            SendMode::Sendfile => "sendfile",
            SendMode::Write => "write",
        }
    }
}

/// How the receiver puts the bytes in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvMode {
    /// `recv(2)` straight into the destination memory (one copy; its page faults are taken
    /// inside the socket read, with the socket locked).
    Direct,
    /// `recv(2)` into a 256 KiB buffer that stays in cache, then a copy into place (two
    /// copies; the faults are taken outside the socket, as a VMM that parses records does).
    Bounce,
}

impl RecvMode {
    fn name(self) -> &'static str {
        match self {
            RecvMode::Direct => "direct",
            RecvMode::Bounce => "bounce",
        }
    }
}

/// The receiver's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mem {
    /// Fresh anonymous memory, 4 KiB pages (as livemig's destination).
    Fresh,
    /// Fresh anonymous memory with `MADV_HUGEPAGE` (as QEMU's destination).
    FreshThp,
    /// The data's pages written once before the clock starts: no fault, no zeroing during
    /// the copy, which no destination with fresh memory can match; the hard bound.
    Touched,
}

impl Mem {
    fn name(self) -> &'static str {
        match self {
            Mem::Fresh => "fresh",
            Mem::FreshThp => "thp",
            Mem::Touched => "touched",
        }
    }

    fn words(self) -> &'static str {
        match self {
            Mem::Fresh => "fresh 4 KiB-page memory",
            Mem::FreshThp => "fresh THP memory",
            Mem::Touched => "memory touched beforehand",
        }
    }
}

/// The bounce buffer of [`RecvMode::Bounce`].
const BOUNCE: usize = 256 << 10;

/// One measured copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub send: SendMode,
    pub recv: RecvMode,
    pub mem: Mem,
    /// First byte sent to last byte in memory, microseconds.
    pub us: u64,
    /// Bytes moved.
    pub bytes: u64,
}

impl Sample {
    pub fn label(&self) -> String {
        format!(
            "{} → {} recv → {}",
            self.send.name(),
            self.recv.name(),
            self.mem.words()
        )
    }
}

/// CRC-64/NVME of every 2 MiB of `bytes` (the last piece may be shorter): the digest format
/// bench-peer compares (`livemig vm incoming --ram-digest` writes the same).
pub fn digest_bytes(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks(PIECE as usize)
        .map(|c| crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, c))
        .collect()
}

/// [`digest_bytes`] of `len` bytes read from `r` at `at` onwards (a file or `/proc/PID/mem`).
pub fn digest_reader(r: &File, at: u64, len: u64) -> Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; PIECE as usize];
    let mut out = Vec::with_capacity(len.div_ceil(PIECE) as usize);
    let mut off = 0;
    while off < len {
        let n = (len - off).min(PIECE) as usize;
        r.read_exact_at(&mut buf[..n], at + off)
            .with_context(|| format!("reading {n} bytes at {:#x}", at + off))?;
        out.push(crc_fast::checksum(
            crc_fast::CrcAlgorithm::Crc64Nvme,
            &buf[..n],
        ));
        off += n as u64;
    }
    Ok(out)
}

/// Reads a digest file: little-endian u64s.
pub fn read_digest(path: &Path) -> Result<Vec<u64>> {
    let b = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        b.len() % 8 == 0,
        "{}: {} bytes is not a whole number of 8-byte digests",
        path.display(),
        b.len()
    );
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

fn write_digest(path: &Path, d: &[u64]) -> Result<()> {
    let b: Vec<u8> = d.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, b).with_context(|| format!("writing {}", path.display()))
}

/// `None` if equal, else the first difference in words.
pub fn compare(want: &[u64], got: &[u64]) -> Option<String> {
    if want.len() != got.len() {
        return Some(format!(
            "{} pieces of 2 MiB expected, {} digested",
            want.len(),
            got.len()
        ));
    }
    let bad: Vec<usize> = (0..want.len()).filter(|&i| want[i] != got[i]).collect();
    let first = *bad.first()?;
    Some(format!(
        "{} of {} pieces of 2 MiB differ, the first at RAM offset {:#x}",
        bad.len(),
        want.len(),
        first as u64 * PIECE
    ))
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The data extents of `f` (SEEK_DATA/SEEK_HOLE), cut into pieces that do not cross a 2 MiB
/// boundary.
fn data_pieces(f: &File, size: u64) -> Result<Vec<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < size {
        // SAFETY: lseek on an open fd; results are checked.
        let d = unsafe { libc::lseek(fd, at as i64, libc::SEEK_DATA) };
        if d < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e).context("lseek SEEK_DATA");
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        ensure!(
            h >= d,
            "lseek SEEK_HOLE: {}",
            std::io::Error::last_os_error()
        );
        let (mut s, e) = (d as u64, (h as u64).min(size));
        while s < e {
            let n = (e - s).min(PIECE - s % PIECE);
            out.push((s, n));
            s += n;
        }
        at = e;
    }
    Ok(out)
}

/// `xtask floor-send --image F --to ADDR --channels N --mode sendfile|write`: prints
/// `start NS` (CLOCK_MONOTONIC) before its first byte, then `sent BYTES`.
pub fn send_main(args: &[String]) -> Result<()> {
    let (mut image, mut to, mut channels, mut mode) = (None, None, 1usize, SendMode::Sendfile);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut v = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--image" => image = Some(PathBuf::from(v()?)),
            "--to" => to = Some(v()?.clone()),
            "--channels" => channels = v()?.parse().context("--channels")?,
            "--mode" => {
                mode = match v()?.as_str() {
                    "sendfile" => SendMode::Sendfile,
                    "write" => SendMode::Write,
                    m => bail!("--mode {m:?}: sendfile or write"),
                }
            }
            other => bail!("floor-send: unknown option {other:?}"),
        }
    }
    let image = image.context("--image is required")?;
    let to = to.context("--to is required")?;
    ensure!(channels >= 1, "--channels: at least 1");
    let f = File::open(&image).with_context(|| format!("opening {}", image.display()))?;
    let size = f.metadata()?.len();
    let pieces = data_pieces(&f, size)?;
    let map = match mode {
        SendMode::Write if size > 0 => {
            // SAFETY: a fresh read-only shared mapping of the whole file; checked below and
            // unmapped at exit.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size as usize,
                    libc::PROT_READ,
                    libc::MAP_SHARED | libc::MAP_POPULATE,
                    f.as_raw_fd(),
                    0,
                )
            };
            ensure!(
                p != libc::MAP_FAILED,
                "mmap {}: {}",
                image.display(),
                std::io::Error::last_os_error()
            );
            p as usize
        }
        _ => 0,
    };
    let socks: Vec<TcpStream> = (0..channels)
        .map(|_| TcpStream::connect(&to).with_context(|| format!("connecting to {to}")))
        .collect::<Result<_>>()?;
    println!("start {}", monotonic_ns());
    std::io::stdout().flush()?;
    let fd = f.as_raw_fd();
    let sent: u64 = std::thread::scope(|s| -> Result<u64> {
        let hs: Vec<_> = socks
            .into_iter()
            .enumerate()
            .map(|(k, mut sock)| {
                let mine: Vec<(u64, u64)> =
                    pieces.iter().skip(k).step_by(channels).copied().collect();
                s.spawn(move || -> Result<u64> {
                    let mut n = 0;
                    for (off, len) in mine {
                        let mut hdr = [0u8; 16];
                        hdr[..8].copy_from_slice(&off.to_le_bytes());
                        hdr[8..].copy_from_slice(&len.to_le_bytes());
                        // SAFETY: sends the 16-byte local header; MSG_MORE joins it to the data.
                        let r = unsafe {
                            libc::send(sock.as_raw_fd(), hdr.as_ptr().cast(), 16, libc::MSG_MORE)
                        };
                        ensure!(r == 16, "send header: {}", std::io::Error::last_os_error());
                        match mode {
                            SendMode::Sendfile => {
                                let mut o = off as i64;
                                let mut left = len as usize;
                                while left > 0 {
                                    // SAFETY: sendfile between two open fds; `o` is a valid
                                    // local offset it advances.
                                    let r = unsafe {
                                        libc::sendfile(sock.as_raw_fd(), fd, &mut o, left)
                                    };
                                    ensure!(r > 0, "sendfile: {}", std::io::Error::last_os_error());
                                    left -= r as usize;
                                }
                            }
                            SendMode::Write => {
                                // SAFETY: [off, off+len) lies inside the file's mapping (the
                                // pieces come from its extents below its size), mapped until
                                // this process ends.
                                let b = unsafe {
                                    std::slice::from_raw_parts(
                                        (map + off as usize) as *const u8,
                                        len as usize,
                                    )
                                };
                                sock.write_all(b).context("write")?;
                            }
                        }
                        n += len;
                    }
                    sock.shutdown(std::net::Shutdown::Write)?;
                    Ok(n)
                })
            })
            .collect();
        join_sum(hs, "sending")
    })?;
    println!("sent {sent}");
    Ok(())
}

/// `xtask floor-recv --size BYTES --channels N [--memory fresh|thp|touched --image F]
/// [--bounce] --digest FILE`: prints `listening
/// ADDR`, then, once every connection ended, `end NS BYTES` (CLOCK_MONOTONIC at the last byte
/// in memory), and writes the digest of all `--size` bytes to FILE.
pub fn recv_main(args: &[String]) -> Result<()> {
    let (mut size, mut channels, mut mem, mut digest) = (None, 1usize, Mem::Fresh, None);
    let mut mode = RecvMode::Direct;
    let mut image: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut v = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--size" => size = Some(v()?.parse::<u64>().context("--size")?),
            "--channels" => channels = v()?.parse().context("--channels")?,
            "--memory" => {
                mem = match v()?.as_str() {
                    "fresh" => Mem::Fresh,
                    "thp" => Mem::FreshThp,
                    "touched" => Mem::Touched,
                    m => bail!("--memory {m:?}: fresh, thp or touched"),
                }
            }
            "--image" => image = Some(PathBuf::from(v()?)),
            "--bounce" => mode = RecvMode::Bounce,
            "--digest" => digest = Some(PathBuf::from(v()?)),
            other => bail!("floor-recv: unknown option {other:?}"),
        }
    }
    let size = size.context("--size is required")?;
    let digest = digest.context("--digest is required")?;
    ensure!(
        size > 0 && channels >= 1,
        "--size and --channels must be positive"
    );
    // SAFETY: fresh private anonymous memory, checked below; unmapped at exit.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    ensure!(
        p != libc::MAP_FAILED,
        "mmap {size} bytes: {}",
        std::io::Error::last_os_error()
    );
    if mem == Mem::FreshThp {
        // SAFETY: advice on the mapping just made.
        let r = unsafe { libc::madvise(p, size as usize, libc::MADV_HUGEPAGE) };
        ensure!(
            r == 0,
            "madvise(MADV_HUGEPAGE): {}",
            std::io::Error::last_os_error()
        );
    }
    let base = p as usize;
    if mem == Mem::Touched {
        // The pages the data will land in, written once before the clock (the sender's clock
        // starts after this process says it listens).
        let image = image.context("--memory touched needs --image")?;
        let f = File::open(&image).with_context(|| format!("opening {}", image.display()))?;
        for (off, len) in data_pieces(&f, size)? {
            let mut at = off;
            while at < off + len {
                // SAFETY: `at` lies inside the mapping (the pieces lie below `size`); a
                // volatile byte write, no reference kept.
                unsafe { ((base + at as usize) as *mut u8).write_volatile(1) };
                at += 4096;
            }
        }
    }
    let l = TcpListener::bind("127.0.0.1:0")?;
    println!("listening {}", l.local_addr()?);
    std::io::stdout().flush()?;
    let socks: Vec<TcpStream> = (0..channels)
        .map(|_| l.accept().map(|(s, _)| s).context("accept"))
        .collect::<Result<_>>()?;
    let got: u64 = std::thread::scope(|s| -> Result<u64> {
        let hs: Vec<_> = socks
            .into_iter()
            .map(|mut sock| {
                s.spawn(move || -> Result<u64> {
                    let mut n = 0;
                    let mut bounce = match mode {
                        RecvMode::Bounce => vec![0u8; BOUNCE],
                        RecvMode::Direct => Vec::new(),
                    };
                    loop {
                        let mut hdr = [0u8; 16];
                        match sock.read(&mut hdr[..1])? {
                            0 => return Ok(n),
                            _ => sock.read_exact(&mut hdr[1..])?,
                        }
                        let off = u64::from_le_bytes(hdr[..8].try_into().expect("8"));
                        let len = u64::from_le_bytes(hdr[8..].try_into().expect("8"));
                        ensure!(
                            len <= PIECE && off.checked_add(len).is_some_and(|e| e <= size),
                            "record {off:#x}+{len:#x} outside {size:#x} bytes"
                        );
                        let mut at = 0u64;
                        while at < len {
                            let dst = (base + (off + at) as usize) as *mut u8;
                            let want = match mode {
                                RecvMode::Direct => (len - at) as usize,
                                RecvMode::Bounce => ((len - at) as usize).min(BOUNCE),
                            };
                            let into = match mode {
                                RecvMode::Direct => dst,
                                RecvMode::Bounce => bounce.as_mut_ptr(),
                            };
                            // SAFETY: `into` is either [off+at, off+at+want) inside the mapping
                            // (checked above) or the bounce buffer of at least `want` bytes;
                            // the kernel writes there and no Rust reference to that memory
                            // is alive across the call.
                            let r = unsafe {
                                libc::recv(sock.as_raw_fd(), into.cast(), want, libc::MSG_WAITALL)
                            };
                            ensure!(
                                r > 0,
                                "recv: {}",
                                if r == 0 {
                                    "the sender closed mid-record".to_string()
                                } else {
                                    std::io::Error::last_os_error().to_string()
                                }
                            );
                            if mode == RecvMode::Bounce {
                                // SAFETY: `r` bytes were received into the buffer; the target
                                // range lies inside the mapping (checked above) and does not
                                // overlap the buffer.
                                unsafe {
                                    std::ptr::copy_nonoverlapping(bounce.as_ptr(), dst, r as usize)
                                };
                            }
                            at += r as u64;
                        }
                        n += len;
                    }
                })
            })
            .collect();
        join_sum(hs, "receiving")
    })?;
    let end = monotonic_ns();
    println!("end {end} {got}");
    std::io::stdout().flush()?;
    // SAFETY: every writer has finished; the mapping is `size` readable bytes.
    let all = unsafe { std::slice::from_raw_parts(base as *const u8, size as usize) };
    write_digest(&digest, &digest_bytes(all))?;
    Ok(())
}

/// Joins the threads and sums their byte counts; the first error (or panic) wins.
fn join_sum(hs: Vec<std::thread::ScopedJoinHandle<'_, Result<u64>>>, what: &str) -> Result<u64> {
    let mut total = 0;
    for h in hs {
        total += h
            .join()
            .map_err(|_| anyhow::anyhow!("a {what} thread panicked"))??;
    }
    Ok(total)
}

fn spawn_line(
    cmd: &mut Command,
    what: &str,
) -> Result<(std::process::Child, BufReader<std::process::ChildStdout>)> {
    let mut c = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let out = BufReader::new(c.stdout.take().context("stdout")?);
    Ok((c, out))
}

fn line(
    r: &mut BufReader<std::process::ChildStdout>,
    what: &str,
    key: &str,
) -> Result<Vec<String>> {
    let mut s = String::new();
    r.read_line(&mut s)
        .with_context(|| format!("reading {what}'s output"))?;
    let w: Vec<String> = s.split_whitespace().map(str::to_string).collect();
    ensure!(
        w.first().map(String::as_str) == Some(key),
        "{what} said {s:?}, expected {key:?}"
    );
    Ok(w)
}

/// One copy of `image` (its data, `size` bytes of address space) over `channels` connections,
/// checked against `want` (the image's digest). `tmp` holds the receiver's digest file.
#[allow(clippy::too_many_arguments)]
pub fn measure(
    image: &Path,
    size: u64,
    channels: u32,
    send: SendMode,
    recv: RecvMode,
    mem: Mem,
    want: &[u64],
    tmp: &Path,
) -> Result<Sample> {
    let exe = std::env::current_exe().context("finding the xtask binary")?;
    let dfile = tmp.join("floor-digest.bin");
    let _ = std::fs::remove_file(&dfile);
    let mut rc = Command::new(&exe);
    rc.args(["floor-recv", "--size", &size.to_string()])
        .args(["--channels", &channels.to_string(), "--digest"])
        .arg(&dfile);
    rc.args(["--memory", mem.name(), "--image"]).arg(image);
    if recv == RecvMode::Bounce {
        rc.arg("--bounce");
    }
    let (mut rx, mut rout) = spawn_line(&mut rc, "floor-recv")?;
    let addr = line(&mut rout, "floor-recv", "listening")?
        .get(1)
        .cloned()
        .context("floor-recv printed no address")?;
    let mut sc = Command::new(&exe);
    sc.args(["floor-send", "--image"])
        .arg(image)
        .args(["--to", &addr, "--channels", &channels.to_string()])
        .args(["--mode", send.name()]);
    let (mut tx, mut tout) = spawn_line(&mut sc, "floor-send")?;
    let result = (|| -> Result<Sample> {
        let start: u64 = line(&mut tout, "floor-send", "start")?
            .get(1)
            .context("floor-send's start line has no time")?
            .parse()?;
        let sent: u64 = line(&mut tout, "floor-send", "sent")?
            .get(1)
            .context("sent")?
            .parse()?;
        let e = line(&mut rout, "floor-recv", "end")?;
        let (end, got): (u64, u64) = (
            e.get(1).context("end")?.parse()?,
            e.get(2).context("end")?.parse()?,
        );
        ensure!(got == sent, "the floor receiver got {got} of {sent} bytes");
        let st = rx.wait()?;
        ensure!(st.success(), "floor-recv failed ({st})");
        let got = read_digest(&dfile)?;
        if let Some(d) = compare(want, &got) {
            bail!("the lower-bound copy is not the image: {d}");
        }
        Ok(Sample {
            send,
            recv,
            mem,
            us: end.saturating_sub(start) / 1000,
            bytes: sent,
        })
    })();
    let _ = tx.kill();
    let _ = rx.kill();
    let _ = tx.wait();
    let _ = rx.wait();
    let _ = std::fs::remove_file(&dfile);
    result
}

/// Plain memory-copy bandwidth, bytes per second: the best of three copies of 256 MiB into
/// memory already touched, and the best of three into fresh anonymous memory (page faults
/// included).
pub fn memcpy_bandwidth() -> (f64, f64) {
    const N: usize = 256 << 20;
    let src: Vec<u8> = (0..N).map(|i| (i * 31 % 251) as u8).collect();
    let mut dst = vec![1u8; N];
    let mut warm = f64::MAX;
    let mut fresh = f64::MAX;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        warm = warm.min(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        let mut d = Vec::<u8>::with_capacity(N);
        // SAFETY: copies N initialized bytes into the capacity just reserved, then sets the
        // length to what was written.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), d.as_mut_ptr(), N);
            d.set_len(N);
        }
        std::hint::black_box(&d);
        fresh = fresh.min(t.elapsed().as_secs_f64());
    }
    (N as f64 / warm, N as f64 / fresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_name_the_first_difference() {
        let a = vec![0u8; 5 << 20];
        let mut b = a.clone();
        let da = digest_bytes(&a);
        assert_eq!(da.len(), 3, "5 MiB is three pieces, the last 1 MiB");
        assert_eq!(compare(&da, &digest_bytes(&b)), None);
        b[(4 << 20) + 7] = 1;
        let m = compare(&da, &digest_bytes(&b)).expect("differs");
        assert!(m.contains("1 of 3") && m.contains("0x400000"), "{m}");
        assert!(compare(&da, &da[..2]).is_some());
    }

    #[test]
    fn pieces_follow_the_data_and_stop_at_2_mib() {
        use std::os::unix::fs::FileExt;
        let dir = std::env::temp_dir().join(format!("floor-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("img");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&vec![7u8; 3 << 20], 4 << 20).unwrap();
        f.sync_all().unwrap();
        let got = data_pieces(&f, 16 << 20).unwrap();
        // tmpfs and ext4 report data at page or block granularity: the 3 MiB written at 4 MiB
        // come back as 2 MiB + 1 MiB.
        assert_eq!(got, vec![(4 << 20, 2 << 20), (6 << 20, 1 << 20)]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
