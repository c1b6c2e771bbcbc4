//! Deterministic streams shared by the tests (and by examples/make_golden.rs).
#![allow(dead_code)]

use livemig_stream::{Compat, DirtyCaps, Phase, Round, Writer, WriterOptions};

/// A representative version-1 stream: two devices, PRE_COPY and STOP_COPY state, pages with
/// payload and zero pages, a dirty bitmap and two rounds.
pub fn v1_basic(checksums: bool) -> Vec<u8> {
    let opts = WriterOptions {
        checksums,
        producer: "livemig golden v1".into(),
        detect_zero_pages: true,
        max_record: 16 << 10,

        ..WriterOptions::default()
    };
    let mut w = Writer::new(Vec::new(), opts).unwrap();
    w.compat(&Compat {
        device: 0,
        identity: "19e5:a256 hisi_acc_vfio_pci",
        compat: &(0u8..40).collect::<Vec<_>>(),
        page_size_mask: 0x4000_1000,
        dirty_caps: DirtyCaps(DirtyCaps::IOMMU),
        migration_flags: 0b101,
    })
    .unwrap();
    w.compat(&Compat {
        device: 1,
        identity: "mtty",
        compat: b"",
        page_size_mask: 0x1000,
        dirty_caps: DirtyCaps(DirtyCaps::DEVICE),
        migration_flags: 0b111,
    })
    .unwrap();
    let mut page = vec![0u8; 4096 * 6];
    for (i, b) in page.iter_mut().enumerate().skip(4096 * 2) {
        *b = (i % 251) as u8;
    }
    w.pages(0x10_0000, 4096, &page).unwrap();
    w.device_state(0, Phase::PreCopy, &[0xab; 100]).unwrap();
    w.round(&Round {
        round: 0,
        pages: 4,
        zero_pages: 2,
        dirty_pages: 6,
        device_bytes: 100,
        stream_bytes: 20_000,
        elapsed_us: 1500,
    })
    .unwrap();
    w.dirty_bitmap(0x10_0000, 70 * 4096, 4096, &[0b1011, 0b1])
        .unwrap();
    w.pages(0x10_1000, 4096, &page[4096 * 2..4096 * 3]).unwrap();
    w.round(&Round {
        round: 1,
        pages: 1,
        dirty_pages: 1,
        ..Round::default()
    })
    .unwrap();
    w.device_state(0, Phase::StopCopy, &[0xcd; 40_000]).unwrap();
    w.device_state(1, Phase::StopCopy, b"mtty state").unwrap();
    w.zero_pages(0x4000_0000, 0x20_0000, 3).unwrap();
    w.finish().unwrap()
}

/// Every record type with small payloads (about 3 KB): for the exhaustive truncation and
/// byte-flip loops.
pub fn v1_small(checksums: bool) -> Vec<u8> {
    let opts = WriterOptions {
        checksums,
        producer: "livemig small".into(),
        detect_zero_pages: true,
        max_record: 1024,

        ..WriterOptions::default()
    };
    let mut w = Writer::new(Vec::new(), opts).unwrap();
    w.compat(&Compat {
        device: 0,
        identity: "dev0",
        compat: &[1, 2, 3, 4],
        page_size_mask: 0x1000,
        dirty_caps: DirtyCaps(DirtyCaps::IOMMU),
        migration_flags: 0b101,
    })
    .unwrap();
    let mut pages = vec![0u8; 512 * 4];
    pages[512..1024].fill(0x5a);
    w.pages(0x8000, 512, &pages).unwrap();
    w.device_state(0, Phase::PreCopy, &[0xab; 40]).unwrap();
    w.round(&Round {
        round: 0,
        pages: 1,
        zero_pages: 3,
        ..Round::default()
    })
    .unwrap();
    w.dirty_bitmap(0, 100 * 512, 512, &[0b1, 0b10]).unwrap();
    w.device_state(0, Phase::StopCopy, &[0xcd; 1200]).unwrap();
    w.zero_pages(0x10_0000, 4096, 2).unwrap();
    w.finish().unwrap()
}

/// A QEMU VFIO section framing sample, written from the documented layout. The configuration
/// is a `vmstate_vfio_pci_config` of a conventional (256-byte) configuration space that holds
/// the END_OF_STATE bytes, so only parsing its layout finds where it ends.
pub fn qemu_sample() -> Vec<u8> {
    use livemig_stream::qemu::{END_OF_STATE, Item, PciConfigState, encode};
    let precopy: Vec<u8> = (0..300u32).map(|i| (i * 3) as u8).collect();
    let mut space = [0u8; 256];
    space[..4].copy_from_slice(&[0x86, 0x80, 0x15, 0x10]);
    space[0x40..0x48].copy_from_slice(&END_OF_STATE.to_be_bytes());
    let config = PciConfigState {
        version_id: 2,
        config: &space,
        irq_state: [1, 0, 0, 0],
        msix: None,
        display: None,
        display_version: 0,
    }
    .encode();
    encode(&[
        Item::SetupState,
        Item::EndOfState,
        Item::Data(&precopy),
        Item::InitDataSent,
        Item::EndOfState,
        Item::Data(b"stop-copy device state"),
        Item::EndOfState,
        Item::Config(&config),
        Item::EndOfState,
    ])
}
