//! Host prerequisites for the rig on Debian: which commands and files are needed, which packages
//! provide them, and — when running as root — installing what is missing, from the release's
//! backports suite where needed.
//!
//! The backports source is derived from the machine's own Debian source (its URIs and keyring),
//! never from a hard-coded mirror: machines here use snapshot or local mirrors.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// One thing the rig needs.
#[derive(Debug, Clone)]
pub struct Need {
    /// What is checked: a command on PATH or an absolute path.
    pub what: &'static str,
    /// The Debian package providing it.
    pub package: &'static str,
    /// Needs the `<codename>-backports` suite.
    pub backports: bool,
}

/// Everything `cargo xtask rig` needs on the host.
pub const NEEDS: &[Need] = &[
    Need {
        what: "qemu-system-x86_64",
        package: "qemu-system-x86",
        backports: true,
    },
    Need {
        what: "/usr/src/linux-source-6.12.tar.xz",
        package: "linux-source-6.12",
        backports: true,
    },
    Need {
        what: "make",
        package: "make",
        backports: false,
    },
    Need {
        what: "gcc",
        package: "gcc",
        backports: false,
    },
    Need {
        what: "bc",
        package: "bc",
        backports: false,
    },
    Need {
        what: "flex",
        package: "flex",
        backports: false,
    },
    Need {
        what: "bison",
        package: "bison",
        backports: false,
    },
    Need {
        what: "xz",
        package: "xz-utils",
        backports: false,
    },
    Need {
        what: "/usr/include/gelf.h",
        package: "libelf-dev",
        backports: false,
    },
    Need {
        what: "/usr/include/openssl/ssl.h",
        package: "libssl-dev",
        backports: false,
    },
    Need {
        what: "/usr/lib/x86_64-linux-gnu/libc.a",
        package: "libc6-dev",
        backports: false,
    },
];

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(cmd).is_file()))
}

fn present(n: &Need) -> bool {
    if n.what.starts_with('/') {
        Path::new(n.what).exists()
    } else {
        on_path(n.what)
    }
}

/// The needs not met on this host.
pub fn missing() -> Vec<&'static Need> {
    NEEDS.iter().filter(|n| !present(n)).collect()
}

/// Only QEMU (the peer benchmark needs nothing else from the rig's list).
pub fn ensure_qemu() -> Result<()> {
    ensure(|n| n.package == "qemu-system-x86")
}

/// A Debian APT source, reduced to what a backports stanza copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Mirror URIs.
    pub uris: Vec<String>,
    /// Suites, e.g. `bookworm bookworm-updates`.
    pub suites: Vec<String>,
    /// The keyring, if the source names one.
    pub signed_by: Option<String>,
}

/// Parses deb822 `.sources` text: stanzas separated by blank lines, `Key: value` fields,
/// comments starting with `#`. Only `Types: deb` stanzas are returned.
pub fn parse_deb822(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut types = Vec::new();
        let mut src = Source {
            uris: vec![],
            suites: vec![],
            signed_by: None,
        };
        for line in stanza.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let words = || v.split_whitespace().map(str::to_string).collect::<Vec<_>>();
            match k.trim().to_ascii_lowercase().as_str() {
                "types" => types = words(),
                "uris" => src.uris = words(),
                "suites" => src.suites = words(),
                "signed-by" => src.signed_by = Some(v.trim().to_string()),
                _ => {}
            }
        }
        if types.iter().any(|t| t == "deb") && !src.uris.is_empty() {
            out.push(src);
        }
    }
    out
}

/// Parses one-line `sources.list` text (`deb [opts] URI suite components...`).
pub fn parse_one_line(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let mut rest = rest.trim();
        let mut signed_by = None;
        if let Some(opts) = rest.strip_prefix('[') {
            let Some((opts, after)) = opts.split_once(']') else {
                continue;
            };
            for o in opts.split_whitespace() {
                if let Some(v) = o.strip_prefix("signed-by=") {
                    signed_by = Some(v.to_string());
                }
            }
            rest = after.trim();
        }
        let mut w = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (w.next(), w.next()) {
            out.push(Source {
                uris: vec![uri.to_string()],
                suites: vec![suite.to_string()],
                signed_by,
            });
        }
    }
    out
}

/// The deb822 stanza for `<codename>-backports`, copied from the source that carries the main
/// `<codename>` suite. `None` if no such source exists.
pub fn backports_stanza(sources: &[Source], codename: &str) -> Option<String> {
    let main = sources
        .iter()
        .find(|s| s.suites.iter().any(|x| x == codename))?;
    let mut s = format!(
        "# Added by cargo xtask rig (livemig) for qemu-system-x86 and linux-source-6.12.\nTypes: deb\nURIs: {}\nSuites: {codename}-backports\nComponents: main\n",
        main.uris.join(" ")
    );
    if let Some(k) = &main.signed_by {
        s.push_str(&format!("Signed-By: {k}\n"));
    }
    Some(s)
}

/// All APT sources of the machine.
fn read_sources() -> (Vec<Source>, bool) {
    let mut all = Vec::new();
    let mut has_backports = false;
    let mut files: Vec<PathBuf> = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.filter_map(|e| e.ok().map(|e| e.path())));
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let parsed = match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => parse_deb822(&text),
            Some("list") => parse_one_line(&text),
            _ if f.ends_with("sources.list") => parse_one_line(&text),
            _ => continue,
        };
        has_backports |= parsed
            .iter()
            .any(|s| s.suites.iter().any(|x| x.ends_with("-backports")));
        all.extend(parsed);
    }
    (all, has_backports)
}

fn codename() -> Result<String> {
    let text = std::fs::read_to_string("/etc/os-release").context("read /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|s| s.trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .context("/etc/os-release has no VERSION_CODENAME")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("rig: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Makes sure every need is met: installs missing packages when root, otherwise explains
/// exactly what to install.
pub fn ensure_prerequisites() -> Result<()> {
    ensure(|_| true)
}

/// Makes sure the needs `pick` selects are met (see [`ensure_prerequisites`]).
fn ensure(pick: impl Fn(&Need) -> bool) -> Result<()> {
    let missing: Vec<&Need> = missing().into_iter().filter(|n| pick(n)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let codename = codename()?;
    let list = |bp: bool| -> Vec<&str> {
        missing
            .iter()
            .filter(|n| n.backports == bp)
            .map(|n| n.package)
            .collect()
    };
    let (plain, backported) = (list(false), list(true));
    let explain = missing
        .iter()
        .map(|n| format!("{} (package {})", n.what, n.package))
        .collect::<Vec<_>>()
        .join(", ");
    if !is_root() {
        bail!(
            "this command needs {explain}.\nAs root, run:\n  apt-get install -y {}\n  apt-get install -y -t {codename}-backports {}\n(with a {codename}-backports APT source), or rerun this command as root to do it automatically.",
            plain.join(" "),
            backported.join(" ")
        );
    }
    eprintln!("rig: installing missing prerequisites: {explain}");
    if !backported.is_empty() {
        let (sources, has_backports) = read_sources();
        if !has_backports {
            let stanza = backports_stanza(&sources, &codename).with_context(|| {
                format!(
                    "no APT source carries suite {codename}: cannot derive {codename}-backports"
                )
            })?;
            let path = "/etc/apt/sources.list.d/livemig-backports.sources";
            std::fs::write(path, stanza).with_context(|| format!("write {path}"))?;
            eprintln!("rig: added {path}");
        }
    }
    let mut update = Command::new("apt-get");
    update.args(["update", "-q"]);
    run(&mut update)?;
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    if !plain.is_empty() {
        let mut c = Command::new("apt-get");
        c.args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&plain)
            .envs(env);
        run(&mut c)?;
    }
    if !backported.is_empty() {
        let target = format!("{codename}-backports");
        let mut c = Command::new("apt-get");
        c.args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-t",
            &target,
        ])
        .args(&backported)
        .envs(env);
        run(&mut c)?;
    }
    let still: Vec<&Need> = self::missing().into_iter().filter(|n| pick(n)).collect();
    if !still.is_empty() {
        bail!(
            "still missing after installing: {}",
            still.iter().map(|n| n.what).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// A deb822 stanza for `suite`, on the mirror and keyring of the source that carries the
/// machine's own release (`codename`). `None` if no source carries it.
pub fn suite_stanza(sources: &[Source], codename: &str, suite: &str) -> Option<String> {
    let main = sources
        .iter()
        .find(|s| s.suites.iter().any(|x| x == codename))?;
    let mut s = format!(
        "Types: deb\nURIs: {}\nSuites: {suite}\nComponents: main\n",
        main.uris.join(" ")
    );
    if let Some(k) = &main.signed_by {
        s.push_str(&format!("Signed-By: {k}\n"));
    }
    Some(s)
}

/// Downloads the `.deb` of `package` from `suite` (e.g. `trixie-backports` on a bookworm
/// machine) with a private APT state in `dir`: the machine's sources, lists and cache are
/// not touched, so nothing from that suite can be installed by accident. Returns its path.
pub fn download_from_suite(package: &str, suite: &str, dir: &Path) -> Result<PathBuf> {
    let (sources, _) = read_sources();
    let stanza = suite_stanza(&sources, &codename()?, suite)
        .context("no APT source carries this machine's release: cannot derive a mirror")?;
    let parts = dir.join("sources.list.d");
    let lists = dir.join("lists");
    let archives = dir.join("archives");
    for d in [&parts, &lists.join("partial"), &archives.join("partial")] {
        std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    std::fs::write(parts.join(format!("{suite}.sources")), stanza)?;
    let opts = [
        "-o".to_string(),
        "Dir::Etc::sourcelist=/dev/null".to_string(),
        "-o".to_string(),
        format!("Dir::Etc::sourceparts={}", parts.display()),
        "-o".to_string(),
        format!("Dir::State::Lists={}", lists.display()),
        "-o".to_string(),
        format!("Dir::Cache::archives={}", archives.display()),
        "-o".to_string(),
        "APT::Sandbox::User=root".to_string(),
    ];
    run(Command::new("apt-get").args(&opts).args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .current_dir(dir)
        .args(&opts)
        .args(["download", "-q", package]))?;
    let deb = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .with_context(|| {
            format!(
                "apt-get download left no {package}_*.deb in {}",
                dir.display()
            )
        })?;
    Ok(deb)
}

/// The `Version` field of a `.deb`.
pub fn deb_version(deb: &Path) -> Result<String> {
    let out = Command::new("dpkg-deb")
        .args(["-f"])
        .arg(deb)
        .arg("Version")
        .output()
        .context("cannot run dpkg-deb")?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || v.is_empty() {
        bail!("{}: no Version field", deb.display());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suite_stanza_copies_the_mirror_and_keyring_of_the_release() {
        let src = parse_deb822(
            "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        );
        let s = suite_stanza(&src, "bookworm", "trixie-backports").unwrap();
        assert!(s.contains("URIs: http://mirror.example/debian\n"), "{s}");
        assert!(s.contains("Suites: trixie-backports\n"), "{s}");
        assert!(s.contains("Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"));
        assert!(suite_stanza(&src, "trixie", "trixie-backports").is_none());
    }

    const DEB822: &str = "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";

    #[test]
    fn backports_stanza_copies_the_main_source() {
        let s = parse_deb822(DEB822);
        assert_eq!(s.len(), 2);
        let stanza = backports_stanza(&s, "bookworm").unwrap();
        assert!(stanza.contains("URIs: http://deb.debian.org/debian\n"));
        assert!(stanza.contains("Suites: bookworm-backports\n"));
        assert!(stanza.contains("Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"));
        assert!(!stanza.contains("security"));
        assert!(backports_stanza(&s, "trixie").is_none());
    }

    #[test]
    fn one_line_sources_with_options() {
        let s = parse_one_line(
            "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.local/debian bookworm main\ndeb-src http://x bookworm main\n",
        );
        assert_eq!(
            s,
            vec![Source {
                uris: vec!["http://mirror.local/debian".into()],
                suites: vec!["bookworm".into()],
                signed_by: Some("/k.gpg".into()),
            }]
        );
        let stanza = backports_stanza(&s, "bookworm").unwrap();
        assert!(stanza.contains("URIs: http://mirror.local/debian"));
    }

    #[test]
    fn deb_src_and_disabled_stanzas_are_ignored() {
        let s = parse_deb822("Types: deb-src\nURIs: http://x\nSuites: bookworm\n");
        assert!(s.is_empty());
    }
}
