//! A host's compatibility descriptor (`livemig::compat::HostDescriptor`, the JSON `livemig
//! compat export` writes and `compat check` reads) on arbitrary bytes: never panics; a
//! descriptor that parses checks against itself and against its devices reversed without
//! panicking, and serialises to JSON that parses to the same descriptor.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livemig::compat::{self, HostDescriptor};

fuzz_target!(|data: &[u8]| {
    let Ok(d) = serde_json::from_slice::<HostDescriptor>(data) else {
        return;
    };
    let _ = d.check_format();
    let _ = compat::check(&d.devices, &d.devices);
    let mut rev = d.devices.clone();
    rev.reverse();
    let _ = compat::check(&d.devices, &rev);
    let _ = compat::check(&d.devices, &[]);
    let text = serde_json::to_string(&d).expect("a parsed descriptor serialises");
    let back: HostDescriptor = serde_json::from_str(&text).expect("and parses again");
    assert_eq!(back, d);
});
