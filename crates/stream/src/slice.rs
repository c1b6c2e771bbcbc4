//! Reading from memory: the sans-IO [`Decoder`] parses complete records in place from any
//! buffer (a pipe, a ring, a mapped file), and [`SliceReader`] walks a whole stream held in one
//! slice. Records borrow from the input; nothing is copied.

use crate::error::{Error, ErrorKind};
use crate::format::{self, HEADER_LEN, RECORD_HEADER_LEN, Record, RecordHeader, StreamHeader};
use crate::validate::{Limits, Totals, Validator};

/// The validating decoder: feed it the bytes that follow what it has consumed so far.
#[derive(Debug)]
pub struct Decoder {
    header: StreamHeader,
    v: Validator,
    failed: bool,
}

impl Decoder {
    /// Parses the stream header at the front of `buf`. `Ok(None)`: fewer than 48 bytes yet.
    /// On success the decoder has consumed [`HEADER_LEN`] bytes.
    pub fn start(buf: &[u8], limits: Limits) -> Result<Option<Decoder>, Error> {
        let Some(h) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = StreamHeader::decode(h).map_err(|k| Error::at(0, None, k))?;
        let crc = u32::from_le_bytes([h[44], h[45], h[46], h[47]]);
        Ok(Some(Decoder {
            v: Validator::new(limits, &header, crc),
            header,
            failed: false,
        }))
    }

    /// The stream header.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// Totals so far.
    pub fn totals(&self) -> Totals {
        self.v.totals()
    }

    /// Bytes consumed so far (the offset of the next record).
    pub fn consumed(&self) -> u64 {
        self.v.consumed()
    }

    /// Whether End was read.
    pub fn finished(&self) -> bool {
        self.v.ended()
    }

    /// Whether an error ended the decoding.
    pub fn failed(&self) -> bool {
        self.failed
    }

    fn fail(&mut self, kind: ErrorKind) -> Error {
        self.failed = true;
        let record = (!matches!(kind, ErrorKind::TrailingData)).then(|| self.v.next_index());
        Error::at(self.v.consumed(), record, kind)
    }

    /// Checks the next record header (before its body is available).
    pub fn header_of(&mut self, hb: &[u8; RECORD_HEADER_LEN]) -> Result<RecordHeader, Error> {
        if self.failed {
            return Err(Error::at(self.v.consumed(), None, ErrorKind::TrailingData));
        }
        let rh = RecordHeader::decode(hb);
        self.v.check_header(&rh).map_err(|k| self.fail(k))?;
        Ok(rh)
    }

    /// Checks and decodes the body of the record announced by `rh` (from [`Decoder::header_of`]).
    pub fn body<'b>(&mut self, rh: &RecordHeader, body: &'b [u8]) -> Result<Record<'b>, Error> {
        debug_assert_eq!(body.len(), rh.length as usize);
        if self.v.checksums() {
            let computed = rh.compute_crc(&[body]);
            self.v.check_crc(rh, computed).map_err(|k| self.fail(k))?;
        }
        let rec = format::decode(rh.tag, rh.flags, body).map_err(|k| self.fail(k))?;
        self.v.accept(rh, &rec).map_err(|k| self.fail(k))?;
        Ok(rec)
    }

    /// Decodes one complete record at the front of `buf`; returns it with the bytes it used.
    /// `Ok(None)`: `buf` does not hold a complete record yet (supply more bytes), or End was
    /// already read and `buf` is empty.
    pub fn record<'b>(&mut self, buf: &'b [u8]) -> Result<Option<(Record<'b>, usize)>, Error> {
        if self.v.ended() {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(self.fail(ErrorKind::TrailingData));
        }
        let Some(hb) = buf.first_chunk::<RECORD_HEADER_LEN>() else {
            return Ok(None);
        };
        let rh = self.header_of(hb)?;
        let total = RECORD_HEADER_LEN + rh.length as usize;
        if buf.len() < total {
            return Ok(None);
        }
        let rec = self.body(&rh, &buf[RECORD_HEADER_LEN..total])?;
        Ok(Some((rec, total)))
    }

    /// The input ended inside the current record's body, `needed` bytes short.
    pub fn truncated(&mut self, needed: u64) -> Error {
        self.fail(ErrorKind::Truncated { needed })
    }

    /// The input ended with `rest` unconsumed: the error to report if the stream is incomplete,
    /// or `None` if End was read and nothing follows.
    pub fn at_eof(&mut self, rest: &[u8]) -> Option<Error> {
        if self.v.ended() && rest.is_empty() {
            return None;
        }
        if self.v.ended() {
            return Some(self.fail(ErrorKind::TrailingData));
        }
        let kind = match rest.first_chunk::<RECORD_HEADER_LEN>() {
            None if rest.is_empty() => ErrorKind::MissingEnd,
            None => ErrorKind::Truncated {
                needed: (RECORD_HEADER_LEN - rest.len()) as u64,
            },
            Some(hb) => {
                let rh = RecordHeader::decode(hb);
                if let Err(k) = self.v.check_header(&rh) {
                    k
                } else {
                    ErrorKind::Truncated {
                        needed: (RECORD_HEADER_LEN + rh.length as usize - rest.len()) as u64,
                    }
                }
            }
        };
        Some(self.fail(kind))
    }
}

/// A validating reader over a whole stream in one slice; records borrow from the slice.
#[derive(Debug)]
pub struct SliceReader<'a> {
    data: &'a [u8],
    pos: usize,
    d: Decoder,
    done: bool,
}

impl<'a> SliceReader<'a> {
    /// Checks the stream header.
    pub fn new(data: &'a [u8], limits: Limits) -> Result<SliceReader<'a>, Error> {
        let Some(d) = Decoder::start(data, limits)? else {
            return Err(Error::at(
                0,
                None,
                ErrorKind::Truncated {
                    needed: (HEADER_LEN - data.len()) as u64,
                },
            ));
        };
        Ok(SliceReader {
            data,
            pos: HEADER_LEN,
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
        self.pos as u64
    }

    /// The next record; `Ok(None)` after End (having checked nothing follows). An error ends
    /// the reading: it is returned once and later calls return `Ok(None)`.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Record<'a>>, Error> {
        if self.done {
            return Ok(None);
        }
        let rest = &self.data[self.pos..];
        match self.d.record(rest) {
            Ok(Some((rec, used))) => {
                self.pos += used;
                Ok(Some(rec))
            }
            Ok(None) => {
                self.done = true;
                match self.d.at_eof(rest) {
                    Some(e) => Err(e),
                    None => Ok(None),
                }
            }
            Err(e) => {
                self.done = true;
                Err(e)
            }
        }
    }

    /// Reads every remaining record, checking the whole stream (End included, nothing after).
    pub fn validate_all(&mut self) -> Result<Totals, Error> {
        while self.next()?.is_some() {}
        Ok(self.d.totals())
    }
}
