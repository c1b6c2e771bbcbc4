//! The dirty-tracker contract (`livemig::tracker::testing`) for KVM's dirty logs, the bitmap
//! (`KVM_GET_DIRTY_LOG`/`KVM_CLEAR_DIRTY_LOG`) and the ring, over a running test guest on the
//! real /dev/kvm: between two harvests the guest runs until it reports progress, then is
//! paused, so what it wrote is known to lie in the RAM it writes (its logs and working set);
//! the exact pages are the guest's, so the check asks for at least one of them.

mod common;

use std::time::Duration;

use livemig::bitmap::PageBitmap;
use livemig::tracker::testing::{self, Dirtied, Subject};
use livemig::tracker::{BoxError, DirtyTracker};
use livemig_kvm::vm::pause;
use livemig_kvm::{DirtyMode, KvmDirtyLog, TestVm, TestVmConfig};

const RAM: u64 = 32 << 20;
const PAGE: u64 = 4096;

struct Guest(TestVm);

impl Guest {
    fn run_a_little(&self) {
        let steps = self.0.monitor.steps();
        self.0.vm.unpause(pause::ENGINE);
        let r = self.0.wait_progress(&steps, Duration::from_secs(20));
        self.0.vm.pause(pause::ENGINE);
        r.expect("the guest runs between harvests");
    }
}

struct On<T>(Guest, std::marker::PhantomData<T>);

impl<T: DirtyTracker> Subject for On<T> {
    type Tracker = T;
    fn pages(&self) -> u64 {
        RAM / PAGE
    }
    fn dirty(&mut self, _: &mut T, _: u32) -> Dirtied {
        self.0.run_a_little();
        // The guest writes its logs (from 8 MiB) and its working set (from 16 MiB); below its
        // image at 1 MiB only the CPU itself writes, setting accessed and dirty bits in the
        // GDT (0x8000) and the page tables livemig-kvm starts it with (0x9000..0xf000) the first
        // time a 2 MiB page is touched after a boot, and KVM logs those writes too (CI saw page
        // 0xb, the first page directory). Below that, the guest's own mailbox page (0x6000: the
        // step counts each vCPU publishes there, guest.c STEPS). Nothing lies below 0x6000.
        Dirtied {
            must: vec![],
            within: (0x6000 / PAGE, RAM / PAGE),
        }
    }
}

fn guest(dirty: DirtyMode) -> Guest {
    let cfg = TestVmConfig {
        vcpus: 1,
        pages: 256,
        ram: vec![(0, RAM)],
        dirty,
        ..TestVmConfig::default()
    };
    let vm = TestVm::boot(&cfg).expect("boot the test VM");
    vm.vm.pause(pause::ENGINE);
    Guest(vm)
}

/// A KVM log whose harvests are thrown away (the negative control).
struct Dropped(KvmDirtyLog);

impl DirtyTracker for Dropped {
    fn name(&self) -> String {
        format!("{} (harvests dropped)", self.0.name())
    }
    fn start(&mut self) -> Result<(), BoxError> {
        self.0.start()
    }
    fn harvest(&mut self, _: &mut PageBitmap) -> Result<u64, BoxError> {
        let mut scratch = PageBitmap::new(RAM / PAGE, PAGE);
        self.0.harvest(&mut scratch).map(|_| 0)
    }
    fn stop(&mut self) -> Result<(), BoxError> {
        self.0.stop()
    }
}

#[test]
fn kvm_dirty_bitmap_and_ring_meet_the_contract() {
    let Some(_kvm) = common::kvm() else {
        return;
    };
    for mode in [DirtyMode::Bitmap, DirtyMode::Ring(4096)] {
        let g = guest(mode);
        let t = KvmDirtyLog::new(&g.0.vm);
        let name = t.name();
        let c = testing::check(&mut On(g, std::marker::PhantomData), t)
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        eprintln!("{name}: {} rules", c.rules);
    }
    // Negative control: the same guest, its harvests dropped.
    let g = guest(DirtyMode::Bitmap);
    let t = Dropped(KvmDirtyLog::new(&g.0.vm));
    let e = testing::check(&mut On(g, std::marker::PhantomData), t).unwrap_err();
    assert!(e.contains("nothing reported after a write"), "{e}");
}
