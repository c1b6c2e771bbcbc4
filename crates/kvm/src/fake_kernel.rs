//! A process-wide fault layer in front of the KVM calls a migration makes (feature
//! `fake-kernel`), for whole-migration fail-nth sweeps.
//!
//! KVM itself stays real: before each call this crate makes while migrating — the dirty log
//! (`KVM_GET_DIRTY_LOG`, `KVM_CLEAR_DIRTY_LOG`, `KVM_RESET_DIRTY_RINGS`, slot logging through
//! `KVM_SET_USER_MEMORY_REGION`), the VM state (`KVM_GET/SET_CLOCK`, `KVM_GET/SET_IRQCHIP`) and
//! every vCPU state ioctl — the installed [`Kernel`] is asked; an errno it returns is that
//! call's result and the call does not reach KVM. Without an installed kernel every call goes
//! to KVM. The feature is meant for dev-dependencies only (decisions.md, "Fakes across
//! crates").

use std::sync::Mutex;

/// Decides, call by call, whether a KVM call fails.
pub trait Kernel: Send {
    /// Called before the KVM call `what` (its ioctl name, e.g. `KVM_GET_REGS`); `Err(errno)`
    /// fails it with that errno.
    fn call(&mut self, what: &'static str) -> Result<(), i32>;
}

static KERNEL: Mutex<Option<Box<dyn Kernel>>> = Mutex::new(None);

/// Installs `k` for every thread of the process until the guard drops (replacing any other).
pub fn install(k: Box<dyn Kernel>) -> Guard {
    *KERNEL.lock().unwrap_or_else(|p| p.into_inner()) = Some(k);
    Guard(())
}

/// Removes the installed kernel when dropped.
#[derive(Debug)]
pub struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        KERNEL.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// Asks the installed kernel about `what`; `Ok` when none is installed.
pub(crate) fn check(what: &'static str) -> Result<(), i32> {
    match KERNEL
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_deref_mut()
    {
        Some(k) => k.call(what),
        None => Ok(()),
    }
}
