//! `livemig vm`: a running KVM test VM migrated between two processes over loopback TCP, with
//! the dirty ring and with the dirty bitmap, and the guest's own verification on the
//! destination. Needs a usable /dev/kvm: without one these tests print why and pass, except
//! under CI=true, where they fail unless LIVEMIG_SKIP_KVM is set.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_livemig");

fn kvm() -> bool {
    match livemig_kvm::kvm_usable() {
        Ok(()) => true,
        Err(why) => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            assert!(
                !ci || std::env::var_os("LIVEMIG_SKIP_KVM").is_some(),
                "CI=true and /dev/kvm is unusable ({why}); set LIVEMIG_SKIP_KVM=1 to skip \
                 explicitly"
            );
            eprintln!("livemig vm tests did not run: {why}");
            false
        }
    }
}

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
    if !kvm() {
        return;
    }
    check(&demo("ring", &[]), "dirty ring");
}

#[test]
fn vm_demo_migrates_a_running_vm_between_two_processes_with_the_bitmap_over_two_page_channels() {
    if !kvm() {
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
        .args(["vm", "incoming", "--listen", "127.0.0.1:0", "--json"])
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
fn a_killed_destination_process_leaves_the_source_vm_running() {
    use livemig::engine::{Event, Source, SourceConfig};
    use livemig::{Error, Phase};
    use livemig_kvm::{TestVm, TestVmConfig, platform};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    if !kvm() {
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
            if let Event::Phase(p) = e {
                if *p == at {
                    let mut c = c.lock().unwrap();
                    c.kill().unwrap();
                    c.wait().unwrap();
                }
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
