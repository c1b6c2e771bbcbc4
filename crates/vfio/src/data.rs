//! Migration data transfer sessions: the data fd and the loops that move device state.
//!
//! An arc into STOP_COPY, PRE_COPY, PRE_COPY_P2P or RESUMING returns a data fd (vfio.h,
//! `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`). The saving group shares one fd; RESUMING gets its own.
//! The byte stream is opaque and its order must be preserved; its segmentation need not be.
//!
//! * **STOP_COPY**: read until `read()` returns 0 — the permanent end of stream. ENOMSG is not
//!   allowed here ([`save_stop_copy`]).
//! * **PRE_COPY**: `VFIO_MIG_GET_PRECOPY_INFO` estimates what is available (`initial_bytes`,
//!   then `dirty_bytes`); when both are 0 the fd is at a *temporary* end of stream, and `read()`
//!   fails with ENOMSG (some drivers, e.g. mtty, return 0 instead). [`save_precopy`] reads one
//!   round driven by those estimates.
//! * **RESUMING**: write the bytes in any segmentation ([`load_resuming`]); the device validates
//!   them when it leaves RESUMING.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::abi;
use crate::error::{Error, Op};
use crate::sys;

/// `VFIO_MIG_GET_PRECOPY_INFO`: the device's estimate of pre-copy data still available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrecopyInfo {
    /// Initial pre-copy bytes not read yet. Leaving PRE_COPY before this reaches 0 is allowed
    /// but vfio.h recommends against it.
    pub initial_bytes: u64,
    /// Bytes of device state changed relative to what was already read.
    pub dirty_bytes: u64,
    /// `VFIO_PRECOPY_INFO_REINIT`: the device put new initial data on the stream
    /// (`initial_bytes` counts it), so what was sent as its initial data no longer is all of
    /// it. Only ever set after the device's opt-in
    /// ([`MigrationDevice::enable_precopy_info_v2`](crate::MigrationDevice::enable_precopy_info_v2));
    /// without it the kernel's `flags` are not an output and are ignored.
    pub reinit: bool,
}

impl PrecopyInfo {
    /// Everything currently available to read.
    pub fn total(&self) -> u64 {
        self.initial_bytes.saturating_add(self.dirty_bytes)
    }
}

/// A migration data transfer session: readable in the saving states, writable in RESUMING.
pub trait DataChannel: Read + Write {
    /// `VFIO_MIG_GET_PRECOPY_INFO`. Valid only while the device is in PRE_COPY or PRE_COPY_P2P;
    /// other states give EINVAL (vfio.h).
    fn precopy_info(&mut self) -> Result<PrecopyInfo, Error>;
}

/// A kernel migration data fd, owned. Implements [`Read`], [`Write`] and [`AsFd`] so callers can
/// also poll or splice it themselves.
#[derive(Debug)]
pub struct DataFile {
    file: File,
    /// The device opted in to `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2`: `flags` is an output.
    precopy_v2: bool,
}

impl DataFile {
    /// Takes ownership of a data fd (for example one passed in by an orchestrator).
    pub fn from_fd(fd: OwnedFd) -> DataFile {
        DataFile {
            precopy_v2: false,
            file: File::from(fd),
        }
    }

    /// Waits until the fd is readable (data or end of stream), or `timeout` passes. Useful at a
    /// PRE_COPY temporary end of stream: vfio.h says to wait with poll() for more data.
    pub fn wait_readable(&self, timeout: Option<Duration>) -> Result<bool, Error> {
        let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: `pfd` is one valid pollfd for the duration of the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc >= 0 {
                return Ok(rc > 0);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(Error::ioctl(Op::DataRead, err));
            }
        }
    }
}

impl Read for DataFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sys::read(self.file.as_fd(), buf)
    }
}

impl Write for DataFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sys::write(self.file.as_fd(), buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for DataFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for DataFile {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl From<DataFile> for OwnedFd {
    fn from(d: DataFile) -> OwnedFd {
        d.file.into()
    }
}

impl DataFile {
    /// Marks the session as belonging to a device that opted in to
    /// `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2`, so `VFIO_PRECOPY_INFO_REINIT` is read from
    /// `flags` (for a fd passed in by an orchestrator that did the opt-in itself).
    pub fn with_precopy_info_v2(mut self, on: bool) -> DataFile {
        self.precopy_v2 = on;
        self
    }
}

impl DataChannel for DataFile {
    fn precopy_info(&mut self) -> Result<PrecopyInfo, Error> {
        let mut info = abi::vfio_precopy_info {
            argsz: core::mem::size_of::<abi::vfio_precopy_info>() as u32,
            ..Default::default()
        };
        // SAFETY: `info` is a valid vfio_precopy_info with argsz set to its size.
        unsafe {
            sys::ioctl(
                self.file.as_fd(),
                abi::VFIO_MIG_GET_PRECOPY_INFO,
                (&raw mut info).cast(),
            )
        }
        .map_err(|e| Error::ioctl(Op::PrecopyInfo, e))?;
        Ok(PrecopyInfo {
            initial_bytes: info.initial_bytes,
            dirty_bytes: info.dirty_bytes,
            // Bits other than REINIT are not defined (7.3.4 vfio.h line 1317): ignored, as a
            // later kernel's new output bits must not break this one.
            reinit: self.precopy_v2 && info.flags & abi::VFIO_PRECOPY_INFO_REINIT != 0,
        })
    }
}

/// Buffer size for the copy loops: large enough to amortise syscalls, small enough for stacks
/// of many devices.
const CHUNK: usize = 64 * 1024;

/// Errors while moving data between a data fd and the caller's reader/writer.
fn is_enomsg(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOMSG)
}

/// Reads the STOP_COPY device state into `sink` until end of stream; returns the byte count.
///
/// `Interrupted` reads are retried. ENOMSG is an error here ([`Error::UnexpectedEnomsg`]): vfio.h
/// says it "may not be returned in STOP_COPY". A failing `sink` is reported as
/// [`Error::Sink`].
pub fn save_stop_copy<D, W>(data: &mut D, sink: &mut W) -> Result<u64, Error>
where
    D: Read + ?Sized,
    W: Write + ?Sized,
{
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match data.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                sink.write_all(&buf[..n])
                    .map_err(|source| Error::Sink { source })?;
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_enomsg(&e) => return Err(Error::UnexpectedEnomsg),
            Err(e) => return Err(Error::ioctl(Op::DataRead, e)),
        }
    }
}

/// The outcome of one PRE_COPY round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrecopyRound {
    /// `VFIO_MIG_GET_PRECOPY_INFO` at the start of the round.
    pub info: PrecopyInfo,
    /// Bytes copied to the sink.
    pub bytes: u64,
    /// The fd reached its temporary end of stream (ENOMSG, a 0-byte read, or nothing reported
    /// available): nothing more to read until the device changes state again.
    pub drained: bool,
}

/// Reads one PRE_COPY round into `sink`: queries `VFIO_MIG_GET_PRECOPY_INFO`, then reads up to
/// the reported `initial_bytes + dirty_bytes`, at most `max_bytes`.
///
/// A temporary end of stream — ENOMSG, or a 0-byte read as some drivers give — ends the round
/// with `drained` set; it is not an error. An estimate of 0 ends the round without reading
/// (the read would only return ENOMSG). EINVAL from the info ioctl means the device is not in a
/// PRE_COPY state and is returned as an error naming `VFIO_MIG_GET_PRECOPY_INFO`.
pub fn save_precopy<D, W>(data: &mut D, sink: &mut W, max_bytes: u64) -> Result<PrecopyRound, Error>
where
    D: DataChannel + ?Sized,
    W: Write + ?Sized,
{
    let info = data.precopy_info()?;
    let want = info.total().min(max_bytes);
    let mut round = PrecopyRound {
        info,
        bytes: 0,
        drained: info.total() == 0,
    };
    let mut buf = vec![0u8; CHUNK.min(usize::try_from(want).unwrap_or(CHUNK)).max(1)];
    while round.bytes < want {
        let ask = usize::try_from(want - round.bytes)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        match data.read(&mut buf[..ask]) {
            Ok(0) => {
                round.drained = true;
                break;
            }
            Ok(n) => {
                sink.write_all(&buf[..n])
                    .map_err(|source| Error::Sink { source })?;
                round.bytes += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_enomsg(&e) => {
                round.drained = true;
                break;
            }
            Err(e) => return Err(Error::ioctl(Op::DataRead, e)),
        }
    }
    Ok(round)
}

/// Writes RESUMING data from `src` into the data fd until `src` ends; returns the byte count.
/// Short writes are continued; segmentation does not matter to the device (vfio.h).
pub fn load_resuming<R, D>(src: &mut R, data: &mut D) -> Result<u64, Error>
where
    R: Read + ?Sized,
    D: Write + ?Sized,
{
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(Error::Source { source }),
        };
        write_resuming(data, &buf[..n])?;
        total += n as u64;
    }
}

/// Writes one chunk of RESUMING data, continuing short writes.
pub fn write_resuming<D: Write + ?Sized>(data: &mut D, mut bytes: &[u8]) -> Result<(), Error> {
    while !bytes.is_empty() {
        match data.write(bytes) {
            Ok(0) => {
                return Err(Error::ioctl(
                    Op::DataWrite,
                    io::Error::from(io::ErrorKind::WriteZero),
                ));
            }
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::ioctl(Op::DataWrite, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted channel: each read returns the next scripted result.
    struct Script {
        reads: Vec<io::Result<Vec<u8>>>,
        info: PrecopyInfo,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.reads.is_empty() {
                return Ok(0);
            }
            match self.reads.remove(0) {
                Ok(mut v) => {
                    let n = v.len().min(buf.len());
                    buf[..n].copy_from_slice(&v[..n]);
                    if n < v.len() {
                        self.reads.insert(0, Ok(v.split_off(n)));
                    }
                    Ok(n)
                }
                Err(e) => Err(e),
            }
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len().min(3)) // short writes
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl DataChannel for Script {
        fn precopy_info(&mut self) -> Result<PrecopyInfo, Error> {
            Ok(self.info)
        }
    }

    fn errno(n: i32) -> io::Error {
        io::Error::from_raw_os_error(n)
    }

    #[test]
    fn stop_copy_reads_to_eof_and_retries_eintr() {
        let mut s = Script {
            reads: vec![
                Ok(b"abc".to_vec()),
                Err(errno(libc::EINTR)),
                Ok(b"def".to_vec()),
            ],
            info: PrecopyInfo::default(),
        };
        let mut out = Vec::new();
        assert_eq!(save_stop_copy(&mut s, &mut out).unwrap(), 6);
        assert_eq!(out, b"abcdef");
    }

    #[test]
    fn stop_copy_rejects_enomsg_and_names_read_errors() {
        let mut s = Script {
            reads: vec![Ok(b"x".to_vec()), Err(errno(libc::ENOMSG))],
            info: PrecopyInfo::default(),
        };
        assert!(matches!(
            save_stop_copy(&mut s, &mut Vec::new()),
            Err(Error::UnexpectedEnomsg)
        ));
        let mut s = Script {
            reads: vec![Err(errno(libc::EIO))],
            info: PrecopyInfo::default(),
        };
        let e = save_stop_copy(&mut s, &mut Vec::new()).unwrap_err();
        assert_eq!(e.to_string(), "migration data read failed");
        assert_eq!(e.errno(), Some(libc::EIO));
    }

    #[test]
    fn precopy_round_stops_at_estimate_enomsg_or_zero() {
        // Reads only what the estimate says, even if more is there.
        let mut s = Script {
            reads: vec![Ok(b"0123456789".to_vec())],
            info: PrecopyInfo {
                reinit: false,
                initial_bytes: 4,
                dirty_bytes: 2,
            },
        };
        let mut out = Vec::new();
        let r = save_precopy(&mut s, &mut out, u64::MAX).unwrap();
        assert_eq!((r.bytes, r.drained), (6, false));
        assert_eq!(out, b"012345");
        // The cap wins over the estimate.
        let r = save_precopy(&mut s, &mut Vec::new(), 2).unwrap();
        assert_eq!(r.bytes, 2);
        // ENOMSG is the temporary end of stream.
        let mut s = Script {
            reads: vec![Ok(b"ab".to_vec()), Err(errno(libc::ENOMSG))],
            info: PrecopyInfo {
                reinit: false,
                initial_bytes: 10,
                dirty_bytes: 0,
            },
        };
        let r = save_precopy(&mut s, &mut Vec::new(), u64::MAX).unwrap();
        assert_eq!((r.bytes, r.drained), (2, true));
        // Nothing reported: no read at all.
        let mut s = Script {
            reads: vec![Err(errno(libc::EIO))],
            info: PrecopyInfo::default(),
        };
        let r = save_precopy(&mut s, &mut Vec::new(), u64::MAX).unwrap();
        assert_eq!((r.bytes, r.drained), (0, true));
    }

    #[test]
    fn resuming_writes_continue_short_writes() {
        let mut dst = Script {
            reads: vec![],
            info: PrecopyInfo::default(),
        };
        let n = load_resuming(&mut &b"hello world"[..], &mut dst).unwrap();
        assert_eq!(n, 11);
    }

    #[test]
    fn sink_failure_is_distinct_from_device_failure() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut s = Script {
            reads: vec![Ok(b"abc".to_vec())],
            info: PrecopyInfo::default(),
        };
        let e = save_stop_copy(&mut s, &mut Broken).unwrap_err();
        assert!(matches!(e, Error::Sink { .. }), "{e}");
    }
}
