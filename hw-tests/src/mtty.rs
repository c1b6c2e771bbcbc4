//! livemig-vfio against the kernel's migration driver sample, mtty (samples/vfio-mdev/mtty.c):
//! an emulated serial-port mdev that implements VFIO migration v2 with STOP_COPY, P2P and
//! PRE_COPY. Its stream is a 24-byte header (magic 0x7e9d09898c3e2c4e, version, port count)
//! followed by the ports' state: 96 bytes for the two-port type `mtty-2`.

use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use livemig_iommufd::{AutoDomains, DomainPath, Iommufd};
use livemig_vfio::{
    DataChannel, DeviceLocator, DmaLogger, DmaRange, MigrationDevice, MigrationFlags,
    MigrationState, VfioDevice, data, fsm,
};

use crate::harness::{Outcome, Runner};
use crate::util::{uuid, write_sysfs};
use crate::{check_eq, trace};

const MTTY_TYPE: &str = "/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2";
const MTTY_DATA_SIZE: usize = 96;

struct Mtty {
    uuid: String,
    dev: VfioDevice,
}

impl Mtty {
    /// Closes the device, then removes the mdev. (Removal waits for every user of the device
    /// to close it, so removing while our fd is open would never return.)
    fn remove(self) -> Result<()> {
        let Mtty { uuid, dev } = self;
        drop(dev);
        write_sysfs(format!("/sys/bus/mdev/devices/{uuid}/remove"), "1")
    }
}

/// Field order is drop order: devices first, then the domains, then the iommufd.
struct Ctx {
    a: Mtty,
    b: Mtty,
    _auto: AutoDomains,
    _iommufd: Iommufd,
}

fn create(iommufd: &Iommufd, auto: &mut AutoDomains) -> Result<Mtty> {
    let id = uuid()?;
    trace!("mtty create {id}");
    write_sysfs(Path::new(MTTY_TYPE).join("create"), &id)?;
    let path = DeviceLocator::default().mdev_cdev(&id)?;
    trace!("mtty open {}", path.display());
    let dev = VfioDevice::open(&path)?;
    let dev_id = dev.bind_iommufd(iommufd.as_fd())?;
    trace!("mtty bound as {dev_id}");
    let probed = iommufd.probe_device(dev_id);
    let chosen = auto.attach(&probed, |pt| {
        dev.attach_pt(pt).map_err(std::io::Error::from)
    })?;
    trace!("mtty attached: {chosen}");
    // An mdev has no IOMMU: HWPT allocation is refused and the IOAS is attached directly.
    if chosen.path != DomainPath::Ioas || chosen.dirty_tracking {
        bail!("mtty attach took an unexpected path: {chosen}");
    }
    Ok(Mtty { uuid: id, dev })
}

fn setup() -> Result<Ctx> {
    let iommufd = Iommufd::open()?;
    let mut auto = AutoDomains::new(iommufd.alloc_ioas()?);
    let a = create(&iommufd, &mut auto).context("first mtty")?;
    let b = create(&iommufd, &mut auto).context("second mtty")?;
    Ok(Ctx {
        a,
        b,
        _auto: auto,
        _iommufd: iommufd,
    })
}

fn to_running(dev: &mut VfioDevice) -> Result<()> {
    trace!("reset");
    dev.reset()?;
    check_eq!(
        dev.migration_state()?,
        MigrationState::Running,
        "after VFIO_DEVICE_RESET"
    );
    Ok(())
}

/// What the PRECOPY_INFOv2 cases pass in `vfio_precopy_info.flags`.
const GARBAGE: u32 = 0xffff_fff0;

/// `VFIO_MIG_GET_PRECOPY_INFO` on `data` with `flags` passed in; returns the flags the kernel
/// left (the crate always passes 0 and reads only REINIT, so this goes around it).
fn raw_precopy_flags(data: &impl AsFd, flags: u32) -> Result<u32> {
    let mut info = livemig_vfio::abi::vfio_precopy_info {
        argsz: size_of::<livemig_vfio::abi::vfio_precopy_info>() as u32,
        flags,
        ..Default::default()
    };
    // SAFETY: `info` is a vfio_precopy_info with argsz set; the fd is a migration data fd.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&data.as_fd()),
            livemig_vfio::abi::VFIO_MIG_GET_PRECOPY_INFO as libc::Ioctl,
            &mut info,
        )
    };
    ensure!(
        rc == 0,
        "VFIO_MIG_GET_PRECOPY_INFO: {}",
        std::io::Error::last_os_error()
    );
    Ok(info.flags)
}

/// STOP_COPY after a reset, then back to RUNNING.
fn save(dev: &mut VfioDevice) -> Result<Vec<u8>> {
    to_running(dev)?;
    save_as_is(dev)
}

/// UART registers through the ports' I/O BARs (BAR0 = port 0, BAR1 = port 1; mtty.c
/// `mdev_access`/`handle_bar_write`): scratch (SCR, offset 7) and line control (LCR, offset 3,
/// DLAB bit left clear). VFIO_DEVICE_RESET does not touch them (mtty.c `mtty_reset` only
/// resets the migration state machine), so they carry a distinctive state across the tests.
const UART_LCR: u64 = 3;
const UART_SCR: u64 = 7;

pub(crate) fn set_uart(dev: &VfioDevice, scr: [u8; 2], lcr: [u8; 2]) -> Result<()> {
    for port in 0..2u32 {
        let r = dev.region_info(port)?;
        dev.write_region(&r, UART_SCR, &[scr[port as usize]])?;
        dev.write_region(&r, UART_LCR, &[lcr[port as usize]])?;
    }
    Ok(())
}

pub(crate) fn uart(dev: &VfioDevice) -> Result<[u8; 4]> {
    let mut out = [0u8; 4];
    for port in 0..2u32 {
        let r = dev.region_info(port)?;
        let i = 2 * port as usize;
        dev.read_region(&r, UART_SCR, &mut out[i..i + 1])?;
        dev.read_region(&r, UART_LCR, &mut out[i + 1..i + 2])?;
    }
    Ok(out)
}

/// STOP_COPY from the current state (no reset first), then back to RUNNING.
fn save_as_is(dev: &mut VfioDevice) -> Result<Vec<u8>> {
    trace!("save: to STOP_COPY");
    let t = dev.transition(MigrationState::StopCopy)?;
    let mut out = Vec::new();
    data::save_stop_copy(
        &mut t.data.context("STOP_COPY opened no data fd")?,
        &mut out,
    )?;
    dev.transition(MigrationState::Running)?;
    Ok(out)
}

/// Puts `dev` in `state` by walking the planner's arcs; RESUMING gets `stream` written so that
/// leaving it succeeds. Returns the open data session (the caller keeps it alive).
fn enter(
    dev: &mut VfioDevice,
    state: MigrationState,
    stream: &[u8],
) -> Result<Option<livemig_vfio::DataFile>> {
    to_running(dev)?;
    trace!("enter {state}");
    let t = dev.transition(state)?;
    let mut data = t.data;
    if state == MigrationState::Resuming {
        let d = data.as_mut().context("RESUMING opened no data fd")?;
        data::write_resuming(d, stream)?;
    }
    check_eq!(dev.migration_state()?, state);
    Ok(data)
}

pub fn run(r: &mut Runner) {
    let mut ctx = match setup() {
        Ok(c) => {
            r.case("vfio.mtty_create_bind_attach_ioas", || Ok(Outcome::Pass));
            c
        }
        Err(e) => {
            r.fail("vfio.mtty_create_bind_attach_ioas", &format!("{e:#}"));
            return;
        }
    };

    r.case("vfio.mtty_migration_flags", || {
        let f = ctx.a.dev.migration_flags()?;
        check_eq!(
            f,
            MigrationFlags::STOP_COPY | MigrationFlags::P2P | MigrationFlags::PRE_COPY
        );
        ensure!(ctx.a.dev.supports_migration()?, "MIGRATION probe");
        Ok(Outcome::Pass)
    });

    // The dirty-tracker contract's life cycle against the kernel's DMA-logging uAPI. mtty does
    // no DMA, and its log ops are stubs that accept START/STOP and report nothing (6.12
    // samples/vfio-mdev/mtty.c lines 1284-1306, 7.3.4 lines 1287-1309), so no page can be
    // dirtied here: the rig checks the rules about state (harvest refused when not tracking,
    // stop without start a no-op, a restart taken by the kernel, a clean report) while the
    // coverage rules run over the simulated device in livemig's tests.
    r.case("vfio.mtty_dma_log_tracker_contract", || {
        use livemig::bitmap::PageBitmap;
        use livemig::memory::PAGE_SIZE;
        use livemig::tracker::{DirtyTracker, DmaLogTracker};
        let e = |what: &str| {
            let what = what.to_string();
            move |e: livemig::tracker::BoxError| anyhow::anyhow!("{what}: {e}")
        };
        let mut t =
            DmaLogTracker::new("mtty", &mut ctx.a.dev, &[(0, 1 << 20)], None).map_err(e("new"))?;
        let mut bits = PageBitmap::new(256, PAGE_SIZE);
        ensure!(t.harvest(&mut bits).is_err(), "a harvest before start");
        t.stop().map_err(e("stop before start"))?;
        t.start().map_err(e("DMA_LOGGING_START"))?;
        check_eq!(t.harvest(&mut bits).map_err(e("DMA_LOGGING_REPORT"))?, 0);
        t.start().map_err(e("a restart (STOP, then START)"))?;
        check_eq!(
            t.harvest(&mut bits)
                .map_err(e("a report after the restart"))?,
            0
        );
        t.stop().map_err(e("DMA_LOGGING_STOP"))?;
        ensure!(t.harvest(&mut bits).is_err(), "a harvest after stop");
        t.stop().map_err(e("a second stop"))?;
        check_eq!(bits.count(), 0);
        Ok(Outcome::Pass)
    });

    r.case("vfio.mtty_data_size", || {
        check_eq!(ctx.a.dev.stop_copy_size()?, MTTY_DATA_SIZE as u64);
        Ok(Outcome::Pass)
    });

    let stream = match save(&mut ctx.b.dev) {
        Ok(s) => s,
        Err(e) => {
            r.fail(
                "vfio.mtty_fsm",
                &format!("cannot capture a reference stream: {e:#}"),
            );
            return;
        }
    };

    // Every (current, target) pair through the kernel, compared with the planner.
    let flags = MigrationFlags::STOP_COPY | MigrationFlags::P2P | MigrationFlags::PRE_COPY;
    for cur in flags.states() {
        r.case(&format!("vfio.mtty_fsm_from_{cur}"), || {
            for target in flags.states() {
                let planned = fsm::plan(cur, target, flags);
                let _session = enter(&mut ctx.a.dev, cur, &stream)
                    .with_context(|| format!("entering {cur}"))?;
                if matches!(planned, Err(livemig_vfio::Error::Blocked { .. })) {
                    // Never sent to the kernel: Linux 6.12 spins forever in
                    // vfio_mig_get_next_state() on STOP_COPY -> PRE_COPY[_P2P] (fixed upstream
                    // in 2026). livemig-vfio must refuse it in userspace, state unchanged.
                    let e = ctx.a.dev.set_migration_state(target).unwrap_err();
                    ensure!(
                        matches!(e, livemig_vfio::Error::Blocked { .. }),
                        "{cur} -> {target} was not refused before the kernel: {e}"
                    );
                    check_eq!(ctx.a.dev.migration_state()?, cur);
                    continue;
                }
                // One combined SET, as a VMM without the planner would issue it.
                trace!("SET {cur} -> {target}");
                let kernel = ctx.a.dev.set_migration_state(target);
                trace!(
                    "SET {cur} -> {target}: {:?}",
                    kernel.as_ref().map(|d| d.is_some())
                );
                let after = ctx.a.dev.migration_state()?;
                match (&planned, &kernel) {
                    (Ok(_), Ok(_)) => check_eq!(after, target, "{cur} -> {target}"),
                    (Err(_), Err(e)) => {
                        check_eq!(e.errno(), Some(libc::EINVAL), "{cur} -> {target}: {e}");
                        check_eq!(after, cur, "{cur} -> {target} refused: state unchanged");
                    }
                    (p, k) => bail!(
                        "{cur} -> {target}: planner {} but kernel {}",
                        if p.is_ok() { "accepts" } else { "refuses" },
                        match k {
                            Ok(_) => "accepts".to_string(),
                            Err(e) => format!("refuses ({e})"),
                        }
                    ),
                }
                // The arc-by-arc walk reaches the same state.
                if let Ok(path) = planned {
                    let _again = enter(&mut ctx.a.dev, cur, &stream)?;
                    trace!("walk {cur} -> {target}");
                    let t = ctx.a.dev.transition(target)?;
                    check_eq!(t.path, path);
                    check_eq!(ctx.a.dev.migration_state()?, target);
                }
            }
            to_running(&mut ctx.a.dev)?;
            Ok(Outcome::Pass)
        });
    }

    r.case("vfio.mtty_stop_copy_to_resuming", || {
        // A distinctive source state, and a destination that holds something else: a RESUMING
        // that loads nothing cannot pass (see the negative control below).
        to_running(&mut ctx.a.dev)?;
        set_uart(&ctx.a.dev, [0x5a, 0xa5], [0x1b, 0x0b])?;
        let want = uart(&ctx.a.dev)?;
        check_eq!(
            want,
            [0x5a, 0x1b, 0xa5, 0x0b],
            "A's UART registers read back"
        );
        let from_a = save_as_is(&mut ctx.a.dev)?;
        check_eq!(from_a.len(), MTTY_DATA_SIZE);
        to_running(&mut ctx.b.dev)?;
        set_uart(&ctx.b.dev, [0x11, 0x22], [0x03, 0x03])?;
        ensure!(uart(&ctx.b.dev)? != want, "B must start in another state");
        let mut input = ctx
            .b
            .dev
            .transition(MigrationState::Resuming)?
            .data
            .context("RESUMING opened no data fd")?;
        // Segmentation must not matter: write it in odd pieces.
        for piece in from_a.chunks(7) {
            data::write_resuming(&mut input, piece)?;
        }
        let t = ctx.b.dev.transition(MigrationState::Running)?;
        check_eq!(t.path.last().copied(), Some(MigrationState::Running));
        check_eq!(
            uart(&ctx.b.dev)?,
            want,
            "B's UART registers after RESUMING are A's"
        );
        check_eq!(
            save_as_is(&mut ctx.b.dev)?,
            from_a,
            "B's saved state equals A's"
        );
        Ok(Outcome::Pass)
    });

    r.case("vfio.mtty_noop_resume_is_caught", || {
        // Negative control: a RESUMING that loads nothing must fail the register check the
        // case above relies on.
        to_running(&mut ctx.a.dev)?;
        set_uart(&ctx.a.dev, [0x6c, 0xc6], [0x1a, 0x0a])?;
        let want = uart(&ctx.a.dev)?;
        to_running(&mut ctx.b.dev)?;
        set_uart(&ctx.b.dev, [0x33, 0x44], [0x03, 0x03])?;
        let _input = ctx.b.dev.transition(MigrationState::Resuming)?.data;
        // No data written. Leaving RESUMING may be refused; either way B must not hold A's
        // state.
        let left = ctx.b.dev.transition(MigrationState::Running);
        let got = uart(&ctx.b.dev)?;
        ensure!(
            got != want,
            "the no-op RESUMING left B with A's registers {got:02x?}: the check cannot tell"
        );
        to_running(&mut ctx.b.dev)?;
        trace!(
            "negative control: no-op RESUMING caught (leaving RESUMING: {}; B holds {got:02x?}, A {want:02x?})",
            match left {
                Ok(_) => "accepted".to_string(),
                Err(e) => format!("refused: {e}"),
            }
        );
        Ok(Outcome::Pass)
    });

    r.case("vfio.mtty_precopy", || {
        to_running(&mut ctx.a.dev)?;
        let mut session = ctx
            .a
            .dev
            .transition(MigrationState::PreCopy)?
            .data
            .context("PRE_COPY opened no data fd")?;
        let mut stream = Vec::new();
        let info = session.precopy_info()?;
        ensure!(
            info.initial_bytes > 0,
            "PRE_COPY reports initial bytes: {info:?}"
        );
        let round = data::save_precopy(&mut session, &mut stream, u64::MAX)?;
        check_eq!(round.bytes, info.initial_bytes);
        let again = data::save_precopy(&mut session, &mut stream, u64::MAX)?;
        ensure!(
            again.drained && again.bytes == 0,
            "temporary end of stream: {again:?}"
        );
        let t = ctx.a.dev.transition(MigrationState::StopCopy)?;
        ensure!(t.data.is_none(), "PRE_COPY -> STOP_COPY keeps the session");
        let e = session.precopy_info().unwrap_err();
        check_eq!(
            e.errno(),
            Some(libc::EINVAL),
            "PRECOPY_INFO outside PRE_COPY"
        );
        data::save_stop_copy(&mut session, &mut stream)?;
        check_eq!(stream.len(), MTTY_DATA_SIZE);
        drop(session);
        ctx.a.dev.transition(MigrationState::Running)?;
        to_running(&mut ctx.b.dev)?;
        let mut input = ctx
            .b
            .dev
            .transition(MigrationState::Resuming)?
            .data
            .context("no fd")?;
        data::write_resuming(&mut input, &stream)?;
        ctx.b.dev.transition(MigrationState::Running)?;
        check_eq!(save(&mut ctx.b.dev)?, save(&mut ctx.a.dev)?);
        Ok(Outcome::Pass)
    });

    r.case("vfio.mtty_corrupted_stream_refused", || {
        // A corrupted header: mtty refuses the bytes at write() (EFAULT). The destination
        // stays in RESUMING, reported, and must be reset: leaving RESUMING after a failed write
        // would load whatever was counted (mtty counts the refused bytes too).
        let mut bad = save(&mut ctx.a.dev)?;
        bad[0] ^= 0xff; // the magic
        to_running(&mut ctx.b.dev)?;
        let mut input = ctx
            .b
            .dev
            .transition(MigrationState::Resuming)?
            .data
            .context("no fd")?;
        let e = data::write_resuming(&mut input, &bad).unwrap_err();
        check_eq!(e.errno(), Some(libc::EFAULT), "{e}");
        check_eq!(ctx.b.dev.migration_state()?, MigrationState::Resuming);
        drop(input);
        to_running(&mut ctx.b.dev)?;

        // A truncated stream: every byte accepted, but leaving RESUMING validates the whole
        // state and fails (EINVAL); the arc and the state it left are reported.
        let good = save(&mut ctx.a.dev)?;
        let mut input = ctx
            .b
            .dev
            .transition(MigrationState::Resuming)?
            .data
            .context("no fd")?;
        data::write_resuming(&mut input, &good[..good.len() / 2])?;
        let e = ctx.b.dev.transition(MigrationState::Running).unwrap_err();
        match &e {
            livemig_vfio::Error::ArcFailed {
                from, to, left_in, ..
            } => {
                check_eq!(
                    (*from, *to),
                    (MigrationState::Resuming, MigrationState::Stop)
                );
                check_eq!(*left_in, Some(MigrationState::Resuming), "{e}");
            }
            other => bail!("unexpected error {other}"),
        }
        check_eq!(e.errno(), Some(libc::EINVAL), "{e}");
        drop(input);
        to_running(&mut ctx.b.dev)?;
        Ok(Outcome::Pass)
    });

    r.case("vfio.mtty_oversized_stream_refused", || {
        to_running(&mut ctx.b.dev)?;
        let mut input = ctx
            .b
            .dev
            .transition(MigrationState::Resuming)?
            .data
            .context("no fd")?;
        let e = data::write_resuming(&mut input, &[0u8; MTTY_DATA_SIZE + 1]).unwrap_err();
        check_eq!(e.errno(), Some(libc::ENOMEM), "{e}");
        drop(input);
        to_running(&mut ctx.b.dev)?;
        Ok(Outcome::Pass)
    });

    r.case("vfio.mtty_dma_logging", || {
        // mtty registers DMA-logging ops that track nothing: start/report/stop must all work and
        // the report must leave the bitmap clean (the kernel only sets bits).
        ensure!(ctx.a.dev.supports_dma_logging()?, "DMA_LOGGING_START probe");
        let session = ctx.a.dev.start(
            4096,
            &[DmaRange::new(0, 1 << 30), DmaRange::new(1 << 32, 1 << 30)],
        )?;
        check_eq!(session.ranges.len(), 2);
        let mut bm = vec![0u64; livemig_vfio::dma_log::bitmap_words(1 << 20, 4096) as usize];
        ctx.a.dev.dma_logging_report(0, 1 << 20, 4096, &mut bm)?;
        ensure!(bm.iter().all(|&w| w == 0), "mtty logged DMA it never does");
        ctx.a.dev.dma_logging_stop()?;
        Ok(Outcome::Pass)
    });

    // PRECOPY_INFOv2 (Linux 7.3): the opt-in is the kernel's to prove, since mtty never
    // re-initialises. With it the core zeroes `flags` before the driver fills them (7.3.4
    // include/linux/vfio.h lines 317-320); without it they come back as passed in (6.12, and 7.3
    // before the opt-in). `b` opts in; `a` does not and is the control in the same case.
    if crate::harness::kernel_at_least(7, 0) {
        r.case("vfio.mtty_precopy_info_v2_opt_in", || {
            to_running(&mut ctx.a.dev)?;
            to_running(&mut ctx.b.dev)?;
            check_eq!(
                ctx.b.dev.enable_precopy_info_v2()?,
                livemig_vfio::PrecopyInfoV2::Enabled
            );
            let mut plain = ctx.a.dev.transition(MigrationState::PreCopy)?.data;
            let mut v2 = ctx.b.dev.transition(MigrationState::PreCopy)?.data;
            let (plain, v2) = (
                plain.as_mut().context("a: no data fd")?,
                v2.as_mut().context("b: no data fd")?,
            );
            check_eq!(
                raw_precopy_flags(plain, GARBAGE)?,
                GARBAGE,
                "without the opt-in"
            );
            check_eq!(raw_precopy_flags(v2, GARBAGE)?, 0, "after the opt-in");
            let info = v2.precopy_info()?;
            ensure!(!info.reinit && info.initial_bytes > 0, "{info:?}");
            ctx.a.dev.transition(MigrationState::Running)?;
            ctx.b.dev.transition(MigrationState::Running)?;
            Ok(Outcome::Pass)
        });
        // 7.3 refuses the blocked arc itself (7.3.4 vfio_main.c lines 891-896); livemig-vfio
        // still refuses it before the syscall, as it must on 6.12 where the kernel would spin.
        r.case("vfio.mtty_stop_copy_to_pre_copy_kernel_einval", || {
            to_running(&mut ctx.a.dev)?;
            let t = ctx.a.dev.transition(MigrationState::StopCopy)?;
            let e = ctx
                .a
                .dev
                .set_migration_state(MigrationState::PreCopy)
                .err()
                .context("the crate let STOP_COPY -> PRE_COPY through")?;
            ensure!(
                matches!(e, livemig_vfio::Error::Blocked { .. }),
                "the crate's refusal: {e}"
            );
            let mut arg = livemig_vfio::abi::FeatureArg::new(
                livemig_vfio::abi::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                livemig_vfio::abi::VFIO_DEVICE_FEATURE_SET,
                livemig_vfio::abi::vfio_device_feature_mig_state {
                    device_state: MigrationState::PreCopy.into(),
                    data_fd: -1,
                },
            );
            // SAFETY: `arg` is a vfio_device_feature header with the MIG_DEVICE_STATE payload.
            let rc = unsafe {
                libc::ioctl(
                    std::os::fd::AsRawFd::as_raw_fd(&ctx.a.dev),
                    livemig_vfio::abi::VFIO_DEVICE_FEATURE as libc::Ioctl,
                    &mut arg,
                )
            };
            let errno = std::io::Error::last_os_error().raw_os_error();
            check_eq!((rc, errno), (-1, Some(libc::EINVAL)), "the kernel's answer");
            check_eq!(ctx.a.dev.migration_state()?, MigrationState::StopCopy);
            drop(t);
            to_running(&mut ctx.a.dev)?;
            Ok(Outcome::Pass)
        });
    } else {
        r.case("vfio.mtty_precopy_info_v2_not_supported", || {
            to_running(&mut ctx.a.dev)?;
            match ctx.a.dev.enable_precopy_info_v2()? {
                livemig_vfio::PrecopyInfoV2::NotSupported(why) => {
                    ensure!(why.contains("ENOTTY"), "{why}")
                }
                other => bail!("6.12 accepted the opt-in: {other:?}"),
            }
            let mut t = ctx.a.dev.transition(MigrationState::PreCopy)?;
            let data = t.data.as_mut().context("no data fd")?;
            check_eq!(
                raw_precopy_flags(data, GARBAGE)?,
                GARBAGE,
                "flags are not an output"
            );
            ensure!(!data.precopy_info()?.reinit);
            drop(t);
            ctx.a.dev.transition(MigrationState::Running)?;
            Ok(Outcome::Pass)
        });
    }

    let Ctx {
        a,
        b,
        _auto,
        _iommufd,
    } = ctx;
    r.case("vfio.mtty_remove", || {
        a.remove()?;
        b.remove()?;
        Ok(Outcome::Pass)
    });
}
