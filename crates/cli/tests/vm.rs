//! `livemig vm`: a running KVM test VM migrated between two processes over loopback TCP, with
//! the dirty ring and with the dirty bitmap, and the guest's own verification on the
//! destination. Needs a usable /dev/kvm: without one these tests print why and pass, except
//! under CI=true, where they fail unless LIVEMIG_SKIP_KVM is set.

mod common;

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_livemig");

fn demo(dirty: &str, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN)
        .args([
            "vm", "demo", "--json", "--dirty", dirty, "--warmup", "300ms",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vm demo --dirty {dirty} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn check(v: &serde_json::Value, mechanism: &str) {
    assert_eq!(v["verified"], true, "{v:#}");
    let src = &v["source"];
    assert!(
        src["dirty_logging"].as_str().unwrap().contains(mechanism),
        "{}",
        src["dirty_logging"]
    );
    let rounds = src["report"]["rounds"].as_array().unwrap();
    assert!(!rounds.is_empty());
    assert!(src["report"]["bytes"].as_u64().unwrap() > 0);
    assert!(src["report"]["downtime_us"].as_u64().unwrap() > 0);
    // The guest's sequence continues where the source stopped.
    let stopped: Vec<u64> = serde_json::from_value(src["steps_at_stop"].clone()).unwrap();
    let resumed: Vec<u64> =
        serde_json::from_value(v["destination"]["resumed_steps"].clone()).unwrap();
    assert!(
        resumed.iter().zip(&stopped).all(|(r, s)| r > s),
        "resumed {resumed:?} after {stopped:?}"
    );
    assert_eq!(v["destination"]["verification"]["ok"], true);
}

#[test]
fn vm_demo_migrates_a_running_vm_between_two_processes_with_the_ring() {
    if !common::kvm("livemig vm tests") {
        return;
    }
    check(&demo("ring", &[]), "dirty ring");
}

#[test]
fn vm_demo_migrates_a_running_vm_between_two_processes_with_the_bitmap_over_two_page_channels() {
    if !common::kvm("livemig vm tests") {
        return;
    }
    // The guest verifies every page it wrote: pages spread over two page channels and the
    // round barrier keep them all.
    check(&demo("bitmap", &["--channels", "2"]), "dirty bitmap");
}

#[test]
fn bad_vm_values_are_named() {
    let out = Command::new(BIN)
        .args(["vm", "run", "--vcpus", "9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    if livemig_kvm::kvm_usable().is_ok() {
        assert!(err.contains("9 vCPUs"), "{err}");
    }
    let out = Command::new(BIN)
        .args(["vm", "run", "--dirty", "ring:100"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    if livemig_kvm::kvm_usable().is_ok() {
        assert!(err.contains("power of two"), "{err}");
    }
    let out = Command::new(BIN)
        .args(["vm", "run", "--dirty", "sometimes"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown dirty logging mode"));
}

/// Starts `livemig vm incoming` on an ephemeral port; returns the process and its address.
fn spawn_destination() -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(BIN)
        .args([
            "vm",
            "incoming",
            "--listen",
            "127.0.0.1:0",
            "--json",
            "--plain",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    (child, addr)
}

#[test]
fn a_vcpu_stopped_by_a_triple_fault_on_the_source_is_reported_not_migrated_silently() {
    if !common::kvm("livemig vm tests") {
        return;
    }
    let (mut dst, addr) = spawn_destination();
    let out = Command::new(BIN)
        .args(["vm", "migrate", "--to", &addr, "--json", "--plain"])
        .args(["--vcpus", "2", "--warmup", "300ms", "--x-guest-shutdown"])
        .output()
        .unwrap();
    // One host: the source process has ended (its VM with it) and the destination holds the
    // VM, as the source's message says.
    let dst_alive = dst.try_wait().unwrap().is_none();
    let _ = dst.kill();
    let _ = dst.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the source said it migrated cleanly: {err}"
    );
    assert!(
        err.contains("the VM runs on the destination") && dst_alive,
        "the VM must be on the destination alone (destination alive: {dst_alive}): {err}"
    );
    // The first vCPU to triple-fault stops the VM; which one it is depends on timing.
    for want in [
        "had stopped before the handover",
        ": unexpected exit Shutdown at rip",
    ] {
        assert!(err.contains(want), "{want:?} not in: {err}");
    }
}

#[test]
fn a_killed_destination_process_leaves_the_source_vm_running() {
    use livemig::engine::{Event, Source, SourceConfig};
    use livemig::{Error, Phase};
    use livemig_kvm::{TestVm, TestVmConfig, platform};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    if !common::kvm("livemig vm tests") {
        return;
    }
    let src = TestVm::boot(&TestVmConfig::default()).unwrap();
    for at in [Phase::PreCopy(1), Phase::StopCopy] {
        let (child, addr) = spawn_destination();
        let child = Arc::new(Mutex::new(child));
        let sp = platform::source(&src.vm, vec![], None, None).unwrap();
        let mut source = Source::new(
            sp,
            SourceConfig {
                // Two rounds at least, so the stop-and-copy kill follows a pre-copy round.
                downtime_limit: Duration::from_micros(1),
                max_rounds: 2,
                ..SourceConfig::default()
            },
        );
        let c = child.clone();
        source.on_event(move |e| {
            if let Event::Phase(p) = e
                && *p == at
            {
                let mut c = c.lock().unwrap();
                c.kill().unwrap();
                c.wait().unwrap();
            }
        });
        let stream = std::net::TcpStream::connect(&addr).unwrap();
        let r = source.migrate_over(livemig::transport::TcpChannel(stream));
        let e = r.expect_err("the destination died");
        assert!(
            matches!(e, Error::Link { .. } | Error::Stream { .. }),
            "killed at {at}: {e}"
        );
        assert_eq!(e.phase(), Some(at), "{e}");
        let steps = src.monitor.steps();
        src.wait_progress(&steps, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("killed at {at}: the source VM does not run again: {e}"));
        let f = src.verify(Duration::from_secs(30)).unwrap();
        assert!(f.is_empty(), "killed at {at}: {f:?}");
    }
}

/// Migrates a one-vCPU test VM whose RAM is a 256 MiB shared file holding 32 MiB of data beyond
/// the guest's own area (enough that its first round lasts a while on any machine) (as `cargo xtask bench-peer` runs it); returns the source's and the
/// destination's JSON.
fn file_backed_migration(
    dir: &std::path::Path,
    vm: &[&str],
    migrate: &[&str],
) -> (serde_json::Value, serde_json::Value) {
    use std::io::{BufRead, BufReader, Read};
    use std::os::unix::fs::FileExt;
    let img = dir.join("ram.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(256 << 20).unwrap();
    let data: Vec<u8> = (0..32u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    f.write_all_at(&data, 64 << 20).unwrap();
    drop(f);
    let mut dst = Command::new(BIN)
        .args([
            "vm",
            "incoming",
            "--listen",
            "127.0.0.1:0",
            "--json",
            "--plain",
        ])
        .args(["--vcpus=1", "--pages=64", "--ram=256MiB", "--high-ram=0"])
        .args(vm)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(dst.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let src = Command::new(BIN)
        .args(["vm", "migrate", "--to", &addr, "--json", "--plain"])
        .args(["--vcpus=1", "--pages=64", "--ram=256MiB", "--high-ram=0"])
        .args(vm)
        .args(migrate)
        .arg("--mem-file")
        .arg(&img)
        .output()
        .unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = dst.wait().unwrap();
    assert!(
        src.status.success() && status.success(),
        "source: {}\n{}\ndestination ({status}): {rest}",
        String::from_utf8_lossy(&src.stdout),
        String::from_utf8_lossy(&src.stderr)
    );
    let d: serde_json::Value = serde_json::from_str(&rest).unwrap();
    assert_eq!(d["verification"]["ok"], true, "{d:#}");
    assert!(d["received"]["pages"].as_u64().unwrap() >= 8192, "{d:#}");
    (serde_json::from_slice(&src.stdout).unwrap(), d)
}

/// The benchmark's paused case: an idle guest, paused, on a shared file: the destination's
/// guest verifies and writes nothing, both sides report their CPU time, the chart is drawn.
#[test]
fn a_paused_idle_vm_on_a_shared_file_migrates_and_is_charted() {
    if !common::kvm("livemig vm tests") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("livemig-vm-paused-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let chart = dir.join("chart.svg");
    let chart_arg = format!("--chart={}", chart.display());
    let (s, d) = file_backed_migration(&dir, &["--idle"], &["--paused", "--warmup=0s", &chart_arg]);
    assert_eq!(s["paused"], true);
    assert_eq!(s["report"]["stop_copy"]["dirty_pages"], 0, "{s:#}");
    assert!(s["cpu_us"].as_u64().unwrap() > 0 && d["cpu_us"].as_u64().unwrap() > 0);
    assert_eq!(
        d["resumed_steps"],
        serde_json::json!([0]),
        "an idle guest writes nothing"
    );
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("livemig"),
        "{svg:.200}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--paused` keeps a writing guest's vCPUs parked through the migration: nothing is dirty at
/// stop-and-copy, while the same guest unpaused leaves pages for it (the control); on the
/// destination the guest runs on either way.
#[test]
fn a_paused_writing_vm_dirties_nothing_during_the_migration() {
    if !common::kvm("livemig vm tests") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("livemig-vm-paused-w-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // As fast as it can: whenever its vCPU thread gets a core it writes every page of its
    // working set within a fraction of a millisecond.
    let (paused, d) = file_backed_migration(&dir, &["--rate=0"], &["--paused", "--warmup=100ms"]);
    assert_eq!(
        paused["report"]["stop_copy"]["dirty_pages"], 0,
        "{paused:#}"
    );
    assert!(d["resumed_steps"][0].as_u64().unwrap() > 0, "{d:#}");
    let (running, _) = file_backed_migration(&dir, &["--rate=0"], &["--warmup=100ms"]);
    assert_eq!(running["paused"], false);
    assert!(
        running["report"]["stop_copy"]["dirty_pages"]
            .as_u64()
            .unwrap()
            > 0,
        "{running:#}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_image_command_prints_qemus_command_line_for_a_rate() {
    if !common::kvm("livemig vm tests") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("livemig-vm-image-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(BIN)
        .args(["vm", "image", "-o"])
        .arg(dir.join("guest.bin"))
        .args(["--print-append", "--pages=512", "--rate=1000"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    let period: u64 = line
        .trim()
        .strip_prefix("cpus=1 pages=512 period=")
        .and_then(|r| r.strip_suffix(" idle=0"))
        .unwrap_or_else(|| panic!("{line:?}"))
        .parse()
        .unwrap();
    // 1000 pages/s: one page per millisecond of a TSC between 100 MHz and 10 GHz.
    assert!((100_000..10_000_000).contains(&period), "{period}");
    let img = std::fs::read(dir.join("guest.bin")).unwrap();
    assert_eq!(img, livemig_kvm::guest::IMAGE);
    std::fs::remove_dir_all(&dir).unwrap();
}
