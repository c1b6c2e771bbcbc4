//! A whole live migration on the simulated platform: 256 MiB of sparse guest RAM (32 MiB of it
//! populated) behind the VT-d IOMMU model, a HiSilicon QM VF doing DMA through it (tracked by
//! the IOMMU's dirty bits), a device that logs its own DMA (tracked by its DMA log), and vCPUs
//! writing, migrated over an in-process link with bandwidth and latency while all of it keeps
//! running. Checks that the engine converged and that the destination's RAM and device state
//! equal the stopped source's bit for bit (`SimHost::compare`).
//!
//! `cargo run -p livemig-sim --example simulate` (add `--release` for a bigger guest)

use std::process::ExitCode;
use std::time::Duration;

use livemig::engine::{Destination, Source, SourceConfig};
use livemig::link::{Cut, LinkConfig};
use livemig_sim::{SimDestination, SimSource, SimSpec, Vendor};

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("ok: destination RAM and device state equal the source's");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("simulate example FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let spec = SimSpec {
        vendor: Vendor::Vtd,
        ram: 256 << 20,
        populated: 32 << 20,
        qm_vfs: 1,
        logging_devices: 1,
        cpu_dirty_rate: 2_000,
        dma_rate: 500,
        ..SimSpec::default()
    };
    let cfg = SourceConfig {
        downtime_limit: Duration::from_millis(100),
        ..SourceConfig::default()
    };
    // The source host starts its guest (vCPU writer, device work) right away.
    let SimSource {
        platform,
        host: src_host,
        workload,
    } = livemig_sim::source(&spec, cfg.precopy)?;
    let SimDestination {
        platform: dplatform,
        host: dst_host,
    } = livemig_sim::destination(&spec, cfg.precopy)?;
    std::thread::sleep(Duration::from_millis(50)); // work in flight before the migration

    let mut source = Source::new(platform, cfg);
    let plan = source.check().map_err(|e| e.chain())?;
    println!("tracker per device: {plan:?}");
    let mut dest = Destination::new(dplatform);
    let link = LinkConfig {
        bandwidth: 1 << 30,
        latency: Duration::from_micros(200),
    };
    let (report, received) =
        livemig::link::migrate_local(&mut source, &mut dest, link, &Cut::new());
    let report = report.map_err(|e| format!("source: {}", e.chain()))?;
    let received = received.map_err(|e| format!("destination: {}", e.chain()))?;
    println!(
        "{} pre-copy rounds, {} bytes, downtime {:.1} ms (limit {} ms), converged {}",
        report.rounds.len(),
        report.bytes,
        report.downtime_us as f64 / 1e3,
        report.downtime_limit_us / 1000,
        report.converged
    );
    for (name, chosen) in &report.tracking {
        println!("  {name}: {chosen:?}");
    }
    println!(
        "destination: {} pages, {} zero pages, device bytes {:?}",
        received.pages, received.zero_pages, received.device_bytes
    );
    if !report.converged {
        return Err(format!(
            "did not converge: {:?}",
            report.non_convergence.unwrap_or_default()
        ));
    }
    if !source.is_stopped() {
        return Err("after a successful migration the source must stay stopped".into());
    }
    // The source guest is stopped for good: stop its threads, then compare everything.
    drop(workload);
    src_host.compare(&dst_host)
}
