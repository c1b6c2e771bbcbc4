//! Raw iommufd uAPI: ioctl numbers, constants and `#[repr(C)]` mirrors of the kernel structures.
//!
//! Transcribed from `include/uapi/linux/iommufd.h` of Linux 6.12 (Debian `linux-source-6.12`),
//! plus three later additions that callers must *probe* for rather than assume:
//! `IOMMU_IOAS_MAP_FILE` (Linux 6.13, command 0x8f), the ARM SMMUv3 hardware-info type
//! (6.14, type 2) and the AMD hardware-info type (type 4). The selftest ("mock") hardware-info
//! type comes from `drivers/iommu/iommufd/iommufd_test.h`. Tests pin every number, size and
//! offset.
//!
//! "General ioctl format" (iommufd.h): every argument starts with `size`, the size of the
//! structure the caller passes; the kernel requires any bytes beyond what it understands to be
//! zero (E2BIG otherwise) and every `__reserved` field to be zero.

/// The ioctl type byte (`IOMMUFD_TYPE`, `';'`).
pub const IOMMUFD_TYPE: u32 = b';' as u32;

/// `_IO(type, nr)` (`include/uapi/asm-generic/ioctl.h`): direction and size 0.
pub const fn io(ty: u32, nr: u32) -> u64 {
    ((ty as u64) << 8) | nr as u64
}

/// `IOMMUFD_CMD_BASE`.
pub const IOMMUFD_CMD_BASE: u32 = 0x80;

/// `IOMMU_DESTROY`.
pub const IOMMU_DESTROY: u64 = io(IOMMUFD_TYPE, 0x80);
/// `IOMMU_IOAS_ALLOC`.
pub const IOMMU_IOAS_ALLOC: u64 = io(IOMMUFD_TYPE, 0x81);
/// `IOMMU_IOAS_ALLOW_IOVAS`.
pub const IOMMU_IOAS_ALLOW_IOVAS: u64 = io(IOMMUFD_TYPE, 0x82);
/// `IOMMU_IOAS_COPY`.
pub const IOMMU_IOAS_COPY: u64 = io(IOMMUFD_TYPE, 0x83);
/// `IOMMU_IOAS_IOVA_RANGES`.
pub const IOMMU_IOAS_IOVA_RANGES: u64 = io(IOMMUFD_TYPE, 0x84);
/// `IOMMU_IOAS_MAP`.
pub const IOMMU_IOAS_MAP: u64 = io(IOMMUFD_TYPE, 0x85);
/// `IOMMU_IOAS_UNMAP`.
pub const IOMMU_IOAS_UNMAP: u64 = io(IOMMUFD_TYPE, 0x86);
/// `IOMMU_OPTION`.
pub const IOMMU_OPTION: u64 = io(IOMMUFD_TYPE, 0x87);
/// `IOMMU_VFIO_IOAS`.
pub const IOMMU_VFIO_IOAS: u64 = io(IOMMUFD_TYPE, 0x88);
/// `IOMMU_HWPT_ALLOC`.
pub const IOMMU_HWPT_ALLOC: u64 = io(IOMMUFD_TYPE, 0x89);
/// `IOMMU_GET_HW_INFO`.
pub const IOMMU_GET_HW_INFO: u64 = io(IOMMUFD_TYPE, 0x8a);
/// `IOMMU_HWPT_SET_DIRTY_TRACKING`.
pub const IOMMU_HWPT_SET_DIRTY_TRACKING: u64 = io(IOMMUFD_TYPE, 0x8b);
/// `IOMMU_HWPT_GET_DIRTY_BITMAP`.
pub const IOMMU_HWPT_GET_DIRTY_BITMAP: u64 = io(IOMMUFD_TYPE, 0x8c);
/// `IOMMU_HWPT_INVALIDATE`.
pub const IOMMU_HWPT_INVALIDATE: u64 = io(IOMMUFD_TYPE, 0x8d);
/// `IOMMU_FAULT_QUEUE_ALLOC`.
pub const IOMMU_FAULT_QUEUE_ALLOC: u64 = io(IOMMUFD_TYPE, 0x8e);
/// `IOMMU_IOAS_MAP_FILE` (Linux 6.13+; ENOTTY on 6.12).
pub const IOMMU_IOAS_MAP_FILE: u64 = io(IOMMUFD_TYPE, 0x8f);
/// `IOMMU_VIOMMU_ALLOC` (Linux 7.3.4 `include/uapi/linux/iommufd.h` line 55; ENOTTY on 6.12).
pub const IOMMU_VIOMMU_ALLOC: u64 = io(IOMMUFD_TYPE, 0x90);
/// `IOMMU_VDEVICE_ALLOC` (7.3.4 iommufd.h line 56; ENOTTY on 6.12).
pub const IOMMU_VDEVICE_ALLOC: u64 = io(IOMMUFD_TYPE, 0x91);
/// `IOMMU_TEST_CMD` (`_IO(';', IOMMUFD_CMD_BASE + 32)`, iommufd_test.h; `CONFIG_IOMMUFD_TEST`).
pub const IOMMU_TEST_CMD: u64 = io(IOMMUFD_TYPE, 0x80 + 32);

/// `IOMMU_IOAS_MAP_FIXED_IOVA`: place the mapping at the given IOVA.
pub const IOMMU_IOAS_MAP_FIXED_IOVA: u32 = 1 << 0;
/// `IOMMU_IOAS_MAP_WRITEABLE`: DMA may write.
pub const IOMMU_IOAS_MAP_WRITEABLE: u32 = 1 << 1;
/// `IOMMU_IOAS_MAP_READABLE`: DMA may read.
pub const IOMMU_IOAS_MAP_READABLE: u32 = 1 << 2;

/// `IOMMU_OPTION_RLIMIT_MODE`: global; 0 user-based, 1 process-based accounting.
pub const IOMMU_OPTION_RLIMIT_MODE: u32 = 0;
/// `IOMMU_OPTION_HUGE_PAGES`: per IOAS; 1 (default) combines contiguous pages.
pub const IOMMU_OPTION_HUGE_PAGES: u32 = 1;
/// `IOMMU_OPTION_OP_SET`.
pub const IOMMU_OPTION_OP_SET: u16 = 0;
/// `IOMMU_OPTION_OP_GET`.
pub const IOMMU_OPTION_OP_GET: u16 = 1;

/// `IOMMU_VFIO_IOAS_GET`.
pub const IOMMU_VFIO_IOAS_GET: u16 = 0;
/// `IOMMU_VFIO_IOAS_SET`.
pub const IOMMU_VFIO_IOAS_SET: u16 = 1;
/// `IOMMU_VFIO_IOAS_CLEAR`.
pub const IOMMU_VFIO_IOAS_CLEAR: u16 = 2;

/// `IOMMU_HWPT_ALLOC_NEST_PARENT`.
pub const IOMMU_HWPT_ALLOC_NEST_PARENT: u32 = 1 << 0;
/// `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`: dirty tracking support is enforced on attach.
pub const IOMMU_HWPT_ALLOC_DIRTY_TRACKING: u32 = 1 << 1;
/// `IOMMU_HWPT_FAULT_ID_VALID`.
pub const IOMMU_HWPT_FAULT_ID_VALID: u32 = 1 << 2;
/// `IOMMU_HWPT_DATA_NONE`: a kernel-managed (paging) HWPT.
pub const IOMMU_HWPT_DATA_NONE: u32 = 0;

/// `IOMMU_VIOMMU_TYPE_DEFAULT`: reserved; the kernel refuses it (EOPNOTSUPP, 7.3.4
/// `drivers/iommu/iommufd/viommu.c` line 33).
pub const IOMMU_VIOMMU_TYPE_DEFAULT: u32 = 0;
/// `IOMMU_VIOMMU_TYPE_ARM_SMMUV3` (7.3.4 iommufd.h line 1103).
pub const IOMMU_VIOMMU_TYPE_ARM_SMMUV3: u32 = 1;
/// `IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV` (7.3.4 iommufd.h line 1109).
pub const IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV: u32 = 2;

/// `IOMMU_PGFAULT_FLAGS_PASID_VALID`: the record's `pasid` is valid.
pub const IOMMU_PGFAULT_FLAGS_PASID_VALID: u32 = 1 << 0;
/// `IOMMU_PGFAULT_FLAGS_LAST_PAGE`: the last record of its page request group.
pub const IOMMU_PGFAULT_FLAGS_LAST_PAGE: u32 = 1 << 1;
/// `IOMMU_PGFAULT_PERM_READ`.
pub const IOMMU_PGFAULT_PERM_READ: u32 = 1 << 0;
/// `IOMMU_PGFAULT_PERM_WRITE`.
pub const IOMMU_PGFAULT_PERM_WRITE: u32 = 1 << 1;
/// `IOMMU_PGFAULT_PERM_EXEC` (PCIe 10.4.1, Execute Requested).
pub const IOMMU_PGFAULT_PERM_EXEC: u32 = 1 << 2;
/// `IOMMU_PGFAULT_PERM_PRIV` (PCIe 10.4.1, Privileged Mode Requested).
pub const IOMMU_PGFAULT_PERM_PRIV: u32 = 1 << 3;
/// `IOMMUFD_PAGE_RESP_SUCCESS`: the fault was handled, the device retries (PCIe "Success").
pub const IOMMUFD_PAGE_RESP_SUCCESS: u32 = 0;
/// `IOMMUFD_PAGE_RESP_INVALID`: the fault cannot be handled, no retry (PCIe "Invalid Request").
pub const IOMMUFD_PAGE_RESP_INVALID: u32 = 1;

/// `IOMMU_HW_INFO_TYPE_NONE`.
pub const IOMMU_HW_INFO_TYPE_NONE: u32 = 0;
/// `IOMMU_HW_INFO_TYPE_INTEL_VTD`.
pub const IOMMU_HW_INFO_TYPE_INTEL_VTD: u32 = 1;
/// `IOMMU_HW_INFO_TYPE_ARM_SMMUV3` (Linux 6.14+).
pub const IOMMU_HW_INFO_TYPE_ARM_SMMUV3: u32 = 2;
/// `IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV` (later kernels).
pub const IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV: u32 = 3;
/// `IOMMU_HW_INFO_TYPE_AMD` (later kernels).
pub const IOMMU_HW_INFO_TYPE_AMD: u32 = 4;
/// `IOMMU_HW_INFO_TYPE_SELFTEST` (iommufd_test.h).
pub const IOMMU_HW_INFO_TYPE_SELFTEST: u32 = 0xfeed_beef;
/// `IOMMU_HW_INFO_SELFTEST_REGVAL`: the mock's `test_reg` value.
pub const IOMMU_HW_INFO_SELFTEST_REGVAL: u32 = 0xdead_beef;

/// `IOMMU_HW_CAP_DIRTY_TRACKING`: GET_DIRTY_BITMAP and SET_DIRTY_TRACKING are supported.
pub const IOMMU_HW_CAP_DIRTY_TRACKING: u64 = 1 << 0;
/// `IOMMU_HW_CAP_PCI_PASID_EXEC`.
pub const IOMMU_HW_CAP_PCI_PASID_EXEC: u64 = 1 << 1;
/// `IOMMU_HW_CAP_PCI_PASID_PRIV`.
pub const IOMMU_HW_CAP_PCI_PASID_PRIV: u64 = 1 << 2;

/// `IOMMU_HWPT_DIRTY_TRACKING_ENABLE`.
pub const IOMMU_HWPT_DIRTY_TRACKING_ENABLE: u32 = 1;
/// `IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR`: read without clearing (before an unmap).
pub const IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR: u32 = 1;

/// `struct iommu_destroy`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_destroy {
    /// sizeof(struct iommu_destroy).
    pub size: u32,
    /// in: any destroyable object id.
    pub id: u32,
}

/// `struct iommu_ioas_alloc`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_ioas_alloc {
    /// sizeof(struct iommu_ioas_alloc).
    pub size: u32,
    /// must be 0.
    pub flags: u32,
    /// out: the new IOAS id.
    pub out_ioas_id: u32,
}

/// `struct iommu_iova_range`: an inclusive interval.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_iova_range {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub last: u64,
}

/// `struct iommu_ioas_iova_ranges`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_ioas_iova_ranges {
    /// sizeof(struct iommu_ioas_iova_ranges).
    pub size: u32,
    /// in: IOAS to query.
    pub ioas_id: u32,
    /// in: capacity of `allowed_iovas`; out: total ranges (EMSGSIZE if too small).
    pub num_iovas: u32,
    /// must be 0.
    pub __reserved: u32,
    /// in: user pointer to `num_iovas` ranges.
    pub allowed_iovas: u64,
    /// out: minimum IOVA alignment for MAP/COPY.
    pub out_iova_alignment: u64,
}

/// `struct iommu_ioas_allow_iovas`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_ioas_allow_iovas {
    /// sizeof(struct iommu_ioas_allow_iovas).
    pub size: u32,
    /// in: IOAS.
    pub ioas_id: u32,
    /// in: number of ranges.
    pub num_iovas: u32,
    /// must be 0.
    pub __reserved: u32,
    /// in: user pointer to the ranges.
    pub allowed_iovas: u64,
}

/// `struct iommu_ioas_map`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_ioas_map {
    /// sizeof(struct iommu_ioas_map).
    pub size: u32,
    /// in: `IOMMU_IOAS_MAP_*`.
    pub flags: u32,
    /// in: IOAS.
    pub ioas_id: u32,
    /// must be 0.
    pub __reserved: u32,
    /// in: user virtual address.
    pub user_va: u64,
    /// in: bytes to map.
    pub length: u64,
    /// in (FIXED_IOVA) / out: IOVA.
    pub iova: u64,
}

/// `struct iommu_ioas_map_file` (Linux 6.13+).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_ioas_map_file {
    /// sizeof(struct iommu_ioas_map_file).
    pub size: u32,
    /// in: `IOMMU_IOAS_MAP_*`.
    pub flags: u32,
    /// in: IOAS.
    pub ioas_id: u32,
    /// in: the memfd to map.
    pub fd: i32,
    /// in: byte offset into the file.
    pub start: u64,
    /// in: bytes to map.
    pub length: u64,
    /// in (FIXED_IOVA) / out: IOVA.
    pub iova: u64,
}

/// `struct iommu_ioas_copy`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_ioas_copy {
    /// sizeof(struct iommu_ioas_copy).
    pub size: u32,
    /// in: `IOMMU_IOAS_MAP_*`.
    pub flags: u32,
    /// in: destination IOAS.
    pub dst_ioas_id: u32,
    /// in: source IOAS.
    pub src_ioas_id: u32,
    /// in: bytes.
    pub length: u64,
    /// in (FIXED_IOVA) / out: destination IOVA.
    pub dst_iova: u64,
    /// in: source IOVA (must exactly match a mapped range).
    pub src_iova: u64,
}

/// `struct iommu_ioas_unmap`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_ioas_unmap {
    /// sizeof(struct iommu_ioas_unmap).
    pub size: u32,
    /// in: IOAS.
    pub ioas_id: u32,
    /// in: first IOVA.
    pub iova: u64,
    /// in: bytes; out: bytes unmapped.
    pub length: u64,
}

/// `struct iommu_option`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_option {
    /// sizeof(struct iommu_option).
    pub size: u32,
    /// in: `IOMMU_OPTION_*`.
    pub option_id: u32,
    /// in: `IOMMU_OPTION_OP_*`.
    pub op: u16,
    /// must be 0.
    pub __reserved: u16,
    /// in: object id, or 0 for global options.
    pub object_id: u32,
    /// in (SET) / out (GET): the value.
    pub val64: u64,
}

/// `struct iommu_vfio_ioas`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_vfio_ioas {
    /// sizeof(struct iommu_vfio_ioas).
    pub size: u32,
    /// in (SET) / out (GET): IOAS id.
    pub ioas_id: u32,
    /// in: `IOMMU_VFIO_IOAS_*`.
    pub op: u16,
    /// must be 0.
    pub __reserved: u16,
}

/// `struct iommu_hwpt_alloc`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_hwpt_alloc {
    /// sizeof(struct iommu_hwpt_alloc).
    pub size: u32,
    /// in: `IOMMU_HWPT_ALLOC_*`.
    pub flags: u32,
    /// in: the device the HWPT is for.
    pub dev_id: u32,
    /// in: IOAS (kernel-managed HWPT) or parent HWPT (nested).
    pub pt_id: u32,
    /// out: the new HWPT id.
    pub out_hwpt_id: u32,
    /// must be 0.
    pub __reserved: u32,
    /// in: `IOMMU_HWPT_DATA_*`.
    pub data_type: u32,
    /// in: length of driver data (0 with `IOMMU_HWPT_DATA_NONE`).
    pub data_len: u32,
    /// in: user pointer to driver data.
    pub data_uptr: u64,
    /// in: fault queue id, with `IOMMU_HWPT_FAULT_ID_VALID`.
    pub fault_id: u32,
    /// must be 0.
    pub __reserved2: u32,
}

/// `struct iommu_hw_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_hw_info {
    /// sizeof(struct iommu_hw_info).
    pub size: u32,
    /// must be 0.
    pub flags: u32,
    /// in: device id from `VFIO_DEVICE_BIND_IOMMUFD`.
    pub dev_id: u32,
    /// in: buffer length; out: length of the kernel's data.
    pub data_len: u32,
    /// in: user pointer to the buffer.
    pub data_uptr: u64,
    /// out: `IOMMU_HW_INFO_TYPE_*`.
    pub out_data_type: u32,
    /// out: PASID width; 0 means no PASID support.
    pub out_max_pasid_log2: u8,
    /// must be 0.
    pub __reserved: [u8; 3],
    /// out: `IOMMU_HW_CAP_*`.
    pub out_capabilities: u64,
}

/// `struct iommu_hw_info_vtd` (`IOMMU_HW_INFO_TYPE_INTEL_VTD`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_hw_info_vtd {
    /// `IOMMU_HW_INFO_VTD_*`.
    pub flags: u32,
    /// must be 0.
    pub __reserved: u32,
    /// VT-d Capability Register (spec 11.4.2).
    pub cap_reg: u64,
    /// VT-d Extended Capability Register (spec 11.4.3).
    pub ecap_reg: u64,
}

/// `struct iommu_hw_info_arm_smmuv3` (`IOMMU_HW_INFO_TYPE_ARM_SMMUV3`, Linux 6.14+).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_hw_info_arm_smmuv3 {
    /// must be 0.
    pub flags: u32,
    /// must be 0.
    pub __reserved: u32,
    /// SMMU_IDR0..5.
    pub idr: [u32; 6],
    /// SMMU_IIDR.
    pub iidr: u32,
    /// SMMU_AIDR.
    pub aidr: u32,
}

/// `struct iommu_hw_info_amd` (`IOMMU_HW_INFO_TYPE_AMD`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_hw_info_amd {
    /// Extended Feature Register (MMIO 0x30).
    pub efr: u64,
    /// Extended Feature 2 Register (MMIO 0x1a0).
    pub efr2: u64,
}

/// `struct iommu_test_hw_info` (`IOMMU_HW_INFO_TYPE_SELFTEST`, iommufd_test.h).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_test_hw_info {
    /// flags.
    pub flags: u32,
    /// `IOMMU_HW_INFO_SELFTEST_REGVAL`.
    pub test_reg: u32,
}

/// `struct iommu_hwpt_set_dirty_tracking`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_hwpt_set_dirty_tracking {
    /// sizeof(struct iommu_hwpt_set_dirty_tracking).
    pub size: u32,
    /// in: `IOMMU_HWPT_DIRTY_TRACKING_ENABLE` or 0.
    pub flags: u32,
    /// in: HWPT id.
    pub hwpt_id: u32,
    /// must be 0.
    pub __reserved: u32,
}

/// `struct iommu_hwpt_get_dirty_bitmap`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_hwpt_get_dirty_bitmap {
    /// sizeof(struct iommu_hwpt_get_dirty_bitmap).
    pub size: u32,
    /// in: HWPT id.
    pub hwpt_id: u32,
    /// in: `IOMMU_HWPT_GET_DIRTY_BITMAP_*`.
    pub flags: u32,
    /// must be 0.
    pub __reserved: u32,
    /// in: IOVA of bit 0.
    pub iova: u64,
    /// in: bytes covered.
    pub length: u64,
    /// in: bytes per bit.
    pub page_size: u64,
    /// in: user pointer to the u64 bitmap; the kernel only sets bits.
    pub data: u64,
}

/// `struct iommu_fault_alloc` (`IOMMU_FAULT_QUEUE_ALLOC`, Linux 6.11+).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_fault_alloc {
    /// sizeof(struct iommu_fault_alloc).
    pub size: u32,
    /// must be 0.
    pub flags: u32,
    /// out: the fault object's id.
    pub out_fault_id: u32,
    /// out: the fault object's file descriptor.
    pub out_fault_fd: u32,
}

/// `struct iommu_hwpt_pgfault`: one record read from a fault queue's fd.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_hwpt_pgfault {
    /// `IOMMU_PGFAULT_FLAGS_*`.
    pub flags: u32,
    /// The iommufd device id of the requester.
    pub dev_id: u32,
    /// PASID, valid with `IOMMU_PGFAULT_FLAGS_PASID_VALID`.
    pub pasid: u32,
    /// Page Request Group Index.
    pub grpid: u32,
    /// `IOMMU_PGFAULT_PERM_*`.
    pub perm: u32,
    /// must be 0.
    pub __reserved: u32,
    /// Faulting address.
    pub addr: u64,
    /// Hint of how many bytes the requester wants (0: none).
    pub length: u32,
    /// Kernel cookie of the group; echoed in the response to the group's last record.
    pub cookie: u32,
}

/// `struct iommu_viommu_alloc` (7.3.4 iommufd.h lines 1152-1162).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_viommu_alloc {
    /// sizeof(struct iommu_viommu_alloc).
    pub size: u32,
    /// must be 0.
    pub flags: u32,
    /// `IOMMU_VIOMMU_TYPE_*` (not DEFAULT).
    pub r#type: u32,
    /// The device whose physical IOMMU backs the vIOMMU.
    pub dev_id: u32,
    /// A nesting-parent HWPT.
    pub hwpt_id: u32,
    /// out: the vIOMMU id.
    pub out_viommu_id: u32,
    /// Length of the type's driver data.
    pub data_len: u32,
    /// must be 0.
    pub __reserved: u32,
    /// User pointer to the driver data (in/out).
    pub data_uptr: u64,
}

/// `struct iommu_vdevice_alloc` (7.3.4 iommufd.h lines 1182-1188).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_vdevice_alloc {
    /// sizeof(struct iommu_vdevice_alloc).
    pub size: u32,
    /// The vIOMMU.
    pub viommu_id: u32,
    /// The physical device.
    pub dev_id: u32,
    /// out: the vDEVICE id.
    pub out_vdevice_id: u32,
    /// The device's ID as the guest's IOMMU knows it (vSID, vDeviceID, vRID).
    pub virt_id: u64,
}

/// `struct iommu_hwpt_page_response`: one record written to a fault queue's fd.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_hwpt_page_response {
    /// The cookie of the group answered.
    pub cookie: u32,
    /// `IOMMUFD_PAGE_RESP_*`.
    pub code: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn ioctl_numbers_match_the_headers() {
        assert_eq!(IOMMU_DESTROY, 0x3b80);
        assert_eq!(IOMMU_IOAS_ALLOC, 0x3b81);
        assert_eq!(IOMMU_IOAS_ALLOW_IOVAS, 0x3b82);
        assert_eq!(IOMMU_IOAS_COPY, 0x3b83);
        assert_eq!(IOMMU_IOAS_IOVA_RANGES, 0x3b84);
        assert_eq!(IOMMU_IOAS_MAP, 0x3b85);
        assert_eq!(IOMMU_IOAS_UNMAP, 0x3b86);
        assert_eq!(IOMMU_OPTION, 0x3b87);
        assert_eq!(IOMMU_VFIO_IOAS, 0x3b88);
        assert_eq!(IOMMU_HWPT_ALLOC, 0x3b89);
        assert_eq!(IOMMU_GET_HW_INFO, 0x3b8a);
        assert_eq!(IOMMU_HWPT_SET_DIRTY_TRACKING, 0x3b8b);
        assert_eq!(IOMMU_HWPT_GET_DIRTY_BITMAP, 0x3b8c);
        assert_eq!(IOMMU_HWPT_INVALIDATE, 0x3b8d);
        assert_eq!(IOMMU_FAULT_QUEUE_ALLOC, 0x3b8e);
        assert_eq!(IOMMU_IOAS_MAP_FILE, 0x3b8f);
        assert_eq!(IOMMU_TEST_CMD, 0x3ba0);
        assert_eq!(IOMMU_VIOMMU_ALLOC, 0x3b90);
        assert_eq!(IOMMU_VDEVICE_ALLOC, 0x3b91);
    }

    #[test]
    fn struct_layouts_match_the_headers() {
        assert_eq!(size_of::<iommu_destroy>(), 8);
        assert_eq!(size_of::<iommu_ioas_alloc>(), 12);
        assert_eq!(size_of::<iommu_iova_range>(), 16);
        assert_eq!(size_of::<iommu_ioas_iova_ranges>(), 32);
        assert_eq!(offset_of!(iommu_ioas_iova_ranges, allowed_iovas), 16);
        assert_eq!(offset_of!(iommu_ioas_iova_ranges, out_iova_alignment), 24);
        assert_eq!(size_of::<iommu_ioas_allow_iovas>(), 24);
        assert_eq!(size_of::<iommu_ioas_map>(), 40);
        assert_eq!(offset_of!(iommu_ioas_map, user_va), 16);
        assert_eq!(offset_of!(iommu_ioas_map, length), 24);
        assert_eq!(offset_of!(iommu_ioas_map, iova), 32);
        assert_eq!(size_of::<iommu_ioas_map_file>(), 40);
        assert_eq!(offset_of!(iommu_ioas_map_file, fd), 12);
        assert_eq!(offset_of!(iommu_ioas_map_file, start), 16);
        assert_eq!(size_of::<iommu_ioas_copy>(), 40);
        assert_eq!(offset_of!(iommu_ioas_copy, length), 16);
        assert_eq!(offset_of!(iommu_ioas_copy, src_iova), 32);
        assert_eq!(size_of::<iommu_ioas_unmap>(), 24);
        assert_eq!(offset_of!(iommu_ioas_unmap, iova), 8);
        assert_eq!(size_of::<iommu_option>(), 24);
        assert_eq!(offset_of!(iommu_option, op), 8);
        assert_eq!(offset_of!(iommu_option, object_id), 12);
        assert_eq!(offset_of!(iommu_option, val64), 16);
        assert_eq!(size_of::<iommu_vfio_ioas>(), 12);
        assert_eq!(size_of::<iommu_hwpt_alloc>(), 48);
        assert_eq!(offset_of!(iommu_hwpt_alloc, out_hwpt_id), 16);
        assert_eq!(offset_of!(iommu_hwpt_alloc, data_type), 24);
        assert_eq!(offset_of!(iommu_hwpt_alloc, data_uptr), 32);
        assert_eq!(offset_of!(iommu_hwpt_alloc, fault_id), 40);
        assert_eq!(size_of::<iommu_hw_info>(), 40);
        assert_eq!(offset_of!(iommu_hw_info, data_uptr), 16);
        assert_eq!(offset_of!(iommu_hw_info, out_data_type), 24);
        assert_eq!(offset_of!(iommu_hw_info, out_max_pasid_log2), 28);
        assert_eq!(offset_of!(iommu_hw_info, out_capabilities), 32);
        assert_eq!(size_of::<iommu_hw_info_vtd>(), 24);
        assert_eq!(offset_of!(iommu_hw_info_vtd, cap_reg), 8);
        assert_eq!(offset_of!(iommu_hw_info_vtd, ecap_reg), 16);
        assert_eq!(size_of::<iommu_hw_info_arm_smmuv3>(), 40);
        assert_eq!(offset_of!(iommu_hw_info_arm_smmuv3, idr), 8);
        assert_eq!(offset_of!(iommu_hw_info_arm_smmuv3, iidr), 32);
        assert_eq!(size_of::<iommu_hw_info_amd>(), 16);
        assert_eq!(size_of::<iommu_test_hw_info>(), 8);
        assert_eq!(size_of::<iommu_hwpt_set_dirty_tracking>(), 16);
        assert_eq!(size_of::<iommu_hwpt_get_dirty_bitmap>(), 48);
        assert_eq!(offset_of!(iommu_hwpt_get_dirty_bitmap, iova), 16);
        assert_eq!(offset_of!(iommu_hwpt_get_dirty_bitmap, page_size), 32);
        assert_eq!(offset_of!(iommu_hwpt_get_dirty_bitmap, data), 40);
        assert_eq!(size_of::<iommu_fault_alloc>(), 16);
        assert_eq!(size_of::<iommu_hwpt_pgfault>(), 40);
        assert_eq!(offset_of!(iommu_hwpt_pgfault, addr), 24);
        assert_eq!(offset_of!(iommu_hwpt_pgfault, cookie), 36);
        assert_eq!(size_of::<iommu_hwpt_page_response>(), 8);
        assert_eq!(size_of::<iommu_viommu_alloc>(), 40);
        assert_eq!(offset_of!(iommu_viommu_alloc, out_viommu_id), 20);
        assert_eq!(offset_of!(iommu_viommu_alloc, data_uptr), 32);
        assert_eq!(size_of::<iommu_vdevice_alloc>(), 24);
        assert_eq!(offset_of!(iommu_vdevice_alloc, virt_id), 16);
    }

    /// Cross-check with rust-vmm's bindgen output (from a newer kernel).
    #[test]
    fn matches_iommufd_bindings() {
        use iommufd_bindings::iommufd as ib;
        assert_eq!(size_of::<ib::iommu_ioas_map>(), size_of::<iommu_ioas_map>());
        assert_eq!(
            size_of::<ib::iommu_ioas_map_file>(),
            size_of::<iommu_ioas_map_file>()
        );
        assert_eq!(
            size_of::<ib::iommu_ioas_copy>(),
            size_of::<iommu_ioas_copy>()
        );
        assert_eq!(
            size_of::<ib::iommu_ioas_unmap>(),
            size_of::<iommu_ioas_unmap>()
        );
        assert_eq!(
            size_of::<ib::iommu_hwpt_alloc>(),
            size_of::<iommu_hwpt_alloc>()
        );
        assert_eq!(size_of::<ib::iommu_hw_info>(), size_of::<iommu_hw_info>());
        assert_eq!(
            size_of::<ib::iommu_hwpt_get_dirty_bitmap>(),
            size_of::<iommu_hwpt_get_dirty_bitmap>()
        );
        assert_eq!(
            size_of::<ib::iommu_hw_info_arm_smmuv3>(),
            size_of::<iommu_hw_info_arm_smmuv3>()
        );
        assert_eq!(
            size_of::<ib::iommu_fault_alloc>(),
            size_of::<iommu_fault_alloc>()
        );
        assert_eq!(
            size_of::<ib::iommu_hwpt_pgfault>(),
            size_of::<iommu_hwpt_pgfault>()
        );
        assert_eq!(
            size_of::<ib::iommu_hwpt_page_response>(),
            size_of::<iommu_hwpt_page_response>()
        );
        assert_eq!(
            ib::iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_LAST_PAGE,
            IOMMU_PGFAULT_FLAGS_LAST_PAGE
        );
        assert_eq!(
            ib::iommufd_page_response_code_IOMMUFD_PAGE_RESP_INVALID,
            IOMMUFD_PAGE_RESP_INVALID
        );
        assert_eq!(
            size_of::<ib::iommu_viommu_alloc>(),
            size_of::<iommu_viommu_alloc>()
        );
        assert_eq!(
            size_of::<ib::iommu_vdevice_alloc>(),
            size_of::<iommu_vdevice_alloc>()
        );
        assert_eq!(ib::IOMMUFD_CMD_VIOMMU_ALLOC, 0x90);
        assert_eq!(ib::IOMMUFD_CMD_IOAS_MAP_FILE, 0x8f);
        assert_eq!(
            ib::iommu_hw_info_type_IOMMU_HW_INFO_TYPE_ARM_SMMUV3,
            IOMMU_HW_INFO_TYPE_ARM_SMMUV3
        );
        assert_eq!(
            ib::iommu_hw_info_type_IOMMU_HW_INFO_TYPE_AMD,
            IOMMU_HW_INFO_TYPE_AMD
        );
    }
}
