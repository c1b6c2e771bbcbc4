//! The reader-side state machine both readers share: limits, sequence numbers, checksums, the
//! Compat-first rule, per-device chunk numbers and phases, End totals and digest.

use alloc::collections::BTreeMap;

use crate::crc::Crc32c;
use crate::error::ErrorKind;
use crate::format::{RFLAG_OPTIONAL, Record, RecordHeader, StreamHeader};

/// Limits a reader enforces; a length above a limit is refused before anything is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest record body.
    pub max_record: u64,
    /// Largest total device state per device.
    pub max_device_state: u64,
    /// Largest stream (bytes, header included).
    pub max_total: u64,
    /// Most devices (Compat records).
    pub max_devices: u64,
}

impl Default for Limits {
    /// 64 MiB records, 4 GiB of state per device, unbounded stream, 1024 devices.
    fn default() -> Limits {
        Limits {
            max_record: 64 << 20,
            max_device_state: 4 << 30,
            max_total: u64::MAX,
            max_devices: 1024,
        }
    }
}

#[derive(Debug, Default, Clone)]
struct DeviceTrack {
    next_chunk: u32,
    stop_copy: bool,
    bytes: u64,
}

/// Totals counted while reading.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Records read (End excluded).
    pub records: u64,
    /// Pages in Pages records.
    pub pages: u64,
    /// Pages in ZeroPages records.
    pub zero_pages: u64,
    /// DeviceState data bytes.
    pub device_bytes: u64,
}

/// The validating state machine.
#[derive(Debug)]
pub struct Validator {
    limits: Limits,
    checksums: bool,
    next_seq: u32,
    /// Bytes consumed so far (header and complete records).
    consumed: u64,
    data_seen: bool,
    ended: bool,
    devices: BTreeMap<u32, DeviceTrack>,
    totals: Totals,
    digest: Crc32c,
}

impl Validator {
    /// After a valid stream header.
    pub fn new(limits: Limits, header: &StreamHeader, header_crc: u32) -> Validator {
        let mut digest = Crc32c::new();
        digest.update(&header_crc.to_le_bytes());
        Validator {
            limits,
            checksums: header.checksums(),
            next_seq: 0,
            consumed: crate::format::HEADER_LEN as u64,
            data_seen: false,
            ended: false,
            devices: BTreeMap::new(),
            totals: Totals::default(),
            digest,
        }
    }

    /// Whether the End record was read.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Bytes consumed so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// The index the next record will have.
    pub fn next_index(&self) -> u64 {
        u64::from(self.next_seq)
    }

    /// Totals so far.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Whether records carry checksums.
    pub fn checksums(&self) -> bool {
        self.checksums
    }

    /// Checks a record header before its body is read.
    pub fn check_header(&self, rh: &RecordHeader) -> Result<(), ErrorKind> {
        if self.ended {
            return Err(ErrorKind::TrailingData);
        }
        if rh.tag == 0 {
            return Err(ErrorKind::ZeroTag);
        }
        if rh.flags & !RFLAG_OPTIONAL != 0 {
            return Err(ErrorKind::UnknownRecordFlags(rh.flags & !RFLAG_OPTIONAL));
        }
        if rh.seq != self.next_seq {
            return Err(ErrorKind::Sequence {
                expected: self.next_seq,
                got: rh.seq,
            });
        }
        if u64::from(rh.length) > self.limits.max_record {
            return Err(ErrorKind::RecordTooLarge {
                length: u64::from(rh.length),
                max: self.limits.max_record,
            });
        }
        let end = self.consumed + crate::format::RECORD_HEADER_LEN as u64 + u64::from(rh.length);
        if end > self.limits.max_total {
            return Err(ErrorKind::StreamLimit {
                max: self.limits.max_total,
            });
        }
        if !self.checksums && rh.crc != 0 {
            return Err(ErrorKind::UnexpectedChecksum(rh.crc));
        }
        Ok(())
    }

    /// Checks the CRC computed over the record (`computed`) against the header.
    pub fn check_crc(&self, rh: &RecordHeader, computed: u32) -> Result<(), ErrorKind> {
        if self.checksums && rh.crc != computed {
            return Err(ErrorKind::Checksum {
                stored: rh.crc,
                computed,
            });
        }
        Ok(())
    }

    /// Applies a decoded record's semantic rules and updates the state.
    pub fn accept(&mut self, rh: &RecordHeader, rec: &Record<'_>) -> Result<(), ErrorKind> {
        match rec {
            Record::Compat(c) => {
                if self.data_seen {
                    return Err(ErrorKind::CompatTooLate);
                }
                if self.devices.contains_key(&c.device) {
                    return Err(ErrorKind::DuplicateDevice(c.device));
                }
                if self.devices.len() as u64 >= self.limits.max_devices {
                    return Err(ErrorKind::TooManyDevices {
                        max: self.limits.max_devices,
                    });
                }
                self.devices.insert(c.device, DeviceTrack::default());
            }
            Record::DeviceState(d) => {
                let max = self.limits.max_device_state;
                let dev = self
                    .devices
                    .get_mut(&d.device)
                    .ok_or(ErrorKind::UnknownDevice(d.device))?;
                if d.chunk != dev.next_chunk {
                    return Err(ErrorKind::ChunkSequence {
                        device: d.device,
                        expected: dev.next_chunk,
                        got: d.chunk,
                    });
                }
                match d.phase {
                    crate::format::Phase::StopCopy => dev.stop_copy = true,
                    crate::format::Phase::PreCopy if dev.stop_copy => {
                        return Err(ErrorKind::PhaseOrder(d.device));
                    }
                    _ => {}
                }
                let bytes = dev.bytes + d.data.len() as u64;
                if bytes > max {
                    return Err(ErrorKind::DeviceStateLimit {
                        device: d.device,
                        bytes,
                        max,
                    });
                }
                dev.bytes = bytes;
                dev.next_chunk = dev.next_chunk.wrapping_add(1);
                self.totals.device_bytes += d.data.len() as u64;
            }
            Record::Pages(p) => self.totals.pages += u64::from(p.count),
            Record::ZeroPages(z) => self.totals.zero_pages += u64::from(z.count),
            Record::End(e) => self.check_end(e)?,
            Record::Channel(_) if rh.seq != 0 => return Err(ErrorKind::ChannelNotFirst),
            Record::Channel(_)
            | Record::Sync(_)
            | Record::DirtyBitmap(_)
            | Record::Round(_)
            | Record::Skipped { .. } => {}
        }
        if !matches!(rec, Record::Compat(_) | Record::Channel(_)) {
            self.data_seen = true;
        }
        if !matches!(rec, Record::End(_)) {
            self.digest.update(&rh.crc.to_le_bytes());
            self.totals.records += 1;
        } else {
            self.ended = true;
        }
        self.consumed += crate::format::RECORD_HEADER_LEN as u64 + u64::from(rh.length);
        self.next_seq = self.next_seq.wrapping_add(1);
        Ok(())
    }

    fn check_end(&self, e: &crate::format::End) -> Result<(), ErrorKind> {
        let t = &self.totals;
        for (field, stated, actual) in [
            ("records", u64::from(e.records), t.records),
            ("stream_bytes", e.stream_bytes, self.consumed),
            ("pages", e.pages, t.pages),
            ("zero_pages", e.zero_pages, t.zero_pages),
            ("device_bytes", e.device_bytes, t.device_bytes),
        ] {
            if stated != actual {
                return Err(ErrorKind::EndMismatch {
                    field,
                    stated,
                    actual,
                });
            }
        }
        let digest = if self.checksums {
            self.digest.finish()
        } else {
            0
        };
        if e.digest != digest {
            return Err(ErrorKind::DigestMismatch);
        }
        Ok(())
    }
}
