//! Small platform pieces the engine tests share: RAM in a vector, a tracker that finds
//! nothing, vCPUs with nothing to pause.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use livemig::bitmap::PageBitmap;
use livemig::engine::Vcpus;
use livemig::memory::{GuestMemory, MemoryError, PAGE_SIZE};
use livemig::tracker::{BoxError, DirtyTracker};

/// Guest RAM in a vector.
pub struct Ram(pub Mutex<Vec<u8>>);

impl Ram {
    /// `len` bytes of `byte`.
    pub fn filled(len: usize, byte: u8) -> Arc<Ram> {
        Arc::new(Ram(Mutex::new(vec![byte; len])))
    }

    /// `pages` pages, page `p` filled with `fill(p)`.
    pub fn pages(pages: u64, fill: impl Fn(u64) -> u8) -> Arc<Ram> {
        let mut v = vec![0u8; (pages * PAGE_SIZE) as usize];
        for p in 0..pages {
            v[(p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize].fill(fill(p));
        }
        Arc::new(Ram(Mutex::new(v)))
    }

    /// Page `p`'s bytes.
    pub fn page(&self, p: u64) -> Vec<u8> {
        self.0.lock().unwrap()[(p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize].to_vec()
    }

    /// The pages that differ from `other`'s.
    pub fn stale_pages(&self, other: &Ram) -> Vec<u64> {
        (0..self.size() / PAGE_SIZE)
            .filter(|&p| self.page(p) != other.page(p))
            .collect()
    }
}

impl GuestMemory for Ram {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let m = self.0.lock().unwrap();
        buf.copy_from_slice(&m[gpa as usize..gpa as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.0.lock().unwrap()[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn zero(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        self.0.lock().unwrap()[gpa as usize..(gpa + len) as usize].fill(0);
        Ok(())
    }
}

/// A vCPU log that never finds anything.
pub struct Quiet;

impl DirtyTracker for Quiet {
    fn name(&self) -> String {
        "quiet".into()
    }
    fn start(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
    fn harvest(&mut self, _into: &mut PageBitmap) -> Result<u64, BoxError> {
        Ok(0)
    }
    fn stop(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
}

/// vCPUs with nothing to pause.
pub struct NoVcpus;

impl Vcpus for NoVcpus {
    fn pause(&mut self) {}
    fn resume(&mut self) {}
}

/// The VM runs on one host, or on none with the reason said (issue 29): both engines'
/// decisions, and the source's stopped state agreeing with its own.
#[allow(dead_code)]
pub fn assert_one_host(s: &livemig::engine::Source, d: &livemig::engine::Destination) {
    let (so, de) = (s.outcome(), d.outcome());
    let side = livemig::engine::handover::one_host(so, de)
        .unwrap_or_else(|e| panic!("{e}: source {so:?}, destination {de:?}"));
    assert_eq!(side == "source", !s.is_stopped(), "source {so:?}");
}
