//! Arbitrary bytes into both livemig stream readers: errors are fine, panics and allocations
//! above the limits are not. Seed the corpus with fixtures/stream/*.lmstream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livemig_stream::{Limits, Reader, SliceReader};

const LIMITS: Limits = Limits {
    max_record: 1 << 20,
    max_device_state: 4 << 20,
    max_total: 64 << 20,
    max_devices: 16,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(mut r) = SliceReader::new(data, LIMITS) {
        while let Ok(Some(_)) = r.next() {}
    }
    if let Ok(mut r) = Reader::new(data, LIMITS) {
        while let Ok(Some(_)) = r.next() {}
        assert!(r.buffer_capacity() as u64 <= LIMITS.max_record);
    }
});
