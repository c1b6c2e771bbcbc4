//! Where guest mappings go: one [`MapListener`] per VFIO endpoint, mirroring the guest's
//! virtio-iommu mappings into the host IOMMU.
//!
//! ```text
//!  guest MAP/UNMAP on domain D ──> device ──> every listener of an endpoint attached to D
//!  ATTACH e to D               ──> e's listener: replay D's mappings (or bypass on)
//!  DETACH e / re-ATTACH         ──> e's listener: unmap D's mappings, bypass as configured
//!  never a single map/unmap of the whole 2^64 space: such a range arrives as two halves
//! ```

use std::collections::BTreeMap;
use std::fmt;

/// Access a mapping grants (`VIRTIO_IOMMU_MAP_F_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perm {
    /// `MAP_F_READ`.
    pub read: bool,
    /// `MAP_F_WRITE`.
    pub write: bool,
    /// `MAP_F_MMIO`: a device (MSI doorbell) rather than memory.
    pub mmio: bool,
}

/// One mapping of IOVAs `[iova, last]` to guest-physical `gpa..`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// First IOVA.
    pub iova: u64,
    /// Last IOVA (inclusive).
    pub last: u64,
    /// Guest-physical address of `iova`.
    pub gpa: u64,
    /// Access.
    pub perm: Perm,
}

impl Mapping {
    /// Bytes covered, or `None` for the whole 64-bit space (which has no u64 length).
    pub fn len(&self) -> Option<u64> {
        (self.last - self.iova).checked_add(1)
    }

    /// Always `false`: a mapping covers at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The pieces a listener receives: the mapping itself, or its two halves when it spans
    /// the whole 64-bit space (QEMU "vfio: Don't issue full 2^64 unmap", seed 004).
    pub fn pieces(&self) -> Vec<Mapping> {
        if self.iova == 0 && self.last == u64::MAX {
            let half = 1u64 << 63;
            vec![
                Mapping {
                    last: half - 1,
                    ..*self
                },
                Mapping {
                    iova: half,
                    gpa: self.gpa.wrapping_add(half),
                    ..*self
                },
            ]
        } else {
            vec![*self]
        }
    }
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:#x}, {:#x}] -> {:#x} {}{}{}",
            self.iova,
            self.last,
            self.gpa,
            if self.perm.read { "r" } else { "-" },
            if self.perm.write { "w" } else { "-" },
            if self.perm.mmio { " mmio" } else { "" }
        )
    }
}

/// Why a listener could not apply a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}")]
pub struct ListenerError {
    /// The host ran out of a resource (the request gets `S_NOMEM`; otherwise `S_DEVERR`).
    pub no_memory: bool,
    /// What failed, with the host's reason.
    pub what: String,
}

/// Receives the mappings of the domain its endpoint is attached to.
pub trait MapListener {
    /// Make `m` reachable by the endpoint.
    fn map(&mut self, m: &Mapping) -> Result<(), ListenerError>;
    /// Remove `m` (exactly a mapping, or a half of one, previously passed to `map`).
    fn unmap(&mut self, m: &Mapping) -> Result<(), ListenerError>;
    /// Enter or leave bypass (identity translation of all guest memory).
    fn set_bypass(&mut self, bypass: bool) -> Result<(), ListenerError>;
    /// Migration dirty tracking started (`true`) or stopped: from now on an unmap must
    /// preserve the dirty state of what it removes. Listeners without a dirty-tracking host
    /// IOMMU ignore it (the default).
    fn set_tracking(&mut self, on: bool) {
        let _ = on;
    }
    /// Guest-physical ranges `(start, length)` found dirty by unmaps since the last call; they
    /// belong in the migration's next dirty harvest. The default has none.
    fn take_dirty(&mut self) -> Vec<(u64, u64)> {
        Vec::new()
    }
}

/// A call a [`RecordingListener`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `map`.
    Map(Mapping),
    /// `unmap`.
    Unmap(Mapping),
    /// `set_bypass`.
    Bypass(bool),
}

/// A listener that keeps the mapping set and a log of calls, for tests; it can be told to fail.
#[derive(Debug, Default, Clone)]
pub struct RecordingListener {
    /// Current mappings by first IOVA.
    pub mappings: BTreeMap<u64, Mapping>,
    /// Whether bypass is on.
    pub bypass: bool,
    /// Every call, in order.
    pub log: Vec<Call>,
    /// Fail the next `map` calls (counting down).
    pub fail_maps: usize,
    /// Fail the next `unmap` calls (counting down).
    pub fail_unmaps: usize,
    /// Whether migration dirty tracking is on.
    pub tracking: bool,
    /// Mappings removed while tracking was on, whose pages a real listener would report dirty
    /// (the recording listener reports every writable page of them).
    pub unmapped_while_tracking: Vec<Mapping>,
}

impl MapListener for RecordingListener {
    fn map(&mut self, m: &Mapping) -> Result<(), ListenerError> {
        self.log.push(Call::Map(*m));
        if self.fail_maps > 0 {
            self.fail_maps -= 1;
            return Err(ListenerError {
                no_memory: true,
                what: format!("injected failure mapping {m}"),
            });
        }
        if let Some(old) = self.mappings.insert(m.iova, *m) {
            return Err(ListenerError {
                no_memory: false,
                what: format!("{m} replaces {old}"),
            });
        }
        Ok(())
    }

    fn unmap(&mut self, m: &Mapping) -> Result<(), ListenerError> {
        self.log.push(Call::Unmap(*m));
        if self.fail_unmaps > 0 {
            self.fail_unmaps -= 1;
            return Err(ListenerError {
                no_memory: false,
                what: format!("injected failure unmapping {m}"),
            });
        }
        match self.mappings.remove(&m.iova) {
            Some(old) if old == *m => {
                if self.tracking && m.perm.write && !m.perm.mmio {
                    self.unmapped_while_tracking.push(*m);
                }
                Ok(())
            }
            Some(old) => Err(ListenerError {
                no_memory: false,
                what: format!("unmap of {m} does not match {old}"),
            }),
            None => Err(ListenerError {
                no_memory: false,
                what: format!("unmap of {m}, which is not mapped"),
            }),
        }
    }

    fn set_bypass(&mut self, bypass: bool) -> Result<(), ListenerError> {
        self.log.push(Call::Bypass(bypass));
        self.bypass = bypass;
        Ok(())
    }

    fn set_tracking(&mut self, on: bool) {
        self.tracking = on;
    }

    fn take_dirty(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.unmapped_while_tracking)
            .into_iter()
            .filter_map(|m| m.len().map(|len| (m.gpa, len)))
            .collect()
    }
}

#[cfg(feature = "iommufd")]
pub use self::iommufd::{GuestMemory, IommufdListener};

#[cfg(feature = "iommufd")]
mod iommufd {
    use super::{ListenerError, MapListener, Mapping};
    use livemig_iommufd::{DirtyBitmap, DmaAccess, Hwpt, Ioas, Placement};
    use std::collections::BTreeMap;

    /// Guest memory as the host process sees it.
    ///
    /// # Safety
    /// Every host address returned must stay mapped in this process for as long as any IOAS
    /// mapping made from it exists, and be memory the VMM treats as shared with devices.
    pub unsafe trait GuestMemory {
        /// The host address of `gpa` and how many bytes from there are contiguous in the host;
        /// `None` if `gpa` is not RAM.
        fn host(&self, gpa: u64) -> Option<(*mut u8, u64)>;
        /// The RAM regions (guest-physical start, length), for bypass (identity) mappings.
        fn regions(&self) -> Vec<(u64, u64)>;
    }

    /// A listener that maps into an iommufd IOAS. While dirty tracking is on, unmaps read the
    /// range's dirty bits first (`IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR` on every dirty-capable
    /// HWPT of the IOAS, then `IOAS_UNMAP`) and keep the dirty guest-physical ranges for the
    /// migration to collect with [`MapListener::take_dirty`]: a guest unmapping during
    /// migration loses no page.
    ///
    /// Give each VFIO endpoint its own IOAS, as virtio-iommu gives each endpoint its own
    /// address space: two endpoints in one guest domain then hold the same mappings in two
    /// IOASes instead of colliding in one. Dropping the listener removes what it mapped.
    pub struct IommufdListener<M> {
        ioas: Ioas,
        hwpts: Vec<Hwpt>,
        tracking: bool,
        mem: M,
        /// Host mappings by IOVA: (length, gpa), one per contiguous host chunk.
        chunks: BTreeMap<u64, (u64, u64)>,
        dirty: Vec<(u64, u64)>,
        page: u64,
    }

    impl<M> std::fmt::Debug for IommufdListener<M> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("IommufdListener")
                .field("ioas", &self.ioas.id())
                .field(
                    "hwpts",
                    &self.hwpts.iter().map(Hwpt::id).collect::<Vec<_>>(),
                )
                .field("tracking", &self.tracking)
                .field("chunks", &self.chunks.len())
                .finish()
        }
    }

    fn failed(what: String, e: &livemig_iommufd::Error) -> ListenerError {
        ListenerError {
            no_memory: e.errno() == Some(12),
            what: format!("{what}: {e}"),
        }
    }

    impl<M: GuestMemory> IommufdListener<M> {
        /// Map into `ioas`, whose devices are attached to `hwpts` (e.g.
        /// `AutoDomains::hwpts().to_vec()`; the dirty-capable ones are read on unmap). `page`
        /// is the dirty-bitmap granule (the host page size).
        pub fn new(ioas: Ioas, hwpts: Vec<Hwpt>, mem: M, page: u64) -> Self {
            IommufdListener {
                ioas,
                hwpts,
                tracking: false,
                mem,
                chunks: BTreeMap::new(),
                dirty: Vec::new(),
                page: page.max(1),
            }
        }

        /// Replace the HWPT set (after a device joined or left the IOAS).
        pub fn set_hwpts(&mut self, hwpts: Vec<Hwpt>) {
            self.hwpts = hwpts;
            self.tracking &= self.hwpts.iter().any(Hwpt::dirty_capable);
        }

        /// The IOAS.
        pub fn ioas(&self) -> &Ioas {
            &self.ioas
        }

        fn map_range(
            &mut self,
            iova: u64,
            gpa: u64,
            len: u64,
            access: DmaAccess,
        ) -> Result<(), ListenerError> {
            let mut done = 0u64;
            while done < len {
                let Some((hva, avail)) = self.mem.host(gpa + done) else {
                    self.unmap_range(iova, done);
                    return Err(ListenerError {
                        no_memory: false,
                        what: format!("guest-physical {:#x} is not RAM", gpa + done),
                    });
                };
                let n = avail.min(len - done);
                // SAFETY: `GuestMemory`'s contract keeps `hva..hva + n` mapped for as long as
                // the IOAS mapping exists, as shared device memory.
                let r = unsafe {
                    self.ioas
                        .map_user(hva, n, Placement::Fixed(iova + done), access)
                };
                if let Err(e) = r {
                    self.unmap_range(iova, done);
                    return Err(failed(format!("IOAS map of {:#x}+{n:#x}", iova + done), &e));
                }
                self.chunks.insert(iova + done, (n, gpa + done));
                done += n;
            }
            Ok(())
        }

        fn unmap_range(&mut self, iova: u64, len: u64) {
            if len > 0 {
                let _ = self.ioas.unmap(iova, len);
            }
            let keys: Vec<u64> = self
                .chunks
                .range(iova..iova.saturating_add(len))
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                self.chunks.remove(&k);
            }
        }
    }

    impl<M> Drop for IommufdListener<M> {
        /// Removes what this listener mapped, so no IOAS mapping outlives the guest memory
        /// it was made from (the IOAS may be shared and live on).
        fn drop(&mut self) {
            for (&iova, &(len, _)) in &self.chunks {
                let _ = self.ioas.unmap(iova, len);
            }
        }
    }

    impl<M: GuestMemory> MapListener for IommufdListener<M> {
        fn map(&mut self, m: &Mapping) -> Result<(), ListenerError> {
            if m.perm.mmio {
                // MSI doorbells are not guest RAM; the host maps its own MSI window.
                return Ok(());
            }
            let len = m.len().ok_or_else(|| ListenerError {
                no_memory: false,
                what: format!("{m} spans the whole 64-bit space"),
            })?;
            let mut access = DmaAccess::empty();
            access.set(DmaAccess::READ, m.perm.read);
            access.set(DmaAccess::WRITE, m.perm.write);
            self.map_range(m.iova, m.gpa, len, access)
        }

        fn unmap(&mut self, m: &Mapping) -> Result<(), ListenerError> {
            if m.perm.mmio {
                return Ok(());
            }
            let len = m.len().ok_or_else(|| ListenerError {
                no_memory: false,
                what: format!("{m} spans the whole 64-bit space"),
            })?;
            let mut found = Vec::new();
            if self.tracking {
                // Read (without clearing) before unmapping: the unmap destroys the PTEs that
                // hold the dirty bits (iommufd.h, IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR).
                let mut bm = DirtyBitmap::new(m.iova, len, self.page)
                    .map_err(|e| failed(format!("dirty bitmap for {m}"), &e))?;
                for h in self.hwpts.iter().filter(|h| h.dirty_capable()) {
                    h.get_dirty_bitmap(m.iova, len, &mut bm, false)
                        .map_err(|e| failed(format!("dirty read of {m} in HWPT {}", h.id()), &e))?;
                }
                found = bm
                    .runs()
                    .map(|run| (m.gpa + (run.iova - m.iova), run.length))
                    .collect();
            }
            self.ioas
                .unmap(m.iova, len)
                .map_err(|e| failed(format!("IOAS unmap of {m}"), &e))?;
            let keys: Vec<u64> = self
                .chunks
                .range(m.iova..=m.last)
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                self.chunks.remove(&k);
            }
            self.dirty.extend(found);
            Ok(())
        }

        fn set_bypass(&mut self, bypass: bool) -> Result<(), ListenerError> {
            let access = DmaAccess::READ | DmaAccess::WRITE;
            for (gpa, len) in self.mem.regions() {
                if bypass {
                    self.map_range(gpa, gpa, len, access)?;
                } else {
                    let m = Mapping {
                        iova: gpa,
                        last: gpa + (len - 1),
                        gpa,
                        perm: super::Perm {
                            read: true,
                            write: true,
                            mmio: false,
                        },
                    };
                    self.unmap(&m)?;
                }
            }
            Ok(())
        }

        /// Unmaps read dirty bits first only when the listener has a dirty-capable HWPT.
        fn set_tracking(&mut self, on: bool) {
            self.tracking = on && self.hwpts.iter().any(Hwpt::dirty_capable);
        }

        fn take_dirty(&mut self) -> Vec<(u64, u64)> {
            std::mem::take(&mut self.dirty)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_space_comes_in_two_halves() {
        let m = Mapping {
            iova: 0,
            last: u64::MAX,
            gpa: 0x1000,
            perm: Perm::default(),
        };
        assert_eq!(m.len(), None);
        let p = m.pieces();
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].iova, p[0].last, p[0].gpa), (0, (1 << 63) - 1, 0x1000));
        assert_eq!(
            (p[1].iova, p[1].last, p[1].gpa),
            (1 << 63, u64::MAX, 0x1000 + (1 << 63))
        );
        assert!(p.iter().all(|x| x.len().is_some()));
        let small = Mapping {
            iova: 0,
            last: 0xfff,
            ..m
        };
        assert_eq!(small.pieces(), [small]);
    }
}
