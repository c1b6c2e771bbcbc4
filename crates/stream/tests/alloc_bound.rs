//! No allocation above the caller's limits, whatever the input: a counting global allocator
//! records the largest single allocation while hostile variants of a stream are read.
//! (Its own test binary, with one test, so nothing else allocates concurrently.)

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use livemig_stream::{Limits, Reader, SliceReader};

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
static ARMED: AtomicBool = AtomicBool::new(false);

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is passed through.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed through.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is passed through.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn hostile_streams_never_allocate_above_the_limits() {
    let good = common::v1_basic(true);
    let limits = Limits {
        max_record: 20 << 10,
        max_device_state: 1 << 20,
        max_total: 1 << 20,
        max_devices: 8,
    };
    let mut variants: Vec<Vec<u8>> = Vec::new();
    for cut in (0..good.len()).step_by(97) {
        variants.push(good[..cut].to_vec());
    }
    for at in (0..good.len()).step_by(13) {
        let mut v = good.clone();
        v[at] ^= 0xff;
        variants.push(v);
    }
    // Length fields claiming huge bodies, in every record header position.
    let mut pos = 48;
    while pos + 16 <= good.len() {
        let len = u32::from_le_bytes(good[pos + 4..pos + 8].try_into().unwrap()) as usize;
        let mut v = good.clone();
        v[pos + 4..pos + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        variants.push(v);
        pos += 16 + len;
    }
    LARGEST.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
    for v in &variants {
        if let Ok(mut r) = Reader::new(&v[..], limits) {
            while let Ok(Some(_)) = r.next() {}
        }
        if let Ok(mut r) = SliceReader::new(v, limits) {
            while let Ok(Some(_)) = r.next() {}
        }
    }
    ARMED.store(false, Ordering::Relaxed);
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest as u64 <= limits.max_record,
        "largest allocation {largest} exceeds max_record {}",
        limits.max_record
    );
    assert!(variants.len() > 1000);
}
