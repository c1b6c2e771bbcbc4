//! The `livemig` binary inside the rig guest (`/bin/livemig`, built static next to hw-tests):
//! `livemig probe --json` must report the selftest mock IOMMU's dirty tracking and the mtty
//! device's migration flags.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::harness::{Outcome, Runner};
use crate::util::{uuid, write_sysfs};

const LIVEMIG: &str = "/bin/livemig";
const MTTY_TYPE: &str = "/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2";

pub fn run(r: &mut Runner) {
    r.case("livemig.probe_json", probe_json);
}

fn probe_json() -> Result<Outcome> {
    if !Path::new(LIVEMIG).exists() {
        return Ok(Outcome::Skip(format!("{LIVEMIG} is not in the initramfs")));
    }
    // An mtty device, created but not opened: the probe opens it itself.
    let id = uuid()?;
    write_sysfs(Path::new(MTTY_TYPE).join("create"), &id)?;
    let out = Command::new(LIVEMIG).args(["probe", "--json"]).output();
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
