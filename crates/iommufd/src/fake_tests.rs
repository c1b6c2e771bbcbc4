//! Unit tests of the object API against a fake iommufd that validates arguments the way
//! drivers/iommu/iommufd does: sizes, reserved fields, flags, alignment, object lifetimes.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::rc::Rc;

use crate::abi;
use crate::sys::fake;
use crate::*;

const PAGE: u64 = 4096;

#[derive(Debug)]
enum Obj {
    Ioas {
        areas: BTreeMap<u64, u64>, // iova -> length
        huge: bool,
    },
    Hwpt {
        ioas: u32,
        dirty_cap: bool,
        tracking: bool,
        dirty: BTreeSet<u64>, // dirty 4K page addresses
        nest_parent: bool,
    },
    /// A vIOMMU on a nesting-parent HWPT.
    Viommu { hwpt: u32 },
    /// A vDEVICE on a vIOMMU.
    Vdevice,
    /// A fault queue; the test holds the other end of its socket pair in `fault_peers`.
    Fault,
}

#[derive(Debug, Clone)]
struct FakeDev {
    caps: u64,
    data_type: u32,
    data: Vec<u8>,
    /// errno for any HWPT_ALLOC (ENOENT: an emulated device's id is an access object).
    alloc_errno: Option<i32>,
}

#[derive(Debug, Default)]
struct State {
    objs: HashMap<u32, Obj>,
    next: u32,
    devs: HashMap<u32, FakeDev>,
    reserved: Vec<(u64, u64)>,
    rlimit_process: bool,
    vfio_ioas: Option<u32>,
    calls: Vec<u64>,
    /// The test's end of each fault queue's socket pair, by fault id.
    fault_peers: HashMap<u32, OwnedFd>,
    /// The kernel has the vIOMMU commands (Linux 7.3; 6.12 answers ENOTTY).
    viommu_cmds: bool,
}

struct FakeIommufd {
    st: Rc<RefCell<State>>,
    fd: Option<RawFd>,
}

fn err(n: i32) -> io::Result<i32> {
    Err(io::Error::from_raw_os_error(n))
}

impl State {
    fn alloc(&mut self, o: Obj) -> u32 {
        self.next += 1;
        self.objs.insert(self.next, o);
        self.next
    }

    fn allowed(&self) -> Vec<(u64, u64)> {
        // Aperture [0, 2^48 - 1] minus the reserved ranges, as inclusive pairs.
        let mut out = Vec::new();
        let mut at = 0u64;
        let mut res = self.reserved.clone();
        res.sort();
        for (s, l) in res {
            if s > at {
                out.push((at, s - 1));
            }
            at = l + 1;
        }
        out.push((at, (1 << 48) - 1));
        out
    }

    fn areas(&mut self, ioas: u32) -> Option<&mut BTreeMap<u64, u64>> {
        match self.objs.get_mut(&ioas) {
            Some(Obj::Ioas { areas, .. }) => Some(areas),
            _ => None,
        }
    }

    fn place(&mut self, ioas: u32, fixed: Option<u64>, len: u64) -> io::Result<u64> {
        if !len.is_multiple_of(PAGE) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let allowed = self.allowed();
        let areas = self
            .areas(ioas)
            .ok_or(io::Error::from_raw_os_error(libc::ENOENT))?;
        let free = |iova: u64| {
            let last = iova + len - 1;
            allowed.iter().any(|&(s, l)| iova >= s && last <= l)
                && !areas.iter().any(|(&a, &al)| iova < a + al && a <= last)
        };
        let iova = match fixed {
            Some(iova) => {
                if iova % PAGE != 0 {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                }
                if !free(iova) {
                    return Err(io::Error::from_raw_os_error(libc::EEXIST));
                }
                iova
            }
            None => {
                let mut cand = allowed[0].0.max(PAGE);
                loop {
                    if free(cand) {
                        break cand;
                    }
                    cand += PAGE;
                }
            }
        };
        areas.insert(iova, len);
        Ok(iova)
    }
}

macro_rules! arg {
    ($ptr:expr, $t:ty) => {{
        // SAFETY: the caller of `ioctl` passes the structure the request names.
        let a = unsafe { &mut *($ptr as *mut $t) };
        if a.size as usize != core::mem::size_of::<$t>() {
            return err(libc::EINVAL);
        }
        a
    }};
}

impl fake::Kernel for FakeIommufd {
    fn open(&mut self, path: &Path) -> io::Result<OwnedFd> {
        if path != Path::new("/dev/iommu") {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        let fd = fake::memfd();
        self.fd = Some(fd.as_raw_fd());
        Ok(fd)
    }

    unsafe fn ioctl(&mut self, fd: RawFd, request: u64, p: *mut c_void) -> io::Result<i32> {
        assert_eq!(Some(fd), self.fd);
        let mut st = self.st.borrow_mut();
        st.calls.push(request);
        match request {
            abi::IOMMU_VIOMMU_ALLOC | abi::IOMMU_VDEVICE_ALLOC if !st.viommu_cmds => {
                err(libc::ENOTTY)
            }
            abi::IOMMU_VIOMMU_ALLOC => {
                let a = arg!(p, abi::iommu_viommu_alloc);
                if a.flags != 0 || a.r#type == abi::IOMMU_VIOMMU_TYPE_DEFAULT || a.__reserved != 0 {
                    return err(libc::EOPNOTSUPP);
                }
                if !st.devs.contains_key(&a.dev_id) {
                    return err(libc::ENOENT);
                }
                if a.r#type != abi::IOMMU_VIOMMU_TYPE_ARM_SMMUV3 {
                    return err(libc::EOPNOTSUPP);
                }
                match st.objs.get(&a.hwpt_id) {
                    Some(Obj::Hwpt {
                        nest_parent: true, ..
                    }) => {}
                    Some(Obj::Hwpt { .. }) => return err(libc::EINVAL),
                    _ => return err(libc::ENOENT),
                }
                a.out_viommu_id = st.alloc(Obj::Viommu { hwpt: a.hwpt_id });
                Ok(0)
            }
            abi::IOMMU_VDEVICE_ALLOC => {
                let a = arg!(p, abi::iommu_vdevice_alloc);
                if !matches!(st.objs.get(&a.viommu_id), Some(Obj::Viommu { .. }))
                    || !st.devs.contains_key(&a.dev_id)
                {
                    return err(libc::ENOENT);
                }
                a.out_vdevice_id = st.alloc(Obj::Vdevice);
                Ok(0)
            }
            abi::IOMMU_FAULT_QUEUE_ALLOC => {
                let a = arg!(p, abi::iommu_fault_alloc);
                if a.flags != 0 {
                    return err(libc::EOPNOTSUPP);
                }
                let mut fds = [0; 2];
                // SAFETY: `fds` has room for the two descriptors socketpair returns.
                let rc = unsafe {
                    libc::socketpair(
                        libc::AF_UNIX,
                        libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                        0,
                        fds.as_mut_ptr(),
                    )
                };
                assert_eq!(rc, 0, "socketpair: {}", io::Error::last_os_error());
                let id = st.alloc(Obj::Fault);
                // SAFETY: `fds[1]` was just created and is owned by nobody else.
                st.fault_peers
                    .insert(id, unsafe { OwnedFd::from_raw_fd(fds[1]) });
                a.out_fault_id = id;
                a.out_fault_fd = fds[0] as u32;
                Ok(0)
            }
            abi::IOMMU_IOAS_ALLOC => {
                let a = arg!(p, abi::iommu_ioas_alloc);
                if a.flags != 0 {
                    return err(libc::EOPNOTSUPP);
                }
                a.out_ioas_id = st.alloc(Obj::Ioas {
                    areas: BTreeMap::new(),
                    huge: true,
                });
                Ok(0)
            }
            abi::IOMMU_DESTROY => {
                let a = arg!(p, abi::iommu_destroy);
                let in_use = st.objs.values().any(|o| match o {
                    Obj::Hwpt { ioas, .. } => *ioas == a.id,
                    Obj::Viommu { hwpt } => *hwpt == a.id,
                    _ => false,
                });
                if in_use {
                    return err(libc::EBUSY);
                }
                match st.objs.remove(&a.id) {
                    Some(_) => Ok(0),
                    None => err(libc::ENOENT),
                }
            }
            abi::IOMMU_IOAS_MAP => {
                let a = arg!(p, abi::iommu_ioas_map);
                if a.__reserved != 0 || a.flags & !7 != 0 {
                    return err(libc::EOPNOTSUPP);
                }
                if a.flags & 6 == 0 || a.length == 0 {
                    return err(libc::EINVAL);
                }
                let fixed = (a.flags & abi::IOMMU_IOAS_MAP_FIXED_IOVA != 0).then_some(a.iova);
                a.iova = st.place(a.ioas_id, fixed, a.length)?;
                Ok(0)
            }
            abi::IOMMU_IOAS_MAP_FILE => err(libc::ENOTTY), // a 6.12 kernel
            abi::IOMMU_IOAS_UNMAP => {
                let a = arg!(p, abi::iommu_ioas_unmap);
                let (iova, len) = (a.iova, a.length);
                let last = iova.saturating_add(len - 1);
                let areas = st
                    .areas(a.ioas_id)
                    .ok_or(io::Error::from_raw_os_error(libc::ENOENT))?;
                let hit: Vec<(u64, u64)> = areas
                    .iter()
                    .filter(|&(&s, &l)| s <= last && s + l > iova)
                    .map(|(&s, &l)| (s, l))
                    .collect();
                if hit.is_empty() {
                    // iopt_unmap_all: unmapping everything from an empty IOAS succeeds.
                    if iova == 0 && len == u64::MAX {
                        a.length = 0;
                        return Ok(0);
                    }
                    return err(libc::ENOENT);
                }
                if hit.iter().any(|&(s, l)| s < iova || s + l - 1 > last) {
                    return err(libc::EINVAL); // would split a mapping
                }
                let mut total = 0;
                for (s, l) in hit {
                    areas.remove(&s);
                    total += l;
                }
                a.length = total;
                Ok(0)
            }
            abi::IOMMU_IOAS_COPY => {
                let a = arg!(p, abi::iommu_ioas_copy);
                let src = st
                    .areas(a.src_ioas_id)
                    .ok_or(io::Error::from_raw_os_error(libc::ENOENT))?;
                // iopt_get_pages: any range fully inside one mapping.
                let inside = src
                    .range(..=a.src_iova)
                    .next_back()
                    .is_some_and(|(&s, &l)| a.src_iova + a.length <= s + l);
                if !inside {
                    return err(libc::ENOENT);
                }
                let fixed = (a.flags & abi::IOMMU_IOAS_MAP_FIXED_IOVA != 0).then_some(a.dst_iova);
                a.dst_iova = st.place(a.dst_ioas_id, fixed, a.length)?;
                Ok(0)
            }
            abi::IOMMU_IOAS_IOVA_RANGES => {
                let a = arg!(p, abi::iommu_ioas_iova_ranges);
                if a.__reserved != 0 {
                    return err(libc::EOPNOTSUPP);
                }
                let allowed = st.allowed();
                let cap = a.num_iovas as usize;
                a.num_iovas = allowed.len() as u32;
                a.out_iova_alignment = PAGE;
                if cap < allowed.len() {
                    return err(libc::EMSGSIZE);
                }
                for (i, &(s, l)) in allowed.iter().enumerate() {
                    // SAFETY: the caller provides `cap` entries.
                    unsafe {
                        *(a.allowed_iovas as *mut abi::iommu_iova_range).add(i) =
                            abi::iommu_iova_range { start: s, last: l };
                    }
                }
                Ok(0)
            }
            abi::IOMMU_IOAS_ALLOW_IOVAS => {
                let a = arg!(p, abi::iommu_ioas_allow_iovas);
                if a.__reserved != 0 {
                    return err(libc::EOPNOTSUPP);
                }
                Ok(0)
            }
            abi::IOMMU_OPTION => {
                let a = arg!(p, abi::iommu_option);
                if a.__reserved != 0 {
                    return err(libc::EOPNOTSUPP);
                }
                match a.option_id {
                    abi::IOMMU_OPTION_RLIMIT_MODE => {
                        if a.object_id != 0 {
                            return err(libc::EOPNOTSUPP);
                        }
                        if a.op == abi::IOMMU_OPTION_OP_SET && !st.objs.is_empty() {
                            return err(libc::EBUSY);
                        }
                        if a.op == abi::IOMMU_OPTION_OP_SET {
                            st.rlimit_process = a.val64 == 1;
                        } else {
                            a.val64 = u64::from(st.rlimit_process);
                        }
                        Ok(0)
                    }
                    abi::IOMMU_OPTION_HUGE_PAGES => match st.objs.get_mut(&a.object_id) {
                        Some(Obj::Ioas { huge, .. }) => {
                            if a.op == abi::IOMMU_OPTION_OP_SET {
                                *huge = a.val64 == 1;
                            } else {
                                a.val64 = u64::from(*huge);
                            }
                            Ok(0)
                        }
                        _ => err(libc::ENOENT),
                    },
                    _ => err(libc::EOPNOTSUPP),
                }
            }
            abi::IOMMU_VFIO_IOAS => {
                let a = arg!(p, abi::iommu_vfio_ioas);
                match a.op {
                    abi::IOMMU_VFIO_IOAS_GET => match st.vfio_ioas {
                        Some(id) => {
                            a.ioas_id = id;
                            Ok(0)
                        }
                        None => err(libc::ENODEV),
                    },
                    abi::IOMMU_VFIO_IOAS_SET => {
                        st.vfio_ioas = Some(a.ioas_id);
                        Ok(0)
                    }
                    abi::IOMMU_VFIO_IOAS_CLEAR => {
                        st.vfio_ioas = None;
                        Ok(0)
                    }
                    _ => err(libc::EOPNOTSUPP),
                }
            }
            abi::IOMMU_GET_HW_INFO => {
                let a = arg!(p, abi::iommu_hw_info);
                if a.flags != 0 || a.__reserved != [0; 3] {
                    return err(libc::EOPNOTSUPP);
                }
                let Some(dev) = st.devs.get(&a.dev_id).cloned() else {
                    return err(libc::ENOENT);
                };
                let n = (a.data_len as usize).min(dev.data.len());
                // SAFETY: the caller provides `data_len` writable bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(dev.data.as_ptr(), a.data_uptr as *mut u8, n)
                };
                a.data_len = dev.data.len() as u32;
                a.out_data_type = dev.data_type;
                a.out_capabilities = dev.caps;
                Ok(0)
            }
            abi::IOMMU_HWPT_ALLOC => {
                let a = arg!(p, abi::iommu_hwpt_alloc);
                if a.__reserved != 0 || a.__reserved2 != 0 || a.flags & !3 != 0 {
                    return err(libc::EOPNOTSUPP);
                }
                if a.data_type == abi::IOMMU_HWPT_DATA_NONE && a.data_len != 0 {
                    return err(libc::EINVAL);
                }
                let Some(dev) = st.devs.get(&a.dev_id).cloned() else {
                    return err(libc::ENOENT);
                };
                if let Some(e) = dev.alloc_errno {
                    return err(e);
                }
                let dirty = a.flags & abi::IOMMU_HWPT_ALLOC_DIRTY_TRACKING != 0;
                if dirty && dev.caps & abi::IOMMU_HW_CAP_DIRTY_TRACKING == 0 {
                    return err(libc::EOPNOTSUPP);
                }
                if !matches!(st.objs.get(&a.pt_id), Some(Obj::Ioas { .. })) {
                    return err(libc::ENOENT);
                }
                a.out_hwpt_id = st.alloc(Obj::Hwpt {
                    ioas: a.pt_id,
                    dirty_cap: dirty,
                    tracking: false,
                    dirty: BTreeSet::new(),
                    nest_parent: a.flags & abi::IOMMU_HWPT_ALLOC_NEST_PARENT != 0,
                });
                Ok(0)
            }
            abi::IOMMU_HWPT_SET_DIRTY_TRACKING => {
                let a = arg!(p, abi::iommu_hwpt_set_dirty_tracking);
                if a.__reserved != 0 || a.flags & !1 != 0 {
                    return err(libc::EOPNOTSUPP);
                }
                match st.objs.get_mut(&a.hwpt_id) {
                    Some(Obj::Hwpt {
                        dirty_cap: true,
                        tracking,
                        ..
                    }) => {
                        *tracking = a.flags == 1;
                        Ok(0)
                    }
                    Some(Obj::Hwpt { .. }) => err(libc::EOPNOTSUPP),
                    _ => err(libc::ENOENT),
                }
            }
            abi::IOMMU_HWPT_GET_DIRTY_BITMAP => {
                let a = arg!(p, abi::iommu_hwpt_get_dirty_bitmap);
                if a.__reserved != 0 || a.flags & !1 != 0 {
                    return err(libc::EOPNOTSUPP);
                }
                // iommufd_check_iova_range
                let Some(last) = a.iova.checked_add(a.length.wrapping_sub(1)) else {
                    return err(libc::EOVERFLOW);
                };
                if a.page_size == 0
                    || a.iova % PAGE != 0
                    || (last + 1) % PAGE != 0
                    || a.iova % a.page_size != 0
                    || (last + 1) % a.page_size != 0
                {
                    return err(libc::EINVAL);
                }
                let Some(Obj::Hwpt {
                    dirty_cap, dirty, ..
                }) = st.objs.get_mut(&a.hwpt_id)
                else {
                    return err(libc::ENOENT);
                };
                if !*dirty_cap {
                    return err(libc::EOPNOTSUPP);
                }
                let hits: Vec<u64> = dirty.range(a.iova..=last).copied().collect();
                for page in hits {
                    let bit = (page - a.iova) / a.page_size;
                    // SAFETY: the caller's bitmap covers the range.
                    unsafe { *(a.data as *mut u64).add((bit / 64) as usize) |= 1 << (bit % 64) };
                    if a.flags & abi::IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR == 0 {
                        dirty.remove(&page);
                    }
                }
                Ok(0)
            }
            _ => err(libc::ENOTTY),
        }
    }
}

fn setup() -> (Iommufd, Rc<RefCell<State>>, fake::Guard) {
    let st = Rc::new(RefCell::new(State::default()));
    let g = fake::install(Box::new(FakeIommufd {
        st: Rc::clone(&st),
        fd: None,
    }));
    (Iommufd::open().unwrap(), st, g)
}

fn add_dev(st: &Rc<RefCell<State>>, id: u32, dev: FakeDev) {
    st.borrow_mut().devs.insert(id, dev);
}

fn vtd_dev(dirty: bool) -> FakeDev {
    let mut data = vec![0u8; 24];
    data[8..16].copy_from_slice(&0x1234u64.to_ne_bytes());
    FakeDev {
        caps: if dirty {
            abi::IOMMU_HW_CAP_DIRTY_TRACKING
        } else {
            0
        },
        data_type: abi::IOMMU_HW_INFO_TYPE_INTEL_VTD,
        data,
        alloc_errno: None,
    }
}

fn mark_dirty(st: &Rc<RefCell<State>>, hwpt: u32, addrs: &[u64]) {
    if let Some(Obj::Hwpt { dirty, .. }) = st.borrow_mut().objs.get_mut(&hwpt) {
        dirty.extend(addrs.iter().map(|a| a & !(PAGE - 1)));
    }
}

#[test]
fn open_failure_names_the_node() {
    let (_, _, _g) = setup();
    let e = Iommufd::open_path("/dev/nope").unwrap_err();
    assert_eq!(e.to_string(), "cannot open /dev/nope");
}

#[test]
fn objects_are_destroyed_on_drop_and_ids_never_leak() {
    let (fd, st, _g) = setup();
    add_dev(&st, 7, vtd_dev(true));
    {
        let ioas = fd.alloc_ioas().unwrap();
        let hwpt = ioas.alloc_hwpt(7, HwptFlags::DIRTY_TRACKING).unwrap();
        let ioas2 = fd.alloc_ioas().unwrap();
        assert_eq!(st.borrow().objs.len(), 3);
        // The HWPT keeps the IOAS alive even after the IOAS handle goes.
        drop(ioas);
        assert_eq!(st.borrow().objs.len(), 3);
        drop(hwpt);
        assert_eq!(st.borrow().objs.len(), 1);
        ioas2.destroy().unwrap();
    }
    assert!(st.borrow().objs.is_empty());
    // Explicit destroy reports the kernel's refusal.
    let ioas = fd.alloc_ioas().unwrap();
    let hwpt = ioas.alloc_hwpt(7, HwptFlags::empty()).unwrap();
    let e = ioas.clone().destroy().unwrap_err();
    assert!(e.to_string().contains("still referenced"), "{e}");
    drop(hwpt);
    ioas.destroy().unwrap();
    assert!(st.borrow().objs.is_empty());
}

#[test]
fn map_unmap_copy_and_validation() {
    let (fd, st, _g) = setup();
    let ioas = fd.alloc_ioas().unwrap();
    let mut buf = vec![0u8; 4 * PAGE as usize];
    let va = buf.as_mut_ptr();
    // SAFETY: `buf` outlives the mapping (unmapped below) and no reference into it is used
    // while mapped.
    let iova = unsafe {
        ioas.map_user(
            va,
            2 * PAGE,
            Placement::Fixed(0x10_0000),
            DmaAccess::READ | DmaAccess::WRITE,
        )
    }
    .unwrap();
    assert_eq!(iova, 0x10_0000);
    // SAFETY: as above.
    let auto = unsafe { ioas.map_user(va, PAGE, Placement::Anywhere, DmaAccess::READ) }.unwrap();
    assert_ne!(auto, iova);
    // Overlap at a fixed IOVA is refused by the kernel.
    // SAFETY: as above.
    let e = unsafe { ioas.map_user(va, PAGE, Placement::Fixed(0x10_1000), DmaAccess::READ) }
        .unwrap_err();
    assert_eq!(e.errno(), Some(libc::EEXIST));
    // Caught before the syscall.
    // SAFETY: nothing is mapped: the call fails validation.
    let e = unsafe { ioas.map_user(va, 0, Placement::Anywhere, DmaAccess::READ) }.unwrap_err();
    assert_eq!(e.to_string(), "IOMMU_IOAS_MAP: length must be non-zero");
    // SAFETY: as above.
    let e =
        unsafe { ioas.map_user(va, PAGE, Placement::Anywhere, DmaAccess::empty()) }.unwrap_err();
    assert!(e.to_string().contains("READ and/or WRITE"));
    // Copy into a second IOAS.
    let other = fd.alloc_ioas().unwrap();
    let c = other
        .copy_from(
            &ioas,
            iova,
            2 * PAGE,
            Placement::Fixed(0x20_0000),
            DmaAccess::READ,
        )
        .unwrap();
    assert_eq!(c, 0x20_0000);
    // A sub-range of a mapping may be copied (as Linux 6.12 allows); an unmapped one may not.
    let sub = other
        .copy_from(
            &ioas,
            iova + PAGE,
            PAGE,
            Placement::Anywhere,
            DmaAccess::READ,
        )
        .unwrap();
    assert_eq!(other.unmap(sub, PAGE).unwrap(), PAGE);
    let e = other
        .copy_from(
            &ioas,
            0x7000_0000,
            PAGE,
            Placement::Anywhere,
            DmaAccess::READ,
        )
        .unwrap_err();
    assert_eq!(e.reason(), Some(Reason::NotFound));
    // Unmap cannot split a mapping; it returns the bytes unmapped.
    let e = ioas.unmap(iova, PAGE).unwrap_err();
    assert_eq!(e.reason(), Some(Reason::InvalidField));
    assert_eq!(ioas.unmap(iova, 2 * PAGE).unwrap(), 2 * PAGE);
    assert_eq!(ioas.unmap_all().unwrap(), PAGE);
    assert_eq!(other.unmap_all().unwrap(), 2 * PAGE);
    assert_eq!(
        other.unmap_all().unwrap(),
        0,
        "unmap_all of an empty IOAS succeeds"
    );
    // IOAS_MAP_FILE: 6.12 does not have it; probing says so.
    assert!(!ioas.supports_map_file().unwrap());
    let mf = fake::memfd();
    let e = ioas
        .map_file(
            std::os::fd::AsFd::as_fd(&mf),
            0,
            PAGE,
            Placement::Anywhere,
            DmaAccess::READ,
        )
        .unwrap_err();
    assert_eq!(e.reason(), Some(Reason::NotSupported));
    assert_eq!(
        e.to_string(),
        "IOMMU_IOAS_MAP_FILE failed: this kernel does not implement the ioctl"
    );
    drop(buf);
    assert!(st.borrow().calls.contains(&abi::IOMMU_IOAS_COPY));
}

#[test]
fn iova_ranges_grow_on_emsgsize_and_allow_iovas_checks_order() {
    let (fd, st, _g) = setup();
    st.borrow_mut().reserved = (0..12)
        .map(|i| (0x1000_0000 * (i + 1), 0x1000_0000 * (i + 1) + 0xfff))
        .collect();
    let ioas = fd.alloc_ioas().unwrap();
    let r = ioas.iova_ranges().unwrap();
    assert_eq!(r.ranges.len(), 13);
    assert_eq!(r.alignment, PAGE);
    assert_eq!(
        r.ranges[0],
        IovaRange {
            start: 0,
            last: 0x0fff_ffff
        }
    );
    ioas.allow_iovas(&[IovaRange {
        start: 0,
        last: 0xffff,
    }])
    .unwrap();
    let e = ioas
        .allow_iovas(&[IovaRange { start: 10, last: 9 }])
        .unwrap_err();
    assert!(e.to_string().contains("ends before it starts"));
}

#[test]
fn options_and_vfio_compat() {
    let (fd, _st, _g) = setup();
    // RLIMIT_MODE changes only while the iommufd holds no objects.
    fd.set_rlimit_per_process(true).unwrap();
    assert!(fd.rlimit_per_process().unwrap());
    let ioas = fd.alloc_ioas().unwrap();
    let e = fd.set_rlimit_per_process(false).unwrap_err();
    assert_eq!(e.reason(), Some(Reason::Busy));
    assert!(ioas.huge_pages().unwrap());
    ioas.set_huge_pages(false).unwrap();
    assert!(!ioas.huge_pages().unwrap());
    assert!(fd.vfio_compat_ioas().is_err());
    fd.set_vfio_compat_ioas(&ioas).unwrap();
    assert_eq!(fd.vfio_compat_ioas().unwrap(), ioas.id());
    fd.clear_vfio_compat_ioas().unwrap();
}

#[test]
fn hw_info_is_probed_once_and_decoded() {
    let (fd, st, _g) = setup();
    add_dev(&st, 3, vtd_dev(true));
    let dev = fd.probe_device(3);
    assert!(dev.dirty_tracking());
    assert!(matches!(
        dev.hw_info().unwrap().vendor,
        VendorInfo::IntelVtd {
            cap_reg: 0x1234,
            ..
        }
    ));
    let n = st
        .borrow()
        .calls
        .iter()
        .filter(|&&c| c == abi::IOMMU_GET_HW_INFO)
        .count();
    assert_eq!(n, 1);
    // A newer kernel's larger structure: the buffer is grown and the call repeated.
    let mut big = vtd_dev(false);
    big.data.resize(100, 0);
    add_dev(&st, 4, big);
    let info = fd.hw_info(4).unwrap();
    assert!(!info.dirty_tracking());
    // No such device (e.g. an mdev's access id): the probe keeps the reason.
    let dev = fd.probe_device(99);
    assert!(!dev.dirty_tracking());
    assert!(
        dev.probe_error()
            .unwrap()
            .contains("an ID or IOVA does not exist"),
        "{:?}",
        dev.probe_error()
    );
}

#[test]
fn dirty_bitmaps_aligned_unaligned_and_no_clear() {
    let (fd, st, _g) = setup();
    add_dev(&st, 7, vtd_dev(true));
    let ioas = fd.alloc_ioas().unwrap();
    let hwpt = ioas.alloc_hwpt(7, HwptFlags::DIRTY_TRACKING).unwrap();
    hwpt.set_dirty_tracking(true).unwrap();
    let base = 0x4000_0000;
    mark_dirty(&st, hwpt.id(), &[base, base + 65 * PAGE, base + 200 * PAGE]);
    let mut bm = DirtyBitmap::new(base, 256 * PAGE, PAGE).unwrap();
    // NO_CLEAR twice gives the same answer.
    hwpt.get_dirty_bitmap(base, 256 * PAGE, &mut bm, false)
        .unwrap();
    assert_eq!(bm.count(), 3);
    bm.clear_all();
    hwpt.get_dirty_bitmap(base, 256 * PAGE, &mut bm, false)
        .unwrap();
    assert_eq!(bm.count(), 3);
    // A sub-range starting mid-word goes through a scratch bitmap and lands at the right bits.
    bm.clear_all();
    hwpt.get_dirty_bitmap(base + 3 * PAGE, 100 * PAGE, &mut bm, true)
        .unwrap();
    assert_eq!(
        bm.runs().map(|r| r.iova).collect::<Vec<_>>(),
        vec![base + 65 * PAGE]
    );
    // Cleared: a second read of that sub-range finds nothing; the rest is still dirty.
    bm.clear_all();
    hwpt.get_dirty_bitmap(base, 256 * PAGE, &mut bm, true)
        .unwrap();
    assert_eq!(
        bm.runs().map(|r| r.iova).collect::<Vec<_>>(),
        vec![base, base + 200 * PAGE]
    );
    // A coarser page size: one bit per 64 KiB.
    mark_dirty(&st, hwpt.id(), &[base + 17 * PAGE]);
    let mut coarse = DirtyBitmap::new(base, 256 * PAGE, 16 * PAGE).unwrap();
    hwpt.get_dirty_bitmap(base, 256 * PAGE, &mut coarse, true)
        .unwrap();
    assert_eq!(coarse.words(), &[0b10]);
}

#[test]
fn dirty_bitmap_arguments_are_checked_before_the_syscall() {
    let (fd, st, _g) = setup();
    add_dev(&st, 7, vtd_dev(true));
    let ioas = fd.alloc_ioas().unwrap();
    let hwpt = ioas.alloc_hwpt(7, HwptFlags::DIRTY_TRACKING).unwrap();
    let plain = ioas.alloc_hwpt(7, HwptFlags::empty()).unwrap();
    let mut bm = DirtyBitmap::new(0, 64 * PAGE, PAGE).unwrap();
    let before = st.borrow().calls.len();
    let cases: Vec<(Error, &str)> = vec![
        (
            hwpt.get_dirty_bitmap(0x800, PAGE, &mut bm, true)
                .unwrap_err(),
            "not aligned to the page size",
        ),
        (
            hwpt.get_dirty_bitmap(0, 0, &mut bm, true).unwrap_err(),
            "non-zero",
        ),
        (
            hwpt.get_dirty_bitmap(60 * PAGE, 8 * PAGE, &mut bm, true)
                .unwrap_err(),
            "outside the bitmap",
        ),
        (
            plain.get_dirty_bitmap(0, PAGE, &mut bm, true).unwrap_err(),
            "without IOMMU_HWPT_ALLOC_DIRTY_TRACKING",
        ),
        (
            plain.set_dirty_tracking(true).unwrap_err(),
            "without IOMMU_HWPT_ALLOC_DIRTY_TRACKING",
        ),
    ];
    for (e, rule) in cases {
        assert!(e.to_string().contains(rule), "{e} lacks {rule:?}");
        assert!(matches!(e, Error::InvalidArgument { .. }));
    }
    assert_eq!(st.borrow().calls.len(), before, "no syscall was made");
}

#[test]
fn read_dirty_then_unmap_loses_nothing() {
    let (fd, st, _g) = setup();
    add_dev(&st, 7, vtd_dev(true));
    let ioas = fd.alloc_ioas().unwrap();
    let hwpt = ioas.alloc_hwpt(7, HwptFlags::DIRTY_TRACKING).unwrap();
    let mut mem = vec![0u8; 8 * PAGE as usize];
    // SAFETY: `mem` outlives the mapping, which is unmapped below.
    let iova = unsafe {
        ioas.map_user(
            mem.as_mut_ptr(),
            8 * PAGE,
            Placement::Fixed(0x100_0000),
            DmaAccess::WRITE,
        )
    }
    .unwrap();
    mark_dirty(&st, hwpt.id(), &[iova + PAGE, iova + 7 * PAGE]);
    let mut bm = DirtyBitmap::new(iova, 8 * PAGE, PAGE).unwrap();
    assert_eq!(
        hwpt.read_dirty_and_unmap(iova, 8 * PAGE, &mut bm).unwrap(),
        8 * PAGE
    );
    assert_eq!(bm.count(), 2);
    assert!(st.borrow_mut().areas(ioas.id()).unwrap().is_empty());
    drop(mem);
}

// --- automatic domain selection -------------------------------------------------------------

/// A scripted VFIO attach: records every pt id tried and answers with the given errno per id.
fn attacher(
    log: Rc<RefCell<Vec<u32>>>,
    refuse: HashMap<u32, i32>,
) -> impl FnMut(u32) -> io::Result<u32> {
    move |pt| {
        log.borrow_mut().push(pt);
        match refuse.get(&pt) {
            Some(&e) => Err(io::Error::from_raw_os_error(e)),
            None => Ok(pt),
        }
    }
}

#[test]
fn auto_domain_allocates_dirty_hwpt_when_caps_say_so_then_reuses_it() {
    let (fd, st, _g) = setup();
    add_dev(&st, 1, vtd_dev(true));
    add_dev(&st, 2, vtd_dev(true));
    let mut auto = AutoDomains::new(fd.alloc_ioas().unwrap());
    let log = Rc::new(RefCell::new(Vec::new()));
    let d1 = auto
        .attach(
            &fd.probe_device(1),
            attacher(Rc::clone(&log), HashMap::new()),
        )
        .unwrap();
    assert_eq!(d1.path, DomainPath::Allocated);
    assert!(d1.dirty_tracking);
    assert_eq!(d1.reason, "the IOMMU reports dirty tracking");
    assert!(
        auto.hwpts()[0].dirty_capable(),
        "allocated with DIRTY_TRACKING up front"
    );
    let d2 = auto
        .attach(
            &fd.probe_device(2),
            attacher(Rc::clone(&log), HashMap::new()),
        )
        .unwrap();
    assert_eq!(d2.path, DomainPath::Reused);
    assert_eq!(d2.pt_id, d1.pt_id);
    assert!(d2.dirty_tracking);
    assert_eq!(auto.hwpts().len(), 1);
    auto.set_dirty_tracking(true).unwrap();
}

#[test]
fn auto_domain_without_dirty_caps_allocates_plain_hwpt() {
    let (fd, st, _g) = setup();
    add_dev(&st, 1, vtd_dev(false));
    let mut auto = AutoDomains::new(fd.alloc_ioas().unwrap());
    let d = auto
        .attach(&fd.probe_device(1), attacher(Rc::default(), HashMap::new()))
        .unwrap();
    assert_eq!(d.path, DomainPath::Allocated);
    assert!(!d.dirty_tracking);
    assert_eq!(d.reason, "the IOMMU does not report dirty tracking");
    assert_eq!(auto.dirty_hwpts().count(), 0);
}

#[test]
fn auto_domain_skips_incompatible_hwpts() {
    let (fd, st, _g) = setup();
    add_dev(&st, 1, vtd_dev(true));
    add_dev(&st, 2, vtd_dev(false));
    let mut auto = AutoDomains::new(fd.alloc_ioas().unwrap());
    let first = auto
        .attach(&fd.probe_device(1), attacher(Rc::default(), HashMap::new()))
        .unwrap();
    // Device 2 sits behind another IOMMU: attaching it to the first HWPT is EINVAL.
    let d = auto
        .attach(
            &fd.probe_device(2),
            attacher(Rc::default(), HashMap::from([(first.pt_id, libc::EINVAL)])),
        )
        .unwrap();
    assert_eq!(d.path, DomainPath::Allocated);
    assert_ne!(d.pt_id, first.pt_id);
    assert_eq!(
        d.skipped,
        vec![format!("HWPT {}: incompatible (EINVAL)", first.pt_id)]
    );
    assert_eq!(auto.hwpts().len(), 2);
}

#[test]
fn auto_domain_falls_back_to_ioas_when_allocation_is_refused() {
    let (fd, st, _g) = setup();
    // An mdev: its id is not an iommufd device, so HW_INFO and HWPT_ALLOC fail with ENOENT.
    let mut auto = AutoDomains::new(fd.alloc_ioas().unwrap());
    let ioas_id = auto.ioas().id();
    let log = Rc::new(RefCell::new(Vec::new()));
    let d = auto
        .attach(
            &fd.probe_device(5),
            attacher(Rc::clone(&log), HashMap::new()),
        )
        .unwrap();
    assert_eq!(d.path, DomainPath::Ioas);
    assert_eq!(d.pt_id, ioas_id);
    assert!(!d.dirty_tracking);
    assert!(
        d.reason.starts_with(
            "HWPT allocation refused (IOMMU_HWPT_ALLOC failed: an ID or IOVA does not exist"
        ),
        "{}",
        d.reason
    );
    assert_eq!(*log.borrow(), vec![ioas_id]);
    assert!(st.borrow().objs.len() == 1, "no HWPT left behind");
}

#[test]
fn auto_domain_retries_without_dirty_when_the_dirty_flag_is_refused() {
    let (fd, st, _g) = setup();
    // Caps claim dirty tracking but the kernel refuses the flag (EOPNOTSUPP).
    let mut dev = vtd_dev(true);
    dev.caps = abi::IOMMU_HW_CAP_DIRTY_TRACKING;
    add_dev(&st, 1, dev);
    let probed = fd.probe_device(1);
    st.borrow_mut().devs.get_mut(&1).unwrap().caps = 0;
    let mut auto = AutoDomains::new(fd.alloc_ioas().unwrap());
    let d = auto
        .attach(&probed, attacher(Rc::default(), HashMap::new()))
        .unwrap();
    assert_eq!(d.path, DomainPath::Allocated);
    assert!(!d.dirty_tracking);
    assert!(
        d.reason.contains("but a dirty-tracking HWPT was refused"),
        "{}",
        d.reason
    );
}

#[test]
fn auto_domain_attach_refused_everywhere_is_an_error_listing_attempts() {
    let (fd, st, _g) = setup();
    add_dev(&st, 1, vtd_dev(true));
    let mut auto = AutoDomains::new(fd.alloc_ioas().unwrap());
    // The new HWPT is refused with EBUSY: fatal, and the HWPT is destroyed again.
    let e = auto
        .attach(&fd.probe_device(1), |_pt| {
            Err(io::Error::from_raw_os_error(libc::EBUSY))
        })
        .unwrap_err();
    match &e {
        Error::NoDomain {
            dev_id, attempts, ..
        } => {
            assert_eq!(*dev_id, 1);
            assert_eq!(attempts.len(), 1);
            assert!(
                attempts[0].contains("VFIO_DEVICE_ATTACH_IOMMUFD_PT failed"),
                "{attempts:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(e.errno(), Some(libc::EBUSY));
    assert_eq!(st.borrow().objs.len(), 1, "only the IOAS is left");
    // An mdev whose IOAS attach also fails.
    let e = auto
        .attach(&fd.probe_device(9), |_pt| {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        })
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("device 9 could not be attached: IOMMU_HWPT_ALLOC"),
        "{e}"
    );
}

#[test]
fn auto_domain_fatal_attach_error_on_reuse_stops() {
    let (fd, st, _g) = setup();
    add_dev(&st, 1, vtd_dev(true));
    add_dev(&st, 2, vtd_dev(true));
    let mut auto = AutoDomains::new(fd.alloc_ioas().unwrap());
    let first = auto
        .attach(&fd.probe_device(1), attacher(Rc::default(), HashMap::new()))
        .unwrap();
    let e = auto
        .attach(
            &fd.probe_device(2),
            attacher(Rc::default(), HashMap::from([(first.pt_id, libc::ENOMEM)])),
        )
        .unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOMEM));
    assert_eq!(
        auto.hwpts().len(),
        1,
        "nothing new allocated after a fatal error"
    );
}

#[test]
fn auto_domains_union_dirty_over_all_hwpts() {
    let (fd, st, _g) = setup();
    add_dev(&st, 1, vtd_dev(true));
    add_dev(&st, 2, vtd_dev(true));
    let mut auto = AutoDomains::new(fd.alloc_ioas().unwrap());
    let a = auto
        .attach(&fd.probe_device(1), attacher(Rc::default(), HashMap::new()))
        .unwrap();
    let b = auto
        .attach(
            &fd.probe_device(2),
            attacher(Rc::default(), HashMap::from([(a.pt_id, libc::EINVAL)])),
        )
        .unwrap();
    auto.set_dirty_tracking(true).unwrap();
    mark_dirty(&st, a.pt_id, &[0x1000]);
    mark_dirty(&st, b.pt_id, &[0x3000]);
    let mut bm = DirtyBitmap::new(0, 64 * PAGE, PAGE).unwrap();
    auto.read_dirty(0, 64 * PAGE, &mut bm, true).unwrap();
    assert_eq!(bm.words(), &[0b1010]);
}

/// The fault queue's file: records the "kernel" writes are decoded, a response reaches it as
/// one 8-byte record, an empty queue reads as no requests, and a short record is refused.
#[test]
fn fault_queue_reads_records_and_writes_responses() {
    use crate::fault::{PageResponse, RECORD_LEN};
    use std::io::{Read, Write};
    use std::time::Duration;

    let (fd, st, _g) = setup();
    let q = fd.alloc_fault_queue().unwrap();
    assert!(q.read_requests(None).unwrap().is_empty());
    let peer = st.borrow_mut().fault_peers.remove(&q.id()).unwrap();
    let mut peer = std::fs::File::from(peer);
    let mut rec = [0u8; RECORD_LEN];
    rec[0] = abi::IOMMU_PGFAULT_FLAGS_LAST_PAGE as u8;
    rec[4] = 5; // dev_id
    rec[16] = (abi::IOMMU_PGFAULT_PERM_WRITE) as u8;
    rec[24..32].copy_from_slice(&0x1234_5000u64.to_le_bytes());
    rec[36] = 77; // cookie
    peer.write_all(&rec).unwrap();
    let got = q.read_requests(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].dev_id, got[0].addr, got[0].cookie),
        (5, 0x1234_5000, 77)
    );
    assert!(got[0].perm.write && !got[0].perm.read && got[0].last_page);

    q.respond(77, PageResponse::Invalid).unwrap();
    let mut resp = [0u8; 16];
    let n = peer.read(&mut resp).unwrap();
    assert_eq!(n, 8);
    assert_eq!(&resp[..8], &[77, 0, 0, 0, 1, 0, 0, 0]);

    peer.write_all(&rec[..30]).unwrap();
    let e = q.read_requests(Some(Duration::from_secs(5))).unwrap_err();
    assert!(e.to_string().contains("30 bytes"), "{e}");
}

/// A HWPT that is not a nesting parent cannot have a nested child, and nested driver data
/// cannot be empty; both are refused before any ioctl.
#[test]
fn alloc_nested_refuses_a_non_parent_and_empty_data() {
    let (fd, st, _g) = setup();
    add_dev(
        &st,
        1,
        FakeDev {
            caps: 0,
            data_type: 0,
            data: vec![],
            alloc_errno: None,
        },
    );
    let ioas = fd.alloc_ioas().unwrap();
    let plain = ioas.alloc_hwpt(1, HwptFlags::empty()).unwrap();
    let before = st.borrow().calls.len();
    let e = plain.alloc_nested(1, 0xdead, &[0; 4], None).unwrap_err();
    assert!(e.to_string().contains("NEST_PARENT"), "{e}");
    let parent = ioas.alloc_hwpt(1, HwptFlags::NEST_PARENT).unwrap();
    let e = parent.alloc_nested(1, 0xdead, &[], None).unwrap_err();
    assert!(e.to_string().contains("driver data"), "{e}");
    assert_eq!(
        st.borrow().calls.len(),
        before + 1,
        "only the parent's HWPT_ALLOC ran"
    );
}

/// vIOMMU and vDEVICE: a 6.12 kernel (ENOTTY) is "not supported" by the probe and by the
/// allocation's error reason; a 7.3 kernel allocates on a nesting parent, refuses a plain HWPT
/// (EINVAL) and an unknown type (EOPNOTSUPP); the objects are destroyed child first.
#[test]
fn viommu_and_vdevice_are_probed_and_allocated() {
    let (fd, st, _g) = setup();
    add_dev(
        &st,
        1,
        FakeDev {
            caps: 0,
            data_type: 0,
            data: vec![],
            alloc_errno: None,
        },
    );
    let ioas = fd.alloc_ioas().unwrap();
    let parent = ioas.alloc_hwpt(1, HwptFlags::NEST_PARENT).unwrap();
    match fd.viommu_support() {
        Support::NotSupported(why) => assert!(why.contains("ENOTTY"), "{why}"),
        Support::Supported => panic!("a 6.12 kernel has no vIOMMU"),
    }
    let e = parent
        .alloc_viommu(1, abi::IOMMU_VIOMMU_TYPE_ARM_SMMUV3, &mut [])
        .unwrap_err();
    assert_eq!(e.reason(), Some(Reason::NotSupported));

    st.borrow_mut().viommu_cmds = true;
    assert_eq!(fd.viommu_support(), Support::Supported);
    let v = parent
        .alloc_viommu(1, abi::IOMMU_VIOMMU_TYPE_ARM_SMMUV3, &mut [])
        .unwrap();
    let d = v.alloc_vdevice(1, 0x42).unwrap();
    assert_eq!(d.virt_id(), 0x42);
    let plain = ioas.alloc_hwpt(1, HwptFlags::empty()).unwrap();
    let e = plain
        .alloc_viommu(1, abi::IOMMU_VIOMMU_TYPE_ARM_SMMUV3, &mut [])
        .unwrap_err();
    assert!(e.to_string().contains("NEST_PARENT"), "{e}");
    let e = parent.alloc_viommu(1, 7, &mut []).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EOPNOTSUPP));
    let e = parent
        .alloc_viommu(1, abi::IOMMU_VIOMMU_TYPE_DEFAULT, &mut [])
        .unwrap_err();
    assert!(e.to_string().contains("reserved"), "{e}");
    let (vid, did) = (v.id(), d.id());
    drop(d);
    drop(v);
    let st = st.borrow();
    assert!(!st.objs.contains_key(&vid) && !st.objs.contains_key(&did));
}
