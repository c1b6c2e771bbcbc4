//! Errors: where in the stream (byte offset, record index) and why.

use core::fmt;

/// Why a stream was refused or could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The first 8 bytes are not `LMIGSTRM`.
    #[error("not a livemig stream (bad magic)")]
    BadMagic,
    /// A major version this reader does not read.
    #[error("stream format {major}.{minor} is not supported (this reader reads version 1.x)")]
    UnsupportedVersion {
        /// Major version in the header.
        major: u16,
        /// Minor version in the header.
        minor: u16,
    },
    /// Stream flag bits this version does not define.
    #[error("unknown stream flags {0:#x}")]
    UnknownStreamFlags(u32),
    /// The producer field is not NUL-padded UTF-8.
    #[error("producer name is not NUL-padded UTF-8")]
    BadProducer,
    /// The header CRC does not match.
    #[error("stream header checksum mismatch")]
    HeaderChecksum,
    /// The input ended inside a structure.
    #[error("truncated: {needed} more bytes needed")]
    Truncated {
        /// Bytes missing.
        needed: u64,
    },
    /// Record tag 0.
    #[error("record tag 0 is invalid")]
    ZeroTag,
    /// A record type this reader does not know and may not skip.
    #[error("unknown record type {0}, not marked optional")]
    UnknownRecord(u16),
    /// Record flag bits this version does not define.
    #[error("unknown record flags {0:#x}")]
    UnknownRecordFlags(u16),
    /// A record body larger than the reader's limit (refused before allocating).
    #[error("record body of {length} bytes exceeds the limit of {max}")]
    RecordTooLarge {
        /// Body length.
        length: u64,
        /// The limit.
        max: u64,
    },
    /// A record out of order (lost, repeated or reordered).
    #[error("record sequence number {got}, expected {expected}")]
    Sequence {
        /// Expected value.
        expected: u32,
        /// Value read.
        got: u32,
    },
    /// A record's CRC32C does not match its contents.
    #[error("checksum mismatch: record says {stored:#010x}, contents give {computed:#010x}")]
    Checksum {
        /// CRC in the record.
        stored: u32,
        /// CRC computed.
        computed: u32,
    },
    /// A non-zero CRC field in a stream without checksums.
    #[error("checksum field is {0:#010x} in a stream without checksums")]
    UnexpectedChecksum(u32),
    /// A reserved field that is not zero.
    #[error("reserved field {0} is not zero")]
    Reserved(&'static str),
    /// A body whose length does not match what its fields say.
    #[error("{record} body is {got} bytes, expected {expected}")]
    BodyLength {
        /// Record type name.
        record: &'static str,
        /// Expected length.
        expected: u64,
        /// Actual length.
        got: u64,
    },
    /// A field with an invalid value.
    #[error("invalid {field}: {value:#x}")]
    InvalidField {
        /// Field name.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// Text that is not UTF-8.
    #[error("{0} is not valid UTF-8")]
    BadText(&'static str),
    /// A Compat record after a non-Compat record.
    #[error("Compat record after other records: compatibility data must come first")]
    CompatTooLate,
    /// A Channel record that is not the stream's first record.
    #[error("Channel record after other records: it must be the stream's first record")]
    ChannelNotFirst,
    /// Two Compat records for one device.
    #[error("device {0} announced twice")]
    DuplicateDevice(u32),
    /// Device state for a device without a Compat record.
    #[error("device {0} has no Compat record")]
    UnknownDevice(u32),
    /// A missing or repeated device-state chunk.
    #[error("device {device}: chunk {got}, expected {expected}")]
    ChunkSequence {
        /// The device.
        device: u32,
        /// Expected chunk number.
        expected: u32,
        /// Chunk number read.
        got: u32,
    },
    /// PRE_COPY data after STOP_COPY data.
    #[error("device {0}: PRE_COPY data after STOP_COPY data")]
    PhaseOrder(u32),
    /// A device's total state above the limit.
    #[error("device {device}: {bytes} bytes of state exceed the limit of {max}")]
    DeviceStateLimit {
        /// The device.
        device: u32,
        /// Bytes so far.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// The stream above the total limit.
    #[error("stream exceeds the limit of {max} bytes")]
    StreamLimit {
        /// The limit.
        max: u64,
    },
    /// More devices than allowed.
    #[error("more than {max} devices")]
    TooManyDevices {
        /// The limit.
        max: u64,
    },
    /// An End total that does not match the stream.
    #[error("End says {field} = {stated}, but the stream has {actual}")]
    EndMismatch {
        /// Field name.
        field: &'static str,
        /// Value in End.
        stated: u64,
        /// Value counted.
        actual: u64,
    },
    /// The End digest does not match the record CRCs.
    #[error("whole-stream digest mismatch")]
    DigestMismatch,
    /// Bytes after End.
    #[error("data after the End record")]
    TrailingData,
    /// The input ended without an End record.
    #[error("stream ends without an End record")]
    MissingEnd,
    /// A writer argument that would produce an invalid stream.
    #[error("{0}")]
    InvalidArgument(alloc::string::String),
    /// The underlying reader or writer failed.
    #[cfg(feature = "std")]
    #[error("I/O error")]
    Io(#[source] std::io::Error),
}

/// A stream error with its position: the byte offset where the offending structure starts and
/// the index of the record (if it is inside one).
#[derive(Debug)]
pub struct Error {
    /// Byte offset in the stream.
    pub offset: u64,
    /// Record index (0 = first record after the header), if any.
    pub record: Option<u64>,
    /// What is wrong.
    pub kind: ErrorKind,
}

impl Error {
    /// An error at `offset`, in record `record`.
    pub fn at(offset: u64, record: Option<u64>, kind: ErrorKind) -> Error {
        Error {
            offset,
            record,
            kind,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.record {
            Some(r) => write!(f, "at byte {} (record {r}): {}", self.offset, self.kind),
            None => write!(f, "at byte {}: {}", self.offset, self.kind),
        }
    }
}

impl core::error::Error for Error {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        core::error::Error::source(&self.kind)
    }
}
