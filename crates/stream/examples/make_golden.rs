//! Writes the golden fixtures of `fixtures/stream/`. Only for creating a *new* format version's
//! goldens: existing ones must never be regenerated (tests/golden.rs checks they still decode).
//!
//! `cargo run -p livemig-stream --example make_golden -- fixtures/stream`

#[path = "../tests/common/mod.rs"]
mod common;

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fixtures/stream".into());
    let dir = std::path::Path::new(&dir);
    std::fs::create_dir_all(dir)?;
    for (name, bytes) in [
        ("v1-basic.lmstream", common::v1_basic(true)),
        ("v1-basic-nocrc.lmstream", common::v1_basic(false)),
        ("qemu-vfio-section.bin", common::qemu_sample()),
    ] {
        let path = dir.join(name);
        if path.exists() {
            eprintln!("{} exists: not overwritten", path.display());
            continue;
        }
        std::fs::write(&path, bytes)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
