//! Golden `acc_vf_data` blobs (fixtures/hisi-qm/), decoded and pinned by insta; every
//! truncation and a byte-flip sweep are errors; property tests over arbitrary bytes.

mod common;

use livemig_hisi_qm::state::{AccVfData, Layout, StateError};
use proptest::prelude::*;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../../fixtures/hisi-qm/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn decode(name: &str, bytes: &[u8]) -> Result<AccVfData, StateError> {
    if name.starts_with("rfc") {
        AccVfData::decode_rfc_v2(bytes)
    } else {
        AccVfData::decode(bytes)
    }
}

#[test]
fn goldens_decode_and_are_reproduced() {
    for (name, bytes) in common::all() {
        let file = fixture(name);
        assert_eq!(
            file, bytes,
            "{name}: the encoder no longer produces the golden bytes"
        );
        let d = decode(name, &file).unwrap_or_else(|e| panic!("{name}: {e}"));
        insta::assert_snapshot!(name, d.to_string());
    }
}

#[test]
fn v1_golden_gets_the_driver_fixup() {
    let d = AccVfData::decode(&fixture("v1.bin")).unwrap();
    let v2 = AccVfData::decode(&fixture("v2.bin")).unwrap();
    assert!(d.v1_fixup_applied);
    // After the fix-up the V1 blob describes exactly the V2 state.
    assert_eq!(d.regs, v2.regs);
    assert_eq!(d.to_v2().encode(), fixture("v2.bin"));
}

#[test]
fn every_truncation_and_flip_of_the_goldens_is_handled() {
    for (name, _) in common::all() {
        let good = fixture(name);
        let layout = decode(name, &good).unwrap().layout;
        for len in 0..good.len() {
            let r = decode(name, &good[..len]);
            if len == layout.match_size() {
                assert!(r.is_ok(), "{name}: the match block alone must decode");
            } else {
                assert!(r.is_err(), "{name} truncated to {len} decoded");
            }
        }
        // Every single-bit flip either still decodes (a field with no constraint) or is an
        // error; none panics. Flips in checked fields must be errors.
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut b = good.clone();
                b[i] ^= 1 << bit;
                let r = decode(name, &b);
                let checked = match layout {
                    // magic, vf_qm_state upper bits, version major, reserved words
                    Layout::V2 => i < 8 || (25..30).contains(&i) || (32..40).contains(&i),
                    Layout::V1 => i < 8 || (25..40).contains(&i),
                    Layout::RfcV2 => false,
                };
                if checked {
                    assert!(r.is_err(), "{name}: flip of byte {i} bit {bit} decoded");
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    /// Arbitrary bytes never panic either decoder, and what decodes re-encodes to a blob that
    /// decodes to the same value.
    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let decoded = [AccVfData::decode(&bytes), AccVfData::decode_rfc_v2(&bytes)];
        for d in decoded.into_iter().flatten() {
            let again = if d.layout == Layout::RfcV2 {
                AccVfData::decode_rfc_v2(&d.encode())
            } else {
                AccVfData::decode(&d.encode())
            };
            let mut want = d.clone();
            if d.layout == Layout::V1 {
                want.v1_fixup_applied = true;
            }
            prop_assert_eq!(again.unwrap(), want);
        }
    }

    /// Valid blobs with random field values survive mutation of any byte without panicking.
    #[test]
    fn mutated_goldens(idx in 0usize..176, val in any::<u8>(), which in 0usize..5) {
        let (name, mut bytes) = common::all().swap_remove(which);
        let i = idx % bytes.len();
        bytes[i] = val;
        let _ = decode(name, &bytes);
    }
}
