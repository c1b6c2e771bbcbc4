//! The return path (`livemig::control::Message::read_from`), what a source reads from its
//! destination, on arbitrary bytes: never panics, allocates no more than the 64 KiB bound per
//! frame, and every message it accepts writes back to a frame that reads as the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livemig::control::Message;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    while let Ok(m) = Message::read_from(&mut r) {
        let mut out = Vec::new();
        m.write_to(&mut out).expect("writing to a Vec");
        let back = Message::read_from(&mut out.as_slice()).expect("a written frame reads");
        assert_eq!(back, m);
    }
});
