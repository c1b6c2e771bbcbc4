//! Arbitrary bytes into the QEMU VFIO section parser and the stream inspector.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livemig_stream::Limits;

fuzz_target!(|data: &[u8]| {
    for item in livemig_stream::qemu::Parser::new(data, 1 << 20) {
        if item.is_err() {
            break;
        }
    }
    let _ = livemig_stream::inspect::inspect(data, Limits::default());
});
