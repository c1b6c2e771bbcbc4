//! Writes the golden `acc_vf_data` blobs of `fixtures/hisi-qm/`. Existing files are never
//! overwritten: tests/golden.rs checks they still decode and that the encoder reproduces them.
//!
//! `cargo run -p livemig-hisi-qm --example make_golden_qm -- fixtures/hisi-qm`

#[path = "../tests/common/mod.rs"]
mod common;

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fixtures/hisi-qm".into());
    let dir = std::path::Path::new(&dir);
    std::fs::create_dir_all(dir)?;
    for (name, bytes) in common::all() {
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
