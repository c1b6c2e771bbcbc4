//! `livemig`: probe a host, run a simulated migration, migrate between two processes, run and
//! migrate the KVM test VM, inspect streams, and check compatibility.
//!
//! This file holds the commands and their dispatch; `args` the shared argument groups and value
//! parsers, `report` the progress bar and the printed report, `net` the connections, `vm` the
//! `livemig vm` commands over `testvm` (the test VM's options and its verification), and `soak`
//! the ping-pong soak's peer.

mod args;
mod chart;
mod host;
mod net;
mod probe;
mod report;
mod secure;
mod soak;
mod sysfs;
mod testvm;
mod vm;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use livemig::compat::{self, HostDescriptor};
use livemig::engine::{Destination, MigrationReport, Source, SourceConfig};
use livemig::link::{Cut, LinkConfig, Paced};
use livemig_sim::{self as sim, SimSpec};
use serde::Serialize;

use crate::args::{
    CompatCmd, MigArgs, SimArgs, TlsCmd, parse_bandwidth, parse_duration, parse_size,
};
use crate::net::{page_channels, receive_one};
use crate::report::{print_report, progress, source_state};

#[derive(Parser)]
#[command(
    name = "livemig",
    version,
    about = "Live migration of VMs with assigned PCI devices"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// TLS credentials for migration channels.
    #[command(subcommand)]
    Tls(TlsCmd),
    /// Report this host's iommufd, VFIO devices, dirty tracking and migration support.
    ///
    /// Read-only by default: device files are not opened (opening a VFIO device can reset
    /// it); what sysfs and /dev/iommu tell is reported.
    Probe {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Also open every idle VFIO device, bind it to a private iommufd and attach it to a
        /// private IOAS: migration flags, DMA logging, the IOMMU's own report and the
        /// auto-domain outcome. Opening a device can reset it.
        #[arg(long)]
        open: bool,
    },
    /// Run a whole migration on the simulated platform and verify the result bit for bit.
    Simulate {
        #[command(flatten)]
        sim: SimArgs,
        #[command(flatten)]
        mig: MigArgs,
        /// Link bandwidth (e.g. 10Gbit, 500MiB/s).
        #[arg(long, default_value = "10Gbit", value_parser = parse_bandwidth)]
        bandwidth: u64,
        /// One-way link latency.
        #[arg(long, default_value = "1ms", value_parser = parse_duration)]
        latency: Duration,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Migrate the simulated source to `livemig incoming` over TCP.
    Migrate {
        /// Destination address (host:port).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        sim: SimArgs,
        #[command(flatten)]
        mig: MigArgs,
        /// Pace the stream to this bandwidth (0 = as fast as TCP goes).
        #[arg(long, default_value = "0", value_parser = parse_bandwidth)]
        bandwidth: u64,
        #[command(flatten)]
        chan: secure::ChannelArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Receive one migration over TCP into a simulated destination.
    Incoming {
        /// Address to listen on (host:port; port 0 picks one and prints it).
        #[arg(long)]
        listen: String,
        #[command(flatten)]
        sim: SimArgs,
        #[command(flatten)]
        chan: secure::ChannelArgs,
        /// The source does not use device PRE_COPY (the destination's devices must match).
        #[arg(long)]
        no_precopy: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Dump a migration stream: livemig's format, a whole QEMU migration file (QEVM, every
    /// section and the VFIO items) or a QEMU VFIO device section.
    Inspect {
        /// The file.
        file: PathBuf,
        /// Machine-readable summary.
        #[arg(long)]
        json: bool,
        /// A file that is not a livemig stream is read whole, up to this many bytes; a longer
        /// one is inspected up to the cap and the output says so. (A livemig stream is read
        /// record by record, whatever its size.)
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        max_bytes: u64,
    },
    /// Compatibility descriptors.
    #[command(subcommand)]
    Compat(CompatCmd),
    /// The KVM test VM: run it, migrate it while it runs (between two processes over TCP),
    /// or `vm demo` for both sides on this machine and the guest's own verification.
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// Real VFIO devices and guest RAM in an iommufd IOAS: migrate them between two processes
    /// over TCP while writer threads (and, in the rig, the iommufd selftest's mock device)
    /// dirty RAM.
    #[command(subcommand)]
    Host(host::HostCmd),
    /// Draw migrations as an SVG chart (bytes sent against time, downtime by phase) from a
    /// JSON list of traces (the format is described in the chart module; `cargo xtask
    /// bench-peer` writes one).
    Chart {
        /// The traces (JSON).
        #[arg(long)]
        input: PathBuf,
        /// The SVG file to write.
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(Serialize)]
struct SimulateJson<'a> {
    spec: &'a SimSpec,
    report: &'a MigrationReport,
    verified: bool,
    verification: String,
}

fn simulate(sim: &SimArgs, mig: &MigArgs, link: LinkConfig, json: bool) -> Result<()> {
    let spec = sim.spec();
    let cfg = SourceConfig {
        link_rate: (link.bandwidth > 0).then_some(link.bandwidth),
        ..mig.config()
    };
    let src = sim::source(&spec, cfg.precopy).map_err(anyhow::Error::msg)?;
    let dst = sim::destination(&spec, cfg.precopy).map_err(anyhow::Error::msg)?;
    let (host, dhost) = (src.host.clone(), dst.host.clone());
    let mut source = Source::new(src.platform, cfg);
    let mut dest = Destination::new(dst.platform);
    let pb = progress(json, &mut source, |_| {});
    if !json {
        eprintln!(
            "simulating: {} IOMMU model, {} GiB RAM ({} MiB populated), {} QM VF(s), {} logging device(s), link {:.2} Gbit/s {:?}",
            spec.vendor.name(),
            spec.ram >> 30,
            spec.populated >> 20,
            spec.qm_vfs,
            spec.logging_devices,
            link.bandwidth as f64 * 8.0 / 1e9,
            link.latency
        );
    }
    // Let the guest run a moment so devices have work in flight.
    std::thread::sleep(Duration::from_millis(200));
    let (r, d) = if mig.channels >= 2 {
        // The link's bandwidth shared by the page channels.
        let page = LinkConfig {
            bandwidth: link.bandwidth / u64::from(mig.channels),
            ..link
        };
        let pages = vec![page; mig.channels as usize];
        livemig::link::migrate_local_channels(&mut source, &mut dest, link, &pages, &Cut::new())
    } else {
        sim::migrate_local(&mut source, &mut dest, link, &Cut::new())
    };
    pb.finish_and_clear();
    drop(src.workload);
    let report = match (r, d) {
        (Ok(r), Ok(_)) => r,
        (Err(e), _) => bail!("migration failed: {}; {}", e.chain(), source_state(&source)),
        (Ok(_), Err(e)) => bail!(
            "destination failed after the source finished: {}",
            e.chain()
        ),
    };
    let verification = host.compare(&dhost);
    if json {
        let out = SimulateJson {
            spec: &spec,
            report: &report,
            verified: verification.is_ok(),
            verification: match &verification {
                Ok(()) => "destination memory and device state equal the source bit for bit".into(),
                Err(e) => e.clone(),
            },
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_report(&report);
        match &verification {
            Ok(()) => println!(
                "verified: destination memory ({} GiB) and the state of {} device(s) equal the source bit for bit",
                spec.ram >> 30,
                spec.qm_vfs + spec.logging_devices
            ),
            Err(e) => println!("VERIFICATION FAILED: {e}"),
        }
    }
    if let Some(path) = &mig.chart {
        chart::write_report(path, "livemig simulate", &report)?;
    }
    if let Err(e) = verification {
        bail!("verification failed: {e}");
    }
    Ok(())
}

/// `livemig simulate` with its defaults (where KVM is not usable, `vm demo` runs this).
fn simulate_default(json: bool) -> Result<()> {
    let cli = Cli::try_parse_from(["livemig", "simulate"])?;
    let Cmd::Simulate {
        sim,
        mig,
        bandwidth,
        latency,
        ..
    } = cli.cmd
    else {
        bail!("the simulate defaults did not parse as simulate");
    };
    simulate(&sim, &mig, LinkConfig { bandwidth, latency }, json)
}

#[derive(Serialize)]
struct SideJson<T: Serialize> {
    role: &'static str,
    report: T,
    digest: sim::HostDigest,
}

fn migrate(
    to: &str,
    sim: &SimArgs,
    mig: &MigArgs,
    bandwidth: u64,
    sec: &secure::Security,
    json: bool,
) -> Result<()> {
    let spec = sim.spec();
    let cfg = SourceConfig {
        link_rate: (bandwidth > 0).then_some(bandwidth),
        ..mig.config()
    };
    let src = sim::source(&spec, cfg.precopy).map_err(anyhow::Error::msg)?;
    let host = src.host.clone();
    let mut source = Source::new(src.platform, cfg);
    let pb = progress(json, &mut source, |_| {});
    let conn = secure::dial(to, sec)?;
    std::thread::sleep(Duration::from_millis(200));
    let page_bw = bandwidth / u64::from(mig.channels);
    let main = secure::Conn {
        data: Box::new(Paced::new(conn.data, bandwidth, Cut::new())),
        ..conn
    };
    // The pacing emulates a slower network: it holds through the switchover too.
    let keep = livemig::link::Unpace::new();
    let r = source.migrate_channels(main, &mut page_channels(to, page_bw, &keep, sec));
    pb.finish_and_clear();
    drop(src.workload);
    let report = r.map_err(|e| {
        anyhow::anyhow!("migration failed: {}; {}", e.chain(), source_state(&source))
    })?;
    if let Some(path) = &mig.chart {
        chart::write_report(path, &format!("livemig migrate --to {to}"), &report)?;
    }
    let digest = host.digest();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&SideJson {
                role: "source",
                report: &report,
                digest
            })?
        );
    } else {
        print_report(&report);
        println!(
            "source digest: memory {} devices {:?} (compare with the destination's)",
            digest.memory, digest.devices
        );
    }
    Ok(())
}

fn incoming(
    listen: &str,
    sim: &SimArgs,
    precopy: bool,
    chan: &secure::ChannelArgs,
    json: bool,
) -> Result<()> {
    let sec = &chan.security()?;
    let spec = sim.spec();
    let dst = sim::destination(&spec, precopy).map_err(anyhow::Error::msg)?;
    let host = dst.host.clone();
    let mut dest = Destination::new(dst.platform);
    dest.set_phase_deadline(chan.phase_deadline());
    let report = receive_one(
        listen,
        &mut dest,
        false,
        if json { None } else { Some("") },
        sec,
    )?;
    let digest = host.digest();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&SideJson {
                role: "destination",
                report: &report,
                digest
            })?
        );
    } else {
        println!(
            "received {} pages, {} zero pages, {} rounds, {:.1} MiB; devices RUNNING after {:.1} ms",
            report.pages,
            report.zero_pages,
            report.rounds,
            report.bytes as f64 / 1048576.0,
            report.load_us as f64 / 1e3
        );
        println!(
            "destination buffers: {:.1} MiB of records, {} bytes of descriptors (bound {:.1} MiB)",
            report.memory.record_buffers as f64 / 1048576.0,
            report.memory.compat,
            report.memory.bound as f64 / 1048576.0
        );
        println!(
            "destination digest: memory {} devices {:?}",
            digest.memory, digest.devices
        );
    }
    Ok(())
}

fn inspect(file: &PathBuf, json: bool, max_bytes: u64) -> Result<()> {
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let ins = livemig_stream::inspect::inspect_with(
        std::io::BufReader::new(f),
        Default::default(),
        max_bytes,
    )
    .with_context(|| format!("reading {}", file.display()))?;
    if let Some(n) = ins.summary.read_only_first {
        eprintln!(
            "{}: only the first {n} bytes were inspected (--max-bytes); the file is longer",
            file.display()
        );
    }
    if json {
        println!("{}", ins.summary.to_json());
    } else {
        print!("{}", ins.dump);
    }
    if let Some(e) = &ins.summary.error {
        bail!("{}: {e}", file.display());
    }
    Ok(())
}

fn compat_export(sim: &SimArgs, precopy: bool, host: bool, open: bool) -> Result<HostDescriptor> {
    if host {
        let p = probe::probe(open);
        let devices = p
            .devices
            .iter()
            .filter(|d| !open || d.migration_flags.is_some())
            .map(|d| {
                let flags = d
                    .migration_flags
                    .iter()
                    .flatten()
                    .map(|n| match n.as_str() {
                        "STOP_COPY" => 1,
                        "P2P" => 2,
                        "PRE_COPY" => 4,
                        _ => 0,
                    })
                    .sum();
                let (identity, layout) = probe::identity(d);
                let unit = d.sysfs.iommu_unit.as_ref();
                compat::DeviceDescriptor {
                    device: livemig::device::DeviceCompat {
                        identity,
                        compat: layout.into_bytes(),
                        migration_flags: flags,
                        dma_logging: d.dma_logging,
                    },
                    // Read-only: what the IOMMU unit's registers in sysfs say; with
                    // --open, what the auto domain gave the device.
                    iommu_dirty_tracking: if d.opened {
                        d.iommu_dirty_tracking
                    } else {
                        unit.is_some_and(|u| u.dirty_tracking == Some(true))
                    },
                    page_size_mask: unit.map_or(0, |u| u.page_sizes),
                    migration_flags_known: d.opened,
                    dma_logging_limits: d.dma_logging_limits,
                }
            })
            .collect();
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        return Ok(HostDescriptor {
            format: compat::FORMAT.into(),
            host: name,
            iommu: if p.iommufd {
                "iommufd".into()
            } else {
                "none".into()
            },
            devices,
        });
    }
    let spec = sim.spec();
    let dst = sim::destination(&spec, precopy).map_err(anyhow::Error::msg)?;
    Ok(HostDescriptor {
        format: compat::FORMAT.into(),
        host: format!("simulated {}", spec.vendor.name()),
        iommu: format!(
            "{} model ({})",
            spec.vendor.name(),
            if spec.iommu_dirty {
                "dirty tracking"
            } else {
                "no dirty tracking"
            }
        ),
        devices: dst.platform.descriptors(),
    })
}

fn read_descriptor(p: &PathBuf) -> Result<HostDescriptor> {
    let t = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    parse_descriptor(&t).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
}

/// A descriptor from JSON: the format tag first (a newer livemig's descriptor is named as
/// such, not reported as a missing field), then every field must be one this livemig knows
/// ([`compat::KNOWN_FIELDS`]), then the structure.
fn parse_descriptor(text: &str) -> Result<HostDescriptor, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not a compatibility descriptor: {e}"))?;
    let format = v
        .get("format")
        .and_then(|f| f.as_str())
        .ok_or("not a compatibility descriptor: no \"format\" string")?;
    compat::check_format(format)?;
    let (top, device, limits) = compat::KNOWN_FIELDS;
    let unknown = |o: &serde_json::Value, known: &[&str], at: &str| -> Result<(), String> {
        let Some(o) = o.as_object() else {
            return Ok(()); // the structure parse below names a wrong type
        };
        match o.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(format!(
                "unknown field {k:?} {at}: written by a newer livemig or edited; refusing \
                 rather than ignoring it"
            )),
            None => Ok(()),
        }
    };
    unknown(&v, top, "at the top level")?;
    for (i, d) in v
        .get("devices")
        .and_then(|d| d.as_array())
        .into_iter()
        .flatten()
        .enumerate()
    {
        unknown(d, device, &format!("in device {i}"))?;
        if let Some(l) = d.get("dma_logging_limits") {
            unknown(l, limits, &format!("in device {i}'s dma_logging_limits"))?;
        }
    }
    serde_json::from_value(v).map_err(|e| format!("not a compatibility descriptor: {e}"))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Probe { json, open } => {
            let r = probe::probe(open);
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for line in &r.summary {
                    println!("{line}");
                }
                for d in &r.devices {
                    println!("{}:", d.cdev.display());
                    let (id, layout) = probe::identity(d);
                    println!("  {id}");
                    if !layout.is_empty() {
                        println!("  {layout}");
                    }
                    if let Some(u) = &d.sysfs.iommu_unit {
                        println!(
                            "  IOMMU unit {} ({}): {}",
                            u.name,
                            u.kind,
                            u.detail.as_deref().unwrap_or("registers not readable")
                        );
                    }
                    for p in &d.sysfs.problems {
                        println!("  sysfs: {p}");
                    }
                    if !d.opened {
                        println!("  {}", d.verdict);
                        continue;
                    }
                    if let Some(e) = &d.error {
                        println!("  error: {e}");
                        continue;
                    }
                    match &d.iommu {
                        Some(i) => println!(
                            "  IOMMU {}: capabilities {:?}",
                            i.hw_info_type, i.capabilities
                        ),
                        None => println!(
                            "  no IOMMU ({})",
                            d.iommu_error.as_deref().unwrap_or("unknown")
                        ),
                    }
                    match &d.migration_flags {
                        Some(f) => println!("  migration flags {}", f.join("|")),
                        None => println!(
                            "  not migratable ({})",
                            d.migration_error.as_deref().unwrap_or("unknown")
                        ),
                    }
                    match (&d.dma_logging_limits, &d.dma_logging_error) {
                        (Some(l), _) => println!(
                            "  DMA logging yes ({} KiB pages for a 4 KiB hint, {} ranges)",
                            l.page_size >> 10,
                            l.max_ranges
                        ),
                        (None, Some(e)) => println!("  DMA logging yes (limits unreadable: {e})"),
                        (None, None) => {
                            println!("  DMA logging {}", if d.dma_logging { "yes" } else { "no" })
                        }
                    }
                    if let Some(a) = &d.auto_domain {
                        println!("  auto domain: {a}");
                    }
                }
            }
        }
        Cmd::Simulate {
            sim,
            mig,
            bandwidth,
            latency,
            json,
        } => simulate(&sim, &mig, LinkConfig { bandwidth, latency }, json)?,
        Cmd::Migrate {
            to,
            sim,
            mig,
            bandwidth,
            chan,
            json,
        } => migrate(&to, &sim, &mig, bandwidth, &chan.security()?, json)?,
        Cmd::Incoming {
            listen,
            sim,
            chan,
            no_precopy,
            json,
        } => incoming(&listen, &sim, !no_precopy, &chan, json)?,
        Cmd::Tls(TlsCmd::Keygen { name, cert, key }) => {
            let names = if name.is_empty() {
                vec!["livemig".to_string()]
            } else {
                name
            };
            let fp = secure::keygen(&names, &cert, &key)?;
            println!("{fp}");
            eprintln!(
                "wrote {} and {} (mode 0600); give the other host --tls-peer {fp}",
                cert.display(),
                key.display()
            );
        }
        Cmd::Inspect {
            file,
            json,
            max_bytes,
        } => inspect(&file, json, max_bytes)?,
        Cmd::Vm(cmd) => vm::main(cmd, simulate_default)?,
        Cmd::Host(cmd) => host::run(cmd)?,
        Cmd::Chart { input, output } => chart::run(&input, &output)?,
        Cmd::Compat(CompatCmd::Export {
            sim,
            no_precopy,
            host,
            open,
            output,
        }) => {
            let d = compat_export(&sim, !no_precopy, host, open)?;
            match output {
                Some(p) => std::fs::write(&p, serde_json::to_string_pretty(&d)? + "\n")
                    .with_context(|| format!("writing {}", p.display()))?,
                None => println!("{}", serde_json::to_string_pretty(&d)?),
            }
        }
        Cmd::Compat(CompatCmd::Check { a, b, json }) => {
            let (da, db) = (read_descriptor(&a)?, read_descriptor(&b)?);
            let v = compat::check(&da.devices, &db.devices);
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{} -> {}: {}",
                    da.host,
                    db.host,
                    if v.compatible {
                        "compatible"
                    } else {
                        "NOT compatible"
                    }
                );
                for r in &v.reasons {
                    println!("  reason: {r}");
                }
                for n in &v.notes {
                    println!("  note: {n}");
                }
            }
            if !v.compatible {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
