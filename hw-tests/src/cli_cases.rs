//! The `livemig` binary inside the rig guest (`/bin/livemig`, built static next to hw-tests):
//! `livemig probe --open --json` must report the selftest mock IOMMU's dirty tracking and the
//! mtty device's migration flags; `livemig probe --json` and `livemig compat export --host`
//! must describe the mtty from sysfs without opening any device file, which the kernel's
//! inotify (`IN_OPEN` on `/dev/vfio/devices`) proves — the same watch sees `--open` open it.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::harness::{Outcome, Runner};
use crate::util::{uuid, write_sysfs};

const LIVEMIG: &str = "/bin/livemig";
const MTTY_TYPE: &str = "/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2";

const CDEVS: &str = "/dev/vfio/devices";

pub fn run(r: &mut Runner) {
    r.case("livemig.probe_json", probe_json);
    r.case(
        "livemig.probe_read_only_opens_no_device_file",
        probe_read_only,
    );
}

/// An inotify watch for opens of files in a directory.
struct OpenWatch(i32);

impl OpenWatch {
    fn new(dir: &str) -> Result<OpenWatch> {
        // SAFETY: plain system calls; the fd is owned by the returned value.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        ensure!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        let w = OpenWatch(fd);
        let path = std::ffi::CString::new(dir)?;
        // SAFETY: a valid NUL-terminated path and our own inotify fd.
        let wd = unsafe { libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_OPEN) };
        ensure!(
            wd >= 0,
            "inotify_add_watch {dir}: {}",
            std::io::Error::last_os_error()
        );
        Ok(w)
    }

    /// Names of the files opened since the last call (the directory's own opens, from
    /// listing it, have no name and are left out).
    fn opened(&self) -> Vec<String> {
        let mut names = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reads into a local buffer of the given length from our inotify fd.
            let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return names;
            }
            let mut at = 0usize;
            while at + 16 <= n as usize {
                let mask = u32::from_ne_bytes(buf[at + 4..at + 8].try_into().unwrap_or_default());
                let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap_or_default())
                    as usize;
                let name = buf.get(at + 16..at + 16 + len).unwrap_or_default();
                let name = String::from_utf8_lossy(name)
                    .trim_end_matches('\0')
                    .to_string();
                if mask & libc::IN_OPEN != 0 && !name.is_empty() {
                    names.push(name);
                }
                at += 16 + len;
            }
        }
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        // SAFETY: closes the fd this value owns.
        unsafe { libc::close(self.0) };
    }
}

/// The cdev name (`vfioN`) of an mdev.
fn cdev_of(id: &str) -> Result<String> {
    let dir = format!("/sys/bus/mdev/devices/{id}/vfio-dev");
    let e = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {dir}"))?
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("vfio"))
        .with_context(|| format!("no vfioN in {dir}"))?;
    Ok(e.file_name().to_string_lossy().into_owned())
}

fn probe_read_only() -> Result<Outcome> {
    if !Path::new(LIVEMIG).exists() {
        return Ok(Outcome::Skip(format!("{LIVEMIG} is not in the initramfs")));
    }
    let id = uuid()?;
    write_sysfs(Path::new(MTTY_TYPE).join("create"), &id)?;
    let r = (|| -> Result<()> {
        let cdev = cdev_of(&id)?;
        let watch = OpenWatch::new(CDEVS)?;
        let out = Command::new(LIVEMIG)
            .args(["probe", "--json"])
            .output()
            .context("running livemig probe")?;
        let export = Command::new(LIVEMIG)
            .args(["compat", "export", "--host"])
            .output()
            .context("running livemig compat export --host")?;
        let opened = watch.opened();
        ensure!(
            opened.is_empty(),
            "the read-only probe and export opened {opened:?}"
        );
        ensure!(
            out.status.success() && export.status.success(),
            "livemig failed: {} {}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&export.stderr)
        );
        let j: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("livemig probe --json output")?;
        ensure!(j["opened_devices"] == false, "opened_devices: {j}");
        let devs = j["devices"].as_array().context("devices array")?;
        let mtty = devs
            .iter()
            .find(|d| d["device"] == id.as_str())
            .with_context(|| format!("mtty {id} not among the devices: {devs:?}"))?;
        let sys = &mtty["sysfs"];
        ensure!(
            mtty["opened"] == false
                && mtty["migration_flags"].is_null()
                && sys["bus"] == "mdev"
                && sys["mdev_type"] == "mtty-2"
                && sys["device_api"] == "vfio-pci"
                && sys["parent"] == "mtty"
                && sys["problems"] == serde_json::json!([]),
            "the mtty from sysfs: {mtty}"
        );
        ensure!(
            mtty["cdev"].as_str().is_some_and(|c| c.ends_with(&cdev)),
            "cdev {cdev}: {mtty}"
        );
        let d: serde_json::Value =
            serde_json::from_slice(&export.stdout).context("compat export --host output")?;
        let ids: Vec<&str> = d["devices"]
            .as_array()
            .context("descriptor devices")?
            .iter()
            .filter_map(|x| x["identity"].as_str())
            .collect();
        ensure!(
            ids.iter().any(|i| i.starts_with("mdev mtty-2 (vfio-pci)")),
            "the exported identities: {ids:?}"
        );
        // The negative control: the same watch sees the deep probe open the cdev.
        let out = Command::new(LIVEMIG)
            .args(["probe", "--open", "--json"])
            .output()
            .context("running livemig probe --open")?;
        ensure!(out.status.success(), "livemig probe --open failed");
        let opened = watch.opened();
        ensure!(
            opened.contains(&cdev),
            "probe --open opened {opened:?}, not {cdev}: the watch cannot see opens"
        );
        Ok(())
    })();
    let removed = write_sysfs(format!("/sys/bus/mdev/devices/{id}/remove"), "1");
    r?;
    removed?;
    Ok(Outcome::Pass)
}

fn probe_json() -> Result<Outcome> {
    if !Path::new(LIVEMIG).exists() {
        return Ok(Outcome::Skip(format!("{LIVEMIG} is not in the initramfs")));
    }
    // An mtty device, created but not opened: the probe opens it itself (`--open`).
    let id = uuid()?;
    write_sysfs(Path::new(MTTY_TYPE).join("create"), &id)?;
    let out = Command::new(LIVEMIG)
        .args(["probe", "--open", "--json"])
        .output();
    let removed = write_sysfs(format!("/sys/bus/mdev/devices/{id}/remove"), "1");
    let out = out.context("running livemig probe")?;
    removed?;
    ensure!(
        out.status.success(),
        "livemig probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("livemig probe --json output")?;
    ensure!(j["iommufd"] == true, "iommufd not reported: {j}");
    let mock = &j["selftest_mock"];
    ensure!(
        mock["iommu"]["dirty_tracking"] == true && mock["dirty_hwpt"] == true,
        "mock IOMMU dirty tracking not reported: {mock}"
    );
    ensure!(
        mock["no_dirty_variant_refused"] == true,
        "a no-dirty mock device got a dirty HWPT: {mock}"
    );
    let devs = j["devices"].as_array().context("devices array")?;
    let mtty = devs
        .iter()
        .find(|d| d["device"] == id.as_str())
        .with_context(|| format!("mtty {id} not among the probed devices: {devs:?}"))?;
    ensure!(
        mtty["migration_flags"] == serde_json::json!(["STOP_COPY", "P2P", "PRE_COPY"]),
        "mtty migration flags: {}",
        mtty["migration_flags"]
    );
    ensure!(mtty["iommu"].is_null(), "an mdev has no IOMMU: {mtty}");
    ensure!(
        mtty["verdict"]
            .as_str()
            .is_some_and(|v| v.starts_with("migratable")),
        "verdict: {}",
        mtty["verdict"]
    );
    Ok(Outcome::Pass)
}
