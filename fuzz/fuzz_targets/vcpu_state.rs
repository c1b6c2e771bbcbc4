//! The KVM vCPU state record (`livemig_kvm::state::VmState::decode`) on arbitrary bytes: never
//! panics, and whatever decodes re-encodes byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livemig_kvm::state::VmState;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = VmState::decode(data) {
        let again = s.encode();
        let back = VmState::decode(&again).expect("an encoded record decodes");
        assert_eq!(back.encode(), again);
        let _ = s.check_fits(s.vcpus.len(), &s.cpuid.clone(), s.xsave_size);
    }
});
