//! The `livemig` binary: two processes migrating over loopback TCP, inspect, compat.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_livemig");
const SIM: [&str; 6] = ["--ram", "512MiB", "--populated", "16MiB", "--seed", "7"];

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
}

fn json(out: &[u8]) -> serde_json::Value {
    serde_json::from_slice(out)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(out)))
}

/// Starts `livemig incoming` on an ephemeral loopback port; returns it, the address, and its
/// stderr (kept open: the process reports progress there).
fn spawn_incoming(
    extra: &[&str],
) -> (
    std::process::Child,
    String,
    BufReader<std::process::ChildStderr>,
) {
    let mut dst = Command::new(BIN)
        .args(["incoming", "--listen", "127.0.0.1:0"])
        .args(extra)
        .args(SIM)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(dst.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (dst, addr, err)
}

#[test]
fn two_processes_migrate_over_loopback_tcp() {
    two_processes(&[]);
}

#[test]
fn two_processes_migrate_over_three_page_channels() {
    let s = two_processes(&["--channels", "3"]);
    assert!(
        s["report"]["timeline"].as_array().unwrap().len() >= 2,
        "bytes against time are reported"
    );
}

/// A migration between two processes; the source's JSON.
fn two_processes(extra: &[&str]) -> serde_json::Value {
    let (dst, addr, _stderr) = spawn_incoming(&["--json", "--plain"]);
    let src = Command::new(BIN)
        .args(["migrate", "--to", &addr, "--json", "--plain"])
        .args(extra)
        .args(SIM)
        .output()
        .unwrap();
    let dout = dst.wait_with_output().unwrap();
    assert!(
        src.status.success(),
        "source: {}",
        String::from_utf8_lossy(&src.stderr)
    );
    assert!(dout.status.success(), "destination failed");
    let (s, d) = (json(&src.stdout), json(&dout.stdout));
    assert_eq!(s["role"], "source");
    assert_eq!(d["role"], "destination");
    assert_eq!(
        s["digest"], d["digest"],
        "memory and device state identical"
    );
    assert_eq!(s["digest"]["devices"].as_array().unwrap().len(), 3);
    assert!(!s["report"]["rounds"].as_array().unwrap().is_empty());
    s
}

#[test]
fn incoming_refuses_a_mismatched_source_and_the_source_says_why() {
    let (mut dst, addr, _stderr) = spawn_incoming(&["--qm-vfs", "1", "--plain"]);
    let src = Command::new(BIN)
        .args(["migrate", "--to", &addr, "--plain"])
        .args(SIM)
        .output()
        .unwrap();
    assert!(!dst.wait().unwrap().success());
    assert!(!src.status.success());
    let e = String::from_utf8_lossy(&src.stderr);
    assert!(
        e.contains("compat exchange: the destination refused: the source has 3 device(s), the destination 2"),
        "{e}"
    );
}

#[test]
fn compat_export_and_check() {
    let dir = std::env::temp_dir().join(format!("livemig-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b, c) = (dir.join("a.json"), dir.join("b.json"), dir.join("c.json"));
    for (f, extra) in [(&a, vec![]), (&b, vec![]), (&c, vec!["--no-precopy"])] {
        let st = Command::new(BIN)
            .args(["compat", "export", "-o"])
            .arg(f)
            .args(extra)
            .status()
            .unwrap();
        assert!(st.success());
    }
    let ok = Command::new(BIN)
        .args(["compat", "check", "--json"])
        .args([&a, &b])
        .output()
        .unwrap();
    assert!(ok.status.success());
    assert_eq!(json(&ok.stdout)["compatible"], true);
    let bad = Command::new(BIN)
        .args(["compat", "check"])
        .args([&a, &c])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let t = String::from_utf8_lossy(&bad.stdout);
    assert!(t.contains("NOT compatible"), "{t}");
    assert!(
        t.contains("uses PRE_COPY which the destination device lacks"),
        "{t}"
    );
    std::fs::write(&c, "{\"format\": 1}").unwrap();
    let e = Command::new(BIN)
        .args(["compat", "check"])
        .args([&a, &c])
        .output()
        .unwrap();
    assert!(!e.status.success());
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("not a compatibility descriptor"),
        "{}",
        String::from_utf8_lossy(&e.stderr)
    );
    // A descriptor from a newer livemig: a later format, or a field this one does not know, is
    // refused by name, never passed by ignoring it.
    let good: serde_json::Value = serde_json::from_slice(&std::fs::read(&a).unwrap()).unwrap();
    let refusal = |v: &serde_json::Value| {
        std::fs::write(&c, serde_json::to_vec(v).unwrap()).unwrap();
        let o = Command::new(BIN)
            .args(["compat", "check"])
            .args([&a, &c])
            .output()
            .unwrap();
        assert!(!o.status.success() && o.stdout.is_empty(), "{o:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let mut newer = good.clone();
    newer["format"] = "livemig-compat/2".into();
    newer["devices"][0]["identity"] = serde_json::Value::Null;
    let e = refusal(&newer);
    assert!(e.contains("written by a newer livemig"), "{e}");
    let mut extra = good.clone();
    extra["devices"][1]["pasid_width"] = 20.into();
    let e = refusal(&extra);
    assert!(
        e.contains("unknown field \"pasid_width\" in device 1"),
        "{e}"
    );
    let mut extra = good.clone();
    extra["signature"] = "x".into();
    let e = refusal(&extra);
    assert!(
        e.contains("unknown field \"signature\" at the top level"),
        "{e}"
    );
    // Negative control: the unchanged descriptor passes the same path.
    std::fs::write(&c, serde_json::to_vec(&good).unwrap()).unwrap();
    let o = Command::new(BIN)
        .args(["compat", "check"])
        .args([&a, &c])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn inspect_dumps_both_formats_and_names_corruption() {
    let out = Command::new(BIN)
        .args(["inspect", "--json"])
        .arg(fixture("stream/v1-basic.lmstream"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let j = json(&out.stdout);
    assert_eq!(j["format"], "livemig");
    assert_eq!(j["valid"], true);
    let out = Command::new(BIN)
        .arg("inspect")
        .arg(fixture("stream/qemu-vfio-section.bin"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.is_empty());
    let mut bytes = std::fs::read(fixture("stream/v1-basic.lmstream")).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    let bad = std::env::temp_dir().join(format!("livemig-bad-{}.lmstream", std::process::id()));
    std::fs::write(&bad, &bytes).unwrap();
    let out = Command::new(BIN).arg("inspect").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("at byte"), "{e}");
    std::fs::remove_file(&bad).unwrap();
}

#[test]
fn bad_arguments_are_named() {
    let out = Command::new(BIN)
        .args(["simulate", "--ram", "12 parsecs"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("unknown size unit \"parsecs\""), "{e}");
    let out = Command::new(BIN)
        .args(["simulate", "--vendor", "sparc"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown IOMMU vendor \"sparc\""));
    let out = Command::new(BIN)
        .args(["simulate", "--ram", "1GiB", "--populated", "2GiB"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("populated"));
    for bad in ["0", "65"] {
        let out = Command::new(BIN)
            .args(["simulate", "--channels", bad])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            e.contains(&format!(
                "invalid value '{bad}' for '--channels <CHANNELS>'"
            )),
            "{e}"
        );
    }
}

/// A file inspect must read whole is read up to `--max-bytes`, and the output says so; within
/// the cap nothing is said.
#[test]
fn inspect_caps_what_it_reads_whole_and_says_so() {
    let file = fixture("qemu/q35-tcg-16m.qevm");
    let size = std::fs::metadata(&file).unwrap().len();
    let out = Command::new(BIN)
        .args(["inspect", "--json", "--max-bytes", "4096"])
        .arg(&file)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("only the first 4096 bytes were inspected (--max-bytes)"),
        "{e}"
    );
    let j = json(&out.stdout);
    assert_eq!(j["read_only_first"], 4096, "{j}");
    assert!(!out.status.success(), "a cut QEMU file is not valid: {j}");
    let out = Command::new(BIN)
        .args(["inspect", "--json", "--max-bytes"])
        .arg(size.to_string())
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json(&out.stdout);
    assert!(j.get("read_only_first").is_none(), "{j}");
}

/// `livemig tls keygen` for a host: (certificate, key, fingerprint).
fn keygen(dir: &std::path::Path, name: &str) -> (String, String, String) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    let out = Command::new(BIN)
        .args(["tls", "keygen", "--name", name, "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fp = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(fp.starts_with("sha256:") && fp.len() == 71, "{fp}");
    (cert.display().to_string(), key.display().to_string(), fp)
}

fn tls_args<'a>(cert: &'a str, key: &'a str, peer: &'a str) -> [&'a str; 6] {
    ["--tls-cert", cert, "--tls-key", key, "--tls-peer", peer]
}

/// Two processes over mutual TLS with pinned self-signed certificates (made by `livemig tls
/// keygen`): the migration arrives whole, and the destination names the source's fingerprint.
/// A third certificate the destination did not pin is refused before anything is read, and a
/// connection that says nothing is not waited on: the destination logs the stranger (address
/// and reason) and keeps listening, and the pinned source that connects after both migrates
/// (issue 29, item 5). Negative control: with `--max-handshake-failures 1` the stranger ends
/// the incoming migration, with an error naming the bound. Without --plain or TLS options
/// nothing starts.
#[test]
fn two_processes_migrate_over_mutual_tls_and_a_stranger_is_refused() {
    let dir = std::env::temp_dir().join(format!("livemig-cli-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (sc, sk, sfp) = keygen(&dir, "source");
    let (dc, dk, dfp) = keygen(&dir, "destination");
    let (xc, xk, _) = keygen(&dir, "stranger");

    let mut dargs = vec!["--json"];
    dargs.extend(tls_args(&dc, &dk, &sfp));
    let (dst, addr, mut derr) = spawn_incoming(&dargs);
    let src = Command::new(BIN)
        .args(["migrate", "--to", &addr, "--json"])
        .args(tls_args(&sc, &sk, &dfp))
        .args(SIM)
        .output()
        .unwrap();
    let mut said = String::new();
    derr.read_line(&mut said).unwrap();
    let dout = dst.wait_with_output().unwrap();
    assert!(
        src.status.success(),
        "source: {}",
        String::from_utf8_lossy(&src.stderr)
    );
    assert!(dout.status.success(), "destination failed");
    assert_eq!(json(&src.stdout)["digest"], json(&dout.stdout)["digest"]);
    assert!(
        said.contains(&sfp),
        "the destination names the source: {said:?}"
    );

    // A silent connection and a stranger first, then the source.
    let (dst, addr, derr) = spawn_incoming(&dargs);
    let silent = std::net::TcpStream::connect(&addr).unwrap();
    let stranger = Command::new(BIN)
        .args(["migrate", "--to", &addr])
        .args(tls_args(&xc, &xk, &dfp))
        .args(SIM)
        .output()
        .unwrap();
    assert!(
        !stranger.status.success(),
        "the stranger believed it migrated"
    );
    let src = Command::new(BIN)
        .args(["migrate", "--to", &addr, "--json"])
        .args(tls_args(&sc, &sk, &dfp))
        .args(SIM)
        .output()
        .unwrap();
    let dout = dst.wait_with_output().unwrap();
    let said: String = derr.lines().map(|l| l.unwrap() + "\n").collect();
    assert!(
        src.status.success(),
        "source: {}\ndestination: {said}",
        String::from_utf8_lossy(&src.stderr)
    );
    assert!(dout.status.success(), "destination failed: {said}");
    assert_eq!(json(&src.stdout)["digest"], json(&dout.stdout)["digest"]);
    assert!(
        said.contains("refused a connection from 127.0.0.1:")
            && said.contains("(1 of 16 failed handshakes allowed)")
            && said.contains("is not pinned"),
        "the stranger is logged with its address and the reason: {said}"
    );
    assert!(said.contains(&sfp), "the source is named: {said}");
    drop(silent);

    // Negative control: one failed handshake allowed; the stranger ends the wait.
    let mut bounded = tls_args(&dc, &dk, &sfp).to_vec();
    bounded.extend(["--max-handshake-failures", "1"]);
    let (mut dst, addr, derr) = spawn_incoming(&bounded);
    let src = Command::new(BIN)
        .args(["migrate", "--to", &addr])
        .args(tls_args(&xc, &xk, &dfp))
        .args(SIM)
        .output()
        .unwrap();
    assert!(
        !dst.wait().unwrap().success(),
        "the destination took a stranger"
    );
    let rest: String = derr.lines().map(|l| l.unwrap() + "\n").collect();
    assert!(rest.contains("is not pinned"), "{rest}");
    assert!(
        rest.contains("--max-handshake-failures 1 reached"),
        "the error names the bound: {rest}"
    );
    assert!(!src.status.success(), "the stranger believed it migrated");

    let none = Command::new(BIN)
        .args(["incoming", "--listen", "127.0.0.1:0"])
        .args(SIM)
        .output()
        .unwrap();
    assert!(!none.status.success());
    let e = String::from_utf8_lossy(&none.stderr);
    assert!(e.contains("--plain") && e.contains("--tls-cert"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
