//! The simulated device as a migration driver: data sessions, PRE_COPY, validation on resume,
//! data-path faults and DMA logging.

use livemig_vfio::data::{self, PrecopyInfo};
use livemig_vfio::sim::{Fault, SimConfig, SimDevice};
use livemig_vfio::{DataChannel, DmaLogger, DmaRange, Error, MigrationDevice, MigrationFlags};
use livemig_vfio::{MigrationState::*, dma_log};

fn all_flags() -> MigrationFlags {
    MigrationFlags::DEFINED_COMBINATIONS[3]
}

fn pair(flags: MigrationFlags) -> (SimDevice, SimDevice) {
    let src = SimDevice::new(SimConfig {
        seed: 7,
        ..SimConfig::new(flags)
    });
    let dst = SimDevice::new(SimConfig {
        seed: 8,
        ..SimConfig::new(flags)
    });
    (src, dst)
}

fn resume(dst: &mut SimDevice, bytes: &[u8]) -> Result<(), Error> {
    let mut input = dst
        .transition(Resuming)?
        .data
        .expect("RESUMING opens a session");
    // Deliberately odd segmentation: vfio.h says it must not matter.
    for chunk in bytes.chunks(37) {
        data::write_resuming(&mut input, chunk)?;
    }
    dst.transition(Running).map(|_| ())
}

#[test]
fn stop_copy_round_trip_gives_identical_state() {
    let (mut src, mut dst) = pair(MigrationFlags::STOP_COPY);
    src.tick(100);
    assert_ne!(src.state_digest(), dst.state_digest());
    let size = src.stop_copy_size().unwrap();
    let mut out = src.transition(StopCopy).unwrap().data.unwrap();
    let mut bytes = Vec::new();
    let n = data::save_stop_copy(&mut out, &mut bytes).unwrap();
    assert_eq!(n, size, "MIG_DATA_SIZE estimate is exact for this device");
    // The device is stopped: activity does not change it.
    assert_eq!(src.tick(10), 0);
    resume(&mut dst, &bytes).unwrap();
    assert_eq!(src.state_bytes(), dst.state_bytes());
    assert_eq!(dst.migration_state().unwrap(), Running);
    // The source can go back to RUNNING (e.g. after a failed migration).
    src.transition(Running).unwrap();
}

#[test]
fn precopy_rounds_then_stop_copy_converge() {
    for flags in [
        MigrationFlags::STOP_COPY | MigrationFlags::PRE_COPY,
        all_flags(),
    ] {
        let (mut src, mut dst) = pair(flags);
        let mut session = src.transition(PreCopy).unwrap().data.unwrap();
        let mut stream = Vec::new();
        // Round 1: the initial snapshot.
        let info = session.precopy_info().unwrap();
        assert!(info.initial_bytes > 0);
        assert_eq!(info.dirty_bytes, 0);
        let r = data::save_precopy(&mut session, &mut stream, u64::MAX).unwrap();
        assert_eq!(r.bytes, info.initial_bytes);
        assert_eq!(session.precopy_info().unwrap(), PrecopyInfo::default());
        // Temporary end of stream: ENOMSG, reported as drained.
        let r = data::save_precopy(&mut session, &mut stream, u64::MAX).unwrap();
        assert!(r.drained && r.bytes == 0);
        // The device keeps running and dirties its state.
        src.tick(5);
        let info = session.precopy_info().unwrap();
        assert_eq!(info.initial_bytes, 0);
        assert!(info.dirty_bytes > 0);
        let r = data::save_precopy(&mut session, &mut stream, u64::MAX).unwrap();
        assert_eq!(r.bytes, info.dirty_bytes);
        src.tick(3);
        // Stop: the same session continues into STOP_COPY (no new data fd).
        let t = src.transition(StopCopy).unwrap();
        assert!(
            t.data.is_none(),
            "{flags}: PRE_COPY -> STOP_COPY reuses the session"
        );
        // PRECOPY_INFO is only valid in PRE_COPY states.
        let e = session.precopy_info().unwrap_err();
        assert_eq!(e.errno(), Some(libc::EINVAL));
        let final_bytes = data::save_stop_copy(&mut session, &mut stream).unwrap();
        assert!(
            final_bytes < src.stop_copy_size().unwrap(),
            "only what changed is sent"
        );
        resume(&mut dst, &stream).unwrap();
        assert_eq!(src.state_digest(), dst.state_digest(), "{flags}");
    }
}

#[test]
fn leaving_the_saving_group_closes_the_session() {
    let (mut src, _) = pair(all_flags());
    let mut session = src.transition(PreCopy).unwrap().data.unwrap();
    src.transition(Running).unwrap();
    let e = std::io::Read::read(&mut session, &mut [0u8; 8]).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENODEV));
}

#[test]
fn corrupted_or_truncated_streams_are_refused_and_nothing_is_loaded() {
    let (mut src, _) = pair(MigrationFlags::STOP_COPY);
    let mut out = src.transition(StopCopy).unwrap().data.unwrap();
    let mut good = Vec::new();
    data::save_stop_copy(&mut out, &mut good).unwrap();

    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for cut in [0, 10, 24, 25, good.len() / 2, good.len() - 1] {
        cases.push((format!("truncated at {cut}"), good[..cut].to_vec()));
    }
    for at in [0, 9, 13, 17, 30, good.len() / 2, good.len() - 3] {
        let mut bad = good.clone();
        bad[at] ^= 0x40;
        cases.push((format!("byte {at} flipped"), bad));
    }
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[1, 2, 3]);
    cases.push(("trailing bytes".into(), trailing));

    for (what, bytes) in cases {
        let mut dst = SimDevice::new(SimConfig {
            seed: 8,
            ..SimConfig::new(MigrationFlags::STOP_COPY)
        });
        let before = dst.state_bytes();
        let err = resume(&mut dst, &bytes).unwrap_err();
        match &err {
            Error::ArcFailed {
                from,
                to,
                left_in,
                source,
                ..
            } => {
                assert_eq!((*from, *to), (Resuming, Stop), "{what}");
                assert_eq!(*left_in, Some(Resuming), "{what}: left in a reported state");
                assert!(
                    matches!(**source, Error::InvalidDeviceState(_)),
                    "{what}: {source}"
                );
            }
            other => panic!("{what}: unexpected {other:?}"),
        }
        assert_eq!(dst.state_bytes(), before, "{what}: nothing applied");
        assert!(dst.last_rejection().is_some());
        // Aborting RESUMING takes a reset (vfio.h).
        dst.reset().unwrap();
        assert_eq!(dst.migration_state().unwrap(), Running);
    }
}

#[test]
fn stream_for_another_device_is_refused() {
    let (mut src, _) = pair(MigrationFlags::STOP_COPY);
    let mut out = src.transition(StopCopy).unwrap().data.unwrap();
    let mut bytes = Vec::new();
    data::save_stop_copy(&mut out, &mut bytes).unwrap();
    let mut other = SimDevice::new(SimConfig {
        device_id: 0xdead,
        ..SimConfig::new(MigrationFlags::STOP_COPY)
    });
    let err = resume(&mut other, &bytes).unwrap_err();
    assert!(
        other.last_rejection().unwrap().contains("device id"),
        "{err}"
    );
}

#[test]
fn data_path_faults_surface_as_errors_naming_the_operation() {
    let (mut src, mut dst) = pair(MigrationFlags::STOP_COPY);
    src.inject(Fault::DataRead { after: 100 });
    let mut out = src.transition(StopCopy).unwrap().data.unwrap();
    let mut bytes = Vec::new();
    let e = data::save_stop_copy(&mut out, &mut bytes).unwrap_err();
    assert_eq!(e.to_string(), "migration data read failed");
    assert_eq!(bytes.len(), 100);
    // The source still returns to RUNNING.
    src.transition(Running).unwrap();

    dst.inject(Fault::DataWrite { after: 50 });
    let mut input = dst.transition(Resuming).unwrap().data.unwrap();
    let e = data::write_resuming(&mut input, &[0u8; 200]).unwrap_err();
    assert_eq!(e.to_string(), "migration data write failed");
}

#[test]
fn dma_logging_reports_and_clears() {
    let mut dev = SimDevice::new(SimConfig {
        dma_logging_max_ranges: Some(2),
        ..SimConfig::new(MigrationFlags::STOP_COPY)
    });
    const K4: u64 = 4096;
    let ram = [
        DmaRange::new(0, 16 * K4),
        DmaRange::new(1 << 30, 16 * K4),
        DmaRange::new(1 << 32, 16 * K4),
    ];
    let s = dev.start(K4, &ram).unwrap();
    assert_eq!(s.ranges.len(), 2, "merged down to the device budget");
    assert!(dev.dma_write(3 * K4 + 5, 2 * K4)); // pages 3, 4, 5
    assert!(dev.dma_write(1 << 32, 1));
    let mut bm = vec![0u64; dma_log::bitmap_words(16 * K4, K4) as usize];
    dev.dma_logging_report(0, 16 * K4, K4, &mut bm).unwrap();
    assert_eq!(bm[0], 0b111000);
    // Read-and-clear: a second report adds nothing; the kernel only ever sets bits.
    let mut bm2 = vec![0u64; 1];
    dev.dma_logging_report(0, 16 * K4, K4, &mut bm2).unwrap();
    assert_eq!(bm2[0], 0);
    // Coarser report granularity replicates onto the covering bit.
    let mut coarse = vec![0u64; 1];
    dev.dma_logging_report(1 << 32, 16 * K4, 8 * K4, &mut coarse)
        .unwrap();
    assert_eq!(coarse[0], 0b1);
    dev.dma_logging_stop().unwrap();
    assert!(!dev.dma_write(0, 1));
}

#[test]
fn dma_logging_absent_is_enotty() {
    let mut dev = SimDevice::new(SimConfig::new(MigrationFlags::STOP_COPY));
    let e = dev.start(4096, &[DmaRange::new(0, 4096)]).unwrap_err();
    assert!(e.is_unsupported(), "{e}");
    assert_eq!(
        e.to_string(),
        "VFIO_DEVICE_FEATURE(SET DMA_LOGGING_START) failed"
    );
}

/// The device parses RESUMING data as it arrives: a stream many times the state's size holds no
/// more than one partial record at any time, and a chunk that claims to reach outside the state
/// is passed over without being kept (issue 19: the destination's memory stays bounded whatever
/// the source sends).
#[test]
fn resume_data_is_parsed_as_it_arrives_and_never_buffered_whole() {
    let (mut src, mut dst) = pair(MigrationFlags::STOP_COPY);
    src.tick(100);
    let mut out = src.transition(StopCopy).unwrap().data.unwrap();
    let mut stream = Vec::new();
    data::save_stop_copy(&mut out, &mut stream).unwrap();
    drop(out);
    // Header (24 bytes), the chunk records, the end record (9 bytes): repeat the chunks 200
    // times, a stream 200 times the state, still valid (the last copy of each chunk wins).
    let (header, rest) = stream.split_at(24);
    let (chunks, end) = rest.split_at(rest.len() - 9);
    let mut big = header.to_vec();
    for _ in 0..200 {
        big.extend_from_slice(chunks);
    }
    big.extend_from_slice(end);
    let mut input = dst.transition(Resuming).unwrap().data.unwrap();
    let mut most = 0;
    for piece in big.chunks(64 << 10) {
        data::write_resuming(&mut input, piece).unwrap();
        most = most.max(dst.resume_held().unwrap());
    }
    let chunk_record = 13 + 64;
    assert!(
        most < chunk_record,
        "held {most} bytes of {} written",
        big.len()
    );
    drop(input);
    dst.transition(Running).unwrap();
    assert_eq!(dst.state_bytes(), src.state_bytes());

    // A chunk claiming 4 GiB: nothing of it is kept, and the end of the session names it.
    let mut input = dst.transition(Resuming).unwrap().data.unwrap();
    let mut hostile = header.to_vec();
    hostile.push(1);
    hostile.extend_from_slice(&0u32.to_le_bytes());
    hostile.extend_from_slice(&u32::MAX.to_le_bytes());
    data::write_resuming(&mut input, &hostile).unwrap();
    for _ in 0..64 {
        data::write_resuming(&mut input, &[0x5a; 64 << 10]).unwrap();
        assert_eq!(dst.resume_held(), Some(0));
    }
    drop(input);
    dst.transition(Stop).unwrap_err();
    assert_eq!(
        dst.last_rejection().as_deref(),
        Some("chunk at byte 24 runs past the stream end")
    );
}
