//! A reader for the framing QEMU's VFIO migration code writes inside a device's migration
//! sections (QEMU `hw/vfio/migration.c`; the marker values are its `VFIO_MIG_FLAG_*`), so device
//! state QEMU captured can be inspected and restored by livemig. Parsing is our own, from the
//! documented layout: a sequence of big-endian 64-bit markers, DEV_DATA_STATE followed by a
//! big-endian 64-bit size and that many bytes.

use alloc::vec::Vec;

/// `VFIO_MIG_FLAG_END_OF_STATE`.
pub const END_OF_STATE: u64 = 0xffff_ffff_ef10_0001;
/// `VFIO_MIG_FLAG_DEV_CONFIG_STATE`.
pub const DEV_CONFIG_STATE: u64 = 0xffff_ffff_ef10_0002;
/// `VFIO_MIG_FLAG_DEV_SETUP_STATE`.
pub const DEV_SETUP_STATE: u64 = 0xffff_ffff_ef10_0003;
/// `VFIO_MIG_FLAG_DEV_DATA_STATE`.
pub const DEV_DATA_STATE: u64 = 0xffff_ffff_ef10_0004;
/// `VFIO_MIG_FLAG_DEV_INIT_DATA_SENT`.
pub const DEV_INIT_DATA_SENT: u64 = 0xffff_ffff_ef10_0005;
/// `VFIO_MIG_FLAG_DEV_CONFIG_LOAD_READY`.
pub const DEV_CONFIG_LOAD_READY: u64 = 0xffff_ffff_ef10_0006;

/// One element of the framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item<'a> {
    /// END_OF_STATE.
    EndOfState,
    /// DEV_SETUP_STATE.
    SetupState,
    /// DEV_DATA_STATE and its bytes (a chunk of the device's data fd).
    Data(&'a [u8]),
    /// DEV_CONFIG_STATE and the config bytes up to (not including) the next END_OF_STATE.
    /// QEMU writes PCI config as its own vmstate, which has no length prefix: the block ends at
    /// the first END_OF_STATE marker, so this is opaque here.
    Config(&'a [u8]),
    /// DEV_INIT_DATA_SENT.
    InitDataSent,
    /// DEV_CONFIG_LOAD_READY.
    ConfigLoadReady,
}

/// Why QEMU framing could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QemuError {
    /// Not a known marker.
    #[error("at byte {offset}: unknown marker {marker:#018x}")]
    UnknownMarker {
        /// Where.
        offset: u64,
        /// The value.
        marker: u64,
    },
    /// The input ends inside a marker, size or data.
    #[error("at byte {offset}: truncated ({needed} more bytes needed)")]
    Truncated {
        /// Where.
        offset: u64,
        /// Bytes missing.
        needed: u64,
    },
    /// A data size above the caller's limit.
    #[error("at byte {offset}: data block of {size} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Where.
        offset: u64,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// DEV_CONFIG_STATE without a closing END_OF_STATE.
    #[error("at byte {offset}: config state without END_OF_STATE")]
    UnterminatedConfig {
        /// Where the config started.
        offset: u64,
    },
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Iterates the framing of `data`; data blocks larger than `max_block` are refused.
#[derive(Debug, Clone)]
pub struct Parser<'a> {
    data: &'a [u8],
    pos: usize,
    max_block: u64,
    failed: bool,
}

impl<'a> Parser<'a> {
    /// A parser over `data`.
    pub fn new(data: &'a [u8], max_block: u64) -> Parser<'a> {
        Parser {
            data,
            pos: 0,
            max_block,
            failed: false,
        }
    }

    /// Byte offset of the next item.
    pub fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn need(&self, n: usize) -> Result<(), QemuError> {
        let have = self.data.len() - self.pos;
        if have < n {
            return Err(QemuError::Truncated {
                offset: self.pos as u64,
                needed: (n - have) as u64,
            });
        }
        Ok(())
    }

    fn step(&mut self) -> Result<Option<Item<'a>>, QemuError> {
        if self.pos == self.data.len() {
            return Ok(None);
        }
        let start = self.pos;
        self.need(8)?;
        let marker = be64(&self.data[self.pos..]);
        self.pos += 8;
        Ok(Some(match marker {
            END_OF_STATE => Item::EndOfState,
            DEV_SETUP_STATE => Item::SetupState,
            DEV_INIT_DATA_SENT => Item::InitDataSent,
            DEV_CONFIG_LOAD_READY => Item::ConfigLoadReady,
            DEV_DATA_STATE => {
                self.need(8)?;
                let size = be64(&self.data[self.pos..]);
                self.pos += 8;
                if size > self.max_block {
                    return Err(QemuError::TooLarge {
                        offset: start as u64,
                        size,
                        max: self.max_block,
                    });
                }
                let size_usize = usize::try_from(size).unwrap_or(usize::MAX);
                self.need(size_usize)?;
                let bytes = &self.data[self.pos..self.pos + size_usize];
                self.pos += size_usize;
                Item::Data(bytes)
            }
            DEV_CONFIG_STATE => {
                let body = &self.data[self.pos..];
                let end = END_OF_STATE.to_be_bytes();
                let Some(at) = body.windows(8).position(|w| w == end) else {
                    return Err(QemuError::UnterminatedConfig {
                        offset: start as u64,
                    });
                };
                // The config bytes; the END_OF_STATE is left for the next call.
                self.pos += at;
                Item::Config(&body[..at])
            }
            other => {
                return Err(QemuError::UnknownMarker {
                    offset: start as u64,
                    marker: other,
                });
            }
        }))
    }
}

impl<'a> Iterator for Parser<'a> {
    type Item = Result<Item<'a>, QemuError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.step() {
            Ok(Some(i)) => Some(Ok(i)),
            Ok(None) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// The device-state chunks (DEV_DATA_STATE payloads) of `data`, in order, ready to become
/// DeviceState records (phase UNSPECIFIED) or to be written to a RESUMING data fd.
pub fn data_chunks(data: &[u8], max_block: u64) -> Result<Vec<&[u8]>, QemuError> {
    let mut out = Vec::new();
    for item in Parser::new(data, max_block) {
        if let Item::Data(d) = item? {
            out.push(d);
        }
    }
    Ok(out)
}

/// Whether `data` starts like QEMU VFIO framing (a known marker).
pub fn looks_like_qemu(data: &[u8]) -> bool {
    data.len() >= 8
        && matches!(
            be64(data),
            END_OF_STATE
                | DEV_CONFIG_STATE
                | DEV_SETUP_STATE
                | DEV_DATA_STATE
                | DEV_INIT_DATA_SENT
                | DEV_CONFIG_LOAD_READY
        )
}

/// Encodes items in QEMU's framing (for fixtures and tests; QEMU itself is never needed).
pub fn encode(items: &[Item<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        let (marker, payload): (u64, Option<&[u8]>) = match item {
            Item::EndOfState => (END_OF_STATE, None),
            Item::SetupState => (DEV_SETUP_STATE, None),
            Item::InitDataSent => (DEV_INIT_DATA_SENT, None),
            Item::ConfigLoadReady => (DEV_CONFIG_LOAD_READY, None),
            Item::Data(d) => {
                out.extend_from_slice(&DEV_DATA_STATE.to_be_bytes());
                out.extend_from_slice(&(d.len() as u64).to_be_bytes());
                out.extend_from_slice(d);
                continue;
            }
            Item::Config(c) => (DEV_CONFIG_STATE, Some(*c)),
        };
        out.extend_from_slice(&marker.to_be_bytes());
        if let Some(p) = payload {
            out.extend_from_slice(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_chunks() {
        let items = [
            Item::SetupState,
            Item::EndOfState,
            Item::Data(b"first"),
            Item::InitDataSent,
            Item::EndOfState,
            Item::Data(b"second"),
            Item::Data(b""),
            Item::EndOfState,
            Item::Config(b"\x01\x02pci-config"),
            Item::EndOfState,
            Item::ConfigLoadReady,
        ];
        let bytes = encode(&items);
        assert!(looks_like_qemu(&bytes));
        let parsed: Vec<Item<'_>> = Parser::new(&bytes, 1 << 20).map(|r| r.unwrap()).collect();
        assert_eq!(parsed, items);
        assert_eq!(
            data_chunks(&bytes, 1 << 20).unwrap(),
            alloc::vec![&b"first"[..], b"second", b""]
        );
    }

    #[test]
    fn bad_input_is_an_error_with_the_offset() {
        let mut bad = encode(&[Item::Data(b"abc")]);
        bad.truncate(bad.len() - 1);
        assert_eq!(
            data_chunks(&bad, 1 << 20).unwrap_err(),
            QemuError::Truncated {
                offset: 16,
                needed: 1
            }
        );
        let huge = encode(&[Item::Data(&[0u8; 100])]);
        assert!(matches!(
            data_chunks(&huge, 10),
            Err(QemuError::TooLarge { size: 100, .. })
        ));
        let mut bogus = 0x1234u64.to_be_bytes().to_vec();
        bogus.extend_from_slice(&[0; 8]);
        assert!(matches!(
            data_chunks(&bogus, 10),
            Err(QemuError::UnknownMarker { offset: 0, .. })
        ));
        let unterminated = encode(&[Item::Config(b"xyz")]);
        assert!(matches!(
            data_chunks(&unterminated, 10),
            Err(QemuError::UnterminatedConfig { .. })
        ));
        // A size field claiming 2^64-1 bytes is refused by the limit, not allocated.
        let mut liar = DEV_DATA_STATE.to_be_bytes().to_vec();
        liar.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(
            data_chunks(&liar, 1 << 20),
            Err(QemuError::TooLarge { .. })
        ));
    }
}
