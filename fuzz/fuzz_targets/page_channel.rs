//! The destination's page-channel reader (multi-channel framing: a page channel's stream of
//! Channel, Pages/ZeroPages, Sync and End records) on arbitrary bytes, through
//! `livemig::engine::x_receive_page_channel`, the code a page channel connection runs: never
//! panics, and writes guest RAM only inside it (the 64 KiB RAM here has a 8 KiB hole the
//! destination must refuse pages in; a write there would panic below).
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use livemig::memory::{GuestMemory, MemoryError};

const RAM: u64 = 64 << 10;
const HOLE: (u64, u64) = (16 << 10, 24 << 10);

struct Ram(Mutex<Vec<u8>>);

impl GuestMemory for Ram {
    fn size(&self) -> u64 {
        RAM
    }
    fn ranges(&self) -> Vec<(u64, u64)> {
        vec![(0, HOLE.0), (HOLE.1, RAM - HOLE.1)]
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let m = self.0.lock().unwrap();
        buf.copy_from_slice(&m[gpa as usize..gpa as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let end = gpa + data.len() as u64;
        assert!(end <= RAM, "write past RAM: {gpa:#x}+{:#x}", data.len());
        assert!(end <= HOLE.0 || gpa >= HOLE.1, "write into the hole at {gpa:#x}");
        self.0.lock().unwrap()[gpa as usize..end as usize].copy_from_slice(data);
        Ok(())
    }
    fn zero(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let end = gpa + len;
        assert!(end <= RAM, "zero past RAM: {gpa:#x}+{len:#x}");
        assert!(end <= HOLE.0 || gpa >= HOLE.1, "zero in the hole at {gpa:#x}");
        self.0.lock().unwrap()[gpa as usize..end as usize].fill(0);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let ram = Ram(Mutex::new(vec![0; RAM as usize]));
    let _ = livemig::engine::x_receive_page_channel(data.to_vec(), [7; 16], &ram);
});
