//! `cargo xtask bench-peer`: QEMU 10.0 and livemig migrate the same guest memory over loopback
//! TCP on this machine, in one run; a Markdown table, a JSON file and an SVG chart compare them.
//!
//! ```text
//!  image file (sparse; chosen 2 MiB runs pseudo-random, the rest holes)
//!     │ mapped shared by                       │
//!  livemig vm migrate --mem-file   QEMU -object memory-backend-file,share=on -S
//!     │ TCP 127.0.0.1                          │ TCP 127.0.0.1 (1 channel | multifd N)
//!  livemig vm incoming (fresh RAM)   QEMU -incoming defer (fresh RAM)
//! ```
//!
//! Cases:
//! * **paused** (per `--sizes`): the VM does not run. QEMU's source starts with `-S`; livemig's
//!   test VM boots idle (`--idle`: the guest's own boot writes its image, page tables and
//!   per-vCPU state into the first MiBs of the image, then nothing) and is paused before the
//!   migration (`--paused`, as QEMU's `-S`), so no vCPU spins on a core the migration needs.
//! * **running** (per `--running`): the test guest (the same multiboot image under both) on two
//!   vCPUs, the second started by the first with INIT-SIPI-SIPI under both VMMs, each writing
//!   its own working set at a rate that is a share of this run's lower-bound bandwidth (25, 90
//!   and 150% by default): livemig `--rate R` pages/s, QEMU `period=` TSC ticks computed by
//!   `livemig vm image --print-append` from the host's KVM TSC frequency. Auto-converge on
//!   both with QEMU's defaults (20%, +10%, at most 99%, when the guest dirtied more than half
//!   of what was sent twice in a row: livemig's rule is the same). Downtime is vCPU stop
//!   on the source to run on the destination: QMP `STOP` (source) to `RESUME` (destination)
//!   event timestamps for QEMU; for livemig the source's stop with every vCPU parked
//!   (`vcpus_paused_at_ns`) to the destination's first vCPU entry (`first_vcpu_entry_ns`), all
//!   CLOCK_REALTIME on this one machine (the engine's own `downtime_us` is kept in the JSON).
//! * **lower bound** (per paused case and repetition, [`crate::floor`]): the fastest copy of
//!   the image's data between two processes over as many loopback connections as carry pages
//!   (livemig's `--channels`), pipelined, into fresh anonymous memory; four variants
//!   (`sendfile` or `write` from a mapping, receiver memory with or without THP), the fastest
//!   is the bound. Each side's total is reported as a ratio to it.
//! * **every byte**: after each run the destination's guest RAM is digested per 2 MiB
//!   (CRC-64/NVME; livemig: `--ram-digest`, QEMU: `/proc/PID/mem` at the host addresses
//!   `gpa2hva` gives). Paused cases compare it with the source's RAM, the image file both
//!   sources map. Running cases: the guest checks every page of its working sets against its
//!   log on the destination (QEMU's guest takes the command from its mailbox word in RAM,
//!   written through `/proc/PID/mem`, and answers on its console), and the RAM beyond the
//!   working sets, which the guest never writes, must equal the stopped source's digest. A
//!   difference fails the benchmark at the end, naming every run. The lower bound's copies
//!   are checked the same way. `--x-corrupt-destination` damages every QEMU destination
//!   before its checks (the CI control: each must fail).
//! * **one host**: after each QEMU run the source must be `postmigrate` and the destination
//!   running (a running case) or not (a paused case); livemig's source exits on handover.
//!   `--x-resume-source` resumes every QEMU source of a running case (`cont`) before that
//!   check (CI's control run sets it with `--x-corrupt-destination`: each must fail).
//! * **memory copy**: one thread's `memcpy` bandwidth into touched and into fresh memory.
//!
//! The image: the first 32 MiB stay zero (the test guest's code, tables, logs and working set,
//! which livemig's destination has the guest verify), and of the rest whole 2 MiB runs chosen
//! by a seeded pseudo-random permutation are filled with pseudo-random bytes until `--nonzero`
//! percent of the image is non-zero (rounded to whole runs); the rest are holes.
//!
//! Every child runs in its own process group and is killed (SIGKILL to the group) when its
//! guard drops, on every path; image files are removed unless `--keep`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::floor;
use crate::rig::target_dir;

const QEMU: &str = "qemu-system-x86_64";
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The unit of the image's non-zero runs (and of sizes).
const RUN: u64 = 2 * MIB;
/// The image's first bytes stay zero: the test guest's own memory.
const GUEST_AREA: u64 = 32 * MIB;
/// Where the test guest's working sets begin (`crates/kvm/guest/guest.c`, WS_BASE); below
/// are its image, logs and state, all of which it writes.
const GUEST_WS_BASE: u64 = 16 * MIB;
/// The test guest's command mailbox: one u32 per vCPU (guest.c, MAILBOX).
const GUEST_MAILBOX: u64 = 0x6000;
/// Where each vCPU of the test guest publishes its step count, a u64 (guest.c, STEPS).
const GUEST_STEPS: u64 = GUEST_MAILBOX + 0x100;
/// QEMU's `max-bandwidth`: far above loopback (its default, 128 MiB/s, would be the limit).
const QEMU_MAX_BANDWIDTH: u64 = 100_000_000_000;
/// How often QEMU's `query-migrate` is polled for the timeline.
const POLL: Duration = Duration::from_millis(10);

/// How much of a paused case's image holds data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Every page outside the test guest's own first 32 MiB non-zero.
    Dense,
    /// That percentage of the image non-zero, in whole 2 MiB runs (the rest holes).
    Percent(u32),
}

impl Fill {
    fn words(self) -> String {
        match self {
            Fill::Dense => "dense: every page after the guest's 32 MiB non-zero".into(),
            Fill::Percent(p) => format!("{p}% non-zero"),
        }
    }
}

/// Parses one paused case, `SIZE:dense` or `SIZE:PCT%`.
fn parse_paused(s: &str) -> Result<(u64, Fill)> {
    let (size, fill) = s.split_once(':').with_context(|| {
        format!("paused case {s:?}: expected SIZE:dense or SIZE:PCT% (e.g. 4GiB:25%)")
    })?;
    let fill = match fill {
        "dense" => Fill::Dense,
        p => Fill::Percent(
            p.strip_suffix('%')
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("paused case {s:?}: {p:?} is neither `dense` nor a whole percentage like 25%"))?,
        ),
    };
    Ok((parse_size(size)?, fill))
}

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// The paused cases: image size in bytes and how much of it holds data.
    pub paused: Vec<(u64, Fill)>,
    /// QEMU multifd channels (and livemig's, if its CLI has `--channels`).
    pub channels: u32,
    /// Repetitions (medians are reported).
    pub reps: u32,
    /// Small and quick: a 64 MiB image, one repetition, a small running case.
    pub smoke: bool,
    /// Where the results go.
    pub out: PathBuf,
    /// Keep the image files.
    pub keep: bool,
    /// Downtime limit for both (livemig `--downtime`, QEMU `downtime-limit`), ms.
    pub downtime_ms: u64,
    /// Guest RAM of the running cases.
    pub running_mem: u64,
    /// vCPUs of the running cases (each writes its own working set; vCPU 0 starts the others
    /// with INIT-SIPI-SIPI under both VMMs).
    pub running_vcpus: u32,
    /// Working-set pages of each vCPU in the running cases.
    pub running_pages: u32,
    /// The running cases: the guest's write rate as a percentage of this run's lower-bound
    /// bandwidth (bytes/s of the fastest copy in the paused cases).
    pub running: Vec<u32>,
    /// A running case on a link both VMMs pace to this many bytes/s, the guest writing as fast
    /// as it can (`None`: no such case).
    pub capped_link: Option<u64>,
    /// Throttle levels (percent) at which both VMMs' throttles are measured: the guest's write
    /// rate held there, against its rate unthrottled.
    pub throttle: Vec<u8>,
    /// Negative control of the byte checks: every QEMU destination's RAM is damaged (through
    /// /proc/PID/mem) before it is checked: a paused case's first data run, a running case's
    /// vCPU 0 log (the guest's own check) and a page no guest writes (the digest); every such
    /// run must fail, and the benchmark fails naming each.
    pub x_corrupt_destination: bool,
    /// Negative control of the one-host check: every QEMU source of a running case is resumed
    /// (`cont`) after its migration completed, so the guest runs on both sides; every such run
    /// must fail.
    pub x_resume_source: bool,
    /// Use the static release `livemig` the rig builds (CI, after the rig step) instead of
    /// `cargo build --release -p livemig-cli`.
    pub rig_binary: bool,
}

impl Options {
    fn defaults() -> Options {
        Options {
            paused: vec![
                (4 * GIB, Fill::Dense),
                (8 * GIB, Fill::Dense),
                (4 * GIB, Fill::Percent(25)),
                (16 * GIB, Fill::Percent(25)),
            ],
            channels: 2,
            reps: 3,
            smoke: false,
            out: target_dir().join("bench-peer"),
            keep: false,
            downtime_ms: 300,
            running_mem: GIB,
            running_vcpus: 2,
            running_pages: 65536,
            running: vec![25, 90, 150],
            throttle: vec![20, 50, 80],
            capped_link: Some(100_000_000),
            rig_binary: false,
            x_corrupt_destination: false,
            x_resume_source: false,
        }
    }
}

/// Parses a size: a number with B, KiB/K, MiB/M, GiB/G or TiB/T.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let at = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(at);
    let n: u64 = n
        .parse()
        .with_context(|| format!("size {s:?}: expected a whole number and a unit (e.g. 4GiB)"))?;
    let m = match unit {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => MIB,
        "G" | "GiB" => GIB,
        "T" | "TiB" => 1 << 40,
        u => bail!("size {s:?}: unknown unit {u:?} (B, KiB, MiB, GiB, TiB)"),
    };
    n.checked_mul(m)
        .with_context(|| format!("size {s:?} overflows"))
}

fn size_name(b: u64) -> String {
    if b.is_multiple_of(GIB) {
        format!("{} GiB", b / GIB)
    } else {
        format!("{} MiB", b / MIB)
    }
}

/// A comma-separated list of percentages (`90` or `90%`), or `none` for an empty list; an
/// entry that does not parse or fails `ok` is refused with `bad(entry)`.
fn percent_list<T: std::str::FromStr>(
    v: &str,
    ok: impl Fn(&T) -> bool,
    bad: impl Fn(&str) -> String,
) -> Result<Vec<T>> {
    if v == "none" {
        return Ok(Vec::new());
    }
    v.split(',')
        .map(|p| {
            p.trim_end_matches('%')
                .parse()
                .ok()
                .filter(|n| ok(n))
                .with_context(|| bad(p))
        })
        .collect()
}

/// Parses `cargo xtask bench-peer` options; every bad value is refused, named, before
/// anything starts.
pub fn parse_options(args: &[String]) -> Result<Options> {
    let mut o = Options::defaults();
    let mut paused_given = false;
    let mut reps_given = false;
    let mut running_given = false;
    let mut throttle_given = false;
    let mut it = args.iter();
    let value = |it: &mut std::slice::Iter<'_, String>, flag: &str| -> Result<String> {
        it.next()
            .cloned()
            .with_context(|| format!("{flag} needs a value"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--paused" => {
                let v = value(&mut it, a)?;
                o.paused = v
                    .split(',')
                    .map(|s| parse_paused(s).with_context(|| format!("--paused {v:?}")))
                    .collect::<Result<_>>()?;
                paused_given = true;
            }
            "--channels" => {
                let v = value(&mut it, a)?;
                o.channels = v
                    .parse()
                    .with_context(|| format!("--channels {v:?} is not a whole number"))?;
            }
            "--reps" => {
                let v = value(&mut it, a)?;
                o.reps = v
                    .parse()
                    .with_context(|| format!("--reps {v:?} is not a whole number"))?;
                reps_given = true;
            }
            "--downtime" => {
                let v = value(&mut it, a)?;
                o.downtime_ms = v
                    .trim_end_matches("ms")
                    .parse()
                    .with_context(|| format!("--downtime {v:?} is not a whole number of ms"))?;
            }
            "--running" => {
                let v = value(&mut it, a)?;
                o.running = percent_list(
                    &v,
                    |_| true,
                    |p| {
                        format!(
                            "--running {v:?}: {p:?} is not a whole percentage of the lower-bound \
                         bandwidth like 90%"
                        )
                    },
                )?;
                running_given = true;
            }
            "--throttle" => {
                let v = value(&mut it, a)?;
                o.throttle = percent_list(
                    &v,
                    |n| (1..=99).contains(n),
                    |p| format!("--throttle {v:?}: {p:?} is not a percentage from 1 to 99"),
                )?;
                throttle_given = true;
            }
            "--capped-link" => {
                let v = value(&mut it, a)?;
                o.capped_link = if v == "none" {
                    None
                } else {
                    Some(
                        v.parse()
                            .ok()
                            .filter(|&b: &u64| b >= 1_000_000)
                            .with_context(|| {
                                format!("--capped-link {v:?}: bytes/s, at least 1000000, or none")
                            })?,
                    )
                };
            }
            "--out" => o.out = value(&mut it, a)?.into(),
            "--smoke" => o.smoke = true,
            "--keep" => o.keep = true,
            "--rig-binary" => o.rig_binary = true,
            "--x-corrupt-destination" => o.x_corrupt_destination = true,
            "--x-resume-source" => o.x_resume_source = true,
            other => bail!("bench-peer: unknown option {other:?}\n\n{}", crate::USAGE),
        }
    }
    if o.smoke {
        if !paused_given {
            o.paused = vec![(64 * MIB, Fill::Percent(25)), (64 * MIB, Fill::Dense)];
        }
        if !reps_given {
            o.reps = 1;
        }
        o.running_mem = 64 * MIB;
        o.running_pages = 4096;
        if !running_given {
            o.running = vec![25];
        }
        if !throttle_given {
            o.throttle = vec![50];
        }
    }
    o.check()?;
    Ok(o)
}

impl Options {
    fn check(&self) -> Result<()> {
        ensure!(
            self.channels >= 1,
            "--channels {}: at least 1",
            self.channels
        );
        ensure!(
            self.channels <= 64,
            "--channels {}: at most 64",
            self.channels
        );
        ensure!(self.reps >= 1, "--reps {}: at least 1", self.reps);
        ensure!(
            self.downtime_ms >= 1,
            "--downtime {}: at least 1 ms",
            self.downtime_ms
        );
        ensure!(
            !self.paused.is_empty(),
            "--paused: at least one case (the running cases' rates come from its lower bound)"
        );
        for &p in &self.running {
            ensure!(
                (1..=1000).contains(&p),
                "--running {p}%: between 1% and 1000% of the lower-bound bandwidth"
            );
        }
        let ws =
            GUEST_WS_BASE + u64::from(self.running_vcpus) * u64::from(self.running_pages) * 4096;
        ensure!(
            ws <= self.running_mem,
            "the running cases' working sets end at {} MiB, beyond their {} of RAM",
            ws / MIB,
            size_name(self.running_mem)
        );
        for &(s, fill) in &self.paused {
            ensure!(
                s >= 64 * MIB,
                "size {s} bytes ({}) is below 64 MiB",
                size_name(s)
            );
            ensure!(
                s % RUN == 0,
                "size {s} bytes is not a multiple of 2 MiB (the image's run size)"
            );
            ensure!(s <= GIB << 10, "size {} is above 1 TiB", size_name(s));
            if let Fill::Percent(p) = fill {
                let want = runs_wanted(s, fill);
                let have = (s - GUEST_AREA) / RUN;
                ensure!(
                    want <= have,
                    "{}:{p}%: at most {}% of a {} image can be non-zero (its first 32 MiB are \
                     the test guest's; `dense` fills all the rest)",
                    size_name(s).replace(' ', ""),
                    have * RUN * 100 / s,
                    size_name(s)
                );
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The image.

/// splitmix64: a small, fast, seeded generator (the data only has to be non-zero and not
/// compressible or deduplicated by either side).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Fills `buf` (a multiple of 4096 bytes); every page's first word has bit 0 set, so no
    /// page is zero by chance.
    fn fill(&mut self, buf: &mut [u8]) {
        for (i, w) in buf.chunks_exact_mut(8).enumerate() {
            let mut v = self.next();
            if i % 512 == 0 {
                v |= 1;
            }
            w.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// Runs of 2 MiB that `fill` of `size` needs (a percentage rounded to the nearest run;
/// dense: every run after the guest's area).
fn runs_wanted(size: u64, fill: Fill) -> u64 {
    match fill {
        Fill::Dense => (size - GUEST_AREA.min(size)) / RUN,
        Fill::Percent(p) => (size / RUN * u64::from(p) + 50) / 100,
    }
}

/// The indices of the 2 MiB runs that hold data: a seeded partial Fisher-Yates shuffle of
/// the runs after the guest's area, the first `runs_wanted` of it, sorted.
pub fn image_runs(size: u64, fill: Fill, seed: u64) -> Vec<u64> {
    let first = GUEST_AREA / RUN;
    let mut idx: Vec<u64> = (first..size / RUN).collect();
    let k = (runs_wanted(size, fill) as usize).min(idx.len());
    let mut rng = Rng(seed);
    for i in 0..k {
        let j = i + rng.below((idx.len() - i) as u64) as usize;
        idx.swap(i, j);
    }
    let mut chosen = idx[..k].to_vec();
    chosen.sort_unstable();
    chosen
}

/// What was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub path: PathBuf,
    pub size: u64,
    /// How it was filled, and the seed (`image_runs` gives its data runs again).
    pub fill: Fill,
    pub seed: u64,
    /// Bytes in non-zero pages.
    pub nonzero_bytes: u64,
    pub runs: u64,
}

/// Writes the sparse image: `size` bytes, the chosen runs pseudo-random, the rest holes;
/// synced, so no writeback runs during the measurements.
pub fn make_image(path: &Path, size: u64, fill: Fill, seed: u64) -> Result<Image> {
    let _ = std::fs::remove_file(path);
    let f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)
        .with_context(|| format!("sizing {}", path.display()))?;
    let runs = image_runs(size, fill, seed);
    let mut rng = Rng(seed ^ 0x5eed_da7a);
    let mut buf = vec![0u8; RUN as usize];
    for &r in &runs {
        rng.fill(&mut buf);
        f.write_all_at(&buf, r * RUN)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(Image {
        path: path.to_path_buf(),
        size,
        fill,
        seed,
        nonzero_bytes: runs.len() as u64 * RUN,
        runs: runs.len() as u64,
    })
}

/// Removes the image files when dropped (unless kept).
struct ImageFiles {
    paths: Vec<PathBuf>,
    keep: bool,
}

impl Drop for ImageFiles {
    fn drop(&mut self) {
        if !self.keep {
            for p in &self.paths {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// QEMU q35's RAM split (hw/i386/pc_q35.c, with gigabyte alignment, the default of current
/// machine types): RAM of 0xb0000000 bytes or more puts 2 GiB below 4 GiB and the rest above;
/// less stays below. Returns (below 4 GiB, above 4 GiB); in the backing file the part above
/// follows the part below, as livemig's `--ram`/`--high-ram` regions do.
pub fn q35_split(size: u64) -> (u64, u64) {
    if size >= 0xb000_0000 {
        (2 * GIB, size - 2 * GIB)
    } else {
        (size, 0)
    }
}

/// Reads QEMU's `info mtree` for the `ram-below-4g` and `ram-above-4g` aliases into the
/// backend `@ram`: (below-4g size, above-4g size, above-4g offset in the backend).
pub fn mtree_split(mtree: &str) -> Result<(u64, u64, u64)> {
    let alias = |name: &str| -> Result<Option<(u64, u64)>> {
        let Some(line) = mtree
            .lines()
            .find(|l| l.contains(&format!("alias {name} @ram ")))
        else {
            return Ok(None);
        };
        let range = line
            .rsplit(' ')
            .next()
            .with_context(|| format!("mtree line {line:?}"))?;
        let (a, b) = range
            .split_once('-')
            .with_context(|| format!("mtree range {range:?} in {line:?}"))?;
        let a = u64::from_str_radix(a, 16).with_context(|| format!("mtree start {a:?}"))?;
        let b = u64::from_str_radix(b, 16).with_context(|| format!("mtree end {b:?}"))?;
        ensure!(b >= a, "mtree range {range:?} ends before it starts");
        Ok(Some((a, b - a + 1)))
    };
    let (lo_off, lo) = alias("ram-below-4g")?.context("QEMU's memory tree has no ram-below-4g")?;
    ensure!(
        lo_off == 0,
        "ram-below-4g starts at backend offset {lo_off:#x}, not 0"
    );
    let (hi_off, hi) = alias("ram-above-4g")?.unwrap_or((lo, 0));
    Ok((lo, hi, hi_off))
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// A child in its own process group, SIGKILLed (the group) and reaped when dropped unless it
/// was reaped already.
struct Proc {
    name: String,
    child: Child,
    reaped: bool,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
        let child = cmd
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Proc {
            name: name.into(),
            child,
            reaped: false,
        })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits up to `timeout` for the exit; returns the status and the CPU time (user +
    /// system, all threads) the process used in its life, microseconds.
    fn wait(&mut self, timeout: Duration) -> Result<(i32, u64)> {
        let end = Instant::now() + timeout;
        loop {
            let mut status = 0;
            // SAFETY: a zeroed rusage is a valid out-parameter.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: wait4 on our own child's pid with valid out-pointers.
            let r = unsafe { libc::wait4(self.pid(), &mut status, libc::WNOHANG, &mut ru) };
            if r == self.pid() {
                self.reaped = true;
                let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                };
                return Ok((code, us(ru.ru_utime) + us(ru.ru_stime)));
            }
            if r < 0 {
                bail!(
                    "waiting for {}: {}",
                    self.name,
                    std::io::Error::last_os_error()
                );
            }
            if Instant::now() >= end {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.reaped {
            // SAFETY: killpg on the group this child leads (process_group(0)); it is not
            // reaped, so the pid is still ours.
            unsafe { libc::killpg(self.pid(), libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// Utime and stime (clock ticks) from the text of `/proc/PID/stat` (proc(5): fields 14 and
/// 15; the command name, field 2, is in parentheses and may hold spaces and parentheses).
pub fn parse_stat_ticks(stat: &str) -> Result<(u64, u64)> {
    let close = stat
        .rfind(')')
        .with_context(|| format!("/proc stat {stat:?} has no command name"))?;
    let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After the name: field 3 (state) is f[0], so field n is f[n - 3].
    let field = |n: usize| -> Result<u64> {
        let v = f
            .get(n - 3)
            .with_context(|| format!("/proc stat {stat:?} has no field {n}"))?;
        v.parse()
            .with_context(|| format!("/proc stat field {n} {v:?} is not a number"))
    };
    Ok((field(14)?, field(15)?))
}

/// CPU time (user + system, all threads) process `pid` has used, microseconds.
fn proc_cpu_us(pid: i32) -> Result<u64> {
    let p = format!("/proc/{pid}/stat");
    let t = std::fs::read_to_string(&p).with_context(|| format!("reading {p}"))?;
    let (u, s) = parse_stat_ticks(&t)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok((u + s) * 1_000_000 / hz)
}

// ---------------------------------------------------------------------------------------------
// QMP.

/// An asynchronous event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    /// Host clock (CLOCK_REALTIME) when QEMU emitted it, microseconds since the epoch.
    pub timestamp_us: i64,
    pub data: Value,
}

/// One QMP message.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    Greeting {
        version: String,
    },
    Return {
        id: Option<Value>,
        value: Value,
    },
    Error {
        id: Option<Value>,
        class: String,
        desc: String,
    },
    Event(QmpEvent),
}

/// Parses one line QEMU's QMP server sent.
pub fn parse_qmp(line: &str) -> Result<QmpMessage> {
    let v: Value = serde_json::from_str(line)
        .with_context(|| format!("QMP sent {line:?}, which is not JSON"))?;
    let id = v.get("id").cloned();
    if let Some(g) = v.get("QMP") {
        let q = &g["version"]["qemu"];
        return Ok(QmpMessage::Greeting {
            version: format!("{}.{}.{}", q["major"], q["minor"], q["micro"]),
        });
    }
    if let Some(r) = v.get("return") {
        return Ok(QmpMessage::Return {
            id,
            value: r.clone(),
        });
    }
    if let Some(e) = v.get("error") {
        return Ok(QmpMessage::Error {
            id,
            class: e["class"].as_str().unwrap_or("?").into(),
            desc: e["desc"].as_str().unwrap_or("?").into(),
        });
    }
    if let Some(name) = v.get("event").and_then(Value::as_str) {
        let ts = &v["timestamp"];
        let (s, us) = (ts["seconds"].as_i64(), ts["microseconds"].as_i64());
        let (Some(s), Some(us)) = (s, us) else {
            bail!("QMP event {name} without a timestamp: {line:?}");
        };
        return Ok(QmpMessage::Event(QmpEvent {
            name: name.into(),
            timestamp_us: s * 1_000_000 + us,
            data: v.get("data").cloned().unwrap_or(Value::Null),
        }));
    }
    bail!("QMP sent {line:?}: neither greeting, return, error nor event")
}

/// A QMP client: lines arrive on a channel (a reader thread over the socket, or a test's
/// script), commands go to `out`; events that arrive between replies are kept in order.
struct Qmp {
    name: String,
    lines: mpsc::Receiver<String>,
    out: Box<dyn Write + Send>,
    events: Vec<QmpEvent>,
    next_id: u64,
    timeout: Duration,
}

impl Qmp {
    fn new(name: &str, lines: mpsc::Receiver<String>, out: Box<dyn Write + Send>) -> Qmp {
        Qmp {
            name: name.into(),
            lines,
            out,
            events: Vec::new(),
            next_id: 1,
            timeout: Duration::from_secs(30),
        }
    }

    /// Connects to QEMU's QMP socket (retrying while QEMU starts), reads the greeting and
    /// leaves capability negotiation; returns the client and QEMU's version.
    fn connect(name: &str, path: &Path, qemu: &mut Proc) -> Result<(Qmp, String)> {
        let end = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if let Ok(Some(st)) = qemu.child.try_wait() {
                        qemu.reaped = true;
                        bail!("{name} exited ({st}) before its QMP socket was up");
                    }
                    if Instant::now() >= end {
                        bail!("{name}: QMP socket {}: {e}", path.display());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let reader = stream.try_clone()?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut q = Qmp::new(name, rx, Box::new(stream));
        let v = q.handshake()?;
        Ok((q, v))
    }

    fn next(&mut self, deadline: Instant) -> Result<QmpMessage> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(l) => parse_qmp(&l).with_context(|| self.name.clone()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("{}: no QMP message within the deadline", self.name)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("{}: the QMP connection closed", self.name)
            }
        }
    }

    fn handshake(&mut self) -> Result<String> {
        let d = Instant::now() + self.timeout;
        let version = match self.next(d)? {
            QmpMessage::Greeting { version } => version,
            other => bail!("{}: QMP began with {other:?}, not a greeting", self.name),
        };
        self.execute("qmp_capabilities", json!({}))?;
        Ok(version)
    }

    /// Runs a command; events arriving before its reply are kept.
    fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"execute": cmd, "arguments": args, "id": id});
        writeln!(self.out, "{msg}")
            .and_then(|_| self.out.flush())
            .with_context(|| format!("{}: sending {cmd}", self.name))?;
        let d = Instant::now() + self.timeout;
        loop {
            match self
                .next(d)
                .with_context(|| format!("waiting for the reply to {cmd}"))?
            {
                QmpMessage::Event(e) => self.events.push(e),
                QmpMessage::Return { id: rid, value } => {
                    ensure!(
                        rid == Some(json!(id)),
                        "{}: reply id {rid:?} to {cmd} (id {id})",
                        self.name
                    );
                    return Ok(value);
                }
                QmpMessage::Error {
                    class, desc, id: _, ..
                } => bail!("{}: {cmd} failed: {class}: {desc}", self.name),
                QmpMessage::Greeting { .. } => bail!("{}: a second QMP greeting", self.name),
            }
        }
    }

    /// The first event (kept or arriving before `deadline`) `pred` accepts.
    fn wait_event(
        &mut self,
        deadline: Instant,
        what: &str,
        pred: impl Fn(&QmpEvent) -> bool,
    ) -> Result<QmpEvent> {
        if let Some(e) = self.events.iter().find(|e| pred(e)) {
            return Ok(e.clone());
        }
        loop {
            match self
                .next(deadline)
                .with_context(|| format!("waiting for {what}"))?
            {
                QmpMessage::Event(e) => {
                    self.events.push(e.clone());
                    if pred(&e) {
                        return Ok(e);
                    }
                }
                other => bail!(
                    "{}: unexpected {other:?} while waiting for {what}",
                    self.name
                ),
            }
        }
    }
}

fn is_migration(e: &QmpEvent, status: &str) -> bool {
    e.name == "MIGRATION" && e.data["status"] == status
}

// ---------------------------------------------------------------------------------------------
// One measured migration.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    Livemig,
    /// QEMU without multifd: the migration thread on one connection.
    Qemu1,
    /// QEMU with the `multifd` capability on this many channels.
    QemuMultifd(u32),
}

impl Side {
    fn label(self) -> String {
        match self {
            Side::Livemig => "livemig".into(),
            Side::Qemu1 => "QEMU 1 channel".into(),
            Side::QemuMultifd(n) => format!("QEMU multifd {n}"),
        }
    }
    fn key(self) -> String {
        match self {
            Side::Livemig => "livemig".into(),
            Side::Qemu1 => "qemu_1".into(),
            Side::QemuMultifd(n) => format!("qemu_multifd_{n}"),
        }
    }
}

#[derive(Debug, Clone)]
enum Kind {
    /// The paused VM over the image.
    Paused { image: Image },
    /// The test guest running.
    Running(Run),
}

/// A running case: the test guest writing its working sets at a rate derived from this run's
/// lower bound.
#[derive(Debug, Clone)]
struct Run {
    mem: u64,
    vcpus: u32,
    /// Working-set pages per vCPU.
    pages: u32,
    /// The guest's write rate as a percentage of the lower-bound bandwidth.
    pct: u32,
    /// That bandwidth, bytes/s.
    bound_bps: u64,
    /// Pages per second per vCPU asked of the guest (`pct` of `bound_bps`, shared out; 0: as
    /// fast as it can).
    rate: u64,
    /// Both VMMs paced to this many bytes/s (QEMU `max-bandwidth`, livemig
    /// `--max-bandwidth`), the guest writing as fast as it can: auto-converge must engage.
    cap: Option<u64>,
    /// QEMU's `-append` for the same workload.
    append: String,
}

impl Run {
    /// Where the working sets end: below, every byte is the guest's own (checked by the guest);
    /// from here on the guest writes nothing (checked by digest).
    fn guest_end(&self) -> u64 {
        (GUEST_WS_BASE + u64::from(self.vcpus) * u64::from(self.pages) * 4096).next_multiple_of(RUN)
    }
}

#[derive(Debug, Clone)]
struct Case {
    name: String,
    kind: Kind,
}

impl Case {
    fn mem(&self) -> u64 {
        match &self.kind {
            Kind::Paused { image } => image.size,
            Kind::Running(r) => r.mem,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Measured {
    total_us: u64,
    downtime_us: Option<u64>,
    bytes: u64,
    src_cpu_us: u64,
    dst_cpu_us: u64,
    timeline: Vec<(u64, u64)>,
    phases: Vec<(String, u64)>,
    raw: Value,
    /// The digest of the destination's guest RAM once it held everything (paused), or after
    /// the guest's check (running) (`floor::digest_bytes` layout: every 2 MiB, low RAM then
    /// high RAM).
    dest_digest: Option<Vec<u64>>,
    /// Running cases: the digest of the source's guest RAM, stopped after the migration.
    src_digest: Option<Vec<u64>>,
    /// Running cases: the guest's own check of every working-set page on the destination
    /// (`Ok(pages)` or what it reported).
    guest_check: Option<std::result::Result<u64, String>>,
    /// Running cases: the guest's write rate (all vCPUs) just before the migration, pages/s.
    guest_rate: Option<u64>,
    /// Running cases: the dirty rate the VMM measured during pre-copy, pages/s.
    dirty_rate: Option<u64>,
    /// Running cases: the highest vCPU throttle auto-converge applied, percent.
    max_throttle: Option<u64>,
    /// The comparison with the source's RAM (filled in by `run_sides`).
    verified: Value,
    /// Where the guest ran after the migration when that was not on the destination alone
    /// (QEMU's run states; livemig's source exits once the destination has its guest).
    two_hosts: Option<String>,
}

struct Ctx<'a> {
    o: &'a Options,
    livemig: PathBuf,
    accel: &'static str,
    /// `--channels` flags livemig's CLI takes (`vm migrate`, `vm incoming`), if any.
    livemig_channels: (bool, bool),
    tmp: PathBuf,
    logs: PathBuf,
    guest_image: PathBuf,
    seq: u32,
    /// Runs whose bytes did not check out (each is named; the benchmark fails at the end).
    failures: Vec<String>,
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

fn deadline_for(mem: u64) -> Duration {
    // Generous: 60 s plus 20 s per GiB (the slowest side measured moves ~300 MB/s).
    Duration::from_secs(60 + 20 * mem.div_ceil(GIB))
}

impl Ctx<'_> {
    /// Records a failed run or check: printed now, named again when the benchmark fails after
    /// writing every result.
    fn fail(&mut self, e: String) {
        eprintln!("bench-peer: {e}");
        self.failures.push(e);
    }

    /// livemig's warm-up in a running case: one pass over the working set (its first pass
    /// writes every page; at no more than 100,000 pages/s, about a third of what a vCPU of
    /// the test guest writes at most, so that a rate it cannot reach still completes the
    /// pass; so too a rate of 0, as fast as it can), then 500 ms. QEMU's waits for every vCPU's
    /// report of its first pass instead.
    fn running_warmup(r: &Run) -> Duration {
        let rate = if r.rate == 0 {
            100_000
        } else {
            r.rate.min(100_000)
        };
        let pass_ms = u64::from(r.pages) * 1000 / rate;
        Duration::from_millis(pass_ms + 500)
    }

    fn log(&mut self, what: &str) -> Result<File> {
        self.seq += 1;
        let p = self.logs.join(format!("{:03}-{what}.log", self.seq));
        File::create(&p).with_context(|| format!("creating {}", p.display()))
    }

    fn livemig_vm_flags(&self, case: &Case) -> Vec<String> {
        match &case.kind {
            Kind::Paused { image } => {
                let (lo, hi) = q35_split(image.size);
                vec![
                    "--vcpus=1".into(),
                    "--pages=256".into(),
                    "--rate=0".into(),
                    format!("--ram={lo}"),
                    format!("--high-ram={hi}"),
                    "--idle".into(),
                ]
            }
            Kind::Running(r) => vec![
                format!("--vcpus={}", r.vcpus),
                format!("--pages={}", r.pages),
                format!("--rate={}", r.rate),
                format!("--ram={}", r.mem),
                "--high-ram=0".into(),
            ],
        }
    }

    fn run_livemig(&mut self, case: &Case) -> Result<Measured> {
        let flags = self.livemig_vm_flags(case);
        let deadline = deadline_for(case.mem());
        let mut dst_cmd = Command::new(&self.livemig);
        dst_cmd
            .args([
                "vm",
                "incoming",
                "--listen",
                "127.0.0.1:0",
                "--json",
                "--plain",
            ])
            .args(&flags)
            .stdout(Stdio::piped())
            .stderr(self.log("livemig-incoming")?);
        if self.livemig_channels.1 {
            dst_cmd.arg(format!("--channels={}", self.o.channels));
        }
        let digest_file = self.tmp.join("livemig-destination.digest");
        let src_digest_file = self.tmp.join("livemig-source.digest");
        let _ = std::fs::remove_file(&digest_file);
        let _ = std::fs::remove_file(&src_digest_file);
        dst_cmd.arg("--ram-digest").arg(&digest_file);
        let mut dst = Proc::spawn("livemig vm incoming", &mut dst_cmd)?;
        let mut out = BufReader::new(dst.child.stdout.take().context("stdout")?);
        let mut first = String::new();
        out.read_line(&mut first)?;
        let addr = first
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("livemig vm incoming said {first:?}"))?
            .to_string();
        let dst_out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let mut src_cmd = Command::new(&self.livemig);
        src_cmd
            .args(["vm", "migrate", "--to", &addr, "--json", "--plain"])
            .args(&flags)
            .arg(format!("--downtime={}ms", self.o.downtime_ms))
            .stdout(Stdio::piped())
            .stderr(self.log("livemig-migrate")?);
        if self.livemig_channels.0 {
            src_cmd.arg(format!("--channels={}", self.o.channels));
        }
        match &case.kind {
            Kind::Paused { image } => {
                src_cmd
                    .arg("--mem-file")
                    .arg(&image.path)
                    .args(["--paused", "--warmup=0s"]);
            }
            Kind::Running(r) => {
                // As under QEMU: one whole pass over the working set, then 500 ms; the same
                // auto-converge (QEMU's defaults: 20%, +10%, at most 99%, when the guest dirties
                // more than half of what a round sent twice).
                src_cmd
                    .arg(format!(
                        "--warmup={}ms",
                        Self::running_warmup(r).as_millis()
                    ))
                    .arg("--auto-converge")
                    .arg("--ram-digest")
                    .arg(&src_digest_file);
                if let Some(cap) = r.cap {
                    src_cmd.arg(format!("--max-bandwidth={cap}"));
                }
            }
        }
        let mut src = Proc::spawn("livemig vm migrate", &mut src_cmd)?;
        let mut sout = src.child.stdout.take().context("stdout")?;
        let src_out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = sout.read_to_string(&mut s);
            s
        });
        let (src_code, src_life_cpu) = src.wait(deadline)?;
        let (dst_code, dst_life_cpu) = dst.wait(Duration::from_secs(120))?;
        let (so, dout) = (
            src_out.join().unwrap_or_default(),
            dst_out.join().unwrap_or_default(),
        );
        ensure!(
            src_code == 0 && dst_code == 0,
            "livemig failed: source exit {src_code}, destination exit {dst_code} (logs in {})",
            self.logs.display()
        );
        let s: Value = serde_json::from_str(&so)
            .with_context(|| format!("livemig vm migrate printed {so:?}"))?;
        let d: Value = serde_json::from_str(&dout)
            .with_context(|| format!("livemig vm incoming printed {dout:?}"))?;
        ensure!(
            d["verification"]["ok"] == json!(true),
            "the guest's verification failed on livemig's destination: {}",
            d["verification"]
        );
        let r = &s["report"];
        let num = |v: &Value, what: &str| -> Result<u64> {
            v.as_u64()
                .with_context(|| format!("livemig's JSON lacks {what} (got {v})"))
        };
        let timeline: Vec<(u64, u64)> = r["timeline"]
            .as_array()
            .context("livemig's report has no timeline")?
            .iter()
            .map(|p| (p[0].as_u64().unwrap_or(0), p[1].as_u64().unwrap_or(0)))
            .collect();
        let (total_us, bytes) = (num(&r["total_us"], "total_us")?, num(&r["bytes"], "bytes")?);
        let mut timeline = timeline;
        // The line ends where the migration ended (the last sample is the last byte sent).
        if timeline.last().map(|p| p.0) < Some(total_us) {
            timeline.push((total_us, bytes));
        }
        let ph = &r["downtime_phases"];
        let phases = [
            ("stop + final harvest", "stop_and_harvest_us"),
            ("device save", "device_save_us"),
            ("send", "send_us"),
            ("in flight", "in_flight_us"),
            ("destination load", "destination_load_us"),
            ("destination run", "destination_run_us"),
        ]
        .iter()
        .map(|(n, k)| Ok(((*n).to_string(), num(&ph[*k], k)?)))
        .collect::<Result<Vec<_>>>()?;
        let running = matches!(case.kind, Kind::Running { .. });
        // Downtime on one clock across the two processes, as for QEMU: the source's vCPUs
        // all parked (the engine's stop) to the destination's first vCPU entry after its
        // start, both CLOCK_REALTIME.
        let downtime_us = if running {
            let paused = num(&s["vcpus_paused_at_ns"], "vcpus_paused_at_ns")?;
            let entered = num(&d["first_vcpu_entry_ns"], "first_vcpu_entry_ns")?;
            ensure!(
                entered > paused,
                "livemig's destination entered a vCPU at {entered} ns, before the source's \
                 vCPUs were all parked at {paused} ns"
            );
            Some((entered - paused) / 1000)
        } else {
            None
        };
        Ok(Measured {
            total_us,
            downtime_us,
            bytes,
            src_cpu_us: num(&s["cpu_us"], "cpu_us")?,
            dst_cpu_us: num(&d["cpu_us"], "cpu_us")?,
            timeline,
            phases: if running { phases } else { Vec::new() },
            raw: json!({
                "source": s,
                "destination": {"received": d["received"], "cpu_us": d["cpu_us"],
                                "verification": d["verification"],
                                "first_vcpu_entry_ns": d["first_vcpu_entry_ns"]},
                "engine_downtime_us": r["downtime_us"],
                "source_process_cpu_us": src_life_cpu,
                "destination_process_cpu_us": dst_life_cpu,
            }),
            dest_digest: Some(
                floor::read_digest(&digest_file).context("livemig's destination --ram-digest")?,
            ),
            src_digest: if running {
                Some(
                    floor::read_digest(&src_digest_file)
                        .context("livemig's source --ram-digest")?,
                )
            } else {
                None
            },
            guest_rate: running.then(|| s["write_rate_before"].as_u64().unwrap_or(0)),
            // `vm incoming` exits non-zero when the guest's check fails (checked above).
            guest_check: running.then(|| Ok(d["verification"]["pages"].as_u64().unwrap_or(0))),
            dirty_rate: running.then(|| r["dirty_rate"].as_u64().unwrap_or(0)),
            max_throttle: running.then(|| {
                r["rounds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x["throttle_percent"].as_u64())
                    .max()
                    .unwrap_or(0)
            }),
            verified: Value::Null,
            two_hosts: None,
        })
    }

    /// livemig's throttle (item 6 of the benchmark): the test guest, one vCPU writing as
    /// fast as it can, held at `pct` for `window` (`vm run --throttle`); its write rate.
    fn livemig_throttled_rate(&mut self, pct: u8, window: Duration) -> Result<u64> {
        let out = Command::new(&self.livemig)
            .args([
                "vm",
                "run",
                "--json",
                "--vcpus=1",
                "--rate=0",
                "--pages=8192",
            ])
            .args(["--ram=256MiB", "--high-ram=0"])
            .arg(format!("--throttle={pct}"))
            .arg(format!(
                "--time={}ms",
                (window + Duration::from_millis(500)).as_millis()
            ))
            .stderr(self.log("livemig-throttle")?)
            .output()
            .context("running livemig vm run --throttle")?;
        ensure!(
            out.status.success(),
            "livemig vm run --throttle {pct} failed ({}; logs in {})",
            out.status,
            self.logs.display()
        );
        let v: Value = serde_json::from_slice(&out.stdout).context("livemig vm run's JSON")?;
        ensure!(
            v["verification"]["ok"] == json!(true),
            "the guest's check failed after livemig vm run --throttle {pct}: {}",
            v["verification"]
        );
        v["pages_per_s"][0]
            .as_u64()
            .with_context(|| format!("livemig vm run's JSON has no pages_per_s: {v}"))
    }

    /// QEMU's throttle: the same guest under QEMU, first unthrottled, then with auto-converge
    /// held at `pct` (initial = maximum = `pct`) by a migration that cannot converge
    /// (`exec:cat >/dev/null` at 16 MB/s with a 1 ms downtime limit), its write rate read from
    /// the step count it publishes in RAM while QEMU reports the throttle at `pct`; the
    /// migration is then cancelled. (unthrottled, throttled) pages/s.
    fn qemu_throttled_rate(
        &mut self,
        pct: u8,
        window: Duration,
        append: &str,
    ) -> Result<(u64, u64)> {
        let run = Run {
            mem: 256 * MIB,
            vcpus: 1,
            pages: 8192,
            pct: 0,
            bound_bps: 0,
            rate: 0,
            cap: None,
            append: append.to_string(),
        };
        let case = Case {
            name: format!("throttle {pct}%"),
            kind: Kind::Running(run.clone()),
        };
        let qmp = self.tmp.join("throttle.qmp");
        let _ = std::fs::remove_file(&qmp);
        let mut qemu = Proc::spawn(
            "QEMU (throttle)",
            &mut self.qemu_cmd(&case, "source", &qmp)?,
        )?;
        let (mut q, _) = Qmp::connect("QEMU (throttle)", &qmp, &mut qemu)?;
        let log = self.logs.join("guest-source.log");
        let end = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("wrote its working set once")
        {
            ensure!(
                Instant::now() < end,
                "the test guest did not start under QEMU in time ({})",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let at = |q: &mut Qmp| -> Result<u64> {
            let m = q.execute("query-migrate", json!({}))?;
            ensure!(
                m["status"] == json!("active") || m["status"] == json!("setup"),
                "QEMU's throttle run is neither setting up nor active: {m}"
            );
            Ok(m["cpu-throttle-percentage"].as_u64().unwrap_or(0))
        };
        let cancel = |q: &mut Qmp| -> Result<()> {
            q.execute("migrate_cancel", json!({}))?;
            let end = Instant::now() + Duration::from_secs(30);
            while q.execute("query-migrate", json!({}))?["status"] != json!("cancelled") {
                ensure!(
                    Instant::now() < end,
                    "QEMU's migration did not cancel within 30 s"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        };
        q.execute(
            "migrate-set-parameters",
            json!({"cpu-throttle-initial": pct, "cpu-throttle-increment": 1,
                   "max-cpu-throttle": pct, "max-bandwidth": 16_000_000u64,
                   "downtime-limit": 1}),
        )?;
        // The unthrottled rate with the same migration running (dirty logging costs the guest
        // a fault per page written after each sync; the throttled rate pays it too).
        q.execute("migrate", json!({"uri": "exec:cat >/dev/null"}))?;
        at(&mut q)?;
        std::thread::sleep(Duration::from_secs(1));
        let a = qemu_steps(&mut q, qemu.pid())?;
        std::thread::sleep(window);
        let free = steps_rate(a, qemu_steps(&mut q, qemu.pid())?);
        ensure!(
            at(&mut q)? == 0,
            "QEMU throttled a migration without auto-converge"
        );
        cancel(&mut q)?;
        q.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "auto-converge", "state": true}]}),
        )?;
        q.execute("migrate", json!({"uri": "exec:cat >/dev/null"}))?;
        let end = Instant::now() + Duration::from_secs(60);
        while at(&mut q)? != u64::from(pct) {
            ensure!(
                Instant::now() < end,
                "QEMU's auto-converge did not reach {pct}% within 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // A moment for the throttle to take hold on the vCPU, then the window.
        std::thread::sleep(Duration::from_millis(200));
        let a = qemu_steps(&mut q, qemu.pid())?;
        std::thread::sleep(window);
        let b = qemu_steps(&mut q, qemu.pid())?;
        ensure!(
            at(&mut q)? == u64::from(pct),
            "QEMU's throttle left {pct}% during the measurement"
        );
        cancel(&mut q)?;
        let _ = q.execute("quit", json!({}));
        let _ = qemu.wait(Duration::from_secs(10));
        Ok((free, steps_rate(a, b)))
    }

    fn qemu_cmd(&self, case: &Case, role: &str, qmp: &Path) -> Result<Command> {
        let mem = case.mem();
        let mut c = Command::new(QEMU);
        c.args(["-accel", self.accel, "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-cpu", "qemu64"])
            .args(["-machine", "q35,memory-backend=ram"])
            .arg("-m")
            .arg(format!("{}M", mem / MIB))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(self.logs.join(format!("qemu-{role}.out")).pipe_file()?)
            .stderr(self.logs.join(format!("qemu-{role}.err")).pipe_file()?);
        match (&case.kind, role) {
            (Kind::Paused { image }, "source") => {
                c.arg("-object")
                    .arg(format!(
                        "memory-backend-file,id=ram,size={mem},mem-path={},share=on",
                        image.path.display()
                    ))
                    .arg("-S");
            }
            (Kind::Paused { .. }, _) => {
                c.arg("-object")
                    .arg(format!("memory-backend-ram,id=ram,size={mem}"));
            }
            (Kind::Running(r), _) => {
                c.arg("-object")
                    .arg(format!("memory-backend-ram,id=ram,size={mem}"))
                    .arg("-smp")
                    .arg(r.vcpus.to_string())
                    .arg("-kernel")
                    .arg(&self.guest_image)
                    .arg("-append")
                    .arg(&r.append)
                    .args(["-device", "isa-debugcon,iobase=0xe9,chardev=d"])
                    .arg("-chardev")
                    .arg(format!(
                        "file,id=d,path={}",
                        self.logs.join(format!("guest-{role}.log")).display()
                    ));
            }
        }
        if role == "destination" {
            c.args(["-incoming", "defer"]);
        }
        Ok(c)
    }

    /// QEMU on one channel (`multifd` None) or with multifd on that many channels.
    fn run_qemu(&mut self, case: &Case, multifd: Option<u32>) -> Result<Measured> {
        let deadline = Instant::now() + deadline_for(case.mem());
        let (sq, dq) = (self.tmp.join("src.qmp"), self.tmp.join("dst.qmp"));
        let _ = (std::fs::remove_file(&sq), std::fs::remove_file(&dq));
        let mut dst = Proc::spawn(
            "QEMU destination",
            &mut self.qemu_cmd(case, "destination", &dq)?,
        )?;
        let mut src = Proc::spawn("QEMU source", &mut self.qemu_cmd(case, "source", &sq)?)?;
        let (mut d, _) = Qmp::connect("QEMU destination", &dq, &mut dst)?;
        let (mut s, version) = Qmp::connect("QEMU source", &sq, &mut src)?;
        let mut guest_rate = None;
        if let Kind::Paused { image } = &case.kind {
            // The layout livemig was given must be QEMU's: same bytes of the same file.
            let mtree = s.execute(
                "human-monitor-command",
                json!({"command-line": "info mtree"}),
            )?;
            let (lo, hi, hi_off) = mtree_split(mtree.as_str().unwrap_or(""))?;
            ensure!(
                (lo, hi) == q35_split(image.size) && hi_off == lo,
                "QEMU maps {} as {lo:#x} below 4 GiB and {hi:#x} above (backend offset \
                 {hi_off:#x}), not as livemig was told {:x?}",
                size_name(image.size),
                q35_split(image.size)
            );
        } else if let Kind::Running(r) = &case.kind {
            // Every vCPU wrote its whole working set once (the console says so at the end of
            // each one's first pass), then the guest runs 500 ms more: the steady state
            // livemig's warm-up reaches too (a pass, then 500 ms).
            let log = self.logs.join("guest-source.log");
            let end = Instant::now() + Duration::from_secs(30) + Self::running_warmup(r);
            while std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("wrote its working set once")
                .count()
                < r.vcpus as usize
            {
                ensure!(
                    Instant::now() < end,
                    "the test guest did not write its working set under QEMU in time ({})",
                    log.display()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            // The 500 ms also measure the guest's write rate (the step counts it publishes).
            let steps = |q: &mut Qmp| -> Result<(u64, Instant)> {
                let b = qemu_read(q, src.pid(), GUEST_STEPS, 8 * r.vcpus as usize)?;
                Ok((
                    b.chunks_exact(8)
                        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                        .sum(),
                    Instant::now(),
                ))
            };
            let a = steps(&mut s)?;
            std::thread::sleep(Duration::from_millis(500));
            guest_rate = Some(steps_rate(a, steps(&mut s)?));
        }
        let running = matches!(case.kind, Kind::Running(_));
        for q in [&mut s, &mut d] {
            q.execute(
                "migrate-set-capabilities",
                json!({"capabilities": [
                    {"capability": "events", "state": true},
                    {"capability": "auto-converge", "state": running},
                    {"capability": "multifd", "state": multifd.is_some()}]}),
            )?;
            if let Some(channels) = multifd {
                q.execute(
                    "migrate-set-parameters",
                    json!({"multifd-channels": channels}),
                )?;
            }
        }
        let cap = match &case.kind {
            Kind::Running(r) => r.cap,
            Kind::Paused { .. } => None,
        };
        s.execute(
            "migrate-set-parameters",
            json!({"max-bandwidth": cap.unwrap_or(QEMU_MAX_BANDWIDTH),
                   "downtime-limit": self.o.downtime_ms}),
        )?;
        if running {
            // Auto-converge as livemig's: QEMU's defaults, set explicitly.
            s.execute(
                "migrate-set-parameters",
                json!({"cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
                       "max-cpu-throttle": 99, "throttle-trigger-threshold": 50}),
            )?;
        }
        let dst_cpu0 = proc_cpu_us(dst.pid())?;
        d.execute("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}))?;
        let info = d.execute("query-migrate", json!({}))?;
        let port = info["socket-address"][0]["port"]
            .as_str()
            .with_context(|| format!("the destination's query-migrate has no port: {info}"))?
            .to_string();
        let src_cpu0 = proc_cpu_us(src.pid())?;
        let t0 = now_us();
        let start = Instant::now();
        s.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))?;
        let mut timeline = vec![(0u64, 0u64)];
        let mut dirty_rate = Value::Null;
        let mut max_throttle = 0u64;
        let last = loop {
            let q = s.execute("query-migrate", json!({}))?;
            let status = q["status"].as_str().unwrap_or("").to_string();
            if let Some(b) = q["ram"]["transferred"].as_u64() {
                timeline.push((start.elapsed().as_micros() as u64, b));
            }
            if !q["ram"]["dirty-pages-rate"].is_null() && status == "active" {
                dirty_rate = q["ram"]["dirty-pages-rate"].clone();
            }
            if let Some(t) = q["cpu-throttle-percentage"].as_u64() {
                max_throttle = max_throttle.max(t);
            }
            match status.as_str() {
                "completed" => break q,
                "failed" | "cancelled" => bail!("QEMU's migration {status}: {q}"),
                _ => {}
            }
            ensure!(
                Instant::now() < deadline,
                "QEMU's migration did not complete in time (last: {q})"
            );
            std::thread::sleep(POLL);
        };
        let src_cpu = proc_cpu_us(src.pid())? - src_cpu0;
        let done = d.wait_event(deadline, "the destination's MIGRATION completed", |e| {
            is_migration(e, "completed") || is_migration(e, "failed")
        })?;
        ensure!(
            is_migration(&done, "completed"),
            "QEMU's destination: {:?}",
            done.data
        );
        let downtime_us = if running {
            let stop = s.wait_event(deadline, "the source's STOP", |e| e.name == "STOP")?;
            let resume =
                d.wait_event(deadline, "the destination's RESUME", |e| e.name == "RESUME")?;
            Some((resume.timestamp_us - stop.timestamp_us).max(0) as u64)
        } else {
            None
        };
        let dst_cpu = proc_cpu_us(dst.pid())? - dst_cpu0;
        let total_us = (done.timestamp_us - t0).max(0) as u64;
        let bytes = last["ram"]["transferred"]
            .as_u64()
            .with_context(|| format!("query-migrate without ram.transferred: {last}"))?;
        // The line ends where the migration ended: the poll that saw `completed` may come
        // after the destination's event.
        timeline.retain(|p| p.0 < total_us);
        timeline.push((total_us, bytes));
        let status = d.execute("query-status", json!({}))?;
        if running && self.o.x_resume_source {
            s.execute("cont", json!({}))?;
        }
        let src_status = s.execute("query-status", json!({}))?;
        // One host runs the guest: the source has handed over (`postmigrate`), the destination
        // runs a running case's guest and holds a paused case's as its source did.
        let (src_state, dst_state) = (
            src_status["status"].as_str().unwrap_or(""),
            status["status"].as_str().unwrap_or(""),
        );
        let two_hosts =
            (src_state != "postmigrate" || (dst_state == "running") != running).then(|| {
                format!(
                    "QEMU's guest after the migration: the source is {src_state:?} (postmigrate \
                     is due), the destination {dst_state:?} ({} is due)",
                    if running { "running" } else { "not running" }
                )
            });
        let (src_life, dst_life) = (proc_cpu_us(src.pid())?, proc_cpu_us(dst.pid())?);
        // The destination stays paused (its source never ran): its RAM, read through
        // /proc/PID/mem at the host addresses its monitor gives, is what it received.
        let (mut src_digest, mut guest_check) = (None, None);
        let dest_digest = match &case.kind {
            Kind::Paused { image } => {
                if self.o.x_corrupt_destination {
                    corrupt_qemu_ram(&mut d, dst.pid(), image)?;
                }
                Some(qemu_ram_digest(&mut d, dst.pid(), image.size)?)
            }
            Kind::Running(r) => {
                // The source stays stopped (`postmigrate`): its RAM is what it handed over.
                src_digest = Some(qemu_ram_digest(&mut s, src.pid(), r.mem)?);
                if self.o.x_corrupt_destination {
                    corrupt_qemu_running(&mut d, dst.pid(), r)?;
                }
                let log = self.logs.join("guest-destination.log");
                guest_check = Some(qemu_guest_check(&mut d, dst.pid(), r, &log, deadline)?);
                Some(qemu_ram_digest(&mut d, dst.pid(), r.mem)?)
            }
        };
        for q in [&mut s, &mut d] {
            let _ = q.execute("quit", json!({}));
        }
        let _ = src.wait(Duration::from_secs(10));
        let _ = dst.wait(Duration::from_secs(10));
        Ok(Measured {
            total_us,
            downtime_us,
            bytes,
            src_cpu_us: src_cpu,
            dst_cpu_us: dst_cpu,
            timeline,
            phases: downtime_us
                .map(|d| vec![("STOP to RESUME (QMP events)".to_string(), d)])
                .unwrap_or_default(),
            raw: json!({
                "qemu_version": version,
                "query_migrate": last,
                "dirty_pages_rate": dirty_rate,
                "destination_status": status,
                "source_status": src_status,
                "source_process_cpu_us": src_life,
                "destination_process_cpu_us": dst_life,
                "events_source": s.events.iter().map(|e| json!([e.name, e.timestamp_us, e.data])).collect::<Vec<_>>(),
                "events_destination": d.events.iter().map(|e| json!([e.name, e.timestamp_us, e.data])).collect::<Vec<_>>(),
            }),
            dest_digest,
            src_digest,
            guest_check,
            guest_rate,
            dirty_rate: dirty_rate.as_u64().filter(|&r| running && r > 0),
            max_throttle: running.then_some(max_throttle),
            verified: Value::Null,
            two_hosts,
        })
    }
}

/// The host address of guest physical address `gpa` in QEMU (HMP `gpa2hva`).
fn qemu_hva(q: &mut Qmp, gpa: u64) -> Result<u64> {
    let a = q.execute(
        "human-monitor-command",
        json!({"command-line": format!("gpa2hva {gpa:#x}")}),
    )?;
    parse_gpa2hva(a.as_str().unwrap_or(""))
}

/// Parses HMP `gpa2hva`'s answer: "Host virtual address for 0x0 (ram) is 0x7f...".
pub fn parse_gpa2hva(s: &str) -> Result<u64> {
    let hex = s
        .trim()
        .rsplit_once(" is 0x")
        .map(|(_, h)| h)
        .with_context(|| format!("gpa2hva said {s:?}, not \"... is 0xADDRESS\""))?;
    u64::from_str_radix(hex, 16).with_context(|| format!("gpa2hva said {s:?}"))
}

/// The control of the byte check: one byte of the image's first data run flipped in a QEMU
/// destination's RAM.
fn corrupt_qemu_ram(q: &mut Qmp, pid: i32, image: &Image) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let run = image_runs(image.size, image.fill, image.seed)
        .first()
        .copied()
        .context("the image has no data run to corrupt")?;
    let gpa = run * RUN;
    let (lo, _) = q35_split(image.size);
    let gpa = if gpa < lo { gpa } else { 4 * GIB + gpa - lo };
    let hva = qemu_hva(q, gpa)?;
    let mem = File::options()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("opening /proc/{pid}/mem for writing"))?;
    let mut b = [0u8; 1];
    mem.read_exact_at(&mut b, hva)?;
    b[0] ^= 0xff;
    mem.write_all_at(&b, hva)
        .with_context(|| format!("writing QEMU's RAM at {hva:#x}"))?;
    eprintln!("bench-peer: control: flipped the byte at GPA {gpa:#x} in QEMU's destination");
    Ok(())
}

/// The digest of a QEMU guest's RAM (`size` bytes laid out as q35 does: low RAM at GPA 0, the
/// rest at 4 GiB), read from `/proc/PID/mem`.
fn qemu_ram_digest(q: &mut Qmp, pid: i32, size: u64) -> Result<Vec<u64>> {
    let mem = File::open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("opening /proc/{pid}/mem"))?;
    let (lo, hi) = q35_split(size);
    let mut out = Vec::new();
    for (gpa, len) in [(0, lo), (4 * GIB, hi)] {
        if len == 0 {
            continue;
        }
        let hva = qemu_hva(q, gpa)?;
        out.extend(
            floor::digest_reader(&mem, hva, len)
                .with_context(|| format!("QEMU's RAM at GPA {gpa:#x} (host {hva:#x})"))?,
        );
    }
    Ok(out)
}

/// Writes `bytes` into a QEMU guest's RAM at `gpa` through `/proc/PID/mem`.
fn qemu_write(q: &mut Qmp, pid: i32, gpa: u64, bytes: &[u8]) -> Result<()> {
    let hva = qemu_hva(q, gpa)?;
    let mem = File::options()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("opening /proc/{pid}/mem for writing"))?;
    mem.write_all_at(bytes, hva)
        .with_context(|| format!("writing QEMU's RAM at GPA {gpa:#x} (host {hva:#x})"))
}

/// The control of a running case's checks: vCPU 0's log of what it wrote (8 MiB,
/// guest.c LOG_BASE) overwritten, for the guest's own check, and one byte of the first 2 MiB
/// the guest never writes, for the digest.
fn corrupt_qemu_running(q: &mut Qmp, pid: i32, r: &Run) -> Result<()> {
    let log = vec![0xa5u8; r.pages as usize * 4];
    qemu_write(q, pid, 8 * MIB, &log)?;
    if r.guest_end() < r.mem {
        qemu_write(q, pid, r.guest_end() + 4096, &[0x5a])?;
    }
    eprintln!(
        "bench-peer: control: overwrote vCPU 0's log and a byte at GPA {:#x} in QEMU's \
         destination",
        r.guest_end() + 4096
    );
    Ok(())
}

/// The guest's own check on a QEMU destination: the verify command in each vCPU's mailbox
/// word (guest.c MAILBOX), then its console's verdict per vCPU. `Ok(pages checked)`, or the
/// guest's report of what failed.
fn qemu_guest_check(
    q: &mut Qmp,
    pid: i32,
    r: &Run,
    console: &Path,
    deadline: Instant,
) -> Result<std::result::Result<u64, String>> {
    let before = std::fs::read_to_string(console).unwrap_or_default().len();
    let verify: Vec<u8> = (0..r.vcpus).flat_map(|_| 1u32.to_le_bytes()).collect();
    qemu_write(q, pid, GUEST_MAILBOX, &verify)?;
    let end = deadline.min(Instant::now() + Duration::from_secs(60));
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        let new = text.get(before..).unwrap_or("");
        let verdicts: Vec<&str> = new
            .lines()
            .filter(|l| {
                l.starts_with("livemig-guest: cpu")
                    && (l.ends_with(" verify ok") || l.ends_with(" verify FAILED"))
            })
            .collect();
        if verdicts.len() >= r.vcpus as usize {
            return Ok(if verdicts.iter().all(|l| l.contains(" verify ok")) {
                Ok(u64::from(r.vcpus) * u64::from(r.pages))
            } else {
                Err(new
                    .lines()
                    .filter(|l| l.contains("FAILED") || l.contains("does not hold"))
                    .take(4)
                    .collect::<Vec<_>>()
                    .join("; "))
            });
        }
        ensure!(
            Instant::now() < end,
            "the guest on QEMU's destination did not answer the verify command within 60 s \
             (console {}: {new:?})",
            console.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads `len` bytes of a QEMU guest's RAM at `gpa` through `/proc/PID/mem`.
fn qemu_read(q: &mut Qmp, pid: i32, gpa: u64, len: usize) -> Result<Vec<u8>> {
    let hva = qemu_hva(q, gpa)?;
    let mem = File::open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("opening /proc/{pid}/mem"))?;
    let mut b = vec![0u8; len];
    mem.read_exact_at(&mut b, hva)
        .with_context(|| format!("reading QEMU's RAM at GPA {gpa:#x} (host {hva:#x})"))?;
    Ok(b)
}

/// vCPU 0's published step count in a QEMU guest, and when it was read.
fn qemu_steps(q: &mut Qmp, pid: i32) -> Result<(u64, Instant)> {
    let b = qemu_read(q, pid, GUEST_STEPS, 8)?;
    Ok((
        u64::from_le_bytes(b.try_into().unwrap_or([0; 8])),
        Instant::now(),
    ))
}

/// Pages per second between two step readings.
fn steps_rate(a: (u64, Instant), b: (u64, Instant)) -> u64 {
    let dt = b.1.duration_since(a.1).as_secs_f64();
    if dt <= 0.0 {
        0
    } else {
        (b.0.saturating_sub(a.0) as f64 / dt) as u64
    }
}

trait PipeFile {
    fn pipe_file(&self) -> Result<File>;
}

impl PipeFile for PathBuf {
    fn pipe_file(&self) -> Result<File> {
        File::create(self).with_context(|| format!("creating {}", self.display()))
    }
}

// ---------------------------------------------------------------------------------------------
// The lower bound (`floor`).

/// The lower bound of one repetition: every variant the floor measures; the fastest is the
/// bound.
#[derive(Debug, Clone, Default)]
struct Bound {
    copies: Vec<floor::Sample>,
}

impl Bound {
    fn us(&self) -> u64 {
        self.copies.iter().map(|c| c.us).min().unwrap_or(0)
    }

    /// The fastest copy into fresh memory (what a destination starts with).
    fn fresh_us(&self) -> u64 {
        self.copies
            .iter()
            .filter(|c| c.mem != floor::Mem::Touched)
            .map(|c| c.us)
            .min()
            .unwrap_or(0)
    }
}

/// Touches `bytes` of fresh anonymous memory once and frees it: the kernel reclaims what it
/// needs for that much now, untimed, rather than inside whichever migration runs first.
fn make_room(bytes: u64) {
    let n = bytes.min(mem_available() / 2) as usize;
    let mut v = vec![0u8; n];
    for b in v.iter_mut().step_by(4096) {
        *b = 1;
    }
    std::hint::black_box(&v);
}

/// The image's digest (what every destination must hold), read from the page cache.
fn image_digest(image: &Image) -> Result<Vec<u64>> {
    let f = File::open(&image.path).with_context(|| format!("opening {}", image.path.display()))?;
    floor::digest_reader(&f, 0, image.size)
        .with_context(|| format!("digesting {}", image.path.display()))
}

/// Every variant of the floor over `channels` connections, each copy checked against `want`.
fn lower_bound(image: &Image, channels: u32, want: &[u64], tmp: &Path) -> Result<Bound> {
    let mut b = Bound::default();
    use floor::{Mem, RecvMode};
    for send in [floor::SendMode::Sendfile, floor::SendMode::Write] {
        for (recv, mem) in [
            (RecvMode::Direct, Mem::Fresh),
            (RecvMode::Direct, Mem::FreshThp),
            (RecvMode::Bounce, Mem::Fresh),
            (RecvMode::Bounce, Mem::FreshThp),
            (RecvMode::Direct, Mem::Touched),
        ] {
            b.copies.push(
                floor::measure(
                    &image.path,
                    image.size,
                    channels,
                    send,
                    recv,
                    mem,
                    want,
                    tmp,
                )
                .with_context(|| format!("the lower bound ({send:?}, {recv:?}, {mem:?})"))?,
            );
        }
    }
    Ok(b)
}

// ---------------------------------------------------------------------------------------------
// Results.

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    let n = v.len();
    if n == 0 {
        0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

#[derive(Debug, Clone, Default)]
struct Summary {
    total_us: u64,
    downtime_us: Option<u64>,
    bytes: u64,
    src_cpu_us: u64,
    dst_cpu_us: u64,
    /// The repetition whose total is the median (its timeline is drawn).
    typical: usize,
    /// The repetition whose downtime is the median (its phases are drawn).
    typical_downtime: usize,
}

fn summarize(runs: &[Measured]) -> Summary {
    let m = |f: &dyn Fn(&Measured) -> u64| median(runs.iter().map(f).collect());
    let total = m(&|r| r.total_us);
    let typical = runs
        .iter()
        .enumerate()
        .min_by_key(|(_, r)| r.total_us.abs_diff(total))
        .map_or(0, |(i, _)| i);
    let downtime = runs
        .iter()
        .all(|r| r.downtime_us.is_some())
        .then(|| m(&|r| r.downtime_us.unwrap_or(0)));
    let typical_downtime = runs
        .iter()
        .enumerate()
        .min_by_key(|(_, r)| r.downtime_us.unwrap_or(0).abs_diff(downtime.unwrap_or(0)))
        .map_or(0, |(i, _)| i);
    Summary {
        total_us: total,
        downtime_us: downtime,
        typical_downtime,
        bytes: m(&|r| r.bytes),
        src_cpu_us: m(&|r| r.src_cpu_us),
        dst_cpu_us: m(&|r| r.dst_cpu_us),
        typical,
    }
}

fn ratio(a: u64, b: u64) -> String {
    if b == 0 {
        "–".into()
    } else {
        format!("{:.2}×", a as f64 / b as f64)
    }
}

struct CaseResult {
    case: Case,
    runs: BTreeMap<Side, Vec<Measured>>,
    /// Paused cases: the lower bound of every repetition.
    bound: Option<Vec<Bound>>,
    /// Connections that carry pages (the lower bound's count).
    channels: u32,
    /// A repetition failed (see `Ctx::failures`); the case has fewer runs.
    failed: bool,
}

/// The Markdown table of one case.
fn case_table(c: &CaseResult) -> String {
    let mut t = String::new();
    let running = matches!(c.case.kind, Kind::Running { .. });
    t += &format!("### {}\n\n", c.case.name);
    // Running cases add the VMM's own dirty-rate figure and the highest throttle applied.
    let extra = if running {
        " guest writes before (pages/s) | dirty rate (pages/s, the VMM's) | highest throttle (%) |"
    } else {
        ""
    };
    t += &format!(
        "| side | total (s) | downtime (ms) | bytes on the wire (MiB) | source CPU (s) | \
         destination CPU (s) | CPU s per GiB sent |{extra}\n"
    );
    t += &format!(
        "|---|---:|---:|---:|---:|---:|---:|{}\n",
        if running { "---:|---:|---:|" } else { "" }
    );
    let sums: BTreeMap<Side, Summary> = c.runs.iter().map(|(s, r)| (*s, summarize(r))).collect();
    let dt = |s: &Summary| {
        s.downtime_us
            .map_or("–".into(), |d| format!("{:.1}", d as f64 / 1e3))
    };
    let dashes = if running { " – | – | – |" } else { "" };
    for (side, s) in &sums {
        let runs = &c.runs[side];
        // "–" where the VMM gave no figure (QEMU computes its dirty rate at a bitmap sync at
        // most once a second, so a short migration has none).
        let med = |f: &dyn Fn(&Measured) -> Option<u64>| {
            let v: Vec<u64> = runs.iter().filter_map(f).collect();
            if v.is_empty() {
                "–".to_string()
            } else {
                median(v).to_string()
            }
        };
        t += &format!(
            "| {} | {:.2} | {} | {:.1} | {:.2} | {:.2} | {:.2} |{}\n",
            side.label(),
            s.total_us as f64 / 1e6,
            dt(s),
            s.bytes as f64 / MIB as f64,
            s.src_cpu_us as f64 / 1e6,
            s.dst_cpu_us as f64 / 1e6,
            (s.src_cpu_us + s.dst_cpu_us) as f64 / 1e6 / (s.bytes.max(1) as f64 / GIB as f64),
            if running {
                format!(
                    " {} | {} | {} |",
                    med(&|m| m.guest_rate),
                    med(&|m| m.dirty_rate),
                    med(&|m| m.max_throttle)
                )
            } else {
                String::new()
            }
        );
    }
    if let (Some(bs), Kind::Paused { image }) = (&c.bound, &c.case.kind) {
        let us = median(bs.iter().map(Bound::us).collect());
        let best = bs
            .iter()
            .flat_map(|b| b.copies.iter())
            .min_by_key(|c| c.us)
            .map_or(String::new(), floor::Sample::label);
        t += &format!(
            "| lower bound ({} connection(s); fastest: {best}) | {:.2} | – | {:.1} | – | – | – |\n",
            c.channels,
            us as f64 / 1e6,
            image.nonzero_bytes as f64 / MIB as f64
        );
        t += &format!(
            "| fastest copy into fresh memory (not a bound) | {:.2} | – | {:.1} | – | – | – |\n",
            median(bs.iter().map(Bound::fresh_us).collect()) as f64 / 1e6,
            image.nonzero_bytes as f64 / MIB as f64
        );
        for (side, s) in &sums {
            t += &format!(
                "| {} / lower bound | {} | – | – | – | – | – |\n",
                side.label(),
                ratio(s.total_us, us)
            );
        }
    }
    if let Some(l) = sums.get(&Side::Livemig) {
        for (q, s) in sums.iter().filter(|(q, _)| **q != Side::Livemig) {
            {
                let per_gib =
                    |x: &Summary| (x.src_cpu_us + x.dst_cpu_us) * 1000 / (x.bytes / MIB).max(1);
                t += &format!(
                    "| livemig / {} | {} | {} | {} | {} | {} | {} |{dashes}\n",
                    q.label(),
                    ratio(l.total_us, s.total_us),
                    match (l.downtime_us, s.downtime_us) {
                        (Some(a), Some(b)) if running => ratio(a, b),
                        _ => "–".into(),
                    },
                    ratio(l.bytes, s.bytes),
                    ratio(l.src_cpu_us, s.src_cpu_us),
                    ratio(l.dst_cpu_us, s.dst_cpu_us),
                    ratio(per_gib(l), per_gib(s))
                );
            }
        }
    }
    t
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".into(), |(_, v)| v.trim().to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or("unknown".into(), |s| s.trim().to_string());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        })
        .unwrap_or(0);
    let qemu = Command::new(QEMU)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    json!({"cpu": model, "cores": cores, "kernel": kernel,
           "memory_gib": mem as f64 / (1 << 20) as f64, "qemu": qemu})
}

/// `/proc/loadavg`'s first three fields (other work on the machine shows here).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        })
        .map_or(0, |k| k << 10)
}

/// Whether KVM can create a VM here (QEMU then runs with `-accel kvm`, else TCG).
fn kvm_works() -> bool {
    let Ok(f) = File::options().read(true).write(true).open("/dev/kvm") else {
        return false;
    };
    use std::os::fd::AsRawFd;
    // KVM_CREATE_VM = _IO(0xAE, 0x01) (linux/kvm.h); the VM fd is closed at once.
    // SAFETY: an ioctl without a pointer argument on an fd this function owns.
    let vm = unsafe { libc::ioctl(f.as_raw_fd(), 0xae01, 0) };
    if vm >= 0 {
        // SAFETY: vm is a descriptor the ioctl just returned to us.
        unsafe { libc::close(vm) };
    }
    vm >= 0
}

fn build_livemig(o: &Options) -> Result<PathBuf> {
    if o.rig_binary {
        crate::rig::hw_tests_static()?;
        return Ok(crate::rig::livemig_static());
    }
    crate::cargo(&["build", "--release", "-p", "livemig-cli"], &[])?;
    Ok(target_dir().join("release").join("livemig"))
}

fn help_has(livemig: &Path, sub: &[&str], flag: &str) -> bool {
    Command::new(livemig)
        .args(sub)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
        .unwrap_or(false)
}

/// Runs the benchmark.
pub fn bench_peer(o: &Options) -> Result<()> {
    o.check()?;
    crate::apt::ensure_qemu()?;
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let out = o.out.canonicalize()?;
    let logs = out.join("logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs)?;
    let tmp = std::env::temp_dir().join(format!("livemig-bench-peer-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let livemig = build_livemig(o)?;
    let load_start = loadavg();
    let (copy_warm, copy_fresh) = floor::memcpy_bandwidth();
    let kvm = kvm_works();
    // As the KVM tests: under CI=true a KVM that does not work fails, unless skipped
    // explicitly (LIVEMIG_SKIP_KVM=1); elsewhere QEMU runs under TCG and livemig not at all.
    ensure!(
        kvm || std::env::var("CI").map_or(true, |v| v != "true")
            || std::env::var_os("LIVEMIG_SKIP_KVM").is_some(),
        "CI=true and /dev/kvm does not work here: livemig's side cannot run (set \
         LIVEMIG_SKIP_KVM=1 to run QEMU's side alone under TCG)"
    );
    let accel = if kvm { "kvm" } else { "tcg" };
    let livemig_channels = (
        help_has(&livemig, &["vm", "migrate"], "--channels"),
        help_has(&livemig, &["vm", "incoming"], "--channels"),
    );
    let livemig_ch = if livemig_channels.0 { o.channels } else { 1 };
    eprintln!(
        "bench-peer: QEMU with -accel {accel}{}; livemig {} ({} channel(s)){}",
        if kvm {
            ""
        } else {
            " (/dev/kvm does not work here)"
        },
        livemig.display(),
        livemig_ch,
        if livemig_channels.0 {
            String::new()
        } else {
            format!(
                "; this livemig has no --channels: it runs one channel against QEMU's multifd {}",
                o.channels
            )
        }
    );
    let guest_image = tmp.join("guest.bin");
    let mut ctx = Ctx {
        o,
        livemig: livemig.clone(),
        accel,
        livemig_channels,
        tmp: tmp.clone(),
        logs: logs.clone(),
        guest_image: guest_image.clone(),
        seq: 0,
        failures: Vec::new(),
    };
    // A running case's workload under QEMU: the same image, the same rate in TSC ticks.
    let append = |rate: u64, pages: u32| -> Result<String> {
        let o2 = Command::new(&livemig)
            .args(["vm", "image", "-o"])
            .arg(&guest_image)
            .arg("--print-append")
            .arg(format!("--vcpus={}", o.running_vcpus))
            .arg(format!("--pages={pages}"))
            .arg(format!("--rate={rate}"))
            .output()
            .context("running livemig vm image")?;
        ensure!(
            o2.status.success(),
            "livemig vm image failed: {}",
            String::from_utf8_lossy(&o2.stderr)
        );
        Ok(String::from_utf8_lossy(&o2.stdout).trim().to_string())
    };

    let mut files = ImageFiles {
        paths: Vec::new(),
        keep: o.keep,
    };
    let mut results: Vec<CaseResult> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    if !kvm {
        notes.push(
            "/dev/kvm does not work here: QEMU ran under TCG and livemig (whose test VM needs \
             KVM) did not run"
                .into(),
        );
    }
    if !livemig_channels.0 {
        notes.push(format!(
            "this livemig has no `--channels`: it ran one channel; QEMU's multifd ran {} \
             channels",
            o.channels
        ));
    }
    // QEMU on one channel, with multifd on --channels, and, where livemig runs fewer, with
    // multifd on as many channels as livemig (the equal-channel comparison).
    let mut sides: Vec<Side> = vec![Side::Qemu1, Side::QemuMultifd(o.channels)];
    if kvm {
        sides.insert(0, Side::Livemig);
        if livemig_ch != o.channels {
            sides.push(Side::QemuMultifd(livemig_ch));
        }
    }

    let mut refused: Vec<Value> = Vec::new();
    for &(size, fill) in &o.paused {
        let name = format!("Paused VM, {} ({})", size_name(size), fill.words());
        let path = out.join(format!(
            "image-{}-{}.raw",
            size_name(size).replace(' ', ""),
            match fill {
                Fill::Dense => "dense".to_string(),
                Fill::Percent(p) => format!("{p}pct"),
            }
        ));
        // The whole image in the page cache (QEMU's source reads every page, and a read of a
        // hole in a disk file caches a page of zeros), one destination's copy of the data (a
        // destination never touches a zero page) and room for the processes themselves.
        let data = runs_wanted(size, fill) * RUN;
        let need = size + data + GIB;
        let avail = mem_available();
        if avail < need {
            let why = format!(
                "{name}: refused: it needs about {} MiB (the whole {} MiB image in the page \
                 cache, as QEMU's source reads it, its {} MiB of data again in the destination, \
                 1 GiB for the processes) and MemAvailable is {} MiB",
                need / MIB,
                size / MIB,
                data / MIB,
                avail / MIB
            );
            eprintln!("bench-peer: {why}");
            notes.push(why.clone());
            refused.push(json!({"case": name, "need_bytes": need, "mem_available_bytes": avail}));
            continue;
        }
        files.paths.push(path.clone());
        eprintln!(
            "bench-peer: writing the {} image ({})",
            size_name(size),
            fill.words()
        );
        let t = Instant::now();
        let image = make_image(&path, size, fill, 0x6c69_7665 ^ size)?;
        eprintln!(
            "bench-peer: {} image, {} MiB non-zero in {} runs of 2 MiB, written in {:.1} s",
            size_name(size),
            image.nonzero_bytes / MIB,
            image.runs,
            t.elapsed().as_secs_f64()
        );
        let case = Case {
            name,
            kind: Kind::Paused {
                image: image.clone(),
            },
        };
        let mut r = CaseResult {
            case,
            runs: BTreeMap::new(),
            bound: Some(Vec::new()),
            channels: livemig_ch,
            failed: false,
        };
        for rep in 0..o.reps {
            // Reading the image for its digest also puts it in the page cache, where every
            // copy and migration below finds it.
            let want = image_digest(&image)?;
            if rep == 0 {
                // The first destination would otherwise pay for reclaiming the page cache the
                // image write left (measured: 2-3x the time of the later repetitions at
                // 16 GiB). After the read, so the image's pages are the recently used ones.
                make_room(image.nonzero_bytes + 512 * MIB);
            }
            let b = lower_bound(&image, livemig_ch, &want, &tmp)?;
            eprintln!(
                "bench-peer: {} rep {}: lower bound {:.2} s ({})",
                r.case.name,
                rep + 1,
                b.us() as f64 / 1e6,
                b.copies
                    .iter()
                    .map(|c| format!("{} {:.2} s", c.label(), c.us as f64 / 1e6))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if let Some(v) = r.bound.as_mut() {
                v.push(b);
            }
            if !try_sides(&mut ctx, &mut r, &sides, rep) {
                break;
            }
        }
        results.push(r);
        if !o.keep {
            let _ = std::fs::remove_file(&path);
        }
    }
    // The running cases' rates: shares of this run's lower-bound bandwidth (the first dense
    // case's, else the first paused case's), bytes of data per second of the fastest copy.
    let bound_bps = results
        .iter()
        .filter(|r| matches!(&r.case.kind, Kind::Paused { image } if image.fill == Fill::Dense))
        .chain(results.iter())
        .find_map(|r| match (&r.case.kind, &r.bound) {
            (Kind::Paused { image }, Some(bs)) if !bs.is_empty() => {
                let us = median(bs.iter().map(Bound::us).collect()).max(1);
                Some(image.nonzero_bytes * 1_000_000 / us)
            }
            _ => None,
        });
    if kvm && !o.running.is_empty() {
        let bound_bps = bound_bps.context(
            "no paused case ran (refused for memory?), so there is no lower bound to derive the \
             running cases' rates from",
        )?;
        make_room(2 * o.running_mem);
        for &pct in &o.running {
            let rate =
                (bound_bps * u64::from(pct) / 100 / 4096 / u64::from(o.running_vcpus)).max(1);
            let run = Run {
                mem: o.running_mem,
                vcpus: o.running_vcpus,
                pages: o.running_pages,
                pct,
                bound_bps,
                rate,
                cap: None,
                append: append(rate, o.running_pages)?,
            };
            let case = Case {
                name: format!(
                    "Running test guest, {} RAM, {} vCPUs writing {} MiB each at {pct}% of the \
                     lower bound's {:.2} GB/s ({} pages/s per vCPU), auto-converge",
                    size_name(run.mem),
                    run.vcpus,
                    u64::from(run.pages) * 4096 / MIB,
                    bound_bps as f64 / 1e9,
                    rate
                ),
                kind: Kind::Running(run),
            };
            let mut r = CaseResult {
                case,
                runs: BTreeMap::new(),
                bound: None,
                channels: livemig_ch,
                failed: false,
            };
            for rep in 0..o.reps {
                if !try_sides(&mut ctx, &mut r, &sides, rep) {
                    break;
                }
            }
            results.push(r);
        }
    }
    if kvm && let Some(cap) = o.capped_link {
        // Working sets just above what the link moves within the downtime limit (10% more),
        // so that only the throttle lets the migration converge; a larger set never would
        // (at 100 MB/s a round over 512 MiB takes 5 s, in which even a guest held at 99%
        // dirties more than the limit allows).
        let budget = cap * o.downtime_ms / 1000;
        let pages = (budget * 11 / 10 / 4096 / u64::from(o.running_vcpus)).max(1) as u32;
        let run = Run {
            mem: o.running_mem,
            vcpus: o.running_vcpus,
            pages,
            pct: 0,
            bound_bps: 0,
            rate: 0,
            cap: Some(cap),
            append: append(0, pages)?,
        };
        let mut r = CaseResult {
            case: Case {
                name: format!(
                    "Running test guest, {} RAM, {} vCPUs writing {} MiB each as fast as they \
                     can, the link paced to {} MB/s on both, auto-converge",
                    size_name(run.mem),
                    run.vcpus,
                    u64::from(run.pages) * 4096 / MIB,
                    cap / 1_000_000
                ),
                kind: Kind::Running(run),
            },
            runs: BTreeMap::new(),
            bound: None,
            channels: livemig_ch,
            failed: false,
        };
        make_room(2 * o.running_mem);
        for rep in 0..o.reps {
            if !try_sides(&mut ctx, &mut r, &sides, rep) {
                break;
            }
        }
        results.push(r);
    }
    if kvm && !o.running.is_empty() {
        notes.push(format!(
            "QEMU's guest command line (running cases, the period varying with the rate): `{}`",
            append(u64::from(o.running_pages), o.running_pages)?
        ));
    }
    drop(files);

    // Auto-converge's lever, measured on both: the guest (one vCPU writing as fast as it can)
    // unthrottled and held at each level; the effective throttle is 1 - throttled / free.
    let mut throttle_rows: Vec<Value> = Vec::new();
    if kvm && !o.throttle.is_empty() {
        let window = if o.smoke {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(2)
        };
        let one = Command::new(&livemig)
            .args(["vm", "image", "-o"])
            .arg(&guest_image)
            .args(["--print-append", "--vcpus=1", "--pages=8192", "--rate=0"])
            .output()
            .context("running livemig vm image")?;
        ensure!(one.status.success(), "livemig vm image failed");
        let one = String::from_utf8_lossy(&one.stdout).trim().to_string();
        let livemig_free = ctx.livemig_throttled_rate(0, window)?;
        for &pct in &o.throttle {
            let measured = ctx.livemig_throttled_rate(pct, window).and_then(|l| {
                ctx.qemu_throttled_rate(pct, window, &one)
                    .map(|(qfree, q)| (l, qfree, q))
            });
            let (l, qfree, q) = match measured {
                Ok(m) => m,
                Err(e) => {
                    ctx.fail(format!("throttle {pct}%: {e:#}"));
                    continue;
                }
            };
            let eff = |rate: u64, free: u64| 100.0 * (1.0 - rate as f64 / free.max(1) as f64);
            eprintln!(
                "bench-peer: throttle {pct}%: livemig {l} pages/s of {livemig_free} ({:.0}% \
                 effective), QEMU {q} of {qfree} ({:.0}% effective)",
                eff(l, livemig_free),
                eff(q, qfree)
            );
            throttle_rows.push(json!({
                "percent": pct,
                "livemig": {"pages_per_s": l, "unthrottled_pages_per_s": livemig_free,
                            "effective_percent": eff(l, livemig_free)},
                "qemu": {"pages_per_s": q, "unthrottled_pages_per_s": qfree,
                         "effective_percent": eff(q, qfree)},
            }));
        }
    }

    let mut m = machine();
    m["loadavg_start"] = json!(load_start);
    m["loadavg_end"] = json!(loadavg());
    m["memcpy_bytes_per_s"] = json!({"touched": copy_warm, "fresh": copy_fresh});
    let settings = json!({
        "qemu_accel": accel,
        "qemu_machine": "q35, -cpu qemu64, -nodefaults",
        "qemu_max_bandwidth": QEMU_MAX_BANDWIDTH,
        "downtime_limit_ms": o.downtime_ms,
        "qemu_multifd_channels": o.channels,
        "qemu_zero_page_detection": "multifd (10.0's default)",
        "livemig_channels": livemig_ch,
        "reps": o.reps,
    });
    let mut md = String::new();
    md += "## Peer benchmark: livemig against QEMU\n\n";
    md += &format!(
        "Machine: {} ({} cores), kernel {}, {:.1} GiB RAM; {}; load average {} at the start, \
         {} at the end.\n\n",
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["kernel"].as_str().unwrap_or("?"),
        m["memory_gib"].as_f64().unwrap_or(0.0),
        m["qemu"].as_str().unwrap_or("?"),
        m["loadavg_start"].as_str().unwrap_or("?"),
        m["loadavg_end"].as_str().unwrap_or("?")
    );
    md += &format!(
        "Memory copy, one thread: {:.1} GB/s into touched memory, {:.1} GB/s into fresh \
         anonymous memory (page faults included).\n\n",
        copy_warm / 1e9,
        copy_fresh / 1e9
    );
    md += &format!(
        "QEMU settings: `-accel {accel}`, q35, `-cpu qemu64`, `max-bandwidth` {} GB/s, \
         `downtime-limit` {} ms (livemig `--downtime {}ms`); plain single-channel migration, and \
         the `multifd` capability on both sides with `multifd-channels` {}{} (zero pages \
         detected in the multifd threads, 10.0's default). livemig: {} channel(s). Medians of \
         {} repetition(s), the sides' order rotating; loopback TCP; every destination gets \
         fresh anonymous memory.\n\n",
        QEMU_MAX_BANDWIDTH / 1_000_000_000,
        o.downtime_ms,
        o.downtime_ms,
        o.channels,
        if sides.contains(&Side::QemuMultifd(livemig_ch)) && livemig_ch != o.channels {
            format!(" and {livemig_ch} (livemig's count)")
        } else {
            String::new()
        },
        livemig_ch,
        o.reps
    );
    for r in &results {
        md += &case_table(r);
        md += "\n";
    }
    if !throttle_rows.is_empty() {
        md += "### Auto-converge's throttle: the guest's write rate held at each level\n\n";
        md += "| throttle | livemig (pages/s) | livemig effective | QEMU (pages/s) | QEMU effective |\n";
        md += "|---:|---:|---:|---:|---:|\n";
        for t in &throttle_rows {
            md += &format!(
                "| {}% | {} of {} | {:.0}% | {} of {} | {:.0}% |\n",
                t["percent"],
                t["livemig"]["pages_per_s"],
                t["livemig"]["unthrottled_pages_per_s"],
                t["livemig"]["effective_percent"].as_f64().unwrap_or(0.0),
                t["qemu"]["pages_per_s"],
                t["qemu"]["unthrottled_pages_per_s"],
                t["qemu"]["effective_percent"].as_f64().unwrap_or(0.0)
            );
        }
        md += "\nOne vCPU writing as fast as it can (8192 pages), unthrottled and then held at \
               each level: livemig `vm run --throttle` (livemig-kvm parks the vCPUs for that \
               share of the time, in periods of about 10 ms of running), QEMU through \
               auto-converge with initial = maximum = the level during a migration that cannot \
               converge (`exec:cat >/dev/null` at 16 MB/s), \
               its rate read from the step count the guest publishes in RAM while QEMU reports \
               the level (the unthrottled rate under the same migration without auto-converge). \
               Effective: 1 - throttled / unthrottled.\n\n";
    }
    md += "Total: migration start to the destination holding everything (QEMU: `migrate` sent to \
           the destination's MIGRATION `completed` event; livemig: the engine's `total_us`). \
           Downtime, on one clock (CLOCK_REALTIME, both processes on this machine): the source's \
           vCPUs all stopped to the destination's vCPUs running (QEMU: its `STOP` event, sent \
           once every vCPU is paused, to its `RESUME` event, sent just before its vCPUs are \
           resumed; livemig: the source's stop with every vCPU parked to the destination's first \
           vCPU entry, so livemig's figure includes its first `KVM_RUN` and QEMU's does not); \
           none for a paused VM. The phases are the engine's own (`downtime_phases`). CPU: user + system time \
           of each process during the migration (QEMU: /proc/PID/stat before and after; \
           livemig: getrusage in the process). Lower bound: the fastest copy of the image's data \
           between two processes over as many loopback connections as carry pages (livemig's \
           page channels), pipelined (the best of ten: sendfile or write from a mapping; into \
           fresh memory, in place or through a 256 KiB buffer, with or without THP; or in place \
           into memory whose pages were written beforehand, which no destination with fresh \
           memory can match), first byte to last byte in \
           memory on CLOCK_MONOTONIC; it leaves out everything else a migration does, so no \
           migration can beat it. Every paused run's destination RAM was digested per 2 MiB and \
           equal to the source's (`peer.json`: `verified`). In every running run the guest \
           checked every page of its working sets against its own log on the destination (both \
           VMMs), and the RAM beyond them was equal to the stopped source's. Running cases: \
           both VMMs with auto-converge (initial 20%, +10%, at most 99%); CPU includes the \
           guest's vCPU threads on both; the dirty rate is each VMM's own figure (QEMU's \
           `dirty-pages-rate`, livemig's report), the throttle the highest either applied.\n";
    if !notes.is_empty() {
        md += "\nNotes:\n";
        for n in &notes {
            md += &format!("- {n}\n");
        }
    }
    print!("{md}");
    std::fs::write(out.join("peer.md"), &md)?;

    // Raw numbers.
    let raw: Vec<Value> = results
        .iter()
        .map(|r| {
            let sides: serde_json::Map<String, Value> = r
                .runs
                .iter()
                .map(|(side, runs)| {
                    let s = summarize(runs);
                    (
                        side.key(),
                        json!({
                            "label": side.label(),
                            "median": {"total_us": s.total_us, "downtime_us": s.downtime_us,
                                       "bytes": s.bytes, "source_cpu_us": s.src_cpu_us,
                                       "destination_cpu_us": s.dst_cpu_us},
                            "runs": runs.iter().map(|m| json!({
                                "total_us": m.total_us, "downtime_us": m.downtime_us,
                                "bytes": m.bytes, "source_cpu_us": m.src_cpu_us,
                                "destination_cpu_us": m.dst_cpu_us, "timeline": m.timeline,
                                "downtime_phases": m.phases, "raw": m.raw,
                                "verified": m.verified, "dirty_pages_per_s": m.dirty_rate,
                                "guest_pages_per_s_before": m.guest_rate,
                                "max_throttle_percent": m.max_throttle,
                            })).collect::<Vec<_>>(),
                        }),
                    )
                })
                .collect();
            let (image, limit) = match &r.case.kind {
                Kind::Paused { image } => (
                    json!({"size": image.size, "nonzero_bytes": image.nonzero_bytes,
                           "runs_2mib": image.runs, "pattern": "first 32 MiB zero; seeded \
                           random 2 MiB runs of pseudo-random bytes, the rest holes"}),
                    json!(r.bound.as_ref().map(|bs| {
                        json!({
                            "connections": r.channels,
                            "median_us": median(bs.iter().map(Bound::us).collect()),
                            "fresh_memory_median_us": median(bs.iter().map(Bound::fresh_us).collect()),
                            "runs": bs.iter().map(|b| json!({
                                "us": b.us(), "fresh_memory_us": b.fresh_us(),
                                "variants": b.copies.iter().map(|c| json!({
                                    "send": format!("{:?}", c.send).to_lowercase(),
                                    "receive": format!("{:?}", c.recv).to_lowercase(),
                                    "memory": format!("{:?}", c.mem).to_lowercase(), "us": c.us, "bytes": c.bytes,
                                })).collect::<Vec<_>>(),
                            })).collect::<Vec<_>>(),
                        })
                    })),
                ),
                Kind::Running(run) => (
                    json!({"size": run.mem, "qemu_append": run.append, "vcpus": run.vcpus,
                           "pages_per_vcpu": run.pages, "rate_pages_per_s_per_vcpu": run.rate,
                           "percent_of_lower_bound": run.pct,
                           "lower_bound_bytes_per_s": run.bound_bps,
                           "guest_writes_below_gpa": run.guest_end()}),
                    Value::Null,
                ),
            };
            json!({"case": r.case.name, "memory": image, "lower_bound": limit, "sides": sides})
        })
        .collect();
    let doc = json!({"machine": m, "settings": settings, "notes": notes, "cases": raw,
                     "refused": refused, "throttle": throttle_rows,
                     "failures": ctx.failures});
    std::fs::write(
        out.join("peer.json"),
        serde_json::to_string_pretty(&doc)? + "\n",
    )?;

    // The chart, drawn by the livemig binary (plotters lives in the CLI only).
    let panels: Vec<Value> = results
        .iter()
        .map(|r| {
            let mut traces: Vec<Value> = r
                .runs
                .iter()
                .map(|(side, runs)| {
                    // The line of the repetition with the median total, the bar of the one with
                    // the median downtime (the table's numbers).
                    let s = summarize(runs);
                    json!({
                        "label": side.label(),
                        "timeline": runs[s.typical].timeline,
                        "downtime": runs[s.typical_downtime].phases.iter().map(|(p, us)| json!({"phase": p, "us": us})).collect::<Vec<_>>(),
                    })
                })
                .collect();
            if let (Some(bs), Kind::Paused { image }) = (&r.bound, &r.case.kind) {
                // As the table: the median of the repetitions' bounds.
                let us = median(bs.iter().map(Bound::us).collect());
                traces.push(json!({"label": "lower bound", "timeline": [[0, 0], [us, image.nonzero_bytes]]}));
            }
            json!({"title": r.case.name, "traces": traces})
        })
        .collect();
    let traces = out.join("traces.json");
    std::fs::write(
        &traces,
        serde_json::to_string_pretty(&json!({
            "title": format!("livemig against QEMU 10.0 on {} ({} cores), loopback TCP",
                             m["cpu"].as_str().unwrap_or("?"), m["cores"]),
            "panels": panels,
        }))?,
    )?;
    let svg = out.join("peer.svg");
    let st = Command::new(&livemig)
        .args(["chart", "--input"])
        .arg(&traces)
        .arg("-o")
        .arg(&svg)
        .status()
        .context("running livemig chart")?;
    ensure!(st.success(), "livemig chart failed ({st})");
    let _ = std::fs::remove_dir_all(&tmp);

    // Every side completed every case (each run above checked its own outcome); the outputs
    // are there.
    for r in results.iter().filter(|r| !r.failed) {
        for s in &sides {
            ensure!(
                r.runs.get(s).is_some_and(|v| v.len() == o.reps as usize),
                "{}: {} did not complete every repetition",
                r.case.name,
                s.label()
            );
        }
    }
    for f in ["peer.md", "peer.json", "peer.svg"] {
        let p = out.join(f);
        let len = std::fs::metadata(&p).map_or(0, |m| m.len());
        ensure!(len > 0, "{} is missing or empty", p.display());
    }
    ensure!(
        ctx.failures.is_empty(),
        "{} run(s) failed or moved bytes that did not check out (the results are in {}):\n{}",
        ctx.failures.len(),
        out.display(),
        ctx.failures.join("\n")
    );
    let svg_text = std::fs::read_to_string(&svg)?;
    ensure!(svg_text.contains("<svg"), "{} is not an SVG", svg.display());
    eprintln!(
        "bench-peer: wrote {}, {} and {}",
        out.join("peer.md").display(),
        out.join("peer.json").display(),
        svg.display()
    );
    Ok(())
}

/// One repetition of a case; a failure is recorded (named, with its cause) and ends the case,
/// the other cases still run and every result is written before the benchmark fails.
fn try_sides(ctx: &mut Ctx<'_>, r: &mut CaseResult, sides: &[Side], rep: u32) -> bool {
    match run_sides(ctx, r, sides, rep) {
        Ok(()) => true,
        Err(e) => {
            ctx.fail(format!("{e:#}"));
            r.failed = true;
            false
        }
    }
}

fn run_sides(ctx: &mut Ctx<'_>, r: &mut CaseResult, sides: &[Side], rep: u32) -> Result<()> {
    // The order rotates per repetition, so no side always runs first (after the image was
    // written) or last.
    let n = sides.len();
    for k in 0..n {
        let side = sides[(k + rep as usize) % n];
        let t = Instant::now();
        let m = match side {
            Side::Livemig => ctx.run_livemig(&r.case),
            Side::Qemu1 => ctx.run_qemu(&r.case, None),
            Side::QemuMultifd(n) => ctx.run_qemu(&r.case, Some(n)),
        }
        .with_context(|| format!("{}: {}", r.case.name, side.label()))?;
        let mut m = m;
        let sum = |v: &[u64]| {
            let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            format!(
                "{:016x}",
                crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, &b)
            )
        };
        let what = format!("{}: {} (rep {})", r.case.name, side.label(), rep + 1);
        if let Some(e) = m.two_hosts.take() {
            ctx.fail(format!("{what}: {e}"));
        }
        if let Kind::Running(run) = &r.case.kind {
            // Every byte, in two parts: below the end of the working sets the guest writes
            // all the time (its image, logs, state and working sets), and its own check of
            // every working-set page against its log is the proof; above, it never writes,
            // and the destination's digest must equal the stopped source's.
            let want = m
                .src_digest
                .take()
                .context("no source digest for a running case")?;
            let got = m
                .dest_digest
                .take()
                .context("no destination digest for a running case")?;
            let from = (run.guest_end() / RUN) as usize;
            let mut problems = Vec::new();
            match m.guest_check.take() {
                Some(Ok(_)) => {}
                Some(Err(e)) => problems.push(format!(
                    "the guest's check of its working sets failed on the destination: {e}"
                )),
                None => problems.push("the guest's check did not run".into()),
            }
            if want.len() != got.len() || want.len() < from {
                problems.push(format!(
                    "digests of {} and {} pieces of 2 MiB for {} of RAM",
                    want.len(),
                    got.len(),
                    size_name(run.mem)
                ));
            } else {
                // The guest's own pieces taken as equal, so offsets and counts stay whole-RAM.
                let mut beyond = got.clone();
                beyond[..from].copy_from_slice(&want[..from]);
                if let Some(d) = floor::compare(&want, &beyond) {
                    problems.push(format!(
                        "beyond the guest's working sets (from GPA {:#x}; the {from} pieces \
                         below are the guest's to check) the destination's RAM differs from the \
                         source's: {d}",
                        run.guest_end()
                    ));
                }
            }
            m.verified = json!({"guest_checked_pages": u64::from(run.vcpus) * u64::from(run.pages),
                                "digest_from_gpa": run.guest_end(),
                                "pieces_2mib": want.len().saturating_sub(from),
                                "equal": problems.is_empty(),
                                "source_digest": sum(want.get(from..).unwrap_or(&[])),
                                "destination_digest": sum(got.get(from..).unwrap_or(&[]))});
            for p in problems {
                ctx.fail(format!("{what}: {p}"));
            }
        }
        if let Kind::Paused { image } = &r.case.kind {
            // Every byte: the source's RAM is the image file (a shared mapping on both
            // sides), as it was when the migration ended.
            let want = image_digest(image)?;
            let got = m
                .dest_digest
                .take()
                .context("no destination digest for a paused case")?;
            let diff = floor::compare(&want, &got);
            m.verified = json!({"pieces_2mib": want.len(), "equal": diff.is_none(),
                                "source_digest": sum(&want), "destination_digest": sum(&got)});
            if let Some(d) = diff {
                ctx.fail(format!(
                    "{what}: the destination's RAM is not the source's: {d}"
                ));
            }
            ensure!(
                m.bytes >= image.nonzero_bytes,
                "{}: {} sent {} bytes, less than the image's {} non-zero bytes",
                r.case.name,
                side.label(),
                m.bytes,
                image.nonzero_bytes
            );
        }
        eprintln!(
            "bench-peer: {} rep {}: {}: total {:.2} s{}, {:.1} MiB, CPU {:.2} s + {:.2} s ({:.0} s wall)",
            r.case.name,
            rep + 1,
            side.label(),
            m.total_us as f64 / 1e6,
            m.downtime_us.map_or(String::new(), |d| format!(
                ", downtime {:.1} ms",
                d as f64 / 1e3
            )),
            m.bytes as f64 / MIB as f64,
            m.src_cpu_us as f64 / 1e6,
            m.dst_cpu_us as f64 / 1e6,
            t.elapsed().as_secs_f64()
        );
        r.runs.entry(side).or_default().push(m);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn options_parse_and_bad_values_are_named() {
        let o =
            parse_options(&args("--paused 4GiB:dense,16GiB:25% --channels 2 --reps 3")).unwrap();
        assert_eq!(
            o.paused,
            [(4 * GIB, Fill::Dense), (16 * GIB, Fill::Percent(25))]
        );
        assert_eq!((o.channels, o.reps, o.smoke), (2, 3, false));
        let d = parse_options(&[]).unwrap();
        assert_eq!(
            d.paused,
            [
                (4 * GIB, Fill::Dense),
                (8 * GIB, Fill::Dense),
                (4 * GIB, Fill::Percent(25)),
                (16 * GIB, Fill::Percent(25))
            ],
            "the issue's four paused cases by default"
        );
        assert_eq!(
            (d.running.as_slice(), d.running_vcpus),
            (&[25, 90, 150][..], 2),
            "and its three running rates, two vCPUs"
        );
        assert_eq!(
            parse_options(&args("--running 50%,200")).unwrap().running,
            [50, 200]
        );
        assert!(
            parse_options(&args("--running none"))
                .unwrap()
                .running
                .is_empty()
        );
        let s = parse_options(&args("--smoke --out /tmp/x --keep --rig-binary")).unwrap();
        assert!(s.rig_binary);
        assert_eq!(
            (s.paused.as_slice(), s.reps, s.running_mem),
            (
                &[(64 * MIB, Fill::Percent(25)), (64 * MIB, Fill::Dense)][..],
                1,
                64 * MIB
            )
        );
        assert_eq!(s.running, [25], "one running case in the smoke run");
        assert_eq!(s.out, PathBuf::from("/tmp/x"));
        assert!(s.keep);
        for (bad, named) in [
            ("--channels 0", "--channels 0"),
            ("--channels two", "--channels \"two\""),
            (
                "--paused 99MiB:dense",
                "size 103809024 bytes is not a multiple of 2 MiB",
            ),
            ("--paused 32MiB:dense", "is below 64 MiB"),
            ("--paused 4GiB:25%,3Gb:25%", "unknown unit \"Gb\""),
            ("--paused 4.5GiB:dense", "size \"4.5GiB\""),
            ("--paused 4GiB", "expected SIZE:dense or SIZE:PCT%"),
            (
                "--paused 4GiB:25",
                "\"25\" is neither `dense` nor a whole percentage",
            ),
            ("--paused 64MiB:60%", "at most 50% of a 64 MiB image"),
            ("--reps 0", "--reps 0"),
            ("--running 90,fast", "\"fast\" is not a whole percentage"),
            ("--running 0", "--running 0%: between 1% and 1000%"),
            ("--frobnicate", "unknown option \"--frobnicate\""),
            ("--out", "--out needs a value"),
        ] {
            let e = format!("{:#}", parse_options(&args(bad)).unwrap_err());
            assert!(e.contains(named), "{bad}: {e:?} does not name {named:?}");
        }
        assert_eq!(parse_size("64M").unwrap(), 64 * MIB);
        assert_eq!(parse_size("2G").unwrap(), 2 * GIB);
    }

    #[test]
    fn gpa2hva_answers_parse_and_others_are_named() {
        assert_eq!(
            parse_gpa2hva("Host virtual address for 0x0 (ram) is 0x7f12a0000000\r\n").unwrap(),
            0x7f12_a000_0000
        );
        let e = format!(
            "{:#}",
            parse_gpa2hva("Memory at address 0x0 is not RAM").unwrap_err()
        );
        assert!(e.contains("not \"... is 0xADDRESS\""), "{e}");
        assert!(parse_gpa2hva("... is 0xzz").is_err());
    }

    #[test]
    fn the_image_has_exactly_the_chosen_non_zero_bytes() {
        let dir = std::env::temp_dir().join(format!("bench-peer-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        let size = 96 * MIB;
        let img = make_image(&path, size, Fill::Percent(25), 42).unwrap();
        // 48 runs of 2 MiB, 25% = 12 runs, all after the guest's 32 MiB.
        assert_eq!((img.runs, img.nonzero_bytes), (12, 24 * MIB));
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len() as u64, size);
        let nonzero_pages: Vec<usize> = data
            .chunks_exact(4096)
            .enumerate()
            .filter(|(_, p)| p.iter().any(|&b| b != 0))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(nonzero_pages.len() as u64 * 4096, img.nonzero_bytes);
        assert!(
            nonzero_pages.iter().all(|&p| p as u64 * 4096 >= GUEST_AREA),
            "the guest's area stays zero"
        );
        // Whole 2 MiB runs, the ones image_runs chose, spread (not one block).
        let runs = image_runs(size, Fill::Percent(25), 42);
        let mut from_data: Vec<u64> = nonzero_pages.iter().map(|&p| p as u64 / 512).collect();
        from_data.dedup();
        assert_eq!(from_data, runs);
        assert!(
            runs.last().unwrap() - runs.first().unwrap() > 12,
            "{runs:?}"
        );
        // Seeded: the same runs again, other ones for another seed.
        assert_eq!(image_runs(size, Fill::Percent(25), 42), runs);
        assert_ne!(image_runs(size, Fill::Percent(25), 43), runs);
        // Runs are distinct pages of data (no two 2 MiB runs equal).
        let r0 = &data[(runs[0] * RUN) as usize..][..RUN as usize];
        let r1 = &data[(runs[1] * RUN) as usize..][..RUN as usize];
        assert_ne!(r0, r1);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(runs_wanted(16 * GIB, Fill::Percent(25)), 2048);
        assert_eq!(
            runs_wanted(4 * GIB, Fill::Dense),
            2032,
            "all but the guest's 16 runs"
        );
        assert_eq!(runs_wanted(64 * MIB, Fill::Percent(0)), 0);
    }

    #[test]
    fn q35_layout_and_qemus_memory_tree() {
        assert_eq!(q35_split(64 * MIB), (64 * MIB, 0));
        assert_eq!(q35_split(0xb000_0000 - RUN), (0xb000_0000 - RUN, 0));
        assert_eq!(q35_split(4 * GIB), (2 * GIB, 2 * GIB));
        assert_eq!(q35_split(16 * GIB), (2 * GIB, 14 * GIB));
        // As QEMU 10.0 prints it for a 4 GiB q35 machine on memory-backend `ram`.
        let mtree = "\
    0000000000000000-000000007fffffff (prio 0, ram): alias ram-below-4g @ram 0000000000000000-000000007fffffff
    0000000100000000-000000017fffffff (prio 0, ram): alias ram-above-4g @ram 0000000080000000-00000000ffffffff
";
        assert_eq!(mtree_split(mtree).unwrap(), (2 * GIB, 2 * GIB, 2 * GIB));
        let small = "  0000000000000000-0000000003ffffff (prio 0, ram): alias ram-below-4g @ram 0000000000000000-0000000003ffffff\n";
        assert_eq!(mtree_split(small).unwrap(), (64 * MIB, 0, 64 * MIB));
        assert!(
            mtree_split("nothing")
                .unwrap_err()
                .to_string()
                .contains("no ram-below-4g")
        );
        let bad = "alias ram-below-4g @ram 0000000000000000-zz\n";
        assert!(format!("{:#}", mtree_split(bad).unwrap_err()).contains("\"zz\""));
    }

    #[test]
    fn proc_stat_cpu_fields_with_awkward_names() {
        // proc(5) layout; the name holds spaces and a ')'.
        let stat = "4242 (qemu (x) sys) S 1 4242 4242 0 -1 4194560 5125 0 0 0 731 269 0 0 20 0 \
                    7 0 123456 1234567890 4096 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 \
                    0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat_ticks(stat).unwrap(), (731, 269));
        let real = std::fs::read_to_string("/proc/self/stat").unwrap();
        parse_stat_ticks(&real).unwrap();
        assert!(
            parse_stat_ticks("12 (x) S 1 2")
                .unwrap_err()
                .to_string()
                .contains("no field 14")
        );
        assert!(
            parse_stat_ticks("12 (x) S 1 2 3 4 5 6 7 8 9 10 u7 12")
                .unwrap_err()
                .to_string()
                .contains("field 14 \"u7\"")
        );
        assert!(parse_stat_ticks("no name").is_err());
        // The counter of this very process advances while it computes.
        let me = std::process::id() as i32;
        let before = proc_cpu_us(me).unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        let mut x = 1u64;
        while proc_cpu_us(me).unwrap() <= before {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            assert!(Instant::now() < end, "no CPU time counted in 10 s");
        }
    }

    fn scripted(lines: &[&str]) -> (Qmp, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
        let (tx, rx) = mpsc::channel();
        for l in lines {
            tx.send(l.to_string()).unwrap();
        }
        #[derive(Clone)]
        struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut q = Qmp::new("test", rx, Box::new(Shared(sent.clone())));
        q.timeout = Duration::from_millis(200);
        (q, sent)
    }

    #[test]
    fn qmp_messages_parse() {
        assert_eq!(
            parse_qmp(r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian"}, "capabilities": ["oob"]}}"#).unwrap(),
            QmpMessage::Greeting { version: "10.0.2".into() }
        );
        assert_eq!(
            parse_qmp(r#"{"timestamp": {"seconds": 1795990697, "microseconds": 997376}, "event": "MIGRATION", "data": {"status": "setup"}}"#).unwrap(),
            QmpMessage::Event(QmpEvent {
                name: "MIGRATION".into(),
                timestamp_us: 1_795_990_697_997_376,
                data: json!({"status": "setup"}),
            })
        );
        assert_eq!(
            parse_qmp(r#"{"error": {"class": "GenericError", "desc": "no"}, "id": 3}"#).unwrap(),
            QmpMessage::Error {
                id: Some(json!(3)),
                class: "GenericError".into(),
                desc: "no".into()
            }
        );
        assert!(
            parse_qmp("{\"event\": \"STOP\"}")
                .unwrap_err()
                .to_string()
                .contains("STOP without a timestamp")
        );
        assert!(
            parse_qmp("garbage")
                .unwrap_err()
                .to_string()
                .contains("\"garbage\", which is not JSON")
        );
        assert!(
            parse_qmp("{\"what\": 1}")
                .unwrap_err()
                .to_string()
                .contains("neither")
        );
    }

    #[test]
    fn qmp_replies_are_found_among_interleaved_events() {
        let (mut q, sent) = scripted(&[
            r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}}, "capabilities": []}}"#,
            r#"{"return": {}, "id": 1}"#,
            r#"{"timestamp": {"seconds": 10, "microseconds": 5}, "event": "STOP"}"#,
            r#"{"timestamp": {"seconds": 10, "microseconds": 9}, "event": "MIGRATION", "data": {"status": "active"}}"#,
            r#"{"return": {"status": "active", "ram": {"transferred": 4096}}, "id": 2}"#,
            r#"{"error": {"class": "GenericError", "desc": "Migration is disabled"}, "id": 3}"#,
            r#"{"return": {}, "id": 9}"#,
        ]);
        assert_eq!(q.handshake().unwrap(), "10.0.2");
        let r = q.execute("query-migrate", json!({})).unwrap();
        assert_eq!(r["ram"]["transferred"], 4096);
        assert_eq!(
            q.events.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["STOP", "MIGRATION"]
        );
        // A kept event is found without reading further.
        let stop = q
            .wait_event(Instant::now(), "STOP", |e| e.name == "STOP")
            .unwrap();
        assert_eq!(stop.timestamp_us, 10_000_005);
        let e = q.execute("migrate", json!({"uri": "x"})).unwrap_err();
        assert!(
            e.to_string()
                .contains("migrate failed: GenericError: Migration is disabled"),
            "{e}"
        );
        let e = q.execute("query-status", json!({})).unwrap_err();
        assert!(e.to_string().contains("reply id Some(Number(9))"), "{e}");
        let e = q
            .wait_event(Instant::now() + Duration::from_millis(50), "RESUME", |e| {
                e.name == "RESUME"
            })
            .unwrap_err();
        assert!(format!("{e:#}").contains("waiting for RESUME"), "{e:#}");
        let sent = String::from_utf8(sent.lock().unwrap().clone()).unwrap();
        let cmds: Vec<Value> = sent
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(cmds[0]["execute"], "qmp_capabilities");
        assert_eq!(
            cmds[1],
            json!({"execute": "query-migrate", "arguments": {}, "id": 2})
        );
        assert_eq!(cmds[2]["arguments"]["uri"], "x");
    }

    #[test]
    fn qmp_must_begin_with_a_greeting() {
        let (mut q, _) = scripted(&[r#"{"return": {}}"#]);
        assert!(
            q.handshake()
                .unwrap_err()
                .to_string()
                .contains("not a greeting")
        );
    }

    #[test]
    fn medians_and_the_typical_run() {
        assert_eq!(median(vec![5, 1, 3]), 3);
        assert_eq!(median(vec![4, 1, 3, 10]), 3);
        let runs: Vec<Measured> = [30, 10, 20]
            .iter()
            .map(|&t| Measured {
                total_us: t,
                downtime_us: Some(t / 10),
                ..Measured::default()
            })
            .collect();
        let s = summarize(&runs);
        assert_eq!((s.total_us, s.downtime_us, s.typical), (20, Some(2), 2));
        assert_eq!(s.typical_downtime, 2);
        let mixed: Vec<Measured> = [(10, 9), (20, 1), (30, 5)]
            .iter()
            .map(|&(t, d)| Measured {
                total_us: t,
                downtime_us: Some(d),
                ..Measured::default()
            })
            .collect();
        let s = summarize(&mixed);
        assert_eq!(
            (s.typical, s.typical_downtime, s.downtime_us),
            (1, 2, Some(5))
        );
        assert_eq!(ratio(3, 2), "1.50×");
        assert_eq!(ratio(3, 0), "–");
    }
}
