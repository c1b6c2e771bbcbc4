//! `cargo xtask`: project automation.
//!
//! * `cargo xtask ci` — the full test run (the README's test command; `.ci/run` calls it):
//!   format check, the dependency-set check, the module-cycle check (`cycles`), the library
//!   crates checked with the declared minimum Rust (`msrv`), clippy
//!   `-D warnings` (all features), every library crate checked alone with its default features
//!   and with none, the `no_std` binary
//!   (`ci/no-std`, for `x86_64-unknown-none`) with its negative control, all tests (all
//!   features), the examples (`examples`), rustdoc `-D warnings`, then the rig.
//! * `cargo xtask cycles [--path DIR]` — no import circle between the modules of any crate
//!   (`cycles`; a ci step).
//! * `cargo xtask msrv` — every library crate checked with the declared `rust-version` (a ci
//!   step).
//! * `cargo xtask examples` — builds every example and runs those whose main use works here
//!   (a ci step).
//! * `cargo xtask rig [--profile NAME]... [--kernel 6.12|7.3]... [--accel auto|kvm|tcg]
//!   [--keep-artifacts] [--timeout SECS] [--filter SUBSTRING]` — the QEMU conformance rig, on
//!   every kernel of its matrix.
//! * `cargo xtask hw-test [--config FILE] [--dry-run] [--nested] [--filter SUBSTRING]` — the
//!   hardware tests on a lab host.
//! * `cargo xtask bench-peer [--paused SIZE:FILL,...] [--running PCT,...] [--channels N]
//!   [--reps R] [--downtime MS] [--smoke] [--out DIR] [--keep]` — livemig against QEMU 10.0 on this
//!   machine (`bench_peer`).
//! * `cargo xtask soak [--migrations N] [--seed S] [--debug]` — the ping-pong soak
//!   (`crates/cli/tests/soak.rs`) for longer than the test run's 50 migrations (`soak`).

mod apt;
mod bench_peer;
mod bench_readme;
mod cpio;
mod cycles;
mod deps;
mod examples;
mod floor;
mod hwtest;
mod qemu;
mod rig;
mod soak;

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  ci        format check, dependency sets, module cycles, the MSRV check, clippy -D warnings,
            each library crate alone (default / no default features), the no_std binary, all
            tests, the examples, docs -D warnings, the rig
  deps      check each library crate's resolved dependency set against ci/deps/
              --bless            rewrite ci/deps/ after a deliberate change
  cycles    no import circle between the modules of any workspace crate (a ci step)
              --path DIR         check only the crate in DIR
  msrv      cargo check --lib --locked of every library crate with the toolchain of
            workspace.package.rust-version (rustup installs it, minimal profile, if missing;
            target dir target/msrv) (a ci step)
  features  clippy -D warnings on each library crate alone, with default features and with
            none (a ci step)
  examples  build every example (all features) and run each whose main use works on this
            machine; livemig-iommufd's and livemig-host's need /dev/iommu: built only
            (a ci step)
  no-std    build the no_std binary ci/no-std for x86_64-unknown-none, and its negative
            control (a ci step)
  rig       build the kernels, boot each under QEMU per machine profile, run hw-tests
              --profile NAME     mock | vtd | amdvi (repeatable; default: all)
              --kernel NAME      6.12 | 7.3 (repeatable; default: all)
              --accel MODE       auto (probe KVM, else TCG) | kvm | tcg   [auto]
              --keep-artifacts   keep the initramfs, print QEMU command lines
              --timeout SECS     wall-clock limit per profile             [600]
              --filter TEXT      run only cases whose name contains TEXT
  hw-test   run hw-tests on this lab host against the devices in a config file
              --config FILE      lab configuration   [fixtures/lab.example.toml]
              --dry-run          print what would run, run nothing
              --nested           boot an L1 guest with the configured VF assigned and run
                                 hw-tests inside it
              --filter TEXT      run only cases whose name contains TEXT
  bench-peer  QEMU 10.0 and livemig migrate the same guest memory image over loopback TCP
              (paused VM cases with each one's measured lower bound; the test guest
              running on 2 vCPUs at shares of that bound's bandwidth, auto-converge on
              both; every destination's RAM checked against the source's);
              writes DIR/peer.md, DIR/peer.json, DIR/peer.svg
              --paused LIST      paused cases, SIZE:dense or SIZE:PCT%
                                 [4GiB:dense,8GiB:dense,4GiB:25%,16GiB:25%]
              --running LIST     running cases: the guest's write rate in % of the
                                 lower bound's bandwidth, or none       [25,90,150]
              --channels N       QEMU multifd channels (livemig's too, if it has them) [2]
              --reps R           repetitions; medians are reported      [3]
              --capped-link B    one more running case, the link paced to B bytes/s
                                 on both, or none                       [100000000]
              --throttle LIST    auto-converge's throttle levels to measure, % or
                                 none                                   [20,50,80]
              --downtime MS      downtime limit for both, ms            [300]
              --smoke            64 MiB images (25% and dense), 1 repetition, small
                                 running cases (25% and the capped link), throttle 50%
              --out DIR          output directory                       [target/bench-peer]
              --keep             keep the image files
              --rig-binary       use the rig's static release livemig (as the CI step does)
  bench-readme  put one bench-peer run's peer.md into README.md (between its marker
            lines) and its peer.svg at docs/bench/peer.svg; refuses a run with a missing
            repetition, a failed byte check or a recorded failure
              --from DIR         the run's output directory             [target/bench-peer]
  soak      the ping-pong soak for longer: the running KVM test VM migrated back and forth
            between two processes over TLS with a seeded fault every 3-5 migrations
            (crates/cli/tests/soak.rs, which `cargo test` runs with 50); needs /dev/kvm
              --migrations N     migrations                               [500]
              --seed S           replay a run (the seed every run prints) [from the clock]
              --debug            debug build (as `cargo test`) instead of release
";

fn value<'a>(it: &mut impl Iterator<Item = &'a String>, flag: &str) -> Result<&'a String> {
    it.next().with_context(|| format!("{flag} needs a value"))
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        print!("{USAGE}");
        return Ok(());
    };
    let mut it = args[1..].iter();
    match cmd.as_str() {
        "ci" => {
            if let Some(a) = it.next() {
                bail!("ci takes no arguments (got {a:?})");
            }
            ci()
        }
        "rig" => rig::rig(&rig_options(&mut it)?),
        "deps" => match it.next().map(String::as_str) {
            None => deps::deps(false),
            Some("--bless") => deps::deps(true),
            Some(other) => bail!("deps: unknown option {other:?}\n\n{USAGE}"),
        },
        "cycles" => {
            let mut dir = None;
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--path" => dir = Some(std::path::PathBuf::from(value(&mut it, a)?)),
                    other => bail!("cycles: unknown option {other:?}\n\n{USAGE}"),
                }
            }
            cycles::cycles(dir.as_deref())
        }
        "msrv" => match it.next() {
            None => msrv(),
            Some(a) => bail!("msrv takes no arguments (got {a:?})"),
        },
        "features" => features(),
        "examples" => examples::examples(),
        "no-std" => no_std(),
        "hw-test" => {
            let mut o = hwtest::Options::default();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--config" => o.config = value(&mut it, a)?.into(),
                    "--dry-run" => o.dry_run = true,
                    "--nested" => o.nested = true,
                    "--filter" => o.filter = Some(value(&mut it, a)?.clone()),
                    other => bail!("hw-test: unknown option {other:?}\n\n{USAGE}"),
                }
            }
            hwtest::hw_test(&o)
        }
        "bench-peer" => {
            let rest: Vec<String> = it.cloned().collect();
            bench_peer::bench_peer(&bench_peer::parse_options(&rest)?)
        }
        "bench-readme" => {
            let mut from = rig::target_dir().join("bench-peer");
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--from" => from = value(&mut it, a)?.into(),
                    other => bail!("bench-readme: unknown option {other:?}\n\n{USAGE}"),
                }
            }
            let root = rig::workspace_root();
            bench_readme::bench_readme(
                &from,
                &root.join("README.md"),
                &root.join("docs/bench/peer.svg"),
            )
        }
        // bench-peer's lower-bound processes (not for direct use).
        "floor-send" => floor::send_main(&it.cloned().collect::<Vec<_>>()),
        "floor-recv" => floor::recv_main(&it.cloned().collect::<Vec<_>>()),
        "soak" => {
            let rest: Vec<String> = it.cloned().collect();
            soak::soak(&soak::parse_options(&rest)?)
        }
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown xtask command {other:?}\n\n{USAGE}"),
    }
}

fn rig_options<'a>(it: &mut impl Iterator<Item = &'a String>) -> Result<rig::Options> {
    let mut o = rig::Options {
        profiles: Vec::new(),
        kernels: Vec::new(),
        accel: rig::AccelChoice::Auto,
        keep_artifacts: false,
        timeout: Duration::from_secs(600),
        filter: None,
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--profile" => o.profiles.push(value(it, a)?.clone()),
            "--kernel" => o.kernels.push(value(it, a)?.clone()),
            "--accel" => o.accel = value(it, a)?.parse()?,
            "--keep-artifacts" => o.keep_artifacts = true,
            "--timeout" => {
                let v = value(it, a)?;
                o.timeout = Duration::from_secs(
                    v.parse()
                        .with_context(|| format!("--timeout {v:?} is not a number of seconds"))?,
                )
            }
            "--filter" => o.filter = Some(value(it, a)?.clone()),
            other => bail!("rig: unknown option {other:?}\n\n{USAGE}"),
        }
    }
    Ok(o)
}

fn cargo(args: &[&str], envs: &[(&str, &str)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(rig::workspace_root()).args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    eprintln!("==> cargo {}", args.join(" "));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Every library crate alone, with its default features and with `--no-default-features`:
/// one cargo invocation each, so no other package's features leak into its build (cargo
/// unifies features over the packages it builds together). `cargo clippy` is `cargo check` plus
/// lints: every feature-gating mistake (a missing `cfg`, an item or import that only one
/// combination uses, a dependency a feature forgot) is a compile error or a warning, and
/// `-D warnings` fails on both. It skips code generation, whose outcome no feature combination
/// changes for a library (an rlib is not linked); the no_std step links the no_std crates for
/// real. Cold: ~30 s against ~80 s for `cargo build`, on 2 cores.
fn features() -> Result<()> {
    for krate in deps::libraries()? {
        for no_default in [false, true] {
            let mut args = vec!["clippy", "--quiet", "-p", &krate];
            if no_default {
                args.push("--no-default-features");
            }
            args.extend(["--", "-D", "warnings"]);
            cargo(&args, &[])?;
        }
    }
    Ok(())
}

/// The target of the no_std check: core and alloc, no std.
const NO_STD_TARGET: &str = "x86_64-unknown-none";

/// Builds `ci/no-std` (a `#![no_std]`, `#![no_main]` binary with its own panic handler and
/// allocator that calls into livemig-stream, livemig-iommu-pt and livemig-hisi-qm) for
/// `x86_64-unknown-none`, where any `std` in the crate graph fails the build; then the negative
/// control: the same binary with a dependency's `std` turned on must fail for that reason.
fn no_std() -> Result<()> {
    let root = rig::workspace_root();
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("the no_std check needs rustup (for the x86_64-unknown-none target)")?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == NO_STD_TARGET)
    {
        eprintln!("==> rustup target add {NO_STD_TARGET}");
        let status = Command::new("rustup")
            .args(["target", "add", NO_STD_TARGET])
            .status()
            .context("cannot run rustup")?;
        if !status.success() {
            bail!("rustup target add {NO_STD_TARGET} failed ({status})");
        }
    }
    // The check resolves the workspace's locked versions: its lock file (ignored by git) starts
    // as a copy of the workspace's, which cargo prunes to the packages it uses.
    std::fs::copy(root.join("Cargo.lock"), root.join("ci/no-std/Cargo.lock"))
        .context("copying Cargo.lock to ci/no-std")?;
    let target_dir = rig::target_dir();
    let target_dir = target_dir.to_str().context("target dir is not UTF-8")?;
    let build = [
        "build",
        "--manifest-path",
        "ci/no-std/Cargo.toml",
        "--target",
        NO_STD_TARGET,
        "--target-dir",
        target_dir,
    ];
    cargo(&build, &[])?;
    let cargo_bin = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("==> negative control: the same build with livemig-hisi-qm/std must fail");
    let out = Command::new(&cargo_bin)
        .current_dir(&root)
        .args(build)
        .args(["--features", "leak-std"])
        .output()
        .with_context(|| format!("cannot run {cargo_bin}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !stderr.contains("can't find crate for `std`") {
        bail!(
            "the no_std check did not fail with std turned on in a dependency (status {}); it \
             would not notice std either:\n{stderr}",
            out.status
        );
    }
    Ok(())
}

/// `rust-version` of `[workspace.package]` in a Cargo.toml's text.
fn declared_msrv(manifest: &str) -> Option<String> {
    let mut table = "";
    for line in manifest.lines().map(str::trim) {
        if let Some(t) = line.strip_prefix('[') {
            table = t.trim_end_matches(']').trim();
        } else if table == "workspace.package"
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == "rust-version"
        {
            return Some(v.trim().trim_matches('"').to_string());
        }
    }
    None
}

/// Every library crate checked (`cargo check --lib --locked`, default features, one
/// invocation) with the toolchain of the workspace's declared `rust-version`, which rustup
/// installs (minimal profile) when it is missing. Its own target dir, `target/msrv`, keeps the
/// main build's artifacts valid. A dependency whose new release needs a newer Rust fails here
/// by name instead of reaching users of the declared version.
fn msrv() -> Result<()> {
    let root = rig::workspace_root();
    let manifest =
        std::fs::read_to_string(root.join("Cargo.toml")).context("reading Cargo.toml")?;
    let ver =
        declared_msrv(&manifest).context("Cargo.toml: no rust-version in [workspace.package]")?;
    let list = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("the MSRV check needs rustup (to run the declared toolchain)")?;
    let installed = String::from_utf8_lossy(&list.stdout).lines().any(|l| {
        let name = l.split_whitespace().next().unwrap_or("");
        name == ver || name.starts_with(&format!("{ver}-"))
    });
    if !installed {
        eprintln!(
            "==> rustup toolchain install {ver} --profile minimal (the declared MSRV is not \
             installed)"
        );
        let status = Command::new("rustup")
            .args(["toolchain", "install", &ver, "--profile", "minimal"])
            .status()
            .context("cannot run rustup")?;
        if !status.success() {
            bail!("rustup toolchain install {ver} failed ({status})");
        }
    }
    let target_dir = rig::target_dir().join("msrv");
    let target_dir = target_dir.to_str().context("target dir is not UTF-8")?;
    let libs = deps::libraries()?;
    let mut args = vec!["check", "--lib", "--locked", "--target-dir", target_dir];
    for l in &libs {
        args.extend(["-p", l.as_str()]);
    }
    eprintln!("==> rustup run {ver} cargo {}", args.join(" "));
    // The toolchain's own cargo and rustc, not the ones running xtask.
    let status = Command::new("rustup")
        .current_dir(&root)
        .args(["run", &ver, "cargo"])
        .args(&args)
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .status()
        .context("cannot run rustup")?;
    if !status.success() {
        bail!(
            "the library crates do not build with Rust {ver}, the rust-version Cargo.toml \
             declares ([workspace.package]); hold back the dependency that needs a newer Rust or \
             raise the declaration (docs/decisions.md, Workspace: MSRV)"
        );
    }
    eprintln!(
        "==> msrv: {} library crates check with Rust {ver}",
        libs.len()
    );
    Ok(())
}

fn ci() -> Result<()> {
    let t0 = std::time::Instant::now();
    let mut times: Vec<(&str, Duration)> = Vec::new();
    let mut step = |name: &'static str, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        let t = std::time::Instant::now();
        let r = f();
        times.push((name, t.elapsed()));
        eprintln!("==> ci: {name}: {:.0} s", t.elapsed().as_secs_f64());
        r
    };
    step("fmt", &mut || {
        cargo(&["fmt", "--all", "--", "--check"], &[])
    })?;
    step("deps", &mut || deps::deps(false))?;
    step("cycles", &mut || cycles::cycles(None))?;
    step("msrv", &mut msrv)?;
    let r = ci_rest(&mut step);
    for (n, d) in &times {
        eprintln!("==> ci time: {n:<10} {:>6.0} s", d.as_secs_f64());
    }
    eprintln!(
        "==> ci time: total      {:>6.0} s",
        t0.elapsed().as_secs_f64()
    );
    r
}

type Step<'a> = dyn FnMut(&'static str, &mut dyn FnMut() -> Result<()>) -> Result<()> + 'a;

fn ci_rest(step: &mut Step<'_>) -> Result<()> {
    step("clippy", &mut || {
        cargo(
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--all-features",
                "--",
                "-D",
                "warnings",
            ],
            &[],
        )
    })?;
    // Every library crate compiles alone (no feature unification with its neighbours) with its
    // default features and with none, without warnings.
    step("features", &mut features)?;
    // The no_std claims: a #![no_std] binary for a target without std links the no_std crates.
    step("no_std", &mut no_std)?;
    // Every test, the KVM ones (livemig-kvm, livemig-cli's `vm` tests) included: /dev/kvm is
    // part of the test environment here, and under CI=true they fail rather than skip.
    step("test", &mut || {
        cargo(
            &[
                "test",
                "--workspace",
                "--all-features",
                "--",
                "--skip",
                "fail_nth",
            ],
            &[],
        )?;
        // The fail-nth sweeps on their own, with their output: each prints how many points it
        // swept (issue 19).
        cargo(
            &[
                "test",
                "--all-features",
                "-p",
                "livemig-host",
                "--test",
                "fail_nth",
                "--",
                "--nocapture",
            ],
            &[],
        )
    })?;
    // Every example builds; each whose main use works here runs and checks its result.
    step("examples", &mut examples::examples)?;
    step("doc", &mut || {
        cargo(
            &["doc", "--workspace", "--no-deps", "--all-features"],
            &[("RUSTDOCFLAGS", "-D warnings")],
        )
    })?;
    step("rig", &mut || {
        eprintln!("==> cargo xtask rig");
        rig::rig(&rig_options(&mut [].iter())?)
    })?;
    // livemig against QEMU, small: both sides complete, the table and the chart are made. It
    // uses the static release `livemig` the rig step just built (no extra build).
    step("bench-peer-smoke", &mut || {
        let mut o = bench_peer::parse_options(&["--smoke".into(), "--rig-binary".into()])?;
        o.out = rig::target_dir().join("bench-peer-smoke");
        bench_peer::bench_peer(&o)?;
        // The negative control of the byte checks and of the one-host check, in one run (one
        // paused and one running case; the capped link and the throttle levels check nothing
        // more): every QEMU destination damaged and every QEMU source of the running case
        // resumed after its migration, livemig's runs untouched.
        let mut c = bench_peer::parse_options(&[
            "--smoke".into(),
            "--rig-binary".into(),
            "--paused".into(),
            "64MiB:dense".into(),
            "--capped-link".into(),
            "none".into(),
            "--throttle".into(),
            "none".into(),
            "--x-corrupt-destination".into(),
            "--x-resume-source".into(),
        ])?;
        c.out = rig::target_dir().join("bench-peer-control");
        // Each check must name each QEMU run it concerns (the paused case's digest; the
        // running case's guest check, its digest beyond the working sets and its one-host
        // check) and no livemig run.
        match bench_peer::bench_peer(&c) {
            Ok(()) => anyhow::bail!(
                "bench-peer with QEMU's destination RAM damaged and its source resumed passed: \
                 the byte and one-host checks check nothing"
            ),
            Err(e) => {
                let msg = format!("{e:#}");
                let runs = |what: &str| msg.lines().filter(|l| l.contains(what)).count();
                let want = [
                    "the destination's RAM is not the source's",
                    "the guest's check of its working sets failed",
                    "beyond the guest's working sets",
                    "the source is \"running\" (postmigrate is due)",
                ];
                if want.iter().all(|w| runs(w) == 2) && runs(": livemig (rep") == 0 {
                    eprintln!("bench-peer control: failed as it must: {msg}");
                    Ok(())
                } else {
                    Err(e.context(format!(
                        "bench-peer's control did not fail as it must (each of {want:?} for \
                         both QEMU sides, none for livemig)"
                    )))
                }
            }
        }
    })?;
    eprintln!("==> ci: all steps passed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_declared_msrv_is_read_from_workspace_package() {
        let m = "[workspace]\nrust-version = \"9\"\n\n[workspace.package]\nversion = \"0.1.0\"\n\
                 rust-version = \"1.85\"\n\n[package]\nrust-version = \"1.99\"\n";
        assert_eq!(declared_msrv(m).as_deref(), Some("1.85"));
        assert_eq!(declared_msrv("[package]\nrust-version = \"1.80\"\n"), None);
        let real = std::fs::read_to_string(rig::workspace_root().join("Cargo.toml")).unwrap();
        assert!(declared_msrv(&real).is_some());
    }
}
