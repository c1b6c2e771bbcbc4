//! Whole QEMU migration files: a file QEMU 10.0 wrote on this project's machines
//! (`fixtures/qemu/q35-tcg-16m.qevm`, see `fixtures/README.md` for how), and the same file with
//! a VFIO device's sections spliced in (synthetic: the host has no VFIO device), read section by
//! section; truncations, unknown types and unknown markers are errors naming the offset.

use std::fmt::Write as _;

use livemig_stream::qemu::{
    self, DEV_CONFIG_STATE, DEV_DATA_STATE, DEV_SETUP_STATE, END_OF_STATE, Item, PciConfigState,
    QemuError,
};
use livemig_stream::qevm::{
    self, Content, QEMU_VM_EOF, QEMU_VM_SECTION_END, QEMU_VM_SECTION_FOOTER, QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART, QEMU_VM_SECTION_START, QEMU_VM_VMDESCRIPTION, QevmError, QevmFile,
    QevmLimits, SectionKind,
};
use proptest::prelude::*;

fn fixture() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/qemu/q35-tcg-16m.qevm"
    );
    std::fs::read(path).unwrap()
}

fn read(b: &[u8]) -> Result<QevmFile<'_>, QevmError> {
    qevm::read(b, QevmLimits::default())
}

/// One line per section record and command, for snapshots.
fn listing(f: &QevmFile<'_>) -> String {
    let mut s = String::new();
    if let Some(c) = &f.configuration {
        let _ = writeln!(
            s,
            "configuration @{}+{} machine={:?} capabilities={:?}",
            c.offset, c.length, c.machine, c.capabilities
        );
    }
    for sec in f.sections() {
        let what = match &sec.content {
            Content::Ram(r) => format!(
                "ram mem_size={:?} blocks={} zero={} pages={}",
                r.mem_size, r.blocks_listed, r.zero_pages, r.normal_pages
            ),
            Content::Vfio { items, .. } => items
                .iter()
                .map(|i| match i.item {
                    Item::Data(d) => format!("DATA({})", d.len()),
                    Item::Config(c) => format!("CONFIG({})", c.len()),
                    Item::EndOfState => "END_OF_STATE".into(),
                    Item::SetupState => "SETUP".into(),
                    Item::InitDataSent => "INIT_DATA_SENT".into(),
                    Item::ConfigLoadReady => "CONFIG_LOAD_READY".into(),
                })
                .collect::<Vec<_>>()
                .join(" "),
            Content::Vmstate {
                vmsd_name,
                fields,
                subsections,
            } => format!("vmstate {vmsd_name:?} fields={fields} subsections={subsections}"),
        };
        let _ = writeln!(
            s,
            "{:2} {:5} id={:2} {:24} inst={} ver={:2} @{}+{} footer={} | {what}",
            sec.index,
            sec.kind.name(),
            sec.section_id,
            format!("{:?}", sec.idstr),
            sec.instance_id,
            sec.version_id,
            sec.offset,
            sec.length,
            sec.footer
        );
    }
    for c in &f.commands {
        let _ = writeln!(s, "command {} @{} len={}", c.name(), c.offset, c.len);
    }
    for b in &f.ram_blocks {
        let _ = writeln!(
            s,
            "ram block {:24} {:>9} bytes zero={} pages={}",
            format!("{:?}", b.name),
            b.used_length,
            b.zero_pages,
            b.normal_pages
        );
    }
    let d = f.description.as_ref();
    let _ = writeln!(
        s,
        "eof @{:?} description @{:?} json {:?} bytes, {} devices",
        f.eof_offset,
        d.map(|d| d.offset),
        d.map(|d| d.json_length),
        d.map_or(0, |d| d.devices().len())
    );
    s
}

#[test]
fn qemu_written_file_reads_whole() {
    let bytes = fixture();
    let f = read(&bytes).unwrap();
    assert_eq!(f.version, 3);
    let c = f.configuration.as_ref().unwrap();
    assert_eq!(c.machine, "pc-q35-10.0");
    assert_eq!(f.page_size, 4096);

    // RAM: one START with the block list, then pages, then an END; -m 16 gives a 16 MiB
    // pc.ram, and every page of every block is sent exactly once (the VM never ran).
    let ram: Vec<_> = f.sections().iter().filter(|s| s.idstr == "ram").collect();
    assert_eq!(ram.first().unwrap().kind, SectionKind::Start);
    assert_eq!(ram.last().unwrap().kind, SectionKind::End);
    let Content::Ram(start) = &ram[0].content else {
        panic!("ram START is not RAM content")
    };
    let total: u64 = f.ram_blocks.iter().map(|b| b.used_length).sum();
    assert_eq!(start.mem_size, Some(total));
    assert_eq!(start.blocks_listed as usize, f.ram_blocks.len());
    let pc_ram = f.ram_blocks.iter().find(|b| b.name == "pc.ram").unwrap();
    assert_eq!(pc_ram.used_length, 16 << 20);
    for b in &f.ram_blocks {
        assert_eq!(
            b.zero_pages + b.normal_pages,
            b.used_length / f.page_size,
            "{}",
            b.name
        );
    }
    // QEMU's `info migrate` for this run: duplicate 4174 pages, normal 52 pages.
    assert_eq!(f.ram_pages(), (4174, 52));

    // Every FULL section walked with the description, and every described device present.
    let d = f.description.as_ref().unwrap();
    assert_eq!(f.eof_offset.unwrap() + 1, d.offset);
    assert_eq!(d.json_offset + d.json_length, bytes.len() as u64);
    let full: Vec<_> = f
        .sections()
        .iter()
        .filter(|s| s.kind == SectionKind::Full)
        .map(|s| (s.idstr, i64::from(s.instance_id)))
        .collect();
    assert_eq!(full, d.devices());
    assert!(
        f.sections()
            .iter()
            .all(|s| s.footer && matches!(s.content, Content::Ram(_) | Content::Vmstate { .. }))
    );
    // Sections tile the file between the configuration and EOF (commands aside).
    let mut at = c.offset + c.length;
    for s in f.sections() {
        if let Some(cmd) = f.commands.iter().find(|c| c.offset == at) {
            at += 5 + u64::from(cmd.len);
        }
        assert_eq!(s.offset, at, "section {}", s.index);
        at += s.length;
    }
    assert_eq!(at, f.eof_offset.unwrap());
    assert!(f.vfio_devices().is_empty());
    insta::assert_snapshot!("q35_tcg_16m_sections", listing(&f));
}

#[test]
fn every_truncation_is_an_error_naming_an_offset() {
    let bytes = fixture();
    for cut in 0..bytes.len() {
        let e = read(&bytes[..cut]).unwrap_err();
        assert!(e.offset() <= cut as u64, "cut {cut}: {e}");
        assert!(e.to_string().starts_with("at byte"), "cut {cut}: {e}");
    }
}

#[test]
fn unknown_section_type_names_its_offset() {
    let bytes = fixture();
    let f = read(&bytes).unwrap();
    let timer = f.sections().iter().find(|s| s.idstr == "timer").unwrap();
    let at = timer.offset as usize;
    for byte in [0x09u8, 0x42, 0xff] {
        let mut bad = bytes.clone();
        bad[at] = byte;
        assert_eq!(
            read(&bad).unwrap_err(),
            QevmError::UnknownSectionType {
                offset: at as u64,
                byte
            }
        );
    }
    // The first section's type byte too, and EOF replaced.
    let mut bad = bytes.clone();
    let eof = f.eof_offset.unwrap() as usize;
    bad[eof] = 0x33;
    assert_eq!(read(&bad).unwrap_err().offset(), eof as u64);
}

#[test]
fn damaged_structure_is_an_error_naming_its_offset() {
    let bytes = fixture();
    let f = read(&bytes).unwrap();
    // A footer naming another section.
    let cpu = f.sections().iter().find(|s| s.idstr == "cpu").unwrap();
    let footer = (cpu.offset + cpu.length - 5) as usize;
    let mut bad = bytes.clone();
    assert_eq!(bad[footer], QEMU_VM_SECTION_FOOTER);
    bad[footer + 4] ^= 1;
    assert!(matches!(
        read(&bad).unwrap_err(),
        QevmError::Footer { offset, .. } if offset == footer as u64
    ));
    // A description whose length field is off by one is not found; the first section that
    // needs it says so.
    let mut bad = bytes.clone();
    let d = f.description.as_ref().unwrap();
    bad[d.offset as usize + 4] ^= 1;
    let timer = f.sections().iter().find(|s| s.idstr == "timer").unwrap();
    assert_eq!(
        read(&bad).unwrap_err(),
        QevmError::NoDescription {
            offset: timer.offset,
            section: "timer".into()
        }
    );
    // A RAM page word with an unknown flag.
    let part = &f.sections()[1];
    let word = part.body_offset as usize;
    let mut bad = bytes.clone();
    bad[word + 7] |= 0x01;
    assert!(matches!(
        read(&bad).unwrap_err(),
        QevmError::UnknownRamFlags { offset, .. } if offset == word as u64
    ));
    // A vmstate subsection marker missing: the error names section, field and offset.
    let fw = f.sections().iter().find(|s| s.idstr == "fw_cfg").unwrap();
    let body = &bytes[fw.body_offset as usize..(fw.offset + fw.length) as usize];
    let sub = fw.body_offset as usize + body.iter().position(|&b| b == 0x05).unwrap();
    let mut bad = bytes.clone();
    bad[sub] = 0x06;
    let e = read(&bad).unwrap_err();
    assert_eq!(e.offset(), sub as u64, "{e}");
    assert!(
        matches!(&e, QevmError::Field { section, field, .. } if section == "fw_cfg" && field.starts_with("fw_cfg/")),
        "{e}"
    );
}

// ---- A synthetic VFIO device spliced into the QEMU-written file ----
//
// The host has no VFIO device, so QEMU cannot write a VFIO section here. These sections are
// built from the layout QEMU 10.0 writes (hw/vfio/migration.c, and what the rig recipe saw
// from an mtty device: START with DEV_SETUP_STATE, a PART with 24 bytes of data, an empty
// PART, END with 72 bytes, FULL with DEV_CONFIG_STATE), and a JSON description entry shaped
// like `vmstate_save_old_style` writes for it. The data bytes are patterns, not mtty's.

const VFIO_ID: u32 = 39;
const VFIO_IDSTR: &str = "0000:00:01.0/vfio";

fn header(ty: u8, id: u32, full: bool) -> Vec<u8> {
    let mut v = vec![ty];
    v.extend_from_slice(&id.to_be_bytes());
    if full {
        v.push(VFIO_IDSTR.len() as u8);
        v.extend_from_slice(VFIO_IDSTR.as_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&1u32.to_be_bytes());
    }
    v
}

fn footer(v: &mut Vec<u8>, id: u32) {
    v.push(QEMU_VM_SECTION_FOOTER);
    v.extend_from_slice(&id.to_be_bytes());
}

fn data(d: &[u8]) -> Vec<u8> {
    let mut v = DEV_DATA_STATE.to_be_bytes().to_vec();
    v.extend_from_slice(&(d.len() as u64).to_be_bytes());
    v.extend_from_slice(d);
    v
}

fn precopy_bytes() -> Vec<u8> {
    (0..24u8).collect()
}

fn stopcopy_bytes() -> Vec<u8> {
    (100..172u8).collect()
}

/// A 4,116-byte configuration vmstate (PCI Express space, no MSI-X) whose space holds the
/// END_OF_STATE bytes at 0x100, where a search for the marker would cut it.
fn config_blob() -> Vec<u8> {
    let mut space = vec![0u8; qemu::PCIE_CONFIG_SPACE_SIZE];
    space[..4].copy_from_slice(&[0x36, 0x1b, 0x01, 0x00]);
    space[0x100..0x108].copy_from_slice(&END_OF_STATE.to_be_bytes());
    PciConfigState {
        version_id: 2,
        config: &space,
        irq_state: [0; 4],
        msix: None,
        display: None,
        display_version: 0,
    }
    .encode()
}

fn spliced() -> Vec<u8> {
    let bytes = fixture();
    let f = read(&bytes).unwrap();
    let end_of = |kind: SectionKind| {
        let s = f
            .sections()
            .iter()
            .find(|s| s.idstr == "ram" && s.kind == kind)
            .unwrap();
        (s.offset + s.length) as usize
    };
    let (start_end, part_end, end_end) = (
        end_of(SectionKind::Start),
        end_of(SectionKind::Part),
        end_of(SectionKind::End),
    );
    let eof = f.eof_offset.unwrap() as usize;

    let mut start = header(QEMU_VM_SECTION_START, VFIO_ID, true);
    start.extend_from_slice(&DEV_SETUP_STATE.to_be_bytes());
    start.extend_from_slice(&END_OF_STATE.to_be_bytes());
    footer(&mut start, VFIO_ID);
    let mut parts = header(QEMU_VM_SECTION_PART, VFIO_ID, false);
    parts.extend(data(&precopy_bytes()));
    parts.extend_from_slice(&END_OF_STATE.to_be_bytes());
    footer(&mut parts, VFIO_ID);
    parts.extend(header(QEMU_VM_SECTION_PART, VFIO_ID, false));
    parts.extend_from_slice(&END_OF_STATE.to_be_bytes());
    footer(&mut parts, VFIO_ID);
    let mut end = header(QEMU_VM_SECTION_END, VFIO_ID, false);
    end.extend(data(&stopcopy_bytes()));
    end.extend_from_slice(&END_OF_STATE.to_be_bytes());
    footer(&mut end, VFIO_ID);
    let mut full = header(QEMU_VM_SECTION_FULL, VFIO_ID, true);
    let mut body = DEV_CONFIG_STATE.to_be_bytes().to_vec();
    body.extend(config_blob());
    body.extend_from_slice(&END_OF_STATE.to_be_bytes());
    full.extend_from_slice(&body);
    footer(&mut full, VFIO_ID);

    let d = f.description.as_ref().unwrap();
    let json = std::str::from_utf8(&bytes[d.json_offset as usize..]).unwrap();
    assert!(json.ends_with("]}"));
    let entry = format!(
        r#"{{"name": "{VFIO_IDSTR}", "instance_id": 0, "size": {n}, "fields": [{{"name": "data", "size": {n}, "type": "buffer"}}]}}"#,
        n = body.len()
    );
    let json = format!("{}, {entry}]}}", &json[..json.len() - 2]);

    let mut out = bytes[..start_end].to_vec();
    out.extend(start);
    out.extend_from_slice(&bytes[start_end..part_end]);
    out.extend(parts);
    out.extend_from_slice(&bytes[part_end..end_end]);
    out.extend(end);
    out.extend_from_slice(&bytes[end_end..eof]);
    out.extend(full);
    out.push(QEMU_VM_EOF);
    out.push(QEMU_VM_VMDESCRIPTION);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(json.as_bytes());
    out
}

#[test]
fn synthetic_vfio_sections_decode() {
    let bytes = spliced();
    let f = read(&bytes).unwrap();
    assert_eq!(f.vfio_devices(), [VFIO_IDSTR]);
    let kinds: Vec<_> = f.vfio_sections(VFIO_IDSTR.into()).map(|s| s.kind).collect();
    use SectionKind::*;
    assert_eq!(kinds, [Start, Part, Part, End, Full]);
    let mut state = precopy_bytes();
    state.extend(stopcopy_bytes());
    assert_eq!(qevm::vfio_device_state(&f, VFIO_IDSTR), Some(state.clone()));
    assert_eq!(qevm::vfio_device_state(&f, 0), Some(state));
    assert_eq!(qevm::vfio_device_state(&f, 1), None);
    assert_eq!(qevm::vfio_device_state(&f, "0000:00:02.0/vfio"), None);
    let cfg = qevm::vfio_config(&f, 0).unwrap();
    assert_eq!(cfg.encode(), config_blob());
    assert_eq!(cfg.config.len(), 4096);
    assert_eq!(cfg.ids(), (0x1b36, 0x0001));
    // The RAM and device sections around them still read as before.
    assert_eq!(f.ram_pages(), (4174, 52));
    insta::assert_snapshot!("q35_tcg_16m_synthetic_vfio_sections", listing(&f));
}

#[test]
fn synthetic_vfio_damage_names_the_offset() {
    let bytes = spliced();
    let f = read(&bytes).unwrap();
    let items: Vec<_> = f
        .vfio_sections(VFIO_IDSTR.into())
        .flat_map(|s| match &s.content {
            Content::Vfio { items, .. } => items.clone(),
            _ => Vec::new(),
        })
        .collect();
    // An unknown marker in place of the PART's DEV_DATA_STATE.
    let data_at = items
        .iter()
        .find(|i| matches!(i.item, Item::Data(_)))
        .unwrap()
        .offset;
    let mut bad = bytes.clone();
    bad[data_at as usize + 7] = 0x09;
    let e = read(&bad).unwrap_err();
    assert_eq!(
        e,
        QevmError::Vfio {
            section: VFIO_IDSTR.into(),
            error: QemuError::UnknownMarker {
                offset: data_at,
                marker: 0xffff_ffff_ef10_0009
            }
        }
    );
    assert_eq!(e.offset(), data_at);
    // A chunk size beyond the file.
    let mut bad = bytes.clone();
    bad[data_at as usize + 8] = 0x7f;
    assert_eq!(read(&bad).unwrap_err().offset(), data_at);
    // An irq state of 7 inside the configuration vmstate.
    let cfg_at = items
        .iter()
        .find(|i| matches!(i.item, Item::Config(_)))
        .unwrap()
        .offset;
    let irq = cfg_at as usize + 8 + 4 + 4096;
    let mut bad = bytes.clone();
    bad[irq + 3] = 7;
    let e = read(&bad).unwrap_err();
    assert_eq!(e.offset(), irq as u64, "{e}");
    // Every truncation inside the VFIO sections and the description.
    let first = f.vfio_sections(VFIO_IDSTR.into()).next().unwrap().offset as usize;
    for cut in (first..first + 200).chain(bytes.len() - 300..bytes.len()) {
        let e = read(&bytes[..cut]).unwrap_err();
        assert!(e.offset() <= cut as u64, "cut {cut}: {e}");
    }
    let full = f.vfio_sections(VFIO_IDSTR.into()).last().unwrap();
    for cut in full.offset as usize..(full.offset + full.length) as usize {
        assert!(read(&bytes[..cut]).is_err(), "cut {cut}");
    }
}

/// The description's size for the VFIO FULL section decides the layout and must match.
#[test]
fn vfio_config_length_must_match_the_description() {
    let bytes = spliced();
    let f = read(&bytes).unwrap();
    let d = f.description.as_ref().unwrap();
    let json = std::str::from_utf8(&bytes[d.json_offset as usize..]).unwrap();
    let wrong = json.replace("\"size\": 4132,", "\"size\": 4140,");
    assert_ne!(wrong, json);
    let mut bad = bytes[..d.offset as usize].to_vec();
    bad.push(QEMU_VM_VMDESCRIPTION);
    bad.extend_from_slice(&(wrong.len() as u32).to_be_bytes());
    bad.extend_from_slice(wrong.as_bytes());
    let e = read(&bad).unwrap_err();
    assert!(matches!(&e, QevmError::Vfio { .. }), "{e}");
}

#[cfg(feature = "inspect")]
#[test]
fn inspect_lists_sections_and_vfio_items() {
    use livemig_stream::Limits;
    use livemig_stream::inspect::inspect;
    let bytes = spliced();
    let i = inspect(&bytes[..], Limits::default()).unwrap();
    assert!(i.summary.valid, "{:?}", i.summary.error);
    assert_eq!(i.summary.format, "qevm");
    let q = i.summary.qevm.as_ref().unwrap();
    assert_eq!(q.sections.len(), read(&bytes).unwrap().sections().len());
    assert_eq!(i.summary.devices.len(), 1);
    assert_eq!(i.summary.devices[0].precopy_bytes, 24);
    assert_eq!(i.summary.devices[0].stopcopy_bytes, 72);
    let json: serde_json::Value = serde_json::from_str(&i.summary.to_json()).unwrap();
    assert_eq!(json["qevm"]["machine"], "pc-q35-10.0");
    insta::assert_snapshot!("q35_tcg_16m_synthetic_vfio_dump", i.dump);

    // A damaged file is summarized up to the damage.
    let i = inspect(&bytes[..bytes.len() / 2], Limits::default()).unwrap();
    assert!(!i.summary.valid);
    assert!(i.summary.error.as_ref().unwrap().starts_with("at byte"));
    assert!(!i.summary.qevm.as_ref().unwrap().sections.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random byte changes anywhere in the file: an error naming an offset inside the file, or
    /// (for changes inside opaque bytes) a successful read; never a panic.
    #[test]
    fn random_damage_never_panics(edits in proptest::collection::vec((0usize..1 << 20, any::<u8>()), 1..8)) {
        let mut bytes = spliced();
        for (at, v) in edits {
            let i = at % bytes.len();
            bytes[i] = v;
        }
        if let Err(e) = read(&bytes) {
            prop_assert!(e.offset() <= bytes.len() as u64);
        }
    }
}

/// The file QEMU 10.0 wrote inside the rig with an mtty mdev assigned through `vfio-pci`
/// (`fixtures/qemu/mtty-vfio.qevm`, written by the rig case `qemu.vfio_mtty_saved_to_file`):
/// a real VFIO section, not a spliced one.
#[test]
fn qemu_written_vfio_section_of_an_mtty() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/qemu/mtty-vfio.qevm"
    );
    let bytes = std::fs::read(path).unwrap();
    let f = read(&bytes).unwrap();
    assert_eq!(f.vfio_devices(), vec!["0000:00:01.0/vfio"]);
    let kinds: Vec<String> = f
        .vfio_sections(qevm::VfioDevice::Index(0))
        .map(|s| {
            let Content::Vfio { items, .. } = &s.content else {
                panic!("a VFIO section without VFIO content");
            };
            let items: Vec<String> = items
                .iter()
                .map(|i| match i.item {
                    Item::Data(d) => format!("DATA({})", d.len()),
                    Item::Config(c) => format!("CONFIG({})", c.len()),
                    Item::EndOfState => "END".into(),
                    Item::SetupState => "SETUP".into(),
                    other => format!("{other:?}"),
                })
                .collect();
            format!("{}: {}", s.kind.name(), items.join(" "))
        })
        // Whether an empty pre-copy PART follows the first depends on QEMU's iteration timing.
        .filter(|k| k != "PART: END")
        .collect();
    // The layout ../shared/recipes/qemu-in-rig.md describes: setup, the 24-byte header in
    // pre-copy, both ports at stop-copy, then the config state.
    assert_eq!(
        kinds,
        vec![
            "START: SETUP END",
            "PART: DATA(24) END",
            "END: DATA(72) END",
            "FULL: CONFIG(4116) END",
        ],
        "{kinds:#?}"
    );
    let state = qevm::vfio_device_state(&f, 0usize).unwrap();
    assert_eq!(state.len(), 96);
    // samples/vfio-mdev/mtty.c: struct mtty_data (magic, version 1.0, 2 ports) and two
    // struct serial_port (36 bytes each, uart_reg[8] first): the rig programmed SCR (7) and
    // LCR (3) of both ports before QEMU opened the device.
    assert_eq!(&state[..8], &0x7e9d_0989_8c3e_2c4e_u64.to_le_bytes());
    assert_eq!(u32::from_le_bytes(state[16..20].try_into().unwrap()), 2);
    assert_eq!([state[24 + 7], state[24 + 3]], [0x71, 0x1b]);
    assert_eq!([state[60 + 7], state[60 + 3]], [0x17, 0x0b]);
    let cfg = qevm::vfio_config(&f, 0usize).unwrap();
    assert_eq!(cfg.config.len(), 4096);
    // mtty's config space: vendor 0x4348, device 0x3253 (mtty.c mtty_create_config_space).
    assert_eq!(&cfg.config[..4], &[0x48, 0x43, 0x53, 0x32]);
}
