//! Failure injection at every phase: link drops, device errors at each arc and data transfer,
//! compat mismatches, corrupted streams. The source must keep running (nothing lost) and the
//! error must say what failed and where; the destination discards.

mod common;

use std::io::{self, Write};

use livemig::Phase;
use livemig::engine::SourceConfig;
use livemig::link::DataSink;
use livemig_sim::{self as sim, Vendor};
use livemig_vfio::MigrationState as S;
use livemig_vfio::sim::Fault;
use serial_test::serial;

fn precopy_cfg(precopy: bool) -> SourceConfig {
    SourceConfig {
        precopy,
        ..SourceConfig::default()
    }
}

/// Every destination device is back in RUNNING (reset), whatever it had received.
fn dest_reset(run: &common::Run) -> bool {
    run.dest
        .platform()
        .devices
        .iter()
        .all(|d| d.state().ok() == Some(S::Running))
}

#[test]
#[serial]
fn link_drop_in_every_phase_before_the_handover() {
    let s = common::spec(Vendor::Amd);
    for phase in [
        Phase::Compat,
        Phase::Start,
        Phase::PreCopy(1),
        Phase::PreCopy(2),
        Phase::StopCopy,
    ] {
        // A limit no round meets: three pre-copy rounds, then the round limit.
        let cfg = SourceConfig {
            downtime_limit: std::time::Duration::from_micros(1),
            max_rounds: 3,
            ..SourceConfig::default()
        };
        let mut run = common::setup(&s, &s, cfg);
        run.cut_at(phase);
        let (r, d) = run.go();
        let e = r.expect_err("a cut link fails the migration");
        // Starting tracking writes nothing: the cut shows at the first write after it.
        let seen = if phase == Phase::Start {
            Phase::PreCopy(1)
        } else {
            phase
        };
        assert_eq!(e.phase(), Some(seen), "{}", e.chain());
        let text = e.chain();
        assert!(text.contains(&format!("{seen}:")), "{text}");
        assert!(
            text.contains("link dropped") || text.contains("link"),
            "{text}"
        );
        assert!(d.is_err(), "the destination discards");
        run.assert_source_running();
        assert!(
            !run.source.is_stopped(),
            "{phase}: the engine says it runs again"
        );
        // Destination devices were reset: nothing half-loaded stays.
        assert!(dest_reset(&run), "destination devices reset");
    }
}

#[test]
#[serial]
fn link_drop_at_handover_leaves_the_source_stopped_and_intact() {
    let s = common::spec(Vendor::Vtd);
    let mut run = common::setup(&s, &s, precopy_cfg(true));
    run.cut_at(Phase::Handover);
    let (r, _) = run.go();
    let e = r.unwrap_err().chain();
    assert!(
        e.starts_with("handover: link lost after the stream ended"),
        "{e}"
    );
    assert!(
        e.contains("source stays stopped with its state intact"),
        "{e}"
    );
    assert!(
        !sim::all_running(&run.src.host),
        "not resumed: the destination may run"
    );
    assert!(run.source.is_stopped(), "the engine says it stays stopped");
    // The operator learns the destination did not start, and resumes the source.
    run.source.resume().unwrap();
    run.assert_source_running();
}

/// Every arc the source takes, failing with and without leaving the device in ERROR.
#[test]
#[serial]
fn device_error_at_each_source_arc() {
    let s = common::spec(Vendor::Amd);
    let cases = [
        (true, S::Running, S::PreCopy, Phase::Start),
        (true, S::PreCopy, S::StopCopy, Phase::StopCopy),
        (false, S::Running, S::Stop, Phase::StopCopy),
        (false, S::Stop, S::StopCopy, Phase::StopCopy),
    ];
    for (precopy, from, to, phase) in cases {
        for to_error in [false, true] {
            let mut run = common::setup(&s, &s, precopy_cfg(precopy));
            run.src.host.logging_devices()[0].inject(Fault::Arc { from, to, to_error });
            let (r, d) = run.go();
            let e = r.expect_err("an arc fault fails the migration");
            let text = e.chain();
            assert_eq!(e.phase(), Some(phase), "{text}");
            assert!(text.contains("device 2 (dev0)"), "{text}");
            assert!(
                text.contains(&format!("{from} -> {to}")),
                "{from}->{to} error={to_error}: {text}"
            );
            assert!(d.is_err());
            run.src.host.logging_devices()[0].clear_faults();
            run.assert_source_running();
        }
    }
}

#[test]
#[serial]
fn device_data_errors_on_the_source() {
    let s = common::spec(Vendor::Smmuv3);
    for (precopy, phase) in [(true, Phase::PreCopy(1)), (false, Phase::StopCopy)] {
        let mut run = common::setup(&s, &s, precopy_cfg(precopy));
        run.src.host.logging_devices()[0].inject(Fault::DataRead { after: 100 });
        let (r, _) = run.go();
        let e = r.unwrap_err();
        assert_eq!(e.phase(), Some(phase), "{}", e.chain());
        assert!(e.chain().contains("dev0"), "{}", e.chain());
        run.src.host.logging_devices()[0].clear_faults();
        run.assert_source_running();
    }
}

/// Every arc the destination takes, and its data writes.
#[test]
#[serial]
fn device_error_at_each_destination_arc() {
    let s = common::spec(Vendor::Amd);
    let cases: [(Fault, &str); 5] = [
        (
            Fault::Arc {
                from: S::Running,
                to: S::Stop,
                to_error: false,
            },
            "compat exchange",
        ),
        (
            Fault::Arc {
                from: S::Stop,
                to: S::Resuming,
                to_error: true,
            },
            "compat exchange",
        ),
        (Fault::DataWrite { after: 10 }, "receive"),
        (
            Fault::Arc {
                from: S::Resuming,
                to: S::Stop,
                to_error: true,
            },
            "resume",
        ),
        (
            Fault::Arc {
                from: S::Stop,
                to: S::Running,
                to_error: false,
            },
            "resume",
        ),
    ];
    for (fault, where_) in cases {
        let mut run = common::setup(&s, &s, precopy_cfg(true));
        run.dst.host.logging_devices()[0].inject(fault);
        let (r, d) = run.go();
        let de = d.expect_err("the destination fails").chain();
        assert!(
            de.starts_with(&format!("{where_}: device 2 (dev0)")),
            "{fault:?}: {de}"
        );
        let e = r.expect_err("the source learns of it").chain();
        assert!(e.contains("the destination failed"), "{fault:?}: {e}");
        assert!(e.contains("dev0"), "{fault:?}: {e}");
        run.assert_source_running();
        run.dst.host.logging_devices()[0].clear_faults();
        assert!(
            dest_reset(&run),
            "{fault:?}: destination devices reset to RUNNING"
        );
    }
}

#[test]
#[serial]
fn compat_mismatch_is_refused_before_any_state_moves() {
    let s = common::spec(Vendor::Amd);
    let mut other = s.clone();
    other.qm_vfs = 1;
    let mut run = common::setup(&s, &other, precopy_cfg(true));
    let (r, d) = run.go();
    let e = r.unwrap_err().to_string();
    assert!(
        e.starts_with("compat exchange: the destination refused: the source has 3 device(s), the destination 2"),
        "{e}"
    );
    assert!(d.is_err());
    assert!(
        run.src.host.logging_devices()[0].arcs().is_empty(),
        "no source device changed state"
    );
    assert!(
        run.dst.host.logging_devices()[0].arcs().is_empty(),
        "no destination device changed state"
    );
    run.assert_source_running();

    // A source using PRE_COPY cannot move to devices without it.
    let mut run = common::setup(&s, &s, precopy_cfg(true));
    let dst = sim::destination(&s, false).unwrap();
    run.dest = livemig::engine::Destination::new(dst.platform);
    let (r, _) = run.go();
    let e = r.unwrap_err().to_string();
    assert!(e.contains("device 0 (19e5:a256 hisi_acc_vfio_pci): the source uses PRE_COPY which the destination device lacks"), "{e}");
    run.assert_source_running();
}

/// A QM VF under a 6.12-style driver (or on a QM_HW_V3) gives its guest 32 KiB of BAR2; under
/// Linux 7.3.4 on a QM above V3 with QM_MIG_REGION_EN it gives all 64 KiB. The engine's compat
/// exchange refuses the difference, in both directions, before any destination QM register is
/// written; the same new layout on both sides migrates, through the PF BAR2 windows.
#[test]
#[serial]
fn a_qm_bar_layout_difference_is_refused_before_any_destination_write() {
    use livemig_hisi_qm::{MigCtrl, QmRevision};
    let s = common::spec(Vendor::Amd);
    let (old, new) = (QmRevision::V3, QmRevision::V4);
    for (from, to) in [(old, new), (new, old)] {
        let src = sim::source_with_qm_revision(&s, true, from).unwrap();
        let dst = sim::destination_with_qm_revision(&s, true, to).unwrap();
        let mut run = common::setup_from(src, dst, precopy_cfg(true));
        let (r, d) = run.go();
        let e = r.unwrap_err().to_string();
        assert!(
            e.starts_with("compat exchange: the destination refused: device 0 (19e5:a256 hisi_acc_vfio_pci): hisi-qm/1"),
            "{e}"
        );
        let (small, big) = (
            "bar2 guest 0x8000 of 0x10000 mig vf-bar2",
            "bar2 guest 0x10000 of 0x10000 mig pf-bar2",
        );
        let (sb, db) = if from == old {
            (small, big)
        } else {
            (big, small)
        };
        assert!(e.contains(&format!("hisi-qm/1 19e5:a256 {sb}")), "{e}");
        assert!(e.contains(&format!("; hisi-qm/1 19e5:a256 {db}")), "{e}");
        assert!(d.is_err());
        for vf in run.dst.host.qm_vfs() {
            assert_eq!(
                vf.stats().register_writes,
                0,
                "a destination QM VF was written"
            );
        }
        assert!(run.dst.host.logging_devices()[0].arcs().is_empty());
        run.assert_source_running();
    }

    // Negative control: the new layout on both sides is compatible and migrates, the QM VFs'
    // migration registers reached through the PF's BAR2 on both hosts.
    let src = sim::source_with_qm_revision(&s, true, new).unwrap();
    let dst = sim::destination_with_qm_revision(&s, true, new).unwrap();
    let mut run = common::setup_from(src, dst, precopy_cfg(true));
    let (r, d) = run.go();
    r.unwrap_or_else(|e| panic!("{}", e.chain()));
    d.unwrap();
    drop(run.src.workload);
    run.src.host.compare(&run.dst.host).unwrap();
    for vf in run.src.host.qm_vfs().iter().chain(run.dst.host.qm_vfs()) {
        assert_eq!(vf.mig_ctrl(), MigCtrl::PfBar2);
        assert!(vf.stats().window_accesses > 0, "{:?}", vf.stats());
    }
}

/// Flips one byte of the stream at `at`.
struct Corrupt<W> {
    inner: W,
    at: u64,
    pos: u64,
}

impl<W: DataSink> Write for Corrupt<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut b = buf.to_vec();
        if self.at >= self.pos && self.at < self.pos + b.len() as u64 {
            b[(self.at - self.pos) as usize] ^= 0x40;
        }
        let n = self.inner.write(&b)?;
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: DataSink> DataSink for Corrupt<W> {
    fn close(&mut self) -> io::Result<()> {
        self.inner.close()
    }
}

#[test]
#[serial]
fn corrupted_stream_is_refused_and_the_source_resumes() {
    let s = common::spec(Vendor::Vtd);
    // In the compat section, early in the pages, and deep in the stream.
    for at in [70u64, 5000, 20 << 20] {
        let mut run = common::setup(&s, &s, precopy_cfg(true));
        let (dw, dr) = livemig::link::pipe(common::link(), run.cut.clone());
        let (bw, br) = livemig::link::pipe(common::link(), run.cut.clone());
        let dest = &mut run.dest;
        let (r, d) = std::thread::scope(|sc| {
            let h = sc.spawn(move || dest.receive(dr, bw));
            let r = run.source.migrate(
                Corrupt {
                    inner: dw,
                    at,
                    pos: 0,
                },
                br,
            );
            (r, h.join().unwrap())
        });
        let de = d.unwrap_err().chain();
        assert!(de.contains("stream"), "at {at}: {de}");
        let e = r.unwrap_err().chain();
        assert!(
            e.contains("the destination failed") && e.contains("stream"),
            "at {at}: {e}"
        );
        run.assert_source_running();
    }
}
