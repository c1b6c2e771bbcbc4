//! Builds the test guest (`guest/`) with the machine's gcc as a flat multiboot image.
//!
//! Why gcc and not Rust: the guest is freestanding code linked at a fixed address with a
//! 32-bit entry stub. When this was written no bare-metal target could be fetched here; CI now
//! adds `x86_64-unknown-none` for its no_std check (issue 18), so a Rust guest is possible, but
//! its 32-bit multiboot entry would still need assembly and a linker script, and a build
//! script cannot rely on a target being installed. The image is a flat binary whose multiboot header
//! carries the address fields, so QEMU's multiboot loader takes it (it refuses 64-bit ELF
//! files) and livemig-kvm loads it the same way (see docs/decisions.md).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    let out = out_dir.join("guest.elf");
    let guest = dir.join("guest");
    for f in ["guest.c", "entry64.S", "guest.ld"] {
        println!("cargo:rerun-if-changed=guest/{f}");
    }
    println!("cargo:rerun-if-env-changed=LIVEMIG_GUEST_CC");
    let cc = std::env::var("LIVEMIG_GUEST_CC").unwrap_or_else(|_| "gcc".into());
    let status = Command::new(&cc)
        .args([
            "-m64",
            "-mno-red-zone",
            "-mcmodel=small",
            "-ffreestanding",
            "-fno-pic",
            "-fno-pie",
            "-no-pie",
            "-nostdlib",
            "-static",
            "-O2",
            "-fno-stack-protector",
            "-mgeneral-regs-only",
            "-fno-asynchronous-unwind-tables",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wl,--build-id=none",
            "-Wl,--no-warn-rwx-segments",
        ])
        .arg(format!("-Wl,-T,{}", guest.join("guest.ld").display()))
        .arg("-o")
        .arg(&out)
        .arg(guest.join("guest.c"))
        .arg(guest.join("entry64.S"))
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "building the test guest with `{cc}` failed ({s}); livemig-kvm needs a gcc that can \
             build freestanding x86 code with a .code32 stub (Debian's gcc can; set \
             LIVEMIG_GUEST_CC to use another)"
        ),
        Err(e) => panic!("cannot run `{cc}` to build the test guest: {e}"),
    }
    let bin = out_dir.join("guest.bin");
    let objcopy = std::env::var("LIVEMIG_GUEST_OBJCOPY").unwrap_or_else(|_| "objcopy".into());
    match Command::new(&objcopy)
        .args(["-O", "binary"])
        .arg(&out)
        .arg(&bin)
        .status()
    {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("`{objcopy} -O binary` on the test guest failed ({s})"),
        Err(e) => panic!("cannot run `{objcopy}` (binutils) for the test guest: {e}"),
    }
}
