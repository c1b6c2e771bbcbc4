//! Shared by the CLI's KVM tests.

/// Whether /dev/kvm is usable; if not, `what` did not run, which under CI=true fails unless
/// LIVEMIG_SKIP_KVM is set (an explicit opt-out).
pub fn kvm(what: &str) -> bool {
    match livemig_kvm::kvm_usable() {
        Ok(()) => true,
        Err(why) => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            assert!(
                !ci || std::env::var_os("LIVEMIG_SKIP_KVM").is_some(),
                "CI=true and /dev/kvm is unusable ({why}); set LIVEMIG_SKIP_KVM=1 to skip \
                 explicitly"
            );
            eprintln!("{what} did not run: {why}");
            false
        }
    }
}
