//! The VT-d and AMD-Vi unit-programming layouts: the values that worked on QEMU 10.0
//! (`shared/recipes/vtd-firmware.md`), Linux 6.12's encodings written out, round trips, and
//! decoders fed reserved, truncated, contradictory and random input (errors name the field,
//! nothing panics).

use livemig_iommu_pt::Error;
use livemig_iommu_pt::amd::{
    AmdCommand, AmdEvent, Command, EventCode, EventFlags, PagesRange, dev_table_base, ring_base,
    ring_index, ring_offset,
};
use livemig_iommu_pt::caps::VtdCaps;
use livemig_iommu_pt::config::{AmdDte, VtdPasidEntry, amd_gcr3_entry};
use livemig_iommu_pt::vtd::{
    ContextEntry, ContextScope, FaultAccess, FaultReason, FaultRecord, GlobalCommand, InvDesc,
    InvType, Invalidation, IotlbScope, PasidCacheScope, PasidDirEntry, PasidIotlbScope, RootEntry,
    fault_record_offset, gcmd_value, iq_index_256, iq_offset_256, iqa_value, pasid_indices,
    rtaddr_scalable,
};
use proptest::prelude::*;

/// The field an error names.
fn field(e: Error) -> &'static str {
    match e {
        Error::Decode { problem, .. } => problem.field,
        other => panic!("not a decode error: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// VT-d

#[test]
fn vtd_structures_the_recipe_used() {
    // Physical layout in the reserved 16 MiB at 0x2000_0000.
    let (root_t, ctx_t, dir, pasid_t, fs_root) = (
        0x2000_0000u64,
        0x2000_1000u64,
        0x2000_2000u64,
        0x2000_3000u64,
        0x2000_4000u64,
    );
    // Root entry for bus 0: lo = context table | P, hi = 0.
    let root = RootEntry::scalable(Some(ctx_t), None).unwrap();
    assert_eq!(root.words(), [ctx_t | 1, 0]);
    assert_eq!(root.context_table(0x20), Some((ctx_t, 0x20)));
    assert_eq!(root.context_table(0xa0), None);
    assert!(root.problems().is_empty());
    // Context entry for devfn 0x20 at offset 0x20 * 32: val0 = PASID directory | P (PDTS 0),
    // val1 = 0 (RID_PASID 0), val2 = val3 = 0.
    let ctx = ContextEntry::scalable(dir, 0, 0).unwrap();
    assert_eq!(ctx.words(), [dir | 1, 0, 0, 0]);
    assert_eq!(ctx.pasid_dir_entries(), 128);
    assert_eq!(ContextEntry::SIZE * 0x20, 0x400);
    // PASID directory entry 0 -> PASID table; PASID entry 0: 0x49, DID 1, FLPTPTR.
    assert_eq!(PasidDirEntry::new(pasid_t).unwrap().0, pasid_t | 1);
    assert_eq!(pasid_indices(0), (0, 0));
    assert_eq!(pasid_indices(0x1_2345), (0x48d, 5));
    let pe = VtdPasidEntry::first_stage(fs_root, 4, 1);
    assert_eq!(pe.words(), [0x49, 1, fs_root, 0, 0, 0, 0, 0]);
    assert!(pe.problems().is_empty());
    assert_eq!(
        (pe.first_stage_root(), pe.first_stage_levels()),
        (fs_root, Some(4))
    );
    // FLPM = 01b: the value QEMU 10.0 refuses with reason 0x5b.
    assert_eq!(
        VtdPasidEntry::first_stage(fs_root, 5, 1).words()[2],
        fs_root | (1 << 2)
    );
    // RTADDR = root | 01b << 10.
    assert_eq!(rtaddr_scalable(root_t).unwrap(), root_t | (1 << 10));
    assert!(rtaddr_scalable(root_t + 8).is_err());
    // IQA with DW = 1; IQT written as index << 5.
    assert_eq!(iqa_value(0x2000_5000, 0).unwrap(), 0x2000_5000 | (1 << 11));
    assert_eq!(iq_offset_256(3), 0x60);
    assert_eq!(iq_index_256(0x60), 3);
    // GSTS after TE: 0xc4000000; every GCMD repeats TE and QIE.
    assert_eq!(
        gcmd_value(0x8400_0000, GlobalCommand::SetRootTablePointer),
        0xc400_0000
    );
    // Pass-through entries.
    let pt = VtdPasidEntry::pass_through(2);
    assert_eq!(pt.words()[..2], [1 | (4 << 6), 2]);
}

#[test]
fn vtd_fault_record_registers_from_cap() {
    let caps = VtdCaps::from_regs(0x01d2_008c_222f_0606, 0x0000_8800_0000_0f42);
    assert_eq!(fault_record_offset(&caps, 0), Some(0x220));
    assert_eq!(fault_record_offset(&caps, 1), None);
    assert_eq!(caps.iotlb_offset(), 0xf0);
}

#[test]
fn vtd_descriptors_match_linux_qi_encodings() {
    // qi_flush_context, global: QI_CC_GRAN(DMA_CCMD_GLOBAL_INVL) | QI_CC_TYPE.
    let d = InvDesc::context_cache(ContextScope::Global).unwrap();
    assert_eq!(d.words(), [(1 << 4) | 1, 0, 0, 0]);
    // Device-selective: FM 48, SID 32, DID 16, G 3.
    let d = InvDesc::context_cache(ContextScope::Device {
        did: 7,
        sid: 0x20,
        fm: 0,
    })
    .unwrap();
    assert_eq!(d.words()[0], (0x20 << 32) | (7 << 16) | (3 << 4) | 1);
    // qi_flush_iotlb global with draining: DR 7, DW 6, G 1 << 4, type 2.
    let d = InvDesc::iotlb(IotlbScope::Global, true).unwrap();
    assert_eq!(d.words()[0], (1 << 7) | (1 << 6) | (1 << 4) | 2);
    // qi_flush_piotlb, page-selective in PASID: QI_EIOTLB_PASID | DID | GRAN(3) | type 6;
    // qw1 = ADDR | IH << 6 | AM.
    let d = InvDesc::pasid_iotlb(PasidIotlbScope::Pages {
        did: 1,
        pasid: 0,
        addr: 0x2020_0000,
        am: 9,
        ih: false,
    })
    .unwrap();
    assert_eq!(d.words(), [(1 << 16) | (3 << 4) | 6, 0x2020_0000 | 9, 0, 0]);
    // pasid_cache_invalidation_with_pasid: DID | GRAN(QI_PC_PASID_SEL) | PASID | type 7.
    let d = InvDesc::pasid_cache(PasidCacheScope::Pasid { did: 1, pasid: 5 }).unwrap();
    assert_eq!(d.words()[0], (5 << 32) | (1 << 16) | (1 << 4) | 7);
    // The recipe's PASID-cache global: G = 3.
    let d = InvDesc::pasid_cache(PasidCacheScope::Global).unwrap();
    assert_eq!(d.words()[0], (3 << 4) | 7);
    // qi_submit_sync's wait: STATUS_DATA(QI_DONE = 2) | STATUS_WRITE | type 5; qw1 = address.
    let d = InvDesc::wait(Some((0x2000_6000, 2)), false, false).unwrap();
    assert_eq!(d.words(), [(2 << 32) | (1 << 5) | 5, 0x2000_6000, 0, 0]);
    assert_eq!(d.kind().unwrap(), InvType::Wait);
    assert_eq!(&d.to_bytes()[..8], &((2u64 << 32) | 0x25).to_le_bytes());
}

#[test]
fn vtd_descriptor_arguments_are_checked() {
    // The address must be aligned to the 2^AM pages it covers.
    let e = InvDesc::pasid_iotlb(PasidIotlbScope::Pages {
        did: 1,
        pasid: 0,
        addr: 0x2000_1000,
        am: 9,
        ih: false,
    })
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Unaligned {
                align: 0x20_0000,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        InvDesc::pasid_iotlb(PasidIotlbScope::Pasid {
            did: 1,
            pasid: 1 << 20
        })
        .is_err()
    );
    assert!(InvDesc::wait(Some((0x2000_6002, 1)), false, false).is_err());
    assert!(
        InvDesc::context_cache(ContextScope::Device {
            did: 0,
            sid: 0,
            fm: 4
        })
        .is_err()
    );
    assert!(ContextEntry::scalable(0x1000, 8, 0).is_err());
    assert!(ContextEntry::scalable(0x1000, 0, 1 << 20).is_err());
    assert!(RootEntry::scalable(Some(0x1001), None).is_err());
    assert!(iqa_value(0x1000, 8).is_err());
}

#[test]
fn vtd_descriptor_decoders_name_reserved_bits() {
    let good = [
        InvDesc::context_cache(ContextScope::Domain(3)).unwrap(),
        InvDesc::iotlb(IotlbScope::Domain(3), false).unwrap(),
        InvDesc::wait(Some((0x1000, 1)), true, true).unwrap(),
        InvDesc::pasid_iotlb(PasidIotlbScope::Pasid { did: 3, pasid: 9 }).unwrap(),
        InvDesc::pasid_cache(PasidCacheScope::Domain(3)).unwrap(),
    ];
    // Reserved bits of word 0 per type (QEMU's masks without the type bits), word 1 bits
    // 11:7 of address-carrying types, and all of words 2 and 3.
    let masks0 = [
        0xfffc_0000_0000_f1c0u64,
        0xffff_ffff_0000_f100,
        0xffff_f100,
        0xfff0_0000_0000_f1c0,
        0xfff0_0000_0000_f1c0,
    ];
    for (d, m) in good.iter().zip(masks0) {
        assert!(d.decode().is_ok(), "{d:?}");
        for bit in 0..64 {
            if m & (1 << bit) == 0 {
                continue;
            }
            let mut w = d.words();
            w[0] |= 1 << bit;
            let e = InvDesc::from_words(w).decode().unwrap_err();
            assert_eq!(field(e), "INV[63:0]", "bit {bit} of {d:?}");
        }
        let mut w = d.words();
        w[2] = 1;
        assert_eq!(
            field(InvDesc::from_words(w).decode().unwrap_err()),
            "INV[191:128]"
        );
        let mut w = d.words();
        w[3] = 1 << 63;
        assert_eq!(
            field(InvDesc::from_words(w).decode().unwrap_err()),
            "INV[255:192]"
        );
    }
    let mut w = good[3].words();
    w[1] = 0x1000 | (1 << 9); // bit 9 of the address word is reserved
    assert_eq!(
        field(InvDesc::from_words(w).decode().unwrap_err()),
        "INV[127:64]"
    );
    // Unknown type (0), a type not decoded here (3), reserved granularity.
    assert_eq!(
        field(InvDesc::from_words([0; 4]).decode().unwrap_err()),
        "INV.Type"
    );
    assert_eq!(
        field(InvDesc::from_words([0xf; 4]).kind().unwrap_err()),
        "INV.Type"
    );
    assert_eq!(
        field(InvDesc::from_words([3, 0, 0, 0]).decode().unwrap_err()),
        "INV.Type"
    );
    assert_eq!(
        field(InvDesc::from_words([1, 0, 0, 0]).decode().unwrap_err()),
        "INV.G"
    );
    assert_eq!(
        field(
            InvDesc::from_words([6 | (1 << 4), 0, 0, 0])
                .decode()
                .unwrap_err()
        ),
        "INV.G"
    );
    assert_eq!(
        field(
            InvDesc::from_words([7 | (2 << 4), 0, 0, 0])
                .decode()
                .unwrap_err()
        ),
        "INV.G"
    );
    // Contradictory: status data without SW; an address on a PASID-wide invalidation.
    assert_eq!(
        field(
            InvDesc::from_words([5 | (7 << 32), 0, 0, 0])
                .decode()
                .unwrap_err()
        ),
        "INV.SW"
    );
    assert_eq!(
        field(
            InvDesc::from_words([6 | (2 << 4), 0x1000, 0, 0])
                .decode()
                .unwrap_err()
        ),
        "INV[127:64]"
    );
    // Truncated.
    assert!(matches!(
        InvDesc::from_bytes(&[0u8; 31]),
        Err(Error::Truncated {
            got: 31,
            need: 32,
            ..
        })
    ));
}

#[test]
fn vtd_structure_problems_name_the_field() {
    let root = RootEntry::from_words([0x1000 | 1 | (1 << 5), 1 << 11]);
    let f: Vec<_> = root.problems().iter().map(|p| p.field).collect();
    assert_eq!(f, ["ROOT.LO[11:1]", "ROOT.HI[11:1]"]);
    let ctx = ContextEntry::from_words([1 | (1 << 6), 1 << 40, 1, 0]);
    let f: Vec<_> = ctx.problems().iter().map(|p| p.field).collect();
    assert_eq!(f, ["SM_CTX[8:5]", "SM_CTX[127:85]", "SM_CTX[191:128]"]);
    assert_eq!(
        PasidDirEntry(0x1000 | 1 | (1 << 2)).problems()[0].field,
        "PASID_DIR[11:2]"
    );
    assert_eq!(PasidDirEntry(0x1000).table(), None);
    let mut w = VtdPasidEntry::first_stage(0x1000, 4, 1).words();
    w[2] |= 3 << 2;
    let pe = VtdPasidEntry::from_words(w);
    assert_eq!(pe.first_stage_levels(), None);
    assert_eq!(pe.problems()[0].field, "PASID.FLPM");
}

#[test]
fn vtd_fault_records() {
    // What QEMU recorded for an edu write to a non-present first-stage entry.
    let rec = FaultRecord {
        reason: FaultReason::FS_NOT_PRESENT,
        access: FaultAccess::Write,
        source_id: 0x20,
        pasid: None,
        address: 0x2000_2000,
        request_attrs: [false; 3],
        address_type: 0,
    };
    let w = rec.to_words();
    // Linux's dword view: +12 has F (31), T (30), FR (7:0); +8 has SID; +0 the address.
    assert_eq!(w[1] >> 32, (1 << 31) | 0x71);
    assert_eq!(w[1] & 0xffff_ffff, 0x20);
    assert_eq!(w[0], 0x2000_2000);
    assert_eq!(FaultRecord::from_words(w).unwrap(), rec);
    let s = rec.to_string();
    assert!(s.contains("write by 00:04.0 at 0x20002000"), "{s}");
    assert!(
        s.contains("0x71 (first stage: paging entry not present)"),
        "{s}"
    );
    // A read with PASID 5 round-trips.
    let rd = FaultRecord {
        access: FaultAccess::Read,
        pasid: Some(5),
        reason: FaultReason::NO_READ,
        ..rec
    };
    assert_eq!(FaultRecord::from_words(rd.to_words()).unwrap(), rd);
    // Unknown reasons are reported as such.
    let unk = FaultRecord {
        reason: FaultReason(0x99),
        ..rec
    };
    let d = FaultRecord::from_words(unk.to_words()).unwrap();
    assert!(!d.reason.is_known());
    assert!(d.to_string().contains("0x99 (unknown fault reason)"));
    for code in [0x71u8, 0x80, 0x81, 0x85, 0x5b] {
        assert!(FaultReason(code).is_known(), "{code:#x}");
    }
    assert!(FaultReason(0x22).is_interrupt_remapping());
    // F clear, reserved bits, truncated.
    assert_eq!(
        field(FaultRecord::from_words([w[0], w[1] & !(1 << 63)]).unwrap_err()),
        "FRCD.F"
    );
    assert_eq!(
        field(FaultRecord::from_words([w[0] | 0x800, w[1]]).unwrap_err()),
        "FRCD[11:0]"
    );
    assert_eq!(
        field(FaultRecord::from_words([w[0], w[1] | (1 << 20)]).unwrap_err()),
        "FRCD[91:80]"
    );
    // PV without PP is ignored: QEMU 10.0's legacy-mode record (reason 0x5, a write from
    // 00:04.0, PV all ones, PP clear), as the rig's vtd-fw-legacy profile read it.
    let qemu =
        FaultRecord::from_words([0x4001_1000, (1 << 63) | (0xffff << 40) | (0x5 << 32) | 0x20])
            .unwrap();
    assert_eq!(qemu.pasid, None);
    assert_eq!(
        (qemu.reason.0, qemu.access, qemu.source_id),
        (0x5, FaultAccess::Write, 0x20)
    );
    assert!(matches!(
        FaultRecord::from_bytes(&[0xff; 15]),
        Err(Error::Truncated {
            got: 15,
            need: 16,
            ..
        })
    ));
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&w[0].to_le_bytes());
    b[8..].copy_from_slice(&w[1].to_le_bytes());
    assert_eq!(FaultRecord::from_bytes(&b).unwrap(), rec);
}

// ---------------------------------------------------------------------------------------------
// AMD-Vi

#[test]
fn amd_dte_guest_tables() {
    let dte = AmdDte::translated(0x1000_0000, 4, 3);
    let g = dte
        .with_guest_tables(0x0008_7654_3210_f000, 0, 4, true)
        .unwrap();
    assert!(g.guest_translation() && g.guest_io_protection());
    assert_eq!(g.gcr3_table(), 0x0008_7654_3210_f000);
    assert_eq!((g.glx(), g.guest_levels()), (0, Some(4)));
    // The host-table fields are untouched.
    assert_eq!((g.root(), g.mode(), g.domain_id()), (0x1000_0000, 4, 3));
    assert!(g.problems().is_empty());
    // Linux's split of the GCR3 root (DTE_GCR3_VAL_A/B/C at shifts 58, 16, 43).
    let gcr3 = 0x0008_7654_3210_f000u64;
    assert_eq!((g.words()[0] >> 58) & 7, (gcr3 >> 12) & 7);
    assert_eq!((g.words()[1] >> 16) & 0xffff, (gcr3 >> 15) & 0xffff);
    assert_eq!(g.words()[1] >> 43, (gcr3 >> 31) & 0x1f_ffff);
    let five = dte.with_guest_tables(0x2000, 1, 5, false).unwrap();
    assert_eq!(five.guest_levels(), Some(5));
    assert_eq!(five.words()[2], 1 << 54);
    assert!(dte.with_guest_tables(0x2001, 0, 4, false).is_err());
    assert!(dte.with_guest_tables(0x2000, 2, 4, false).is_err());
    assert!(dte.with_guest_tables(0x2000, 0, 3, false).is_err());
    assert_eq!(amd_gcr3_entry(0x1234_5678), 0x1234_5001);
    // Reserved guest fields.
    let mut w = g.words();
    w[0] |= 3 << 56;
    w[2] |= 3 << 54;
    let f: Vec<_> = AmdDte::from_words(w)
        .problems()
        .iter()
        .map(|p| p.field)
        .collect();
    assert_eq!(f, ["DTE.GLX", "DTE.GuestPagingMode"]);
}

#[test]
fn amd_rings() {
    assert_eq!(ring_offset(5), 0x50);
    assert_eq!(ring_index(0x50), 5);
    assert!(ring_base(0x1000, 7).is_err());
    assert!(dev_table_base(0x1000, 0).is_err());
    assert!(dev_table_base(1 << 52, 1).is_err());
}

#[test]
fn amd_commands_round_trip() {
    let c = AmdCommand::completion_wait(Some((0x8_1234_5678, u64::MAX)), true, true).unwrap();
    assert_eq!(
        c.decode().unwrap(),
        Command::CompletionWait {
            store: Some((0x8_1234_5678, u64::MAX)),
            interrupt: true,
            flush: true
        }
    );
    assert_eq!(AmdCommand::from_bytes(&c.to_bytes()).unwrap(), c);
    assert_eq!(
        AmdCommand::invalidate_devtab_entry(0xbeef)
            .decode()
            .unwrap(),
        Command::InvalidateDevtabEntry { device_id: 0xbeef }
    );
    let c = AmdCommand::invalidate_iommu_pages(9, Some(0xf_ffff), PagesRange::Page(0x7000), false)
        .unwrap();
    assert_eq!(
        c.decode().unwrap(),
        Command::InvalidateIommuPages {
            domain_id: 9,
            pasid: Some(0xf_ffff),
            base: 0x7000,
            size: 4096,
            pde: false
        }
    );
    let all = AmdCommand::invalidate_iommu_pages(9, None, PagesRange::All, true).unwrap();
    assert!(matches!(
        all.decode().unwrap(),
        Command::InvalidateIommuPages {
            base: 0,
            size: u64::MAX,
            ..
        }
    ));
    assert!(AmdCommand::completion_wait(Some((0x1004, 0)), false, false).is_err());
    assert!(AmdCommand::invalidate_iommu_pages(0, None, PagesRange::Page(0x1800), false).is_err());
    assert!(AmdCommand::invalidate_iommu_pages(0, Some(1 << 20), PagesRange::All, false).is_err());
    assert!(
        AmdCommand::invalidate_iommu_pages(0, None, PagesRange::Range { iova: 0, size: 0 }, true)
            .is_err()
    );
}

#[test]
fn amd_command_decoder_names_fields() {
    let wait = AmdCommand::completion_wait(None, false, false)
        .unwrap()
        .words();
    let dte = AmdCommand::invalidate_devtab_entry(1).words();
    let pages = AmdCommand::invalidate_iommu_pages(1, None, PagesRange::Page(0x1000), true)
        .unwrap()
        .words();
    let cases: [([u64; 2], &str); 9] = [
        ([wait[0] | (1 << 52), wait[1]], "COMPLETION_WAIT[59:52]"),
        ([wait[0] | 0x1000, 0], "COMPLETION_WAIT.S"),
        ([wait[0], 5], "COMPLETION_WAIT.S"),
        ([dte[0] | (1 << 16), 0], "INVALIDATE_DEVTAB_ENTRY[59:16]"),
        ([dte[0], 1], "INVALIDATE_DEVTAB_ENTRY[127:64]"),
        (
            [pages[0] | (1 << 20), pages[1]],
            "INVALIDATE_IOMMU_PAGES[31:20]",
        ),
        (
            [pages[0] | (1 << 48), pages[1]],
            "INVALIDATE_IOMMU_PAGES[59:48]",
        ),
        (
            [pages[0], pages[1] | (1 << 3)],
            "INVALIDATE_IOMMU_PAGES[75:67]",
        ),
        ([pages[0] | 7, pages[1]], "INVALIDATE_IOMMU_PAGES.PASID"),
    ];
    for (w, want) in cases {
        assert_eq!(
            field(AmdCommand::from_words(w).decode().unwrap_err()),
            want,
            "{w:x?}"
        );
    }
    for op in [0u64, 4, 8, 9, 15] {
        assert_eq!(
            field(AmdCommand::from_words([op << 60, 0]).decode().unwrap_err()),
            "Opcode"
        );
    }
    assert!(matches!(
        AmdCommand::from_bytes(&[0; 8]),
        Err(Error::Truncated {
            got: 8,
            need: 16,
            ..
        })
    ));
}

#[test]
fn amd_events() {
    // IO_PAGE_FAULT as Linux reads it: event[0] = devid, event[1] = code << 28 | flags << 16 |
    // domain, event[2..3] = address.
    let dw0 = 0x0020u64;
    let dw1 = (2u64 << 28) | ((EventFlags::RW as u64) << 16) | 1;
    let ev = AmdEvent::from_words([dw0 | (dw1 << 32), 0x4000_1000]).unwrap();
    assert_eq!(ev.code, EventCode::IoPageFault);
    assert_eq!(
        (ev.device_id, ev.domain_or_pasid, ev.address),
        (0x20, 1, 0x4000_1000)
    );
    assert!(ev.flags.write() && ev.flags.memory() && !ev.flags.guest());
    assert_eq!(
        ev.to_string(),
        "IO_PAGE_FAULT device=00:04.0 domain=0x1 address=0x40001000 flags=0x020"
    );
    assert_eq!(AmdEvent::from_words(ev.to_words()).unwrap(), ev);
    // Named codes, and unknown ones named by value.
    for (code, name) in [
        (1u8, "ILLEGAL_DEV_TABLE_ENTRY"),
        (5, "ILLEGAL_COMMAND_ERROR"),
        (7, "IOTLB_INV_TIMEOUT"),
        (0xd, "RMP_PAGE_FAULT"),
    ] {
        assert_eq!(EventCode::from_code(code).name(), name);
    }
    let unk = AmdEvent::from_words([0xf << 60, 0]).unwrap();
    assert_eq!(unk.code, EventCode::Unknown(0xf));
    assert!(unk.to_string().starts_with("unknown event code 0xf"));
    // A guest fault with a 20-bit PASID.
    let g = AmdEvent {
        code: EventCode::IoPageFault,
        device_id: 0x100,
        domain_or_pasid: 0xf_1234,
        flags: EventFlags(EventFlags::GN),
        address: 0x1000,
    };
    assert_eq!(AmdEvent::from_words(g.to_words()).unwrap(), g);
    // Not yet written, contradictory, misaligned, truncated.
    assert_eq!(
        field(AmdEvent::from_words([0x20, 0]).unwrap_err()),
        "EventCode"
    );
    let mut w = ev.to_words();
    w[0] |= 3 << 16;
    assert_eq!(
        field(AmdEvent::from_words(w).unwrap_err()),
        "IO_PAGE_FAULT.PASID[19:16]"
    );
    assert_eq!(
        field(AmdEvent::from_words([5 << 60, 0x1008]).unwrap_err()),
        "ILLEGAL_COMMAND_ERROR.Address"
    );
    assert!(matches!(
        AmdEvent::from_bytes(&[1; 3]),
        Err(Error::Truncated {
            got: 3,
            need: 16,
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------------
// Properties

fn pasid_iotlb_scope() -> impl Strategy<Value = PasidIotlbScope> {
    prop_oneof![
        (any::<u16>(), 0u32..1 << 20)
            .prop_map(|(did, pasid)| PasidIotlbScope::Pasid { did, pasid }),
        (
            any::<u16>(),
            0u32..1 << 20,
            0u64..1 << 40,
            0u8..19,
            any::<bool>()
        )
            .prop_map(|(did, pasid, page, am, ih)| PasidIotlbScope::Pages {
                did,
                pasid,
                addr: (page << 12) & !((4096u64 << am) - 1),
                am,
                ih,
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Random bytes of any length never make a decoder panic.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        let _ = InvDesc::from_bytes(&bytes).map(|d| (d.decode(), d.kind(), format!("{d:?}")));
        let _ = FaultRecord::from_bytes(&bytes).map(|r| r.to_string());
        let _ = AmdCommand::from_bytes(&bytes).map(|c| (c.decode(), format!("{c:?}")));
        let _ = AmdEvent::from_bytes(&bytes).map(|e| e.to_string());
        let mut w = [0u64; 8];
        for (i, c) in bytes.chunks(8).take(8).enumerate() {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            w[i] = u64::from_le_bytes(b);
        }
        let root = RootEntry::from_words([w[0], w[1]]);
        let _ = (root.problems(), root.context_table(w[2] as u8), format!("{root:?}"));
        let ctx = ContextEntry::from_words([w[0], w[1], w[2], w[3]]);
        let _ = (ctx.problems(), ctx.pasid_dir_entries(), ctx.rid_pasid(), format!("{ctx:?}"));
        let _ = (PasidDirEntry(w[0]).problems(), PasidDirEntry(w[0]).table());
        let pe = VtdPasidEntry::from_words(w);
        let _ = (pe.problems(), pe.first_stage_levels(), pe.ad_update(), format!("{pe:?}"));
        let dte = AmdDte::from_words([w[0], w[1], w[2], w[3]]);
        let _ = (dte.problems(), dte.gcr3_table(), dte.guest_levels(), format!("{dte:?}"));
        let _ = dte.with_guest_tables(w[4], w[5] as u8, w[6] as u8, w[7] & 1 != 0);
    }

    #[test]
    fn pasid_iotlb_descriptors_round_trip(scope in pasid_iotlb_scope()) {
        let d = InvDesc::pasid_iotlb(scope).unwrap();
        prop_assert_eq!(d.decode().unwrap(), Invalidation::PasidIotlb(scope));
        prop_assert_eq!(InvDesc::from_bytes(&d.to_bytes()).unwrap(), d);
    }

    #[test]
    fn other_descriptors_round_trip(
        did in any::<u16>(), sid in any::<u16>(), fm in 0u8..4, pasid in 0u32..1 << 20,
        page in 0u64..1 << 40, am in 0u8..19, ih in any::<bool>(), drain in any::<bool>(),
        status in proptest::option::of((0u64..1 << 50, any::<u32>())),
        irq in any::<bool>(), fence in any::<bool>(),
    ) {
        for scope in [
            ContextScope::Global,
            ContextScope::Domain(did),
            ContextScope::Device { did, sid, fm },
        ] {
            let d = InvDesc::context_cache(scope).unwrap();
            prop_assert_eq!(d.decode().unwrap(), Invalidation::ContextCache(scope));
        }
        let addr = (page << 12) & !((4096u64 << am) - 1);
        for scope in [
            IotlbScope::Global,
            IotlbScope::Domain(did),
            IotlbScope::Pages { did, addr, am, ih },
        ] {
            let d = InvDesc::iotlb(scope, drain).unwrap();
            prop_assert_eq!(
                d.decode().unwrap(),
                Invalidation::Iotlb { scope, drain_reads: drain, drain_writes: drain }
            );
        }
        for scope in [
            PasidCacheScope::Domain(did),
            PasidCacheScope::Pasid { did, pasid },
            PasidCacheScope::Global,
        ] {
            let d = InvDesc::pasid_cache(scope).unwrap();
            prop_assert_eq!(d.decode().unwrap(), Invalidation::PasidCache(scope));
        }
        let status = status.map(|(a, v)| (a & !3, v));
        let d = InvDesc::wait(status, irq, fence).unwrap();
        prop_assert_eq!(
            d.decode().unwrap(),
            Invalidation::Wait { status, interrupt: irq, fence, page_drain: false }
        );
    }

    #[test]
    fn fault_records_round_trip(
        reason in any::<u8>(), read in any::<bool>(), sid in any::<u16>(),
        pasid in proptest::option::of(0u32..1 << 20), page in 0u64..1 << 52,
        attrs in any::<[bool; 3]>(), at in 0u8..4,
    ) {
        let rec = FaultRecord {
            reason: FaultReason(reason),
            access: if read { FaultAccess::Read } else { FaultAccess::Write },
            source_id: sid,
            pasid,
            address: page << 12,
            request_attrs: attrs,
            address_type: at,
        };
        prop_assert_eq!(FaultRecord::from_words(rec.to_words()).unwrap(), rec);
    }

    /// INVALIDATE_IOMMU_PAGES covers the requested range with the smallest naturally aligned
    /// power-of-two block, as `build_inv_address` does.
    #[test]
    fn amd_page_ranges_cover_minimally(
        iova in 0u64..1 << 48, size in 1u64..1 << 40, did in any::<u16>(),
        pasid in proptest::option::of(0u32..1 << 20), pde in any::<bool>(),
    ) {
        let c = AmdCommand::invalidate_iommu_pages(did, pasid, PagesRange::Range { iova, size }, pde)
            .unwrap();
        let Command::InvalidateIommuPages { domain_id, pasid: p, base, size: got, pde: q } =
            c.decode().unwrap()
        else {
            panic!("{c:?}");
        };
        prop_assert_eq!((domain_id, p, q), (did, pasid, pde));
        prop_assert!(got.is_power_of_two() && got >= 4096 && base % got == 0);
        prop_assert!(base <= iova && iova + size - 1 <= base + (got - 1));
        // Half the block would not do: the range straddles its middle (or is one page).
        if got > 4096 {
            let mid = base + got / 2;
            prop_assert!(iova < mid && iova + size > mid);
        }
    }

    #[test]
    fn amd_events_round_trip(
        code in 1u8..16, dev in any::<u16>(), flags in 0u16..0x1000, pasid in 0u32..1 << 20,
        addr in any::<u64>(),
    ) {
        let gn = code != 2 || flags & EventFlags::GN != 0;
        let ev = AmdEvent {
            code: EventCode::from_code(code),
            device_id: dev,
            domain_or_pasid: if gn { pasid } else { pasid & 0xffff },
            flags: EventFlags(flags),
            address: if code == 5 { addr & !0xf } else { addr },
        };
        prop_assert_eq!(AmdEvent::from_words(ev.to_words()).unwrap(), ev);
    }
}
