//! Raw VFIO uAPI: ioctl numbers, constants and `#[repr(C)]` mirrors of the kernel structures.
//!
//! Everything here is transcribed from `include/uapi/linux/vfio.h` of Linux 6.12 (Debian
//! `linux-source-6.12`); the tests at the bottom pin every ioctl number, struct size and field
//! offset to those headers. The structures are the kernel's and are not meant for application
//! code: the typed API in the rest of the crate is. They are public so that other crates (the
//! conformance tests, a VMM with its own ioctl layer) can reuse the exact layouts.
//!
//! Conventions of the VFIO uAPI (vfio.h, "VFIO user API"): every variable-size argument begins
//! with `argsz`, the size of the structure the caller passes. Where the header's kernel-doc says
//! a field "Must be 0" (the `flags` of `vfio_device_bind_iommufd`, `_attach_iommufd_pt` and
//! `_detach_iommufd_pt`, vfio.h lines 907, 934, 965) the kernel enforces it with EINVAL
//! (`drivers/vfio/device_cdev.c` lines 78, 175, 210). `vfio_device_feature_dma_logging_control`'s
//! `__reserved` and `vfio_precopy_info`'s `flags` carry no such rule and 6.12 never checks them;
//! their field docs say what the kernel does instead. This crate writes 0 into both.

/// The ioctl "type" byte shared by VFIO and iommufd: `';'` (vfio.h `VFIO_TYPE`).
pub const VFIO_TYPE: u32 = b';' as u32;
/// First VFIO ioctl command number (vfio.h `VFIO_BASE`).
pub const VFIO_BASE: u32 = 100;

/// Encodes `_IO(type, nr)` as defined by `include/uapi/asm-generic/ioctl.h`: direction 0 and size
/// 0, so the request is `type << 8 | nr`. VFIO and iommufd use `_IO` for every ioctl and pass the
/// structure size in its first field instead.
pub const fn io(ty: u32, nr: u32) -> u64 {
    // _IOC(_IOC_NONE, type, nr, 0): dir bits at 30, size at 16, type at 8, nr at 0.
    ((ty as u64) << 8) | nr as u64
}

/// `VFIO_DEVICE_GET_INFO`: `_IO(VFIO_TYPE, VFIO_BASE + 7)`.
pub const VFIO_DEVICE_GET_INFO: u64 = io(VFIO_TYPE, VFIO_BASE + 7);
/// `VFIO_DEVICE_GET_REGION_INFO`: `_IO(VFIO_TYPE, VFIO_BASE + 8)`.
pub const VFIO_DEVICE_GET_REGION_INFO: u64 = io(VFIO_TYPE, VFIO_BASE + 8);
/// `VFIO_DEVICE_RESET`: `_IO(VFIO_TYPE, VFIO_BASE + 11)`.
pub const VFIO_DEVICE_RESET: u64 = io(VFIO_TYPE, VFIO_BASE + 11);
/// `VFIO_DEVICE_FEATURE`: `_IO(VFIO_TYPE, VFIO_BASE + 17)`.
pub const VFIO_DEVICE_FEATURE: u64 = io(VFIO_TYPE, VFIO_BASE + 17);
/// `VFIO_DEVICE_BIND_IOMMUFD`: `_IO(VFIO_TYPE, VFIO_BASE + 18)`.
pub const VFIO_DEVICE_BIND_IOMMUFD: u64 = io(VFIO_TYPE, VFIO_BASE + 18);
/// `VFIO_DEVICE_ATTACH_IOMMUFD_PT`: `_IO(VFIO_TYPE, VFIO_BASE + 19)`.
pub const VFIO_DEVICE_ATTACH_IOMMUFD_PT: u64 = io(VFIO_TYPE, VFIO_BASE + 19);
/// `VFIO_DEVICE_DETACH_IOMMUFD_PT`: `_IO(VFIO_TYPE, VFIO_BASE + 20)`.
pub const VFIO_DEVICE_DETACH_IOMMUFD_PT: u64 = io(VFIO_TYPE, VFIO_BASE + 20);
/// `VFIO_MIG_GET_PRECOPY_INFO`: `_IO(VFIO_TYPE, VFIO_BASE + 21)`, issued on the data fd.
pub const VFIO_MIG_GET_PRECOPY_INFO: u64 = io(VFIO_TYPE, VFIO_BASE + 21);

/// `VFIO_DEVICE_FEATURE_MASK`: the low 16 bits of `vfio_device_feature.flags` select the feature.
pub const VFIO_DEVICE_FEATURE_MASK: u32 = 0xffff;
/// `VFIO_DEVICE_FEATURE_GET`: read the feature into `data[]`.
pub const VFIO_DEVICE_FEATURE_GET: u32 = 1 << 16;
/// `VFIO_DEVICE_FEATURE_SET`: write the feature from `data[]`.
pub const VFIO_DEVICE_FEATURE_SET: u32 = 1 << 17;
/// `VFIO_DEVICE_FEATURE_PROBE`: only ask whether the feature (and GET/SET) is supported.
pub const VFIO_DEVICE_FEATURE_PROBE: u32 = 1 << 18;

/// `VFIO_DEVICE_FEATURE_PCI_VF_TOKEN`.
pub const VFIO_DEVICE_FEATURE_PCI_VF_TOKEN: u32 = 0;
/// `VFIO_DEVICE_FEATURE_MIGRATION`: GET the device's migration flags.
pub const VFIO_DEVICE_FEATURE_MIGRATION: u32 = 1;
/// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`: GET/SET the migration state; SET may return a data fd.
pub const VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: u32 = 2;
/// `VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY`.
pub const VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY: u32 = 3;
/// `VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP`.
pub const VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP: u32 = 4;
/// `VFIO_DEVICE_FEATURE_LOW_POWER_EXIT`.
pub const VFIO_DEVICE_FEATURE_LOW_POWER_EXIT: u32 = 5;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START`: SET starts device DMA logging.
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_START: u32 = 6;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`: SET stops device DMA logging.
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP: u32 = 7;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`: GET reads and clears the DMA log of a range.
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT: u32 = 8;
/// `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2`: SET (no payload) opts in to `vfio_precopy_info`
/// `flags` as an output (Linux 7.3.4 `include/uapi/linux/vfio.h` lines 1528-1535; the opt-in
/// is `vfio_ioctl_device_feature_migration_precopy_info_v2`, `drivers/vfio/vfio_main.c` lines
/// 1008-1023: EINVAL without PRE_COPY; cleared when the device is closed, line 595). Linux 6.12
/// answers ENOTTY.
pub const VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2: u32 = 12;
/// `VFIO_PRECOPY_INFO_REINIT`: new initial data is on the stream (7.3.4 vfio.h line 1317);
/// reported only after the v2 opt-in.
pub const VFIO_PRECOPY_INFO_REINIT: u32 = 1 << 0;
/// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`: GET the estimated STOP_COPY length.
pub const VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: u32 = 9;
/// `VFIO_DEVICE_FEATURE_BUS_MASTER`.
pub const VFIO_DEVICE_FEATURE_BUS_MASTER: u32 = 10;

/// `VFIO_MIGRATION_STOP_COPY`: STOP, STOP_COPY and RESUMING are supported (always set).
pub const VFIO_MIGRATION_STOP_COPY: u64 = 1 << 0;
/// `VFIO_MIGRATION_P2P`: RUNNING_P2P is supported.
pub const VFIO_MIGRATION_P2P: u64 = 1 << 1;
/// `VFIO_MIGRATION_PRE_COPY`: PRE_COPY (and PRE_COPY_P2P with P2P) is supported.
pub const VFIO_MIGRATION_PRE_COPY: u64 = 1 << 2;

/// `enum vfio_device_mig_state` values.
pub const VFIO_DEVICE_STATE_ERROR: u32 = 0;
/// `VFIO_DEVICE_STATE_STOP`.
pub const VFIO_DEVICE_STATE_STOP: u32 = 1;
/// `VFIO_DEVICE_STATE_RUNNING`.
pub const VFIO_DEVICE_STATE_RUNNING: u32 = 2;
/// `VFIO_DEVICE_STATE_STOP_COPY`.
pub const VFIO_DEVICE_STATE_STOP_COPY: u32 = 3;
/// `VFIO_DEVICE_STATE_RESUMING`.
pub const VFIO_DEVICE_STATE_RESUMING: u32 = 4;
/// `VFIO_DEVICE_STATE_RUNNING_P2P`.
pub const VFIO_DEVICE_STATE_RUNNING_P2P: u32 = 5;
/// `VFIO_DEVICE_STATE_PRE_COPY`.
pub const VFIO_DEVICE_STATE_PRE_COPY: u32 = 6;
/// `VFIO_DEVICE_STATE_PRE_COPY_P2P`.
pub const VFIO_DEVICE_STATE_PRE_COPY_P2P: u32 = 7;

/// `VFIO_DEVICE_FLAGS_RESET`: the device supports `VFIO_DEVICE_RESET`.
pub const VFIO_DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// `VFIO_DEVICE_FLAGS_PCI`: a vfio-pci device (also reported by PCI mdevs such as mtty).
pub const VFIO_DEVICE_FLAGS_PCI: u32 = 1 << 1;
/// `VFIO_DEVICE_FLAGS_CAPS`: the info structure carries a capability chain.
pub const VFIO_DEVICE_FLAGS_CAPS: u32 = 1 << 7;

/// `VFIO_REGION_INFO_FLAG_READ`.
pub const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// `VFIO_REGION_INFO_FLAG_WRITE`.
pub const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// `VFIO_REGION_INFO_FLAG_MMAP`.
pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
/// `VFIO_REGION_INFO_FLAG_CAPS`.
pub const VFIO_REGION_INFO_FLAG_CAPS: u32 = 1 << 3;

/// vfio-pci region index of BAR0 (`VFIO_PCI_BAR0_REGION_INDEX`); BARs 1..=5 follow.
pub const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
/// `VFIO_PCI_ROM_REGION_INDEX`.
pub const VFIO_PCI_ROM_REGION_INDEX: u32 = 6;
/// `VFIO_PCI_CONFIG_REGION_INDEX`: PCI configuration space.
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;

/// `struct vfio_device_feature` header; the feature data follows it directly.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct vfio_device_feature {
    /// in: size of this header plus the data that follows.
    pub argsz: u32,
    /// in: feature index (`VFIO_DEVICE_FEATURE_MASK`) | GET/SET/PROBE.
    pub flags: u32,
}

/// `struct vfio_device_feature_migration` (feature `VFIO_DEVICE_FEATURE_MIGRATION`, GET).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct vfio_device_feature_migration {
    /// out: `VFIO_MIGRATION_*` flags.
    pub flags: u64,
}

/// `struct vfio_device_feature_mig_state` (feature `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct vfio_device_feature_mig_state {
    /// in (SET) / out (GET): an `enum vfio_device_mig_state` value.
    pub device_state: u32,
    /// out: the data transfer fd created by the arc, or -1.
    pub data_fd: i32,
}

/// `struct vfio_device_feature_mig_data_size` (feature `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct vfio_device_feature_mig_data_size {
    /// out: estimated bytes needed to complete STOP_COPY.
    pub stop_copy_length: u64,
}

/// `struct vfio_device_feature_dma_logging_control` (feature `DMA_LOGGING_START`, SET).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct vfio_device_feature_dma_logging_control {
    /// in: requested tracking granularity; out: the granularity the device chose.
    pub page_size: u64,
    /// in: number of entries at `ranges` (non-zero, at most `PAGE_SIZE / 16`).
    pub num_ranges: u32,
    /// Padding. vfio.h (6.12, lines 1372-1377) documents no rule for it and
    /// `vfio_ioctl_device_feature_logging_start` (`vfio_main.c` lines 1047-1129) reads only
    /// `page_size`, `num_ranges` and `ranges` and hands the driver the range tree and
    /// `page_size` (line 1116), so a non-zero value is accepted and ignored; this crate
    /// writes 0.
    pub __reserved: u32,
    /// in: user pointer to `num_ranges` `vfio_device_feature_dma_logging_range`.
    pub ranges: u64,
}

/// `struct vfio_device_feature_dma_logging_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct vfio_device_feature_dma_logging_range {
    /// in: first IOVA, aligned to the control's `page_size`.
    pub iova: u64,
    /// in: length in bytes, aligned to the control's `page_size`.
    pub length: u64,
}

/// `struct vfio_device_feature_dma_logging_report` (feature `DMA_LOGGING_REPORT`, GET).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct vfio_device_feature_dma_logging_report {
    /// in: first IOVA of the range to report.
    pub iova: u64,
    /// in: length of the range in bytes.
    pub length: u64,
    /// in: bytes per bitmap bit; a power of two, at least 4096.
    pub page_size: u64,
    /// in: user pointer to the u64 bitmap; the kernel only sets bits.
    pub bitmap: u64,
}

/// `struct vfio_precopy_info` (`VFIO_MIG_GET_PRECOPY_INFO` on the data fd).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct vfio_precopy_info {
    /// in: size of this structure.
    pub argsz: u32,
    /// Not documented in 6.12's vfio.h (lines 1276-1281). The 6.12 drivers
    /// (`hisi_acc_vf_precopy_ioctl`, hisi_acc_vfio_pci.c lines 798-841; `mlx5vf_precopy_ioctl`,
    /// mlx5/main.c lines 483-572; qat/main.c lines 122-163) check only `argsz` and copy the
    /// field back as the caller wrote it, so it is neither validated nor an output.
    /// Linux 7.3's vfio.h (lines 1278-1280, 1317) makes it an output (`VFIO_PRECOPY_INFO_REINIT`,
    /// bit 0) only after the `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` opt-in, and reserved
    /// otherwise. This crate writes 0 and ignores the returned value.
    pub flags: u32,
    /// out: initial pre-copy bytes still to be read.
    pub initial_bytes: u64,
    /// out: bytes of device state changed since last read.
    pub dirty_bytes: u64,
}

/// `struct vfio_device_bind_iommufd` (`VFIO_DEVICE_BIND_IOMMUFD`, cdev fds only).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct vfio_device_bind_iommufd {
    /// in: size of this structure.
    pub argsz: u32,
    /// must be 0.
    pub flags: u32,
    /// in: the iommufd to bind to.
    pub iommufd: i32,
    /// out: the iommufd device id of this bond.
    pub out_devid: u32,
}

/// `struct vfio_device_attach_iommufd_pt` (`VFIO_DEVICE_ATTACH_IOMMUFD_PT`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct vfio_device_attach_iommufd_pt {
    /// in: size of this structure.
    pub argsz: u32,
    /// must be 0.
    pub flags: u32,
    /// in: IOAS or HWPT id; out: the IOAS id, or the HWPT the device ended up attached to.
    pub pt_id: u32,
}

/// `struct vfio_device_detach_iommufd_pt` (`VFIO_DEVICE_DETACH_IOMMUFD_PT`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct vfio_device_detach_iommufd_pt {
    /// in: size of this structure.
    pub argsz: u32,
    /// must be 0.
    pub flags: u32,
}

/// `struct vfio_device_info` (`VFIO_DEVICE_GET_INFO`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct vfio_device_info {
    /// in: size of the buffer.
    pub argsz: u32,
    /// out: `VFIO_DEVICE_FLAGS_*`.
    pub flags: u32,
    /// out: highest region index + 1.
    pub num_regions: u32,
    /// out: highest IRQ index + 1.
    pub num_irqs: u32,
    /// out: offset of the first capability, when `VFIO_DEVICE_FLAGS_CAPS`.
    pub cap_offset: u32,
    /// padding.
    pub pad: u32,
}

/// `struct vfio_region_info` (`VFIO_DEVICE_GET_REGION_INFO`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct vfio_region_info {
    /// in: size of the buffer.
    pub argsz: u32,
    /// out: `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// in: region index.
    pub index: u32,
    /// out: offset of the first capability, when `VFIO_REGION_INFO_FLAG_CAPS`.
    pub cap_offset: u32,
    /// out: region size in bytes (0: region not implemented).
    pub size: u64,
    /// out: offset of the region within the device fd (for pread/pwrite/mmap).
    pub offset: u64,
}

/// A `vfio_device_feature` header followed by its feature payload, as one ioctl argument.
///
/// `argsz` covers the header and `T`; every payload in vfio.h is 4- or 8-byte aligned and the
/// header is 8 bytes, so `data` sits at offset 8 exactly as the kernel's `data[]` does.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct FeatureArg<T> {
    /// The header.
    pub hdr: vfio_device_feature,
    /// The feature payload.
    pub data: T,
}

impl<T> FeatureArg<T> {
    /// Builds the argument for `feature` with the given GET/SET/PROBE bits.
    pub fn new(feature: u32, op_flags: u32, data: T) -> Self {
        FeatureArg {
            hdr: vfio_device_feature {
                argsz: core::mem::size_of::<Self>() as u32,
                flags: (feature & VFIO_DEVICE_FEATURE_MASK) | op_flags,
            },
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    /// ioctl numbers as the 6.12 headers define them (`_IO(';', 100 + n)`).
    #[test]
    fn ioctl_numbers_match_linux_6_12() {
        assert_eq!(VFIO_DEVICE_GET_INFO, 0x3b6b);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3b6c);
        assert_eq!(VFIO_DEVICE_RESET, 0x3b6f);
        assert_eq!(VFIO_DEVICE_FEATURE, 0x3b75);
        assert_eq!(VFIO_DEVICE_BIND_IOMMUFD, 0x3b76);
        assert_eq!(VFIO_DEVICE_ATTACH_IOMMUFD_PT, 0x3b77);
        assert_eq!(VFIO_DEVICE_DETACH_IOMMUFD_PT, 0x3b78);
        assert_eq!(VFIO_MIG_GET_PRECOPY_INFO, 0x3b79);
    }

    #[test]
    fn feature_and_flag_values_match_linux_6_12() {
        assert_eq!(VFIO_DEVICE_FEATURE_GET, 0x1_0000);
        assert_eq!(VFIO_DEVICE_FEATURE_SET, 0x2_0000);
        assert_eq!(VFIO_DEVICE_FEATURE_PROBE, 0x4_0000);
        assert_eq!(
            [
                VFIO_DEVICE_FEATURE_MIGRATION,
                VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
                VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
                VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
                VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
            ],
            [1, 2, 6, 7, 8, 9]
        );
        assert_eq!(
            [
                VFIO_MIGRATION_STOP_COPY,
                VFIO_MIGRATION_P2P,
                VFIO_MIGRATION_PRE_COPY
            ],
            [1, 2, 4]
        );
        assert_eq!(
            [
                VFIO_DEVICE_STATE_ERROR,
                VFIO_DEVICE_STATE_STOP,
                VFIO_DEVICE_STATE_RUNNING,
                VFIO_DEVICE_STATE_STOP_COPY,
                VFIO_DEVICE_STATE_RESUMING,
                VFIO_DEVICE_STATE_RUNNING_P2P,
                VFIO_DEVICE_STATE_PRE_COPY,
                VFIO_DEVICE_STATE_PRE_COPY_P2P,
            ],
            [0, 1, 2, 3, 4, 5, 6, 7]
        );
    }

    #[test]
    fn struct_layouts_match_linux_6_12() {
        assert_eq!(size_of::<vfio_device_feature>(), 8);
        assert_eq!(offset_of!(vfio_device_feature, flags), 4);

        assert_eq!(size_of::<vfio_device_feature_migration>(), 8);
        assert_eq!(size_of::<vfio_device_feature_mig_state>(), 8);
        assert_eq!(offset_of!(vfio_device_feature_mig_state, data_fd), 4);
        assert_eq!(size_of::<vfio_device_feature_mig_data_size>(), 8);

        assert_eq!(size_of::<vfio_device_feature_dma_logging_control>(), 24);
        assert_eq!(
            offset_of!(vfio_device_feature_dma_logging_control, num_ranges),
            8
        );
        assert_eq!(
            offset_of!(vfio_device_feature_dma_logging_control, __reserved),
            12
        );
        assert_eq!(
            offset_of!(vfio_device_feature_dma_logging_control, ranges),
            16
        );
        assert_eq!(size_of::<vfio_device_feature_dma_logging_range>(), 16);
        assert_eq!(offset_of!(vfio_device_feature_dma_logging_range, length), 8);
        assert_eq!(size_of::<vfio_device_feature_dma_logging_report>(), 32);
        assert_eq!(
            offset_of!(vfio_device_feature_dma_logging_report, length),
            8
        );
        assert_eq!(
            offset_of!(vfio_device_feature_dma_logging_report, page_size),
            16
        );
        assert_eq!(
            offset_of!(vfio_device_feature_dma_logging_report, bitmap),
            24
        );

        assert_eq!(size_of::<vfio_precopy_info>(), 24);
        assert_eq!(offset_of!(vfio_precopy_info, initial_bytes), 8);
        assert_eq!(offset_of!(vfio_precopy_info, dirty_bytes), 16);

        assert_eq!(size_of::<vfio_device_bind_iommufd>(), 16);
        assert_eq!(offset_of!(vfio_device_bind_iommufd, iommufd), 8);
        assert_eq!(offset_of!(vfio_device_bind_iommufd, out_devid), 12);
        assert_eq!(size_of::<vfio_device_attach_iommufd_pt>(), 12);
        assert_eq!(offset_of!(vfio_device_attach_iommufd_pt, pt_id), 8);
        assert_eq!(size_of::<vfio_device_detach_iommufd_pt>(), 8);

        assert_eq!(size_of::<vfio_device_info>(), 24);
        assert_eq!(offset_of!(vfio_device_info, num_regions), 8);
        assert_eq!(offset_of!(vfio_device_info, cap_offset), 16);
        assert_eq!(size_of::<vfio_region_info>(), 32);
        assert_eq!(offset_of!(vfio_region_info, index), 8);
        assert_eq!(offset_of!(vfio_region_info, size), 16);
        assert_eq!(offset_of!(vfio_region_info, offset), 24);
    }

    #[test]
    fn feature_arg_places_data_after_the_header() {
        let arg = FeatureArg::new(
            VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            VFIO_DEVICE_FEATURE_SET,
            vfio_device_feature_mig_state::default(),
        );
        assert_eq!(
            offset_of!(FeatureArg<vfio_device_feature_mig_state>, data),
            8
        );
        assert_eq!(arg.hdr.argsz, 16);
        assert_eq!(arg.hdr.flags, 0x2_0002);
        let arg = FeatureArg::new(
            VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
            VFIO_DEVICE_FEATURE_GET,
            vfio_device_feature_dma_logging_report::default(),
        );
        assert_eq!(arg.hdr.argsz, 40);
    }

    /// Cross-check against rust-vmm's bindgen output (generated from a newer kernel): the fields
    /// the two have in common sit at the same offsets. Structures that grew after 6.12
    /// (`vfio_device_bind_iommufd`, `vfio_device_attach_iommufd_pt`) only share a prefix.
    #[test]
    fn common_prefix_matches_vfio_bindings() {
        use vfio_bindings::bindings::vfio as vb;
        assert_eq!(size_of::<vb::vfio_device_feature_mig_state>(), 8);
        assert_eq!(
            size_of::<vb::vfio_precopy_info>(),
            size_of::<vfio_precopy_info>()
        );
        assert_eq!(
            size_of::<vb::vfio_device_feature_dma_logging_control>(),
            size_of::<vfio_device_feature_dma_logging_control>()
        );
        assert_eq!(
            size_of::<vb::vfio_device_feature_dma_logging_report>(),
            size_of::<vfio_device_feature_dma_logging_report>()
        );
        assert_eq!(
            offset_of!(vb::vfio_device_bind_iommufd, out_devid),
            offset_of!(vfio_device_bind_iommufd, out_devid)
        );
        assert_eq!(
            offset_of!(vb::vfio_device_attach_iommufd_pt, pt_id),
            offset_of!(vfio_device_attach_iommufd_pt, pt_id)
        );
        assert_eq!(vb::VFIO_MIGRATION_PRE_COPY as u64, VFIO_MIGRATION_PRE_COPY);
        assert_eq!(
            vb::VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
            VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT
        );
    }
}
