//! Reading a stream from any `io::Read`, incrementally, with bounded memory.

use std::io::{self, Read};
use std::vec::Vec;

use crate::error::{Error, ErrorKind};
use crate::format::{HEADER_LEN, RECORD_HEADER_LEN, Record, StreamHeader};
use crate::slice::Decoder;
use crate::validate::{Limits, Totals};

/// Grow the body buffer at most this much ahead of the bytes actually received, so a hostile
/// length field costs at most this before the truncation is noticed.
const GROW_STEP: usize = 1 << 20;

/// A validating streaming reader. Records borrow from an internal buffer that is reused; its
/// capacity never exceeds the largest record read (itself bounded by [`Limits::max_record`]).
#[derive(Debug)]
pub struct Reader<R> {
    inner: R,
    buf: Vec<u8>,
    d: Decoder,
    done: bool,
}

/// Reads into `buf` until it is full or the input ends; returns the bytes read.
fn fill<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl<R: Read> Reader<R> {
    /// Reads and checks the stream header.
    pub fn new(mut inner: R, limits: Limits) -> Result<Reader<R>, Error> {
        let mut h = [0u8; HEADER_LEN];
        let n = fill(&mut inner, &mut h).map_err(|e| Error::at(0, None, ErrorKind::Io(e)))?;
        let Some(d) = Decoder::start(&h[..n], limits)? else {
            return Err(Error::at(
                0,
                None,
                ErrorKind::Truncated {
                    needed: (HEADER_LEN - n) as u64,
                },
            ));
        };
        Ok(Reader {
            inner,
            buf: Vec::new(),
            d,
            done: false,
        })
    }

    /// The stream header.
    pub fn header(&self) -> &StreamHeader {
        self.d.header()
    }

    /// Totals so far.
    pub fn totals(&self) -> Totals {
        self.d.totals()
    }

    /// Byte offset of the next record.
    pub fn offset(&self) -> u64 {
        self.d.consumed()
    }

    /// Capacity of the internal body buffer (for tests of the memory bound).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn io_error(&mut self, e: io::Error) -> Error {
        self.done = true;
        Error::at(
            self.d.consumed(),
            Some(self.d.totals().records),
            ErrorKind::Io(e),
        )
    }

    /// The next record; `Ok(None)` after End (having checked nothing follows it). An error ends
    /// the reading: it is returned once and later calls return `Ok(None)`.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Record<'_>>, Error> {
        if self.done {
            return Ok(None);
        }
        let mut hb = [0u8; RECORD_HEADER_LEN];
        let want = if self.d.finished() {
            1
        } else {
            RECORD_HEADER_LEN
        };
        let n = fill(&mut self.inner, &mut hb[..want]).map_err(|e| self.io_error(e))?;
        if n < RECORD_HEADER_LEN {
            self.done = true;
            return match self.d.at_eof(&hb[..n]) {
                Some(e) => Err(e),
                None => Ok(None),
            };
        }
        let rh = self.d.header_of(&hb).inspect_err(|_| self.done = true)?;
        let len = rh.length as usize;
        self.buf.clear();
        let mut got = 0;
        while got < len {
            let step = (len - got).min(GROW_STEP);
            // Exact growth: the buffer never exceeds the record it holds (amortized doubling
            // could reach twice the limit).
            self.buf.reserve_exact(step);
            self.buf.resize(got + step, 0);
            let k = fill(&mut self.inner, &mut self.buf[got..got + step])
                .map_err(|e| self.io_error(e))?;
            got += k;
            if k < step {
                self.done = true;
                return Err(self.d.truncated((len - got) as u64));
            }
        }
        match self.d.body(&rh, &self.buf) {
            Ok(rec) => Ok(Some(rec)),
            Err(e) => {
                self.done = true;
                Err(e)
            }
        }
    }

    /// Reads every remaining record and checks the whole stream.
    pub fn validate_all(&mut self) -> Result<Totals, Error> {
        while self.next()?.is_some() {}
        Ok(self.d.totals())
    }
}
