//! The command line's shared argument groups and value parsers: the simulated platform
//! (`SimArgs`), the migration settings (`MigArgs`), the `compat` and `tls` subcommands, and
//! sizes, bandwidths and durations with their units.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use livemig::engine::SourceConfig;
use livemig::tracker::TrackingMode;
use livemig_sim::{SimSpec, Vendor};

#[derive(Subcommand)]
pub(crate) enum CompatCmd {
    /// Write this host's descriptor (the simulated platform's, or `--host` for the probe's).
    Export {
        #[command(flatten)]
        sim: SimArgs,
        /// The source does not use device PRE_COPY.
        #[arg(long)]
        no_precopy: bool,
        /// Describe the real host from `livemig probe` instead of the simulated platform
        /// (read-only: device identity, driver and BAR layout from sysfs).
        #[arg(long)]
        host: bool,
        /// With `--host`: open the idle devices for their migration flags and DMA logging
        /// (`livemig probe --open`); without it those are not known and the descriptor says 0.
        #[arg(long, requires = "host")]
        open: bool,
        /// Write to this file instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Can the VM of descriptor A migrate to the host of descriptor B? Exit status 1 if not.
    Check {
        /// Source descriptor.
        a: PathBuf,
        /// Destination descriptor.
        b: PathBuf,
        /// Machine-readable verdict.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Clone)]
pub(crate) struct SimArgs {
    /// IOMMU vendor model: amd, vtd, smmuv3.
    #[arg(long, default_value = "amd")]
    vendor: Vendor,
    /// Guest RAM (sparse).
    #[arg(long, default_value = "16GiB", value_parser = parse_size)]
    ram: u64,
    /// Guest RAM filled with data before the migration.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    populated: u64,
    /// HiSilicon QM VF models (tracked by the IOMMU only).
    #[arg(long, default_value_t = 2)]
    qm_vfs: u32,
    /// Simulated devices with DMA logging.
    #[arg(long, default_value_t = 1)]
    logging_devices: u32,
    /// Model an IOMMU without dirty tracking.
    #[arg(long)]
    no_iommu_dirty: bool,
    /// Pages per second the vCPUs dirty.
    #[arg(long, default_value_t = 5000)]
    cpu_dirty_rate: u64,
    /// Jobs or DMA writes per second per device.
    #[arg(long, default_value_t = 2000)]
    dma_rate: u64,
    /// Seed for memory contents and activity.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl SimArgs {
    pub(crate) fn spec(&self) -> SimSpec {
        SimSpec {
            vendor: self.vendor,
            ram: self.ram,
            populated: self.populated,
            iommu_dirty: !self.no_iommu_dirty,
            qm_vfs: self.qm_vfs,
            logging_devices: self.logging_devices,
            cpu_dirty_rate: self.cpu_dirty_rate,
            dma_rate: self.dma_rate,
            seed: self.seed,
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum TlsCmd {
    /// Make a self-signed certificate and key for this host; prints the certificate's
    /// SHA-256 fingerprint, which the other host passes as --tls-peer.
    Keygen {
        /// A name the certificate carries (repeatable; default "livemig").
        #[arg(long)]
        name: Vec<String>,
        /// Where to write the certificate (PEM).
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// Where to write the private key (PEM, mode 0600).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
}

#[derive(Args, Clone)]
pub(crate) struct MigArgs {
    /// Dirty tracking for device DMA: auto, iommu, device.
    #[arg(long, default_value = "auto")]
    tracking: TrackingMode,
    /// Do not use device PRE_COPY.
    #[arg(long)]
    no_precopy: bool,
    /// Downtime limit.
    #[arg(long, default_value = "300ms", value_parser = parse_duration)]
    downtime: Duration,
    /// Stop-and-copy after this many rounds regardless.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// Never stop the VM longer than this: stop-and-copy is not started when the estimate is
    /// over it, and abandoned (the source runs again) if it has not ended in time.
    #[arg(long, value_parser = parse_duration)]
    hard_deadline: Option<Duration>,
    /// Connections that carry pages: 1 (one connection carries everything) or 2 to 64 page
    /// channels beside the main connection (QEMU's multifd layout).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) channels: u32,
    /// Also draw the migration (bytes sent against time, downtime by phase) as an SVG chart.
    #[arg(long, value_name = "FILE")]
    pub(crate) chart: Option<PathBuf>,
}

impl MigArgs {
    pub(crate) fn config(&self) -> SourceConfig {
        SourceConfig {
            tracking: self.tracking,
            precopy: !self.no_precopy,
            downtime_limit: self.downtime,
            max_rounds: self.max_rounds,
            hard_deadline: self.hard_deadline,
            channels: self.channels,
            ..SourceConfig::default()
        }
    }
}

fn split_unit(s: &str) -> Result<(f64, String), String> {
    let s = s.trim();
    let at = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (n, u) = s.split_at(at);
    let n: f64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a number followed by a unit"))?;
    Ok((n, u.trim().to_string()))
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let (n, u) = split_unit(s)?;
    let m: u64 = match u.as_str() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "{s:?}: unknown size unit {other:?} (B, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    Ok((n * m as f64) as u64)
}

pub(crate) fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let (n, u) = split_unit(s)?;
    let bytes = match u.as_str() {
        "" | "B/s" => n,
        "kbit" | "Kbit" => n * 1e3 / 8.0,
        "Mbit" => n * 1e6 / 8.0,
        "Gbit" => n * 1e9 / 8.0,
        "KiB/s" => n * 1024.0,
        "MiB/s" => n * 1048576.0,
        "GiB/s" => n * 1073741824.0,
        other => {
            return Err(format!(
                "{s:?}: unknown bandwidth unit {other:?} (B/s, MiB/s, GiB/s, Mbit, Gbit)"
            ));
        }
    };
    Ok(bytes as u64)
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, u) = split_unit(s)?;
    let secs = match u.as_str() {
        "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        other => {
            return Err(format!(
                "{s:?}: unknown duration unit {other:?} (s, ms, us)"
            ));
        }
    };
    Ok(Duration::from_secs_f64(secs))
}
