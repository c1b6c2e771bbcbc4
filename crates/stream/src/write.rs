//! Writing a stream to any `io::Write`. Record header, fixed part and payload go out in one
//! vectored write, so page payloads are never copied into an intermediate buffer.

use std::collections::BTreeMap;
use std::format;
use std::io::{self, IoSlice, Write};
use std::string::String;

use crate::crc::Crc32c;
use crate::error::{Error, ErrorKind};
use crate::format::{
    self, Channel, Compat, End, HEADER_LEN, MAX_PAGE_SIZE, MIN_PAGE_SIZE, Phase, RECORD_HEADER_LEN,
    RFLAG_OPTIONAL, RecordHeader, Round, StreamHeader, Sync, Tag, encode,
};
use crate::validate::Totals;

/// Writer settings.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Records carry CRC32Cs and End a digest (the `CRC` stream flag). On by default; turn it
    /// off only on a transport with its own integrity (a MAC).
    pub checksums: bool,
    /// The producer name in the header (at most 24 bytes are kept).
    pub producer: String,
    /// Send all-zero pages as ZeroPages records, without payload.
    pub detect_zero_pages: bool,
    /// Largest record body written; Pages and DeviceState data are split to fit.
    pub max_record: u32,
    /// The minor version in the header ([`VERSION_MINOR`](crate::format::VERSION_MINOR), 0,
    /// by default; a livemig source writes
    /// [`MINOR_ROUND_ACKS`](crate::format::MINOR_ROUND_ACKS) to say it reads round
    /// acknowledgements on its return path).
    pub minor: u16,
}

impl Default for WriterOptions {
    fn default() -> WriterOptions {
        WriterOptions {
            checksums: true,
            producer: format!("livemig {}", env!("CARGO_PKG_VERSION")),
            detect_zero_pages: true,
            max_record: 4 << 20,
            minor: format::VERSION_MINOR,
        }
    }
}

/// What a `pages` call wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PagesWritten {
    /// Pages sent with payload.
    pub pages: u64,
    /// Pages sent as zero pages.
    pub zero_pages: u64,
}

/// A stream writer. Call [`Writer::finish`] to write End; a writer dropped without it leaves a
/// stream that every reader refuses (no End).
#[derive(Debug)]
pub struct Writer<W: Write> {
    w: W,
    opts: WriterOptions,
    seq: u32,
    bytes: u64,
    digest: Crc32c,
    totals: Totals,
    devices: BTreeMap<u32, (u32, bool)>,
    data_seen: bool,
}

fn write_all_vectored<W: Write>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether a page is all zero: OR-reduces 64-byte blocks (the compiler vectorizes the block
/// fold) and stops at the first non-zero block.
fn is_zero(page: &[u8]) -> bool {
    let mut blocks = page.chunks_exact(64);
    let dirty = blocks
        .by_ref()
        .any(|b| b.iter().fold(0u8, |a, &x| a | x) != 0);
    !dirty && blocks.remainder().iter().all(|&b| b == 0)
}

impl<W: Write> Writer<W> {
    /// Writes the stream header.
    pub fn new(mut w: W, opts: WriterOptions) -> Result<Writer<W>, Error> {
        if (opts.max_record as usize) < format::PAGES_FIXED + MIN_PAGE_SIZE as usize {
            return Err(Error::at(
                0,
                None,
                ErrorKind::InvalidArgument(format!(
                    "max_record {} cannot hold one {MIN_PAGE_SIZE}-byte page",
                    opts.max_record
                )),
            ));
        }
        let mut header = StreamHeader::new(opts.checksums, &opts.producer);
        header.minor = opts.minor;
        let header = header.encode();
        w.write_all(&header)
            .map_err(|e| Error::at(0, None, ErrorKind::Io(e)))?;
        let mut digest = Crc32c::new();
        digest.update(&header[44..48]);
        Ok(Writer {
            w,
            opts,
            seq: 0,
            bytes: HEADER_LEN as u64,
            digest,
            totals: Totals::default(),
            devices: BTreeMap::new(),
            data_seen: false,
        })
    }

    /// The underlying writer (for example to flush a transport's buffer before waiting for the
    /// peer; writing to it directly would corrupt the stream).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> Result<(), Error> {
        let at = self.bytes;
        self.w
            .flush()
            .map_err(|e| Error::at(at, None, ErrorKind::Io(e)))
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Totals so far.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    fn invalid(&self, msg: String) -> Error {
        Error::at(
            self.bytes,
            Some(u64::from(self.seq)),
            ErrorKind::InvalidArgument(msg),
        )
    }

    fn record(&mut self, tag: Tag, flags: u16, parts: &[&[u8]]) -> Result<(), Error> {
        let length: usize = parts.iter().map(|p| p.len()).sum();
        let length = u32::try_from(length)
            .map_err(|_| self.invalid(format!("record body of {length} bytes")))?;
        let mut rh = RecordHeader {
            tag: tag as u16,
            flags,
            length,
            seq: self.seq,
            crc: 0,
        };
        if self.opts.checksums {
            rh.crc = rh.compute_crc(parts);
        }
        let hb = rh.encode();
        let mut slices = [IoSlice::new(&[]); 4];
        slices[0] = IoSlice::new(&hb);
        for (i, p) in parts.iter().enumerate() {
            slices[1 + i] = IoSlice::new(p);
        }
        let n = 1 + parts.len();
        write_all_vectored(&mut self.w, &mut slices[..n])
            .map_err(|e| Error::at(self.bytes, Some(u64::from(self.seq)), ErrorKind::Io(e)))?;
        if tag != Tag::End {
            self.digest.update(&rh.crc.to_le_bytes());
            self.totals.records += 1;
        }
        if tag != Tag::Compat && tag != Tag::Channel {
            self.data_seen = true;
        }
        self.bytes += (RECORD_HEADER_LEN + length as usize) as u64;
        self.seq = self.seq.wrapping_add(1);
        Ok(())
    }

    /// Announces a device and its compatibility data. Every Compat goes before other records.
    pub fn compat(&mut self, c: &Compat<'_>) -> Result<(), Error> {
        if self.data_seen {
            return Err(self
                .invalid("Compat after other records: compatibility data must come first".into()));
        }
        if self.devices.contains_key(&c.device) {
            return Err(self.invalid(format!("device {} announced twice", c.device)));
        }
        if c.page_size_mask == 0 {
            return Err(self.invalid("page_size_mask must be non-zero".into()));
        }
        let fixed = encode::compat(c).map_err(|k| Error::at(self.bytes, None, k))?;
        self.record(Tag::Compat, 0, &[&fixed, c.identity.as_bytes(), c.compat])?;
        self.devices.insert(c.device, (0, false));
        Ok(())
    }

    /// Device state bytes, split into chunks that fit `max_record`.
    pub fn device_state(&mut self, device: u32, phase: Phase, data: &[u8]) -> Result<(), Error> {
        let Some(&(_, stop_copy)) = self.devices.get(&device) else {
            return Err(self.invalid(format!("device {device} has no Compat record")));
        };
        if phase == Phase::PreCopy && stop_copy {
            return Err(self.invalid(format!(
                "device {device}: PRE_COPY data after STOP_COPY data"
            )));
        }
        let max = self.opts.max_record as usize - format::DEVICE_STATE_FIXED;
        for chunk in data.chunks(max) {
            let (next, _) = self.devices[&device];
            let fixed = encode::device_state(device, phase, next);
            self.record(Tag::DeviceState, 0, &[&fixed, chunk])?;
            self.totals.device_bytes += chunk.len() as u64;
            self.devices.insert(
                device,
                (next.wrapping_add(1), stop_copy || phase == Phase::StopCopy),
            );
        }
        Ok(())
    }

    fn check_pages(&self, gpa: u64, page_size: u32, len: u64, payload: bool) -> Result<(), Error> {
        if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(self.invalid(format!(
                "page size {page_size} is not a power of two in 512..=1 GiB"
            )));
        }
        let ps = u64::from(page_size);
        if !gpa.is_multiple_of(ps)
            || len == 0
            || !len.is_multiple_of(ps)
            || gpa.checked_add(len - 1).is_none()
        {
            return Err(self.invalid(format!(
                "pages at {gpa:#x}+{len:#x} are not whole {page_size}-byte pages"
            )));
        }
        if payload
            && u64::from(page_size) + format::PAGES_FIXED as u64 > u64::from(self.opts.max_record)
        {
            return Err(self.invalid(format!("a {page_size}-byte page does not fit max_record")));
        }
        Ok(())
    }

    fn emit_pages(&mut self, gpa: u64, page_size: u32, data: &[u8]) -> Result<(), Error> {
        self.check_pages(gpa, page_size, data.len() as u64, true)?;
        let ps = page_size as usize;
        let per = (self.opts.max_record as usize - format::PAGES_FIXED) / ps;
        let mut at = gpa;
        for run in data.chunks(per * ps) {
            let count = (run.len() / ps) as u32;
            let fixed = encode::pages(at, page_size, count);
            self.record(Tag::Pages, 0, &[&fixed, run])?;
            self.totals.pages += u64::from(count);
            at += run.len() as u64;
        }
        Ok(())
    }

    fn emit_zero(&mut self, gpa: u64, page_size: u32, count: u64) -> Result<(), Error> {
        let mut at = gpa;
        let mut left = count;
        while left > 0 {
            let n = left.min(u64::from(u32::MAX)) as u32;
            let body = encode::pages(at, page_size, n);
            self.record(Tag::ZeroPages, 0, &[&body])?;
            self.totals.zero_pages += u64::from(n);
            at += u64::from(n) * u64::from(page_size);
            left -= u64::from(n);
        }
        Ok(())
    }

    /// Guest pages at `gpa`; `data` is whole pages. With zero-page detection, runs of all-zero
    /// pages go out as ZeroPages records.
    pub fn pages(&mut self, gpa: u64, page_size: u32, data: &[u8]) -> Result<PagesWritten, Error> {
        // Payload pages must fit a record (checked per run: a zero run needs no payload).
        self.check_pages(
            gpa,
            page_size,
            data.len() as u64,
            !self.opts.detect_zero_pages,
        )?;
        let ps = page_size as usize;
        if !self.opts.detect_zero_pages {
            self.emit_pages(gpa, page_size, data)?;
            return Ok(PagesWritten {
                pages: (data.len() / ps) as u64,
                zero_pages: 0,
            });
        }
        let mut out = PagesWritten::default();
        let mut run_start = 0usize;
        let mut run_zero = None;
        for (i, page) in data.chunks(ps).enumerate() {
            let z = is_zero(page);
            match run_zero {
                Some(rz) if rz == z => {}
                Some(rz) => {
                    self.flush_run(gpa, page_size, data, run_start, i, rz, &mut out)?;
                    run_start = i;
                    run_zero = Some(z);
                }
                None => run_zero = Some(z),
            }
        }
        if let Some(rz) = run_zero {
            self.flush_run(
                gpa,
                page_size,
                data,
                run_start,
                data.len() / ps,
                rz,
                &mut out,
            )?;
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn flush_run(
        &mut self,
        gpa: u64,
        page_size: u32,
        data: &[u8],
        from: usize,
        to: usize,
        zero: bool,
        out: &mut PagesWritten,
    ) -> Result<(), Error> {
        let ps = page_size as usize;
        let at = gpa + (from * ps) as u64;
        let n = (to - from) as u64;
        if zero {
            self.emit_zero(at, page_size, n)?;
            out.zero_pages += n;
        } else {
            self.emit_pages(at, page_size, &data[from * ps..to * ps])?;
            out.pages += n;
        }
        Ok(())
    }

    /// Pages known to be zero, without looking at them.
    pub fn zero_pages(&mut self, gpa: u64, page_size: u32, count: u64) -> Result<(), Error> {
        let len = count
            .checked_mul(u64::from(page_size))
            .ok_or_else(|| self.invalid("zero page count overflows".into()))?;
        self.check_pages(gpa, page_size, len, false)?;
        self.emit_zero(gpa, page_size, count)
    }

    /// A dirty bitmap (kernel layout words), for checkpoints and diagnostics. Optional.
    pub fn dirty_bitmap(
        &mut self,
        iova: u64,
        span: u64,
        page_size: u32,
        words: &[u64],
    ) -> Result<(), Error> {
        let ps = u64::from(page_size);
        if !page_size.is_power_of_two()
            || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size)
            || span == 0
            || !span.is_multiple_of(ps)
            || !iova.is_multiple_of(ps)
            || iova.checked_add(span - 1).is_none()
        {
            return Err(self.invalid(format!(
                "bitmap over {iova:#x}+{span:#x} at page size {page_size} is not well formed"
            )));
        }
        let pages = span / ps;
        if words.len() as u64 != pages.div_ceil(64) {
            return Err(self.invalid(format!("{} words for {pages} pages", words.len())));
        }
        let used = pages % 64;
        if used != 0 && words[words.len() - 1] >> used != 0 {
            return Err(self.invalid("bitmap bits past the last page are set".into()));
        }
        let fixed = encode::dirty_bitmap(iova, span, page_size);
        let le = encode::words_le(words);
        self.record(Tag::DirtyBitmap, RFLAG_OPTIONAL, &[&fixed, &le])
    }

    /// Which channel of a multi-channel migration this stream is; must be the first record.
    pub fn channel(&mut self, c: &Channel) -> Result<(), Error> {
        if self.totals.records != 0 {
            return Err(self.invalid("Channel must be the stream's first record".into()));
        }
        if c.count == 0 || c.index > c.count {
            return Err(self.invalid(format!(
                "Channel index {} of {} page channels",
                c.index, c.count
            )));
        }
        self.record(Tag::Channel, 0, &[&encode::channel(c)])
    }

    /// A page channel's end of `round` (see [`Sync`]).
    pub fn sync(&mut self, round: u32) -> Result<(), Error> {
        self.record(Tag::Sync, 0, &[&encode::sync(&Sync { round })])
    }

    /// Statistics of a pre-copy round. Optional.
    pub fn round(&mut self, r: &Round) -> Result<(), Error> {
        self.record(Tag::Round, RFLAG_OPTIONAL, &[&encode::round(r)])
    }

    /// Writes End (totals and digest), flushes, and returns the inner writer.
    pub fn finish(mut self) -> Result<W, Error> {
        let records = u32::try_from(self.totals.records)
            .map_err(|_| self.invalid("more than 2^32 records".into()))?;
        let end = End {
            records,
            stream_bytes: self.bytes,
            pages: self.totals.pages,
            zero_pages: self.totals.zero_pages,
            device_bytes: self.totals.device_bytes,
            digest: if self.opts.checksums {
                self.digest.finish()
            } else {
                0
            },
        };
        self.record(Tag::End, 0, &[&encode::end(&end)])?;
        self.w
            .flush()
            .map_err(|e| Error::at(self.bytes, None, ErrorKind::Io(e)))?;
        Ok(self.w)
    }
}
