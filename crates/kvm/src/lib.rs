//! # livemig-kvm
//!
//! The KVM backend of the livemig engine, on rust-vmm's `kvm-ioctls`, `kvm-bindings` and
//! `vm-memory`:
//!
//! - [`memory`]: guest RAM as `vm-memory` regions with holes (anonymous, memfd or a shared
//!   file another VMM can map), implementing the engine's `GuestMemory`, with zero-page
//!   knowledge from the backing and the VMM's own writes tracked;
//! - [`vm`]: the VM, vCPU threads that pause without losing an exit (`immediate_exit` plus a
//!   signal kick), host-enforced throttling, and the dirty mechanism chosen by probe;
//! - [`dirty`]: the vCPU dirty tracker over the dirty bitmap (`KVM_GET_DIRTY_LOG`,
//!   `KVM_CLEAR_DIRTY_LOG` in chunks with `MANUAL_DIRTY_LOG_PROTECT2`) or the dirty ring
//!   (per-vCPU rings, `KVM_RESET_DIRTY_RINGS`, ring-full exits without losing entries);
//! - [`state`]: the versioned x86 vCPU state record, refused on a CPUID or XSAVE mismatch;
//! - [`device`]: the engine's vCPU control and the state record as a migration device;
//! - [`guest`]: the self-verifying test VM (a flat multiboot image built from source in
//!   `guest/`, bootable by QEMU too; its workload runs in 64-bit ring 3);
//! - [`platform`]: a running VM as the engine's source platform, a prepared one as its
//!   destination.
//!
//! Feature `fake-kernel` (dev-dependencies only) adds `fake_kernel`: a process-wide fault
//! layer in front of every KVM call a migration makes, for fail-nth sweeps over the real KVM.
//!
//! `cargo bench -p livemig-kvm --bench harvest` times the harvest of pages already dirtied
//! (bitmap against ring, 1%, 10% and 50% of 4 GiB) against a plain read of the bitmap.
//!
//! ```text
//!   Source engine ── KvmDirtyLog (ring | bitmap + VMM writes), KvmVcpus, VmMemory,
//!                    VcpuStateDevice (+ any assigned devices) ──> stream ──> Destination
//! ```
#![deny(missing_docs)]

pub mod device;
pub mod dirty;
#[cfg(feature = "fake-kernel")]
pub mod fake_kernel;
pub mod guest;
pub mod memory;
pub mod platform;
pub mod state;
mod sys;
pub mod vm;

pub use device::{KvmStart, KvmVcpus, VcpuStateDevice};
pub use dirty::KvmDirtyLog;
pub use guest::{ApStart, GuestEvent, TestVm, TestVmConfig};
pub use memory::{Backing, VmMemory};
pub use vm::{DirtyMode, Mechanism, Vm, VmConfig, kvm_usable};

/// A KVM backend error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration no VM could use.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A KVM ioctl failed.
    #[error("{what}")]
    Kvm {
        /// The ioctl and its object.
        what: String,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// A host call (mmap, memfd, files, threads) failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A vCPU state that does not fit this VM.
    #[error("vCPU state: {0}")]
    Vcpu(String),
    /// A malformed vCPU state record.
    #[error("vCPU state record at byte {offset}: {what}")]
    Record {
        /// Byte offset in the record.
        offset: usize,
        /// What was wrong.
        what: String,
    },
    /// The guest image could not be loaded.
    #[error("guest image: {0}")]
    Image(String),
    /// The test guest misbehaved or did not answer.
    #[error("test guest: {0}")]
    Guest(String),
}
