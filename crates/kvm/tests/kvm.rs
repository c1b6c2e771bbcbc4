//! Live migration of a running KVM test VM (real /dev/kvm): both dirty mechanisms, cancel at
//! every phase, failures, the negative control, vCPU records from another CPU model, and
//! non-convergence with and without auto-converge.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use livemig::engine::{AutoConverge, Event, SourceConfig};
use livemig::link::LinkConfig;
use livemig::memory::GuestMemory;
use livemig::{Error, Phase};
use livemig_kvm::{ApStart, DirtyMode, GuestEvent, KvmDirtyLog, Mechanism, TestVm, TestVmConfig};

fn run_and_check(dirty: DirtyMode, expect_ring: bool) {
    let mut cfg = config();
    cfg.dirty = dirty;
    let src = TestVm::boot(&cfg).unwrap();
    let before = src.wait_progress(&[0, 0], Duration::from_secs(10)).unwrap();
    verify_ok(&src, "source before migration");
    let dst = TestVm::incoming(&cfg).unwrap();
    let o = migrate(&src, &dst, SourceConfig::default(), None, link(), None);
    let report = o.report.expect("migration succeeds");
    o.received.expect("destination receives");
    assert!(!report.rounds.is_empty());
    assert!(report.bytes > 0 && report.downtime_us > 0, "{report:?}");
    assert_eq!(
        src.vm.memory().first_difference(dst.vm.memory()),
        None,
        "destination RAM equals the stopped source's"
    );
    assert!(matches!(src.vm.dirty_choice().mechanism, Mechanism::Ring { .. }) == expect_ring);
    let last = src.monitor.steps();
    assert!(
        report.stop_copy.dirty_pages > 0 || report.rounds.iter().skip(1).any(|r| r.dirty_pages > 0),
        "the vCPUs dirtied pages during pre-copy: {report:?}"
    );
    let _ = before;
    start_destination(&dst);
    let after = dst.wait_progress(&last, Duration::from_secs(20)).unwrap();
    assert!(
        after.iter().zip(&last).all(|(a, l)| a > l),
        "the sequence continues: {after:?} after {last:?}"
    );
    verify_ok(&dst, "destination after migration");
    eprintln!(
        "{:?}: {} rounds, {} bytes, downtime {} us, ring-full exits {}",
        dirty,
        report.rounds.len(),
        report.bytes,
        report.downtime_us,
        src.vm.ring_full_exits()
    );
}

#[test]
fn running_vm_migrates_with_the_dirty_bitmap() {
    let Some(_one_at_a_time) = kvm() else {
        return;
    };
    run_and_check(DirtyMode::Bitmap, false);
}

#[test]
fn running_vm_migrates_with_the_dirty_ring() {
    let Some(_one_at_a_time) = kvm() else {
        return;
    };
    run_and_check(DirtyMode::Ring(4096), true);
}

#[test]
fn a_small_ring_fills_and_no_entry_is_lost() {
    let Some(_one_at_a_time) = kvm() else {
        return;
    };
    let mut cfg = config();
    // 256 entries per vCPU (KVM's minimum, one page) against the vCPUs' full speed (~300,000
    // pages/s each here): the ring fills many times while round 1 sends RAM. (At 20,000
    // pages/s a fast round 1 sometimes ended before any ring filled.)
    cfg.dirty = DirtyMode::Ring(256);
    cfg.rate = 0;
    let src = TestVm::boot(&cfg).unwrap();
    src.wait_progress(&[0, 0], Duration::from_secs(10)).unwrap();
    let dst = TestVm::incoming(&cfg).unwrap();
    // Two rounds of ~0.5 s each under dirty logging (a 64 MiB/s link), so the rings fill
    // many times: on an unlimited in-process link the whole migration took ~0.1 s and a run
    // could end before any ring filled.
    let two_rounds = SourceConfig {
        max_rounds: 2,
        ..SourceConfig::default()
    };
    let slow = LinkConfig {
        bandwidth: 64 << 20,
        latency: Duration::ZERO,
    };
    let o = migrate(&src, &dst, two_rounds, None, slow, None);
    o.report.expect("migration succeeds");
    o.received.expect("destination receives");
    let full = src.vm.ring_full_exits();
    assert!(full > 0, "ring-full exits happened");
    assert_eq!(src.vm.memory().first_difference(dst.vm.memory()), None);
    start_destination(&dst);
    verify_ok(&dst, "destination after ring-full exits");
    eprintln!("ring-full exits: {full}");
}

#[test]
fn dropping_one_harvest_loses_pages_and_both_checks_name_them() {
    let Some(_one_at_a_time) = kvm() else {
        return;
    };
    let mut cfg = config();
    // 16,384 pages per vCPU at 20,000 pages/s: a page is rewritten only every 0.8 s, longer
    // than the whole migration, so a page whose report is dropped is never sent again.
    cfg.pages = 16384;
    cfg.ram = vec![(0, 256 << 20), (4 << 30, 64 << 20)];
    let src = TestVm::boot(&cfg).unwrap();
    src.wait_progress(&[0, 0], Duration::from_secs(10)).unwrap();
    let dst = TestVm::incoming(&cfg).unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(AtomicBool::new(false));
    let tracker = DropHarvest {
        inner: KvmDirtyLog::new(&src.vm),
        armed: armed.clone(),
        dropped: dropped.clone(),
    };
    // Drop the harvest at the end of round 1 (what the vCPUs wrote while all of RAM was sent).
    let a = armed.clone();
    let hook = Box::new(move |e: &Event<'_>| {
        if let Event::Phase(Phase::PreCopy(1)) = e {
            a.store(true, Ordering::SeqCst);
        }
    });
    let o = migrate(
        &src,
        &dst,
        SourceConfig::default(),
        Some(Box::new(tracker)),
        link(),
        Some(hook),
    );
    o.report.expect("the engine cannot see the loss");
    assert!(
        dropped.load(Ordering::SeqCst),
        "the dropped harvest held pages"
    );
    let diff = src.vm.memory().first_difference(dst.vm.memory());
    assert!(
        diff.is_some(),
        "the engine's memory comparison finds the lost page"
    );
    start_destination(&dst);
    let f = dst.verify(Duration::from_secs(30)).unwrap();
    let lost = f.iter().find_map(|e| match e {
        GuestEvent::VerifyFail { gpa, .. } => Some(*gpa),
        _ => None,
    });
    assert!(lost.is_some(), "the guest names a lost page: {f:?}");
    eprintln!("negative control: memory differs at {diff:#x?}, the guest reports {lost:#x?} lost");
}

#[test]
fn operator_cancel_at_every_phase_leaves_the_source_running() {
    let Some(_one_at_a_time) = kvm() else {
        return;
    };
    let cfg = config();
    let src = TestVm::boot(&cfg).unwrap();
    for at in [
        Phase::Compat,
        Phase::Start,
        Phase::PreCopy(1),
        Phase::PreCopy(2),
        Phase::StopCopy,
    ] {
        let dst = TestVm::incoming(&cfg).unwrap();
        let sp = livemig_kvm::platform::source(&src.vm, vec![], None, None).unwrap();
        // As the CLI builds it (autostart): a failure must not start the destination.
        let dp = livemig_kvm::platform::destination(&dst.vm, vec![], true).unwrap();
        let mut source = livemig::engine::Source::new(
            sp,
            SourceConfig {
                // Keep pre-copy going past round 2.
                downtime_limit: Duration::from_micros(1),
                max_rounds: 4,
                ..SourceConfig::default()
            },
        );
        let h = source.cancel_handle();
        source.on_event(move |e| {
            if let Event::Phase(p) = e
                && *p == at
            {
                h.cancel(format!("test cancel at {at}"));
            }
        });
        let mut dest = livemig::engine::Destination::new(dp);
        let (r, d) = livemig::link::migrate_local(
            &mut source,
            &mut dest,
            link(),
            &livemig::link::Cut::new(),
        );
        match r {
            Err(Error::Cancelled { phase, reason }) => {
                assert_eq!(phase, at);
                assert!(reason.contains("operator cancel"), "{reason}");
            }
            other => panic!("cancel at {at}: {other:?}"),
        }
        assert!(d.is_err(), "the destination discards");
        assert_one_host(&source, &dest, &dst, &format!("cancel at {at}"));
        runs_again_and_verifies(&src, &format!("source after a cancel at {at}"));
    }
}

#[test]
fn a_corrupted_stream_and_a_dead_destination_leave_the_source_running() {
    let Some(_one_at_a_time) = kvm() else {
        return;
    };
    let cfg = config();
    let src = TestVm::boot(&cfg).unwrap();
    src.wait_progress(&[0, 0], Duration::from_secs(10)).unwrap();
    // The link cut during pre-copy and during stop-and-copy (the destination gone).
    for at in [Phase::PreCopy(1), Phase::StopCopy] {
        let dst = TestVm::incoming(&cfg).unwrap();
        let sp = livemig_kvm::platform::source(&src.vm, vec![], None, None).unwrap();
        let dp = livemig_kvm::platform::destination(&dst.vm, vec![], true).unwrap();
        let mut source = livemig::engine::Source::new(sp, SourceConfig::default());
        let cut = livemig::link::Cut::new();
        let c = cut.clone();
        source.on_event(move |e| {
            if let Event::Phase(p) = e
                && *p == at
            {
                c.cut();
            }
        });
        let mut dest = livemig::engine::Destination::new(dp);
        let (r, _) = livemig::link::migrate_local(&mut source, &mut dest, link(), &cut);
        let e = r.expect_err("the link was cut");
        assert_eq!(e.phase(), Some(at), "{e}");
        assert_one_host(&source, &dest, &dst, &format!("link cut at {at}"));
        runs_again_and_verifies(&src, &format!("source after the destination died at {at}"));
    }
    // A corrupted stream: the destination refuses it and the source runs again.
    let dst = TestVm::incoming(&cfg).unwrap();
    let sp = livemig_kvm::platform::source(&src.vm, vec![], None, None).unwrap();
    let dp = livemig_kvm::platform::destination(&dst.vm, vec![], true).unwrap();
    let mut source = livemig::engine::Source::new(sp, SourceConfig::default());
    let mut dest = livemig::engine::Destination::new(dp);
    let (data_w, data_r) = livemig::link::pipe(link(), livemig::link::Cut::new());
    let (back_w, back_r) = livemig::link::pipe(link(), livemig::link::Cut::new());
    let corrupt = Corrupt {
        inner: data_w,
        at: 200_000,
        seen: 0,
    };
    let dr = &mut dest;
    let (r, d) = std::thread::scope(|s| {
        let t = s.spawn(move || dr.receive(data_r, back_w));
        let r = source.migrate(corrupt, back_r);
        (r, t.join().unwrap())
    });
    let de = d.expect_err("the destination refuses a corrupted stream");
    assert!(de.to_string().contains("stream"), "{de}");
    r.expect_err("the source sees the destination's failure");
    assert_one_host(&source, &dest, &dst, "a corrupted stream");
    runs_again_and_verifies(&src, "source after a corrupted stream");
}

/// Flips one byte at offset `at` of the stream.
struct Corrupt<W> {
    inner: W,
    at: u64,
    seen: u64,
}

impl<W: std::io::Write> std::io::Write for Corrupt<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut b = buf.to_vec();
        if self.seen <= self.at && self.at < self.seen + b.len() as u64 {
            b[(self.at - self.seen) as usize] ^= 0x40;
        }
        let n = self.inner.write(&b)?;
        self.seen += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<W: livemig::link::DataSink> livemig::link::DataSink for Corrupt<W> {
    fn close(&mut self) -> std::io::Result<()> {
        self.inner.close()
    }
}

#[test]
fn a_vcpu_record_from_another_cpu_model_is_refused() {
    let Some(_one_at_a_time) = kvm() else {
        return;
    };
    let cfg = config();
    let src = TestVm::boot(&cfg).unwrap();
    let mut other = cfg.clone();
    // CPUID.1:EDX bit 25 (SSE, present on every x86-64 CPU) cleared: another CPU model.
    other.cpuid_clear = vec![(1, 0, 3, 1 << 25)];
    let dst = TestVm::incoming(&other).unwrap();
    let o = migrate(&src, &dst, SourceConfig::default(), None, link(), None);
    let e = o.report.expect_err("refused");
    let msg = e.to_string();
    assert!(matches!(e, Error::Refused { .. }), "{msg}");
    assert!(
        msg.contains("cpuid="),
        "names the CPUID in the identity: {msg}"
    );
    runs_again_and_verifies(&src, "source after a refused destination");
}

/// CPUID.1:ECX bit 26, XSAVE.
const NO_XSAVE: (u32, u32, u8, u32) = (1, 0, 2, 1 << 26);

fn migrates_holding(xsave: bool, holds: &str) {
    let Some(_one_at_a_time) = kvm() else {
        return;
    };
    let mut cfg = config();
    if xsave {
        cfg.cpuid_set = vec![NO_XSAVE];
    } else {
        cfg.cpuid_clear = vec![NO_XSAVE];
    }
    let src = TestVm::boot(&cfg).unwrap();
    let dst = TestVm::incoming(&cfg).unwrap();
    let compat =
        livemig::device::MigDevice::compat(&livemig_kvm::VcpuStateDevice::new(&src.vm).unwrap());
    assert_eq!(
        String::from_utf8_lossy(&compat.compat),
        format!("vCPU state: {holds}")
    );
    let o = migrate(&src, &dst, SourceConfig::default(), None, link(), None);
    o.report.expect("migrates");
    start_destination(&dst);
    verify_ok(&dst, holds);
}

#[test]
fn a_vm_whose_cpuid_has_no_xsave_migrates_with_the_legacy_fpu() {
    migrates_holding(false, "legacy FPU state, no XCRs (CPUID has no XSAVE)");
}

#[test]
fn a_vm_whose_cpuid_has_xsave_migrates_with_the_xsave_area_and_xcrs() {
    migrates_holding(true, "XSAVE/XCR0 state (CPUID has XSAVE)");
}

#[test]
fn a_destination_whose_cpuid_has_no_xsave_is_refused_at_compat_naming_it() {
    let Some(_one_at_a_time) = kvm() else {
        return;
    };
    // The source's CPUID has XSAVE whether or not KVM's supported set offers it (this
    // machine's does not, although the host has XSAVE; the rig's `-cpu EPYC` guest does).
    let mut cfg = config();
    cfg.cpuid_set = vec![NO_XSAVE];
    let src = TestVm::boot(&cfg).unwrap();
    let mut other = cfg.clone();
    other.cpuid_set.clear();
    other.cpuid_clear = vec![NO_XSAVE];
    let dst = TestVm::incoming(&other).unwrap();
    let o = migrate(&src, &dst, SourceConfig::default(), None, link(), None);
    let e = o.report.expect_err("refused");
    let msg = e.to_string();
    assert!(matches!(e, Error::Refused { .. }), "{msg}");
    assert!(
        msg.contains(
            "vCPU state: XSAVE/XCR0 state (CPUID has XSAVE) on the source; vCPU state: legacy \
             FPU state, no XCRs (CPUID has no XSAVE) on the destination"
        ),
        "names the feature before the CPUID digests: {msg}"
    );
    assert_eq!(dst.vm.entries(), vec![0; cfg.vcpus as usize]);
    runs_again_and_verifies(&src, "source after a destination without XSAVE");
}

#[test]
fn a_dirty_rate_above_the_link_converges_only_with_auto_converge() {
    let Some(_one_at_a_time) = kvm() else {
        return;
    };
    let mut cfg = config();
    // 2 vCPUs x 20,000 pages/s = ~160 MB/s of dirtying against a 16 MiB/s link: ten times the
    // link, so neither noise nor a slow machine can make it converge by luck.
    cfg.rate = 20_000;
    cfg.pages = 2048;
    let link = LinkConfig {
        bandwidth: 16 << 20,
        latency: Duration::ZERO,
    };
    let base = SourceConfig {
        downtime_limit: Duration::from_millis(300),
        max_rounds: 4,
        ..SourceConfig::default()
    };
    let src = TestVm::boot(&cfg).unwrap();
    let dst = TestVm::incoming(&cfg).unwrap();
    let o = migrate(&src, &dst, base.clone(), None, link, None);
    let r = o.report.expect("migrates (over the limit)");
    assert!(!r.converged);
    let why = r.non_convergence.clone().expect("a reason");
    assert!(
        why.contains("auto-converge is off") && why.contains("against a link rate"),
        "{why}"
    );
    assert!(r.rounds.iter().all(|x| x.throttle_percent == 0));
    eprintln!("without auto-converge: {why}");
    drop(dst);
    drop(src);

    let src = TestVm::boot(&cfg).unwrap();
    let dst = TestVm::incoming(&cfg).unwrap();
    let o = migrate(
        &src,
        &dst,
        SourceConfig {
            auto_converge: Some(AutoConverge {
                initial: 40,
                increment: 20,
                max: 99,
            }),
            max_rounds: 20,
            ..base
        },
        None,
        link,
        None,
    );
    let r = o.report.expect("migrates");
    assert!(
        r.converged,
        "auto-converge makes it converge: {:?}",
        r.non_convergence
    );
    let top = r
        .rounds
        .iter()
        .map(|x| x.throttle_percent)
        .max()
        .unwrap_or(0);
    assert!(top > 0, "the throttle was used");
    assert_eq!(src.vm.memory().first_difference(dst.vm.memory()), None);
    start_destination(&dst);
    verify_ok(&dst, "destination after auto-converge");
    eprintln!(
        "with auto-converge: {} rounds, throttle up to {top}%",
        r.rounds.len()
    );
}

#[test]
fn memory_outside_guest_ram_is_refused_before_anything_runs() {
    let Some(_one_at_a_time) = kvm() else {
        return;
    };
    let cfg = config();
    let src = TestVm::boot(&cfg).unwrap();
    let mut small = cfg.clone();
    small.ram = vec![(0, 128 << 20)]; // no high region
    let dst = TestVm::incoming(&small).unwrap();
    assert_ne!(src.vm.memory().size(), dst.vm.memory().size());
    let o = migrate(&src, &dst, SourceConfig::default(), None, link(), None);
    let e = o.received.expect_err("refused");
    assert!(e.to_string().contains("outside guest RAM"), "{e}");
    assert!(dst.monitor.events().is_empty(), "no destination vCPU ran");
    o.report.expect_err("the source sees it");
    runs_again_and_verifies(&src, "source after pages outside guest RAM were refused");
}

#[test]
fn vmm_writes_during_precopy_are_tracked_and_an_untracked_write_is_caught() {
    let Some(_one_at_a_time) = kvm() else {
        return;
    };
    let cfg = config();
    for tracked in [true, false] {
        let src = TestVm::boot(&cfg).unwrap();
        let dst = TestVm::incoming(&cfg).unwrap();
        // Device emulation writes guest RAM in pre-copy round 2, after round 1 sent all of it.
        let mem = src.vm.memory().clone();
        let gpa = (4u64 << 30) + 0x5000;
        let hook = Box::new(move |e: &Event<'_>| {
            if let Event::Phase(Phase::PreCopy(2)) = e {
                if tracked {
                    use vm_memory::Bytes;
                    mem.guest_memory()
                        .write_slice(b"written by the VMM", vm_memory::GuestAddress(gpa))
                        .unwrap();
                } else {
                    // Negative control: the same bytes through the host mapping, bypassing
                    // vm-memory's dirty bitmap (as a buggy device model would).
                    let r = mem.regions()[1];
                    // SAFETY: the address lies inside region 1's live mapping (the VM keeps
                    // the memory alive); the guest never touches the high region.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            b"written by the VMM".as_ptr(),
                            (r.host + (gpa - r.gpa)) as *mut u8,
                            18,
                        );
                    }
                }
            }
        });
        let o = migrate(
            &src,
            &dst,
            SourceConfig {
                downtime_limit: Duration::from_micros(1),
                max_rounds: 3,
                ..SourceConfig::default()
            },
            None,
            link(),
            Some(hook),
        );
        o.report.expect("migrates");
        let diff = src.vm.memory().first_difference(dst.vm.memory());
        if tracked {
            assert_eq!(diff, None, "a tracked VMM write reaches the destination");
            let mut b = [0u8; 18];
            dst.vm.memory().read(gpa, &mut b).unwrap();
            assert_eq!(&b, b"written by the VMM");
        } else {
            assert_eq!(
                diff,
                Some(gpa),
                "an untracked write is caught by the comparison"
            );
        }
    }
}

#[test]
fn ring_resets_under_signal_kicks_lose_nothing() {
    // Regression test for the kernel's dirty-ring reset bailing out on a pending signal and
    // leaving pages unprotected (see livemig-kvm's sys::reset_dirty_rings): small rings fill
    // hundreds of times per round and are reset by the vCPU threads while the throttle and a
    // kicker thread send them signals. Without the signal mask around the reset this lost pages
    // in roughly one attempt in six with the throttle alone.
    let Some(_one_at_a_time) = kvm() else {
        return;
    };
    let mut cfg = config();
    cfg.dirty = DirtyMode::Ring(256);
    cfg.rate = 0; // as fast as the vCPUs go: ~300,000 pages/s each here
    for attempt in 0..3 {
        let src = TestVm::boot(&cfg).unwrap();
        src.vm.set_throttle(30);
        let dst = TestVm::incoming(&cfg).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let stop = AtomicBool::new(false);
        let o = std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    src.vm.kick_all();
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
            let o = migrate(
                &src,
                &dst,
                SourceConfig {
                    downtime_limit: Duration::from_micros(1),
                    max_rounds: 3,
                    ..SourceConfig::default()
                },
                None,
                // Rounds of ~0.5 s, so the rings fill and are reset many times per round.
                LinkConfig {
                    bandwidth: 64 << 20,
                    latency: Duration::ZERO,
                },
                None,
            );
            stop.store(true, Ordering::SeqCst);
            o
        });
        o.report.expect("migrates");
        assert!(src.vm.ring_full_exits() > 0, "the ring filled");
        assert_eq!(
            src.vm.memory().first_difference(dst.vm.memory()),
            None,
            "attempt {attempt}: no page lost ({} ring-full exits)",
            src.vm.ring_full_exits()
        );
    }
}

/// A 16550-style register file as the UART the guest drives (the rig routes the same ports to
/// an assigned mtty): FCR enables the loop-back FIFO, data writes push and reads pop, LCR, MCR
/// and SCR hold what was written.
#[derive(Default)]
struct FakeUart(std::sync::Mutex<(u8, [u8; 8], std::collections::VecDeque<u8>)>);

impl livemig_kvm::vm::PortIo for FakeUart {
    fn io_out(&self, _vcpu: u32, port: u16, data: &[u8]) {
        let mut g = self.0.lock().unwrap();
        match (port, data.first().copied()) {
            (0, Some(b)) if g.0 & 1 != 0 && g.2.len() < 16 => g.2.push_back(b),
            (2, Some(b)) => {
                g.0 = b;
                if b & 6 != 0 {
                    g.2.clear();
                }
            }
            (p @ (3 | 4 | 7), Some(b)) => g.1[p as usize] = b,
            _ => {}
        }
    }
    fn io_in(&self, _vcpu: u32, port: u16, data: &mut [u8]) {
        let mut g = self.0.lock().unwrap();
        let v = match port {
            0 => g.2.pop_front().unwrap_or(0),
            3 | 4 | 7 => g.1[port as usize],
            _ => 0xff,
        };
        data.fill(v);
    }
}

#[test]
fn the_guest_uart_state_is_checked_after_a_migration_and_a_lost_one_fails() {
    let Some(_one_at_a_time) = kvm() else {
        return;
    };
    let cfg = livemig_kvm::TestVmConfig {
        uart: Some(0x3f8),
        ..config()
    };
    for carried in [true, false] {
        let src = TestVm::prepare(&cfg).unwrap();
        let su = Arc::new(FakeUart::default());
        src.monitor.route(0x3f8, 8, su.clone()).unwrap();
        src.start().unwrap();
        let programmed = src
            .uart_programmed()
            .expect("the guest programmed its UART");
        assert_ne!(programmed[1], 0, "four FIFO bytes");
        let dst = TestVm::prepare(&cfg).unwrap();
        let du = Arc::new(FakeUart::default());
        dst.monitor.route(0x3f8, 8, du.clone()).unwrap();
        let o = migrate(&src, &dst, SourceConfig::default(), None, link(), None);
        o.report.expect("migrates");
        if carried {
            // The device's migration data, as a VFIO device would carry it.
            let s = std::mem::take(&mut *su.0.lock().unwrap());
            *du.0.lock().unwrap() = s;
        }
        start_destination(&dst);
        let f = dst.verify(Duration::from_secs(30)).unwrap();
        if carried {
            assert!(f.is_empty(), "{f:?}");
        } else {
            assert!(
                f.iter()
                    .any(|e| matches!(e, GuestEvent::UartCheck { expected, found }
                    if *expected == programmed && found != expected)),
                "negative control: a UART whose state did not arrive fails the guest's check: {f:?}"
            );
        }
    }
    // Routes may not cover the guest's own ports or each other.
    let vm = TestVm::prepare(&cfg).unwrap();
    let u: Arc<FakeUart> = Arc::default();
    assert!(vm.monitor.route(0xe8, 4, u.clone()).is_err());
    vm.monitor.route(0x3f8, 8, u.clone()).unwrap();
    assert!(vm.monitor.route(0x3fc, 8, u).is_err());
}

#[test]
fn a_guest_exception_is_reported_with_its_vector_and_address_not_a_silent_reset() {
    let Some(_one_at_a_time) = kvm() else {
        return;
    };
    let vm = TestVm::boot(&config()).unwrap();
    vm.wait_progress(&[0, 0], Duration::from_secs(10)).unwrap();
    vm.monitor.command_all(livemig_kvm::guest::command::FAULT);
    vm.monitor
        .wait_for(Duration::from_secs(10), |ev| {
            ev.iter()
                .filter(|e| matches!(e, GuestEvent::Exception { vector: 13, .. }))
                .count()
                >= 2
        })
        .unwrap_or_else(|ev| panic!("no #GP reported by both vCPUs: {ev:?}"));
    let mut cpus: Vec<u32> = vm
        .monitor
        .events()
        .iter()
        .filter_map(|e| match e {
            GuestEvent::Exception {
                cpu,
                vector: 13,
                error: 0,
                rip,
                ..
            } if *rip > 0x10_0000 => Some(*cpu),
            _ => None,
        })
        .collect();
    cpus.sort();
    assert_eq!(
        cpus,
        [0, 1],
        "each vCPU names itself and the faulting rip in the image"
    );
    assert!(vm.vm.failures().is_empty(), "{:?}", vm.vm.failures());
}

#[test]
fn the_aps_wait_for_init_sipi_sipi_and_start_only_when_vcpu0_sends_it() {
    let Some(_one_at_a_time) = kvm() else {
        return;
    };
    let mp = |vm: &TestVm, i: usize| vm.vm.vcpus()[i].fd().get_mp_state().unwrap().mp_state;
    // The default: vCPU 1 is left in wait-for-SIPI until the guest's vCPU 0 sends the IPIs.
    let cfg = config();
    assert_eq!(cfg.ap_start, ApStart::Sipi);
    let vm = TestVm::prepare(&cfg).unwrap();
    assert_eq!(
        mp(&vm, 1),
        kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
        "an AP waits for INIT/SIPI before the guest runs"
    );
    vm.start().unwrap();
    let steps = vm.wait_progress(&[0, 0], Duration::from_secs(10)).unwrap();
    assert!(steps[1] > 0, "vCPU 1 writes its working set: {steps:?}");
    assert!(
        vm.monitor
            .text()
            .contains("1 AP(s) started by INIT-SIPI-SIPI"),
        "{}",
        vm.monitor.text()
    );
    let bad = vm.verify(Duration::from_secs(10)).unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    drop(vm);
    // Control: started directly, the same check sees no IPI sent (the line is the guest's
    // own report of the start, not something every boot prints).
    let vm = TestVm::boot(&TestVmConfig {
        ap_start: ApStart::Direct,
        ..config()
    })
    .unwrap();
    vm.wait_progress(&[0, 0], Duration::from_secs(10)).unwrap();
    assert!(
        !vm.monitor.text().contains("INIT-SIPI-SIPI"),
        "{}",
        vm.monitor.text()
    );
}
