//! The livemig migration stream: a versioned, checksummed, hostile-input-safe format for device
//! compatibility data, VFIO device state and guest pages — and a reader for the framing QEMU's
//! VFIO migration writes, so QEMU-captured device state can be inspected and restored.
//!
//! ```text
//! +--------------------+-----------+-----------+-----+-----------+-----------+
//! | stream header (48) | record 0  | record 1  | ... | record N  | End       |
//! +--------------------+-----------+-----------+-----+-----------+-----------+
//!  "LMIGSTRM" ver flags  Compat first (one per device), then DeviceState, Pages,
//!  producer  CRC32C      ZeroPages, DirtyBitmap, Round in any order; End last.
//!
//! record: | tag u16 | rflags u16 | length u32 | seq u32 | crc32c u32 | body ... |
//! ```
//!
//! The byte-exact specification, with every record's layout and the version rules, is
//! `FORMAT.md` in this crate. Everything is little-endian, tag 0 is invalid, reserved bytes
//! must be zero, unknown record types are skipped only when flagged optional.
//!
//! * [`Writer`] (feature `std`) writes over `io::Write` with vectored writes (page payloads are
//!   not copied), optional zero-page detection, and splits records to a size limit.
//! * [`Reader`] (feature `std`) reads incrementally from `io::Read`; [`SliceReader`] reads from
//!   memory without copying (and works in `no_std` + `alloc`). Both enforce caller [`Limits`],
//!   check sequence numbers, checksums, the Compat-first rule, per-device chunk order, the End
//!   totals and digest, and report errors with byte offset, record index and reason. No input
//!   makes them panic.
//! * [`qemu`] parses QEMU's VFIO section framing; [`qevm`] reads whole QEMU migration files
//!   (`QEVM`, as `migrate file:` writes them) and collects their VFIO device state; `inspect`
//!   (feature `inspect`) dumps and summarizes streams of every kind.
//!
//! ```
//! # #[cfg(feature = "std")] {
//! use livemig_stream::{Compat, DirtyCaps, Limits, Phase, Reader, Record, Writer, WriterOptions};
//! let mut w = Writer::new(Vec::new(), WriterOptions::default()).unwrap();
//! w.compat(&Compat {
//!     device: 0,
//!     identity: "19e5:a256 hisi_acc_vfio_pci",
//!     compat: &[0xcc; 40],
//!     page_size_mask: 0x1000,
//!     dirty_caps: DirtyCaps(DirtyCaps::IOMMU),
//!     migration_flags: 0b101,
//! }).unwrap();
//! w.pages(0x10_0000, 4096, &[7u8; 8192]).unwrap();
//! w.device_state(0, Phase::StopCopy, b"device state").unwrap();
//! let bytes = w.finish().unwrap();
//!
//! let mut r = Reader::new(&bytes[..], Limits::default()).unwrap();
//! while let Some(rec) = r.next().unwrap() {
//!     if let Record::Pages(p) = rec {
//!         assert_eq!(p.payload.len(), 8192);
//!     }
//! }
//! # }
//! ```
//!
//! # Features
//! * `std` (default): [`Reader`] and [`Writer`] over `io::Read`/`io::Write`, and CRC32C with
//!   the CPU's carry-less multiply (`crc-fast`). Without it the crate is `no_std` + `alloc`:
//!   records, [`Decoder`]/[`SliceReader`], [`qemu`] and [`qevm`] decode with a table CRC, and CI
//!   links that build into a `#![no_std]` binary for `x86_64-unknown-none`.
//! * `inspect` (implies `std`, opt-in): dumps and JSON summaries through serde and serde_json,
//!   for tools such as the livemig CLI. Nothing else in the crate uses serde.
#![no_std]
#![deny(missing_docs)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod crc;
pub mod error;
pub mod format;
pub mod qemu;
pub mod qevm;
pub mod slice;
pub mod validate;

#[cfg(feature = "inspect")]
pub mod inspect;
#[cfg(feature = "std")]
pub mod read;
#[cfg(feature = "std")]
pub mod write;

pub use error::{Error, ErrorKind};
pub use format::{
    Channel, Compat, DeviceState, DirtyBitmap, DirtyCaps, End, Pages, Phase, Record, RecordHeader,
    Round, StreamHeader, Sync, Tag, ZeroPages,
};
pub use slice::{Decoder, SliceReader};
pub use validate::{Limits, Totals};

#[cfg(feature = "std")]
pub use read::Reader;
#[cfg(feature = "std")]
pub use write::{PagesWritten, Writer, WriterOptions};
