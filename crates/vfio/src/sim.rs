//! An in-memory simulated migratable device, behaving as a VFIO migration driver does.
//!
//! [`SimDevice`] follows the kernel's rules exactly where the kernel defines them — the state
//! set of its [`MigrationFlags`], combination transitions walked arc by arc through
//! [`fsm::next_step`], one data session shared by the saving group, ENOMSG at a PRE_COPY
//! temporary end of stream, EOF at the end of STOP_COPY, EINVAL from
//! `VFIO_MIG_GET_PRECOPY_INFO` outside PRE_COPY, validation of the RESUMING data when leaving
//! RESUMING — and adds what tests need: device activity on demand ([`SimDevice::tick`]), DMA
//! logging, and fault injection at any arc or data transfer ([`Fault`]).
//!
//! Its device state is `state_size` bytes, tracked in `chunk_size` chunks so PRE_COPY can send
//! only what changed. The data stream it produces (little-endian):
//!
//! ```text
//! header  "LMSIMDEV" | version u32 = 1 | device_id u32 | state_size u32 | chunk_size u32
//! chunk   tag u8 = 1 | offset u32 | len u32 | bytes[len] | fnv1a32(offset, len, bytes) u32
//! end     tag u8 = 2 | fnv1a64(whole device state) u64
//! ```
//!
//! The destination checks magic, version, identity and geometry, every chunk checksum and bound,
//! that exactly one end record comes last, and that the rebuilt state has the sender's digest.
//! Nothing is applied unless all of that holds; the device then stays in RESUMING.

use std::collections::{BTreeSet, VecDeque};
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::data::{DataChannel, PrecopyInfo};
use crate::dma_log::{self, DmaLogger, DmaRange};
use crate::error::{Access, Error, Feature, Op};
use crate::fsm::{self, MigrationFlags, MigrationState};
use crate::migration::MigrationDevice;

const MAGIC: &[u8; 8] = b"LMSIMDEV";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 24;
const TAG_CHUNK: u8 = 1;
const TAG_END: u8 = 2;
const CHUNK_OVERHEAD: usize = 1 + 4 + 4 + 4;
const END_LEN: usize = 1 + 8;

/// Configuration of a [`SimDevice`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// Migration flags the device reports (must include STOP_COPY).
    pub flags: MigrationFlags,
    /// Bytes of internal device state.
    pub state_size: usize,
    /// Granularity at which the device tracks its own state changes for PRE_COPY.
    pub chunk_size: usize,
    /// `Some(n)`: the device has a DMA-logging tracker taking up to `n` ranges; `None`: none
    /// (the DMA logging features fail with ENOTTY, as on a device without a tracker).
    pub dma_logging_max_ranges: Option<usize>,
    /// Identity written into the stream; a destination with another identity refuses it.
    pub device_id: u32,
    /// Seed for the initial state and the activity pattern.
    pub seed: u64,
    /// The device accepts the `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` opt-in (a Linux 7.3
    /// kernel with a PRE_COPY device) and then reports [`SimDevice::reinit`] as
    /// `VFIO_PRECOPY_INFO_REINIT`.
    pub precopy_info_v2: bool,
}

impl SimConfig {
    /// A 4 KiB-state device with `flags`, 64-byte chunks, no DMA logging.
    pub fn new(flags: MigrationFlags) -> SimConfig {
        SimConfig {
            flags,
            state_size: 4096,
            chunk_size: 64,
            dma_logging_max_ranges: None,
            device_id: 0x5157_0001,
            seed: 1,
            precopy_info_v2: false,
        }
    }
}

/// A fault to inject into a [`SimDevice`]. Faults stay armed until
/// [`SimDevice::clear_faults`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// The arc `from -> to` fails with EIO. The device stays in `from`, or enters ERROR when
    /// `to_error` is set (a driver that could not restore any valid state).
    Arc {
        /// Arc start.
        from: MigrationState,
        /// Arc end.
        to: MigrationState,
        /// Leave the device in ERROR.
        to_error: bool,
    },
    /// Reads from a saving data session fail with EIO once `after` bytes were read from it.
    DataRead {
        /// Bytes that still succeed.
        after: u64,
    },
    /// Writes to a RESUMING data session fail with EIO once `after` bytes were written to it.
    DataWrite {
        /// Bytes that still succeed.
        after: u64,
    },
    /// `MIG_DEVICE_STATE` GET fails with EIO.
    StateRead,
    /// `VFIO_DEVICE_RESET` fails with EIO.
    Reset,
    /// The next `DMA_LOGGING_REPORT` fails with EIO; the fault then disarms itself (a report
    /// that failed part-way through a harvest).
    DmaLogReport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionKind {
    Save,
    Resume,
}

#[derive(Debug)]
struct Session {
    id: u64,
    kind: SessionKind,
    /// Saving: serialized bytes not read yet. Resuming: unused.
    out: VecDeque<u8>,
    /// Saving: bytes of the initial snapshot not read yet.
    initial_left: u64,
    /// Saving: the end record was queued (STOP_COPY); an empty queue is then EOF.
    ended: bool,
    /// Resuming: the stream parsed as it arrives (at most one partial record is held).
    loader: Loader,
    /// Bytes moved through this session (for data faults).
    moved: u64,
}

/// A RESUMING stream parsed as it arrives, the way a driver consumes its data fd: the header
/// is checked first, each chunk is checked and applied to a copy of the state as soon as it is
/// whole, and only one partial record is ever held (at most a chunk header, the largest chunk
/// the geometry allows and its checksum). A chunk that would write outside the state is passed
/// over without being kept, and nothing after an error or after the end record is kept either,
/// so a peer cannot make the device buffer more than one chunk. The errors are reported when
/// the session ends (RESUMING → STOP); nothing changes unless all of it was valid.
#[derive(Debug, Default)]
struct Loader {
    /// Unparsed bytes: a partial header or record.
    pending: Vec<u8>,
    /// Stream offset of `pending[0]`.
    at: usize,
    /// The state being rebuilt, once the header was accepted.
    scratch: Option<Vec<u8>>,
    /// A chunk passed over: its offset, its bytes still to come, and whether it was whole
    /// enough to have a header and checksum (for the error's wording).
    skipping: Option<(usize, u64)>,
    /// The first error, and the end record's digest.
    err: Option<String>,
    digest: Option<u64>,
    /// Bytes received after the end record.
    after_end: u64,
    /// Every byte received.
    total: u64,
}

impl Loader {
    fn take(&mut self) -> Loader {
        std::mem::take(self)
    }

    fn fail(&mut self, why: String) {
        if self.err.is_none() {
            self.err = Some(why);
        }
        self.pending = Vec::new();
    }

    fn consume(&mut self, n: usize) {
        self.pending.drain(..n);
        self.at += n;
    }

    /// Takes the next bytes written to the data fd.
    fn feed(&mut self, bytes: &[u8], dev: &Inner) {
        self.total += bytes.len() as u64;
        if self.err.is_some() {
            return;
        }
        if self.digest.is_some() {
            self.after_end += bytes.len() as u64;
            return;
        }
        // A chunk being passed over takes its bytes without keeping them (what follows it
        // is not looked at: the stream is refused once it is whole).
        if let Some((at, left)) = self.skipping {
            let n = left.min(bytes.len() as u64);
            self.at += n as usize;
            if n == left {
                self.skipping = None;
                self.fail(format!(
                    "chunk at byte {at} writes outside the device state"
                ));
                return;
            }
            self.skipping = Some((at, left - n));
            return;
        }
        self.pending.extend_from_slice(bytes);
        let word =
            |p: &[u8], at: usize| u32::from_le_bytes(p[at..at + 4].try_into().expect("4 bytes"));
        loop {
            if self.scratch.is_none() {
                if self.pending.len() < HEADER_LEN {
                    return;
                }
                let p = &self.pending;
                if &p[..8] != MAGIC {
                    return self.fail("bad magic".into());
                }
                let (version, id, size, chunk) =
                    (word(p, 8), word(p, 12), word(p, 16), word(p, 20));
                if version != VERSION {
                    return self.fail(format!("unsupported stream version {version}"));
                }
                if id != dev.cfg.device_id {
                    return self.fail(format!(
                        "stream is for device id {id:#x}, this device is {:#x}",
                        dev.cfg.device_id
                    ));
                }
                if size as usize != dev.cfg.state_size || chunk as usize != dev.cfg.chunk_size {
                    return self.fail(format!(
                        "stream geometry {size}/{chunk} differs from device {}/{}",
                        dev.cfg.state_size, dev.cfg.chunk_size
                    ));
                }
                self.scratch = Some(dev.regs.clone());
                self.consume(HEADER_LEN);
            }
            let Some(&tag) = self.pending.first() else {
                return;
            };
            let at = self.at;
            match tag {
                TAG_CHUNK => {
                    if self.pending.len() < 9 {
                        return;
                    }
                    let off = word(&self.pending, 1) as usize;
                    let len = word(&self.pending, 5) as usize;
                    if off.checked_add(len).is_none_or(|e| e > dev.cfg.state_size) {
                        // Not kept: whatever of it arrived goes, the rest is passed over.
                        let whole = 9 + len as u64 + 4;
                        let have = self.pending.len() as u64;
                        self.pending = Vec::new();
                        self.at += have.min(whole) as usize;
                        if have >= whole {
                            return self.fail(format!(
                                "chunk at byte {at} writes outside the device state"
                            ));
                        }
                        self.skipping = Some((at, whole - have));
                        return;
                    }
                    let end = 9 + len + 4;
                    if self.pending.len() < end {
                        return;
                    }
                    let p = &self.pending;
                    let crc = word(p, 9 + len);
                    if crc != fnv1a32(&[&p[1..5], &p[5..9], &p[9..9 + len]]) {
                        return self.fail(format!("chunk at byte {at} fails its checksum"));
                    }
                    if let Some(state) = self.scratch.as_mut() {
                        state[off..off + len].copy_from_slice(&p[9..9 + len]);
                    }
                    self.consume(end);
                }
                TAG_END => {
                    if self.pending.len() < END_LEN {
                        return;
                    }
                    self.digest = Some(u64::from_le_bytes(
                        self.pending[1..9].try_into().expect("8 bytes"),
                    ));
                    self.after_end = (self.pending.len() - END_LEN) as u64;
                    self.pending = Vec::new();
                    return;
                }
                t => return self.fail(format!("unknown record tag {t} at byte {at}")),
            }
        }
    }

    /// The end of the session: the rebuilt state, or why the stream is refused.
    fn finish(&self) -> Result<Vec<u8>, String> {
        if let Some(e) = &self.err {
            return Err(e.clone());
        }
        if let Some((at, _)) = self.skipping {
            return Err(format!("chunk at byte {at} runs past the stream end"));
        }
        let Some(scratch) = &self.scratch else {
            return Err(format!(
                "stream of {} bytes has no complete header",
                self.total
            ));
        };
        if self.after_end > 0 {
            return Err(format!("{} bytes after the end record", self.after_end));
        }
        match self.pending.first() {
            Some(&TAG_CHUNK) if self.pending.len() < CHUNK_OVERHEAD => {
                return Err(format!("truncated chunk record at byte {}", self.at));
            }
            Some(&TAG_CHUNK) => {
                return Err(format!(
                    "chunk at byte {} runs past the stream end",
                    self.at
                ));
            }
            Some(_) => return Err(format!("truncated end record at byte {}", self.at)),
            None => {}
        }
        let Some(digest) = self.digest else {
            return Err("stream ends without an end record".into());
        };
        if fnv1a64(scratch) != digest {
            return Err("rebuilt state does not match the sender's digest".into());
        }
        Ok(scratch.clone())
    }

    /// Bytes the session holds beyond the state copy (the partial record).
    fn held(&self) -> usize {
        self.pending.len()
    }
}

#[derive(Debug)]
struct DmaLog {
    page_size: u64,
    ranges: Vec<DmaRange>,
    /// Logged pages, as indexes `iova / page_size`.
    pages: BTreeSet<u64>,
}

#[derive(Debug)]
struct Inner {
    cfg: SimConfig,
    state: MigrationState,
    regs: Vec<u8>,
    dirty: BTreeSet<usize>,
    rng: u64,
    session: Option<Session>,
    next_session: u64,
    faults: Vec<Fault>,
    dma_log: Option<DmaLog>,
    arcs: Vec<(MigrationState, MigrationState)>,
    last_rejection: Option<String>,
    /// Opted in to PRECOPY_INFOv2.
    precopy_v2: bool,
    /// New initial data was queued and not reported yet.
    reinit_pending: bool,
    /// Times [`SimDevice::reinit`] queued new initial data.
    reinits: u32,
}

/// A simulated migratable device. Cloning gives another handle to the same device, so a test or
/// a simulation can drive device activity while an engine migrates it.
#[derive(Debug, Clone)]
pub struct SimDevice {
    inner: Arc<Mutex<Inner>>,
}

/// The data session of a [`SimDevice`]; the simulated counterpart of a data fd.
#[derive(Debug)]
pub struct SimData {
    inner: Arc<Mutex<Inner>>,
    id: u64,
}

fn fnv1a32(parts: &[&[u8]]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for p in parts {
        for &b in *p {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

/// FNV-1a 64 digest of a byte string (the end record's whole-state digest).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

fn errno(n: i32) -> io::Error {
    io::Error::from_raw_os_error(n)
}

const SET_STATE: Op = Op::Feature(Access::Set, Feature::MigDeviceState);

impl Inner {
    fn initial_regs(cfg: &SimConfig) -> Vec<u8> {
        let mut rng = cfg.seed | 1;
        (0..cfg.state_size)
            .map(|_| xorshift(&mut rng) as u8)
            .collect()
    }

    fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the model half-updated in a way that
        // matters more than the panic itself; keep serving.
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn chunks(&self) -> usize {
        self.cfg.state_size.div_ceil(self.cfg.chunk_size)
    }

    fn chunk_range(&self, c: usize) -> (usize, usize) {
        let start = c * self.cfg.chunk_size;
        (
            start,
            (start + self.cfg.chunk_size).min(self.cfg.state_size),
        )
    }

    fn header(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(HEADER_LEN);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&self.cfg.device_id.to_le_bytes());
        h.extend_from_slice(&(self.cfg.state_size as u32).to_le_bytes());
        h.extend_from_slice(&(self.cfg.chunk_size as u32).to_le_bytes());
        h
    }

    fn push_chunk(&self, out: &mut VecDeque<u8>, c: usize) {
        let (s, e) = self.chunk_range(c);
        let off = (s as u32).to_le_bytes();
        let len = ((e - s) as u32).to_le_bytes();
        let bytes = &self.regs[s..e];
        out.push_back(TAG_CHUNK);
        out.extend(off);
        out.extend(len);
        out.extend(bytes.iter().copied());
        out.extend(fnv1a32(&[&off, &len, bytes]).to_le_bytes());
    }

    fn chunk_wire_len(&self, c: usize) -> u64 {
        let (s, e) = self.chunk_range(c);
        (CHUNK_OVERHEAD + e - s) as u64
    }

    fn new_session(&mut self, kind: SessionKind) -> u64 {
        self.next_session += 1;
        let id = self.next_session;
        self.session = Some(Session {
            id,
            kind,
            out: VecDeque::new(),
            initial_left: 0,
            ended: false,
            loader: Loader::default(),
            moved: 0,
        });
        id
    }

    /// Queues header and every chunk as the initial snapshot of a saving session.
    fn start_save(&mut self) -> u64 {
        let id = self.new_session(SessionKind::Save);
        let mut out: VecDeque<u8> = self.header().into();
        for c in 0..self.chunks() {
            self.push_chunk(&mut out, c);
        }
        self.dirty.clear();
        let s = self.session.as_mut().expect("session just created");
        s.initial_left = out.len() as u64;
        s.out = out;
        id
    }

    /// Moves the dirty chunks into the saving session's queue.
    fn flush_dirty(&mut self) {
        let dirty: Vec<usize> = std::mem::take(&mut self.dirty).into_iter().collect();
        let mut out = self
            .session
            .as_mut()
            .map(|s| std::mem::take(&mut s.out))
            .unwrap_or_default();
        for c in dirty {
            self.push_chunk(&mut out, c);
        }
        if let Some(s) = self.session.as_mut() {
            s.out = out;
        }
    }

    /// STOP_COPY: queue what changed plus the end record; the session then ends at EOF.
    fn finish_save(&mut self) {
        self.flush_dirty();
        let digest = fnv1a64(&self.regs);
        if let Some(s) = self.session.as_mut() {
            s.out.push_back(TAG_END);
            s.out.extend(digest.to_le_bytes());
            s.ended = true;
        }
    }

    fn fault_arc(&self, from: MigrationState, to: MigrationState) -> Option<bool> {
        self.faults.iter().find_map(|f| match *f {
            Fault::Arc {
                from: a,
                to: b,
                to_error,
            } if a == from && b == to => Some(to_error),
            _ => None,
        })
    }

    /// Executes one arc the kernel would hand a driver.
    fn arc(
        &mut self,
        from: MigrationState,
        to: MigrationState,
    ) -> Result<Option<u64>, crate::Error> {
        use MigrationState::*;
        if let Some(to_error) = self.fault_arc(from, to) {
            if to_error {
                self.state = MigrationState::Error;
                self.session = None;
            }
            return Err(crate::Error::ioctl(SET_STATE, errno(libc::EIO)));
        }
        let mut created = None;
        match (from, to) {
            (Running, PreCopy) | (RunningP2p, PreCopyP2p) | (Stop, StopCopy) => {
                let id = self.start_save();
                if to == StopCopy {
                    self.finish_save();
                }
                created = Some(id);
            }
            (PreCopy, StopCopy) | (PreCopyP2p, StopCopy) => self.finish_save(),
            (PreCopy, Running) | (PreCopyP2p, RunningP2p) | (StopCopy, Stop) => {
                self.session = None;
            }
            (Stop, Resuming) => created = Some(self.new_session(SessionKind::Resume)),
            (Resuming, Stop) => {
                let session = self.session.take_if(|s| s.kind == SessionKind::Resume);
                let result = match &session {
                    Some(s) => s.loader.finish(),
                    None => Loader::default().finish(),
                };
                match result {
                    Ok(regs) => self.regs = regs,
                    Err(reason) => {
                        // Refuse and stay in RESUMING with the session kept, as vfio.h allows;
                        // a reset (or leaving for a fresh RESUMING) is the way out.
                        self.last_rejection = Some(reason.clone());
                        self.session = session;
                        return Err(crate::Error::InvalidDeviceState(reason));
                    }
                }
            }
            _ => {}
        }
        self.arcs.push((from, to));
        self.state = to;
        Ok(created)
    }

    fn set_state(&mut self, target: MigrationState) -> Result<Option<u64>, Error> {
        if target == MigrationState::Error {
            return Err(Error::ioctl(SET_STATE, errno(libc::EINVAL)));
        }
        let mut created = None;
        while self.state != target {
            let step = fsm::next_step(self.state, target, self.cfg.flags)
                .map_err(|_| Error::ioctl(SET_STATE, errno(libc::EINVAL)))?;
            if let Some(id) = self.arc(self.state, step)? {
                created = Some(id);
            }
        }
        Ok(created)
    }

    fn session_for(&mut self, id: u64, kind: SessionKind) -> io::Result<&mut Session> {
        match self.session.as_mut() {
            Some(s) if s.id == id && s.kind == kind => Ok(s),
            Some(s) if s.id == id => Err(errno(if kind == SessionKind::Save {
                libc::EINVAL
            } else {
                libc::EBADF
            })),
            _ => Err(errno(libc::ENODEV)),
        }
    }
}

impl SimDevice {
    /// A device in RUNNING. Panics on a configuration no device could have (no STOP_COPY flag,
    /// zero sizes) — a programming error, not an input.
    pub fn new(cfg: SimConfig) -> SimDevice {
        assert!(
            cfg.flags.contains(MigrationFlags::STOP_COPY),
            "a migratable device reports STOP_COPY"
        );
        assert!(
            cfg.state_size > 0 && cfg.chunk_size > 0,
            "sizes must be non-zero"
        );
        assert!(
            u32::try_from(cfg.state_size).is_ok(),
            "state must fit the stream's u32 sizes"
        );
        let regs = Inner::initial_regs(&cfg);
        SimDevice {
            inner: Arc::new(Mutex::new(Inner {
                rng: cfg.seed.rotate_left(17) | 1,
                cfg,
                state: MigrationState::Running,
                regs,
                dirty: BTreeSet::new(),
                session: None,
                next_session: 0,
                faults: Vec::new(),
                dma_log: None,
                arcs: Vec::new(),
                last_rejection: None,
                precopy_v2: false,
                reinit_pending: false,
                reinits: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        Inner::lock(&self.inner)
    }

    /// The device re-initialises during PRE_COPY (as a reconfigured device does): its whole
    /// state is queued again as new initial data, `initial_bytes` counts it again, and the next
    /// `VFIO_MIG_GET_PRECOPY_INFO` reports `VFIO_PRECOPY_INFO_REINIT` if the opt-in was made.
    /// Returns whether a saving session in PRE_COPY was there to re-initialise.
    pub fn reinit(&self) -> bool {
        let mut g = self.lock();
        if !matches!(
            g.state,
            MigrationState::PreCopy | MigrationState::PreCopyP2p
        ) {
            return false;
        }
        // Every chunk again (the stream's header was sent once; chunk records overwrite).
        let mut fresh = VecDeque::new();
        for c in 0..g.chunks() {
            g.push_chunk(&mut fresh, c);
        }
        g.dirty.clear();
        let Some(s) = g.session.as_mut().filter(|s| s.kind == SessionKind::Save) else {
            return false;
        };
        s.out.extend(fresh);
        s.initial_left = s.out.len() as u64;
        g.reinit_pending = true;
        g.reinits += 1;
        true
    }

    /// Initial bytes the saving session has not had read yet (`None` without one): what
    /// `initial_bytes` would report now.
    pub fn precopy_initial_left(&self) -> Option<u64> {
        let g = self.lock();
        g.session
            .as_ref()
            .filter(|s| s.kind == SessionKind::Save)
            .map(|s| s.initial_left)
    }

    /// Times [`reinit`](Self::reinit) queued new initial data.
    pub fn reinits(&self) -> u32 {
        self.lock().reinits
    }

    /// Arms a fault.
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    /// Disarms every fault.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Device activity: changes `writes` random chunks of internal state if the device is in a
    /// running state; a stopped device does not change (vfio.h STOP semantics). Returns the
    /// number of chunks changed.
    pub fn tick(&self, writes: usize) -> usize {
        let mut g = self.lock();
        if !g.state.is_running() {
            return 0;
        }
        let chunks = g.chunks();
        for _ in 0..writes {
            let r = xorshift(&mut g.rng);
            let c = (r as usize) % chunks;
            let (s, e) = g.chunk_range(c);
            let at = s + ((r >> 32) as usize) % (e - s);
            g.regs[at] = g.regs[at].wrapping_add(1 | (r >> 24) as u8);
            g.dirty.insert(c);
        }
        writes
    }

    /// The device writes `[iova, iova + len)` by DMA. Logged if DMA logging is on, the device is
    /// running, and the range intersects a tracked range. Returns whether anything was logged.
    pub fn dma_write(&self, iova: u64, len: u64) -> bool {
        let mut g = self.lock();
        if !g.state.is_running() || len == 0 {
            return false;
        }
        let Some(log) = g.dma_log.as_mut() else {
            return false;
        };
        let last = iova.saturating_add(len - 1);
        let mut any = false;
        for r in &log.ranges {
            let lo = iova.max(r.iova);
            let hi = last.min(r.last());
            if lo <= hi {
                for p in lo / log.page_size..=hi / log.page_size {
                    log.pages.insert(p);
                }
                any = true;
            }
        }
        any
    }

    /// A copy of the internal device state.
    pub fn state_bytes(&self) -> Vec<u8> {
        self.lock().regs.clone()
    }

    /// FNV-1a 64 digest of the internal device state.
    pub fn state_digest(&self) -> u64 {
        fnv1a64(&self.lock().regs)
    }

    /// Every arc executed so far, in order (for checking which arcs a transition took).
    pub fn arcs(&self) -> Vec<(MigrationState, MigrationState)> {
        self.lock().arcs.clone()
    }

    /// Returns the arc log and empties it.
    pub fn take_arcs(&self) -> Vec<(MigrationState, MigrationState)> {
        std::mem::take(&mut self.lock().arcs)
    }

    /// Why the last RESUMING → STOP refused its data.
    pub fn last_rejection(&self) -> Option<String> {
        self.lock().last_rejection.clone()
    }

    /// Bytes a RESUMING session holds besides the state it rebuilds: the partial record not
    /// parsed yet, never more than one chunk with its header and checksum (`None` outside a
    /// RESUMING session).
    pub fn resume_held(&self) -> Option<usize> {
        let g = self.lock();
        g.session
            .as_ref()
            .filter(|s| s.kind == SessionKind::Resume)
            .map(|s| s.loader.held())
    }

    /// The configuration.
    pub fn config(&self) -> SimConfig {
        self.lock().cfg.clone()
    }

    /// Puts the device directly into `state` (test setup; no arcs run, no session exists).
    pub fn force_state(&self, state: MigrationState) {
        let mut g = self.lock();
        g.state = state;
        g.session = None;
    }
}

impl MigrationDevice for SimDevice {
    type Data = SimData;

    /// As Linux 7.3 for a PRE_COPY device when [`SimConfig::precopy_info_v2`] is set; ENOTTY
    /// (Linux 6.12) otherwise.
    fn enable_precopy_info_v2(&mut self) -> Result<crate::PrecopyInfoV2, Error> {
        let mut g = self.lock();
        if !g.cfg.precopy_info_v2 {
            return Ok(crate::PrecopyInfoV2::NotSupported(
                "the kernel has no VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2 (ENOTTY)".into(),
            ));
        }
        if !g.cfg.flags.contains(MigrationFlags::PRE_COPY) {
            return Ok(crate::PrecopyInfoV2::NotSupported(
                "the kernel refused the opt-in (EINVAL: the device has no PRE_COPY)".into(),
            ));
        }
        g.precopy_v2 = true;
        Ok(crate::PrecopyInfoV2::Enabled)
    }

    fn migration_flags(&self) -> Result<MigrationFlags, Error> {
        Ok(self.lock().cfg.flags)
    }

    fn migration_state(&self) -> Result<MigrationState, Error> {
        let g = self.lock();
        if g.faults.contains(&Fault::StateRead) {
            return Err(Error::ioctl(
                Op::Feature(Access::Get, Feature::MigDeviceState),
                errno(libc::EIO),
            ));
        }
        Ok(g.state)
    }

    fn set_migration_state(&mut self, target: MigrationState) -> Result<Option<SimData>, Error> {
        let created = self.lock().set_state(target)?;
        Ok(created.map(|id| SimData {
            inner: Arc::clone(&self.inner),
            id,
        }))
    }

    fn stop_copy_size(&self) -> Result<u64, Error> {
        let g = self.lock();
        let chunks: u64 = (0..g.chunks()).map(|c| g.chunk_wire_len(c)).sum();
        Ok((HEADER_LEN + END_LEN) as u64 + chunks)
    }

    fn reset(&mut self) -> Result<(), Error> {
        let mut g = self.lock();
        if g.faults.contains(&Fault::Reset) {
            return Err(Error::ioctl(Op::Reset, errno(libc::EIO)));
        }
        g.regs = Inner::initial_regs(&g.cfg);
        g.dirty.clear();
        g.session = None;
        g.reinit_pending = false;
        g.state = MigrationState::Running;
        Ok(())
    }
}

impl Read for SimData {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut g = Inner::lock(&self.inner);
        let limit = g.faults.iter().find_map(|f| match *f {
            Fault::DataRead { after } => Some(after),
            _ => None,
        });
        let state = g.state;
        let needs_refill = {
            let s = g.session_for(self.id, SessionKind::Save)?;
            s.out.is_empty() && !s.ended
        };
        if needs_refill && matches!(state, MigrationState::PreCopy | MigrationState::PreCopyP2p) {
            g.flush_dirty();
        }
        let s = g.session_for(self.id, SessionKind::Save)?;
        if s.out.is_empty() {
            // STOP_COPY: permanent EOF. PRE_COPY: temporary end of stream.
            return if s.ended {
                Ok(0)
            } else {
                Err(errno(libc::ENOMSG))
            };
        }
        let mut n = buf.len().min(s.out.len());
        if let Some(after) = limit {
            let room = after.saturating_sub(s.moved);
            if room == 0 {
                return Err(errno(libc::EIO));
            }
            n = n.min(usize::try_from(room).unwrap_or(usize::MAX));
        }
        for (dst, src) in buf[..n].iter_mut().zip(s.out.drain(..n)) {
            *dst = src;
        }
        s.initial_left = s.initial_left.saturating_sub(n as u64);
        s.moved += n as u64;
        Ok(n)
    }
}

impl Write for SimData {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut g = Inner::lock(&self.inner);
        let limit = g.faults.iter().find_map(|f| match *f {
            Fault::DataWrite { after } => Some(after),
            _ => None,
        });
        let s = g.session_for(self.id, SessionKind::Resume)?;
        let mut n = buf.len();
        if let Some(after) = limit {
            let room = after.saturating_sub(s.moved);
            if room == 0 {
                return Err(errno(libc::EIO));
            }
            n = n.min(usize::try_from(room).unwrap_or(usize::MAX));
        }
        s.moved += n as u64;
        let mut s = s.loader.take();
        s.feed(&buf[..n], &g);
        // What one write brought is transient; keep no more room than a record needs.
        if s.pending.capacity() > 2 * (CHUNK_OVERHEAD + g.cfg.state_size) {
            s.pending.shrink_to(CHUNK_OVERHEAD + g.cfg.state_size);
        }
        g.session_for(self.id, SessionKind::Resume)?.loader = s;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl DataChannel for SimData {
    fn precopy_info(&mut self) -> Result<PrecopyInfo, Error> {
        let mut g = Inner::lock(&self.inner);
        let op = |e| Error::ioctl(Op::PrecopyInfo, e);
        if !matches!(
            g.state,
            MigrationState::PreCopy | MigrationState::PreCopyP2p
        ) {
            return Err(op(errno(libc::EINVAL)));
        }
        let pending_dirty: u64 = g.dirty.iter().map(|&c| g.chunk_wire_len(c)).sum();
        let (initial_left, queued) = {
            let s = g.session_for(self.id, SessionKind::Save).map_err(op)?;
            (s.initial_left, s.out.len() as u64)
        };
        let reinit = g.precopy_v2 && std::mem::take(&mut g.reinit_pending);
        Ok(PrecopyInfo {
            initial_bytes: initial_left,
            dirty_bytes: queued - initial_left.min(queued) + pending_dirty,
            reinit,
        })
    }
}

impl DmaLogger for SimDevice {
    fn dma_logging_max_ranges(&self) -> usize {
        self.lock().cfg.dma_logging_max_ranges.unwrap_or(1)
    }

    fn dma_logging_start_raw(&mut self, page_size: u64, ranges: &[DmaRange]) -> Result<u64, Error> {
        let op = Op::Feature(Access::Set, Feature::DmaLoggingStart);
        let mut g = self.lock();
        let Some(max) = g.cfg.dma_logging_max_ranges else {
            return Err(Error::ioctl(op, errno(libc::ENOTTY)));
        };
        if g.dma_log.is_some() || ranges.is_empty() || !page_size.is_power_of_two() {
            return Err(Error::ioctl(op, errno(libc::EINVAL)));
        }
        if ranges.len() > max {
            return Err(Error::ioctl(op, errno(libc::E2BIG)));
        }
        let mut sorted = ranges.to_vec();
        sorted.sort();
        for (i, r) in sorted.iter().enumerate() {
            let aligned = r.iova % page_size == 0 && r.length % page_size == 0 && r.length > 0;
            let overlaps = i > 0 && sorted[i - 1].last() >= r.iova;
            if !aligned || overlaps || r.end().is_none() {
                return Err(Error::ioctl(op, errno(libc::EINVAL)));
            }
        }
        // The simulated tracker works at 4 KiB or the hint, whichever is larger.
        let page_size = page_size.max(dma_log::MIN_REPORT_PAGE_SIZE);
        g.dma_log = Some(DmaLog {
            page_size,
            ranges: sorted,
            pages: BTreeSet::new(),
        });
        Ok(page_size)
    }

    fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), Error> {
        let op = Op::Feature(Access::Get, Feature::DmaLoggingReport);
        dma_log::check_report(iova, length, page_size, bitmap)?;
        let mut g = self.lock();
        if g.cfg.dma_logging_max_ranges.is_none() {
            return Err(Error::ioctl(op, errno(libc::ENOTTY)));
        }
        if let Some(i) = g.faults.iter().position(|f| *f == Fault::DmaLogReport) {
            g.faults.remove(i);
            return Err(Error::ioctl(op, errno(libc::EIO)));
        }
        let Some(log) = g.dma_log.as_mut() else {
            return Err(Error::ioctl(op, errno(libc::EINVAL)));
        };
        let last = iova + (length - 1);
        let first_page = iova / log.page_size;
        let last_page = last / log.page_size;
        let hits: Vec<u64> = log.pages.range(first_page..=last_page).copied().collect();
        for p in hits {
            log.pages.remove(&p);
            // Replicate the tracker page onto every report bit it overlaps.
            let lo = (p * log.page_size).max(iova);
            let hi = (p * log.page_size + (log.page_size - 1)).min(last);
            for bit in (lo - iova) / page_size..=(hi - iova) / page_size {
                bitmap[(bit / 64) as usize] |= 1 << (bit % 64);
            }
        }
        Ok(())
    }

    fn dma_logging_stop(&mut self) -> Result<(), Error> {
        let op = Op::Feature(Access::Set, Feature::DmaLoggingStop);
        let mut g = self.lock();
        if g.cfg.dma_logging_max_ranges.is_none() {
            return Err(Error::ioctl(op, errno(libc::ENOTTY)));
        }
        g.dma_log = None;
        Ok(())
    }
}
