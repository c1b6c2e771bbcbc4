//! Arbitrary bytes into the QEMU migration-file reader (`qevm`) and the inspector's QEVM path:
//! as given, and behind a valid `QEVM` header so most inputs get past the magic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livemig_stream::Limits;
use livemig_stream::qevm::{self, QevmLimits};

fn check(data: &[u8]) {
    let (file, err) = qevm::read_partial(data, QevmLimits::default());
    if let Some(e) = err {
        assert!(e.offset() <= data.len() as u64, "{e}");
    }
    for dev in file.vfio_devices() {
        let _ = qevm::vfio_device_state(&file, dev);
        let _ = qevm::vfio_config(&file, dev);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut framed = b"QEVM\x00\x00\x00\x03".to_vec();
    framed.extend_from_slice(data);
    check(&framed);
    let _ = livemig_stream::inspect::inspect(&framed[..], Limits::default());
});
