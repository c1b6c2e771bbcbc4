//! The vCPU dirty tracker: KVM's dirty bitmap or dirty ring, plus the pages the VMM itself
//! wrote through `vm-memory`.
//!
//! Bitmap: `KVM_GET_DIRTY_LOG` per slot; with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` the GET does
//! not clear, and the pages it reported are re-protected with `KVM_CLEAR_DIRTY_LOG` in chunks
//! of [`CLEAR_CHUNK_PAGES`] (only chunks with dirty pages), before the engine reads them.
//! Ring: every vCPU's ring is collected (entries marked RESET), entries that vCPU threads took
//! at ring-full exits are added, and `KVM_RESET_DIRTY_RINGS` re-protects them — again before
//! the engine reads the pages, so a write after the harvest is always logged again.

use std::sync::Arc;

use livemig::bitmap::PageBitmap;
use livemig::memory::PAGE_SIZE;
use livemig::tracker::{BoxError, DirtyTracker, not_tracking};

use crate::sys;
use crate::vm::{Mechanism, Shared, Vm, set_slot_logging};

/// Pages per `KVM_CLEAR_DIRTY_LOG` call (256 MiB of guest memory).
pub const CLEAR_CHUNK_PAGES: u64 = 64 << 10;

/// What one harvest found, by source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HarvestStats {
    /// Pages from KVM (bitmap or ring).
    pub kvm: u64,
    /// Ring entries vCPU threads had taken at ring-full exits.
    pub spilled: u64,
    /// Pages the VMM wrote.
    pub vmm: u64,
    /// `KVM_CLEAR_DIRTY_LOG` calls.
    pub clears: u64,
}

/// The vCPU (and VMM-write) dirty tracker of a [`Vm`].
#[derive(Debug)]
pub struct KvmDirtyLog {
    shared: Arc<Shared>,
    words: Vec<Vec<u64>>,
    /// The last harvest's figures.
    pub last: HarvestStats,
    /// A start was attempted and no stop completed since.
    tracking: bool,
}

impl KvmDirtyLog {
    /// The tracker of `vm`.
    pub fn new(vm: &Vm) -> KvmDirtyLog {
        let shared = Arc::clone(vm.shared());
        let words = shared
            .memory
            .regions()
            .iter()
            .map(|r| vec![0u64; (r.size / PAGE_SIZE).div_ceil(64) as usize])
            .collect();
        KvmDirtyLog {
            shared,
            words,
            last: HarvestStats::default(),
            tracking: false,
        }
    }

    fn harvest_bitmap(
        &mut self,
        manual: bool,
        into: &mut PageBitmap,
        st: &mut HarvestStats,
    ) -> Result<(), BoxError> {
        for (slot, r) in self.shared.memory.regions().iter().enumerate() {
            let words = &mut self.words[slot];
            words.fill(0);
            sys::get_dirty_log(&self.shared.vm, slot as u32, words)
                .map_err(|e| format!("KVM_GET_DIRTY_LOG slot {slot}: {e}"))?;
            let pages = r.size / PAGE_SIZE;
            if manual {
                let chunk_words = (CLEAR_CHUNK_PAGES / 64) as usize;
                for (ci, chunk) in words.chunks(chunk_words).enumerate() {
                    if chunk.iter().all(|&w| w == 0) {
                        continue;
                    }
                    let first = ci as u64 * CLEAR_CHUNK_PAGES;
                    let n = (pages - first).min(CLEAR_CHUNK_PAGES) as u32;
                    sys::clear_dirty_log(&self.shared.vm, slot as u32, first, n, chunk).map_err(
                        |e| format!("KVM_CLEAR_DIRTY_LOG slot {slot} pages {first}+{n}: {e}"),
                    )?;
                    st.clears += 1;
                }
            }
            st.kvm += into.or_bits(r.gpa / PAGE_SIZE, words, pages);
        }
        Ok(())
    }

    fn harvest_ring(
        &mut self,
        into: &mut PageBitmap,
        st: &mut HarvestStats,
    ) -> Result<(), BoxError> {
        let regions = self.shared.memory.regions();
        let mut bad = None;
        let mut mark = |slot: u32, off: u64, n: &mut u64| match regions.get(slot as usize) {
            Some(r) if off < r.size / PAGE_SIZE => {
                into.set(r.gpa / PAGE_SIZE + off);
                *n += 1;
            }
            _ => bad = Some((slot, off)),
        };
        let mut n = 0;
        for v in &self.shared.vcpus {
            v.collect_ring(|slot, off| mark(slot, off, &mut n));
        }
        st.kvm = n;
        let spilled = std::mem::take(
            &mut *self
                .shared
                .spilled
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let mut ns = 0;
        for (slot, off) in spilled {
            mark(slot, off, &mut ns);
        }
        st.spilled = ns;
        sys::reset_dirty_rings(&self.shared.vm)
            .map_err(|e| format!("KVM_RESET_DIRTY_RINGS: {e}"))?;
        if let Some((slot, off)) = bad {
            return Err(format!(
                "the dirty ring named slot {slot} page {off}, which is not guest RAM"
            )
            .into());
        }
        Ok(())
    }
}

impl DirtyTracker for KvmDirtyLog {
    fn name(&self) -> String {
        match self.shared.dirty.mechanism {
            Mechanism::Bitmap { .. } => "KVM dirty bitmap".into(),
            Mechanism::Ring { .. } => "KVM dirty ring".into(),
        }
    }

    fn start(&mut self) -> Result<(), BoxError> {
        // Before the first ioctl: a start that fails part-way leaves `stop` to undo it.
        self.tracking = true;
        self.shared.memory.reset_vmm_dirty();
        set_slot_logging(&self.shared, true)?;
        // Forget what was logged before: round 1 sends everything anyway.
        let mut sink = PageBitmap::new(self.shared.memory_pages(), PAGE_SIZE);
        self.harvest(&mut sink)?;
        Ok(())
    }

    fn harvest(&mut self, into: &mut PageBitmap) -> Result<u64, BoxError> {
        if !self.tracking {
            return Err(not_tracking(&self.name()));
        }
        let mut st = HarvestStats::default();
        match self.shared.dirty.mechanism {
            Mechanism::Bitmap { manual_protect, .. } => {
                self.harvest_bitmap(manual_protect, into, &mut st)?
            }
            Mechanism::Ring { .. } => self.harvest_ring(into, &mut st)?,
        }
        st.vmm = self.shared.memory.harvest_vmm_dirty(|p| {
            into.set(p);
        });
        self.last = st;
        Ok(st.kvm + st.spilled + st.vmm)
    }

    fn stop(&mut self) -> Result<(), BoxError> {
        if !self.tracking {
            return Ok(());
        }
        set_slot_logging(&self.shared, false)?;
        self.tracking = false;
        Ok(())
    }
}
