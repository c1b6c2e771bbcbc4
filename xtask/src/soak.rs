//! `cargo xtask soak`: the ping-pong soak of `crates/cli/tests/soak.rs` for longer. The test
//! is the controller (the same code `cargo test` runs with 50 migrations); this runs it with
//! `LIVEMIG_SOAK_MIGRATIONS` (and `LIVEMIG_SOAK_SEED` to replay), its output shown, in a
//! release build unless `--debug`.

use anyhow::{Context, Result, bail};

/// The soak's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Migrations.
    pub migrations: u64,
    /// The seed to replay (`None`: the test picks one from the clock and prints it).
    pub seed: Option<u64>,
    /// Debug build instead of release.
    pub debug: bool,
}

/// Parses `--migrations N`, `--seed S`, `--debug`.
pub fn parse_options(args: &[String]) -> Result<Options> {
    let mut o = Options {
        migrations: 500,
        seed: None,
        debug: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = |what: &str| -> Result<u64> {
            let v = it.next().with_context(|| format!("{a} needs a value"))?;
            v.parse()
                .with_context(|| format!("{a} {v:?} is not {what}"))
        };
        match a.as_str() {
            "--migrations" => o.migrations = num("a number of migrations")?,
            "--seed" => o.seed = Some(num("a seed (an unsigned 64-bit number)")?),
            "--debug" => o.debug = true,
            other => bail!("soak: unknown option {other:?} (--migrations N, --seed S, --debug)"),
        }
    }
    if o.migrations == 0 {
        bail!("soak: --migrations must be at least 1");
    }
    Ok(o)
}

/// The test that is the soak's controller.
const TEST: &str = "the_vm_ping_pongs_between_two_processes_through_seeded_faults";

/// Runs the soak.
pub fn soak(o: &Options) -> Result<()> {
    let mut args = vec!["test", "-p", "livemig-cli", "--test", "soak"];
    if !o.debug {
        args.push("--release");
    }
    args.extend(["--", "--exact", TEST, "--nocapture"]);
    let migrations = o.migrations.to_string();
    let seed = o.seed.map(|s| s.to_string());
    let mut envs = vec![("LIVEMIG_SOAK_MIGRATIONS", migrations.as_str())];
    if let Some(s) = &seed {
        envs.push(("LIVEMIG_SOAK_SEED", s.as_str()));
    }
    // Under CI=true the test fails rather than skips where /dev/kvm is unusable: a soak that
    // did not run must not look like one that passed.
    envs.push(("CI", "true"));
    crate::cargo(&args, &envs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(a: &[&str]) -> Result<Options> {
        parse_options(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options_parse_with_their_defaults_and_bad_values_are_named() {
        assert_eq!(
            parse(&[]).unwrap(),
            Options {
                migrations: 500,
                seed: None,
                debug: false
            }
        );
        assert_eq!(
            parse(&["--migrations", "60", "--seed", "7", "--debug"]).unwrap(),
            Options {
                migrations: 60,
                seed: Some(7),
                debug: true
            }
        );
        let e = parse(&["--seed", "x"]).unwrap_err().to_string();
        assert!(e.contains("--seed \"x\""), "{e}");
        assert!(parse(&["--migrations"]).is_err());
        assert!(parse(&["--migrations", "0"]).is_err());
        assert!(
            parse(&["--fast"])
                .unwrap_err()
                .to_string()
                .contains("--fast")
        );
    }
}
