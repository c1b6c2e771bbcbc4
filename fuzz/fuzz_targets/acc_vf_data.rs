//! `acc_vf_data` decoding (both decoders) on arbitrary bytes: never panics, and whatever
//! decodes re-encodes to something that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livemig_hisi_qm::state::{AccVfData, Layout};

fuzz_target!(|data: &[u8]| {
    for d in [AccVfData::decode(data), AccVfData::decode_rfc_v2(data)]
        .into_iter()
        .flatten()
    {
        let again = if d.layout == Layout::RfcV2 {
            AccVfData::decode_rfc_v2(&d.encode())
        } else {
            AccVfData::decode(&d.encode())
        };
        let again = again.expect("a decoded blob re-encodes to a valid blob");
        assert_eq!(again.qp_num, d.qp_num);
        assert_eq!(again.regs, d.regs);
        let _ = d.to_string();
    }
});
