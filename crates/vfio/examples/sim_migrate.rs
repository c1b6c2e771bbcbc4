//! Migrates a simulated device's state with PRE_COPY, the way an engine drives a VFIO device:
//! pre-copy rounds while the device runs, STOP_COPY for the rest, RESUMING on the destination.
//!
//! `cargo run -p livemig-vfio --features sim --example sim_migrate`

use livemig_vfio::sim::{SimConfig, SimDevice};
use livemig_vfio::{MigrationDevice, MigrationFlags, MigrationState, data};

fn arrows(path: &[MigrationState]) -> String {
    path.iter().map(|s| format!(" -> {s}")).collect()
}

fn main() -> Result<(), livemig_vfio::Error> {
    let flags = MigrationFlags::STOP_COPY | MigrationFlags::P2P | MigrationFlags::PRE_COPY;
    let cfg = SimConfig {
        state_size: 64 * 1024,
        ..SimConfig::new(flags)
    };
    let mut src = SimDevice::new(SimConfig {
        seed: 1,
        ..cfg.clone()
    });
    let mut dst = SimDevice::new(SimConfig { seed: 2, ..cfg });

    println!("source flags: {}", src.migration_flags()?);
    let t = src.transition(MigrationState::PreCopy)?;
    println!("source: {}{}", t.from, arrows(&t.path));
    let mut session = t.data.expect("RUNNING -> PRE_COPY opens a data session");
    let mut stream = Vec::new();
    for round in 1..=4 {
        let r = data::save_precopy(&mut session, &mut stream, u64::MAX)?;
        println!(
            "pre-copy round {round}: initial {} B, dirty {} B, sent {} B",
            r.info.initial_bytes, r.info.dirty_bytes, r.bytes
        );
        src.tick(40 / round); // the device keeps running, less each round
    }
    let t = src.transition(MigrationState::StopCopy)?;
    println!(
        "source: PRE_COPY{} (same data session: {})",
        arrows(&t.path),
        t.data.is_none()
    );
    let last = data::save_stop_copy(&mut session, &mut stream)?;
    println!("stop-copy: {last} B; stream total {} B", stream.len());

    let mut input = dst
        .transition(MigrationState::Resuming)?
        .data
        .expect("STOP -> RESUMING opens a data session");
    data::load_resuming(&mut &stream[..], &mut input)?;
    let t = dst.transition(MigrationState::Running)?;
    println!("destination: {}{}", t.from, arrows(&t.path));
    let same = src.state_digest() == dst.state_digest();
    println!("device state identical: {same}");
    src.transition(MigrationState::Running)?; // a real source would now be torn down
    if same {
        Ok(())
    } else {
        Err(livemig_vfio::Error::InvalidDeviceState(
            "state differs".into(),
        ))
    }
}
