//! The case runner: announces, runs (catching panics), and reports each case.

use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// The result of a case that did not fail.
pub enum Outcome {
    /// It passed.
    Pass,
    /// Its hardware or precondition is absent; the reason says which.
    Skip(String),
}

/// Runs cases and counts results.
pub struct Runner {
    filter: Option<String>,
    /// Listing only: names are recorded, nothing runs (the lab plan's check).
    listing: Option<Vec<String>>,
    /// Only these cases run (others are not registered at all).
    only: Option<Vec<String>>,
    passed: usize,
    failed: usize,
    skipped: usize,
}

pub const TAG: &str = "[hw-tests]";

/// The running kernel's (major, minor), from `/proc/sys/kernel/osrelease` (`(0, 0)` if it
/// cannot be read, which makes every version check false).
pub fn kernel_version() -> (u32, u32) {
    let text = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = text
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Whether the running kernel is at least `major.minor`.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    kernel_version() >= (major, minor)
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{TAG} {line}");
    let _ = out.flush();
}

impl Runner {
    pub fn new(filter: Option<String>) -> Runner {
        Runner {
            filter,
            listing: None,
            only: None,
            passed: 0,
            failed: 0,
            skipped: 0,
        }
    }

    /// A runner that only records the names of the cases it is given.
    #[cfg(test)]
    pub fn listing() -> Runner {
        Runner {
            listing: Some(Vec::new()),
            ..Runner::new(None)
        }
    }

    /// The names a listing runner recorded.
    #[cfg(test)]
    pub fn names(&self) -> &[String] {
        self.listing.as_deref().unwrap_or(&[])
    }

    /// From now on only `names` run (None: all again): a profile that runs a few cases of a
    /// shared suite (the kvm profile's lab migrations) lists exactly those.
    pub fn only(&mut self, names: Option<&[&str]>) {
        self.only = names.map(|n| n.iter().map(|s| s.to_string()).collect());
    }

    /// Runs one case unless filtered out.
    pub fn case(&mut self, name: &str, f: impl FnOnce() -> anyhow::Result<Outcome>) {
        if self
            .only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|n| n == name))
        {
            return;
        }
        if let Some(l) = &mut self.listing {
            l.push(name.to_string());
            return;
        }
        if self
            .filter
            .as_ref()
            .is_some_and(|s| !name.contains(s.as_str()))
        {
            return;
        }
        say(&format!("run {name}"));
        let t0 = std::time::Instant::now();
        let result = catch_unwind(AssertUnwindSafe(f));
        // What each case costs, for the budget (the status lines keep their format).
        crate::trace!("{name} took {:.1} s", t0.elapsed().as_secs_f64());
        match result {
            Ok(Ok(Outcome::Pass)) => {
                self.passed += 1;
                say(&format!("ok {name}"));
            }
            Ok(Ok(Outcome::Skip(why))) => {
                self.skipped += 1;
                say(&format!("skip {name}: {why}"));
            }
            Ok(Err(e)) => {
                self.failed += 1;
                say(&format!(
                    "FAIL {name}: {}",
                    format!("{e:#}").replace('\n', " | ")
                ));
            }
            Err(panic) => {
                self.failed += 1;
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                say(&format!("FAIL {name}: panicked: {msg}"));
            }
        }
    }

    /// Marks a case failed without running it (a prerequisite failed).
    /// Reports every case of `names` as failed for the same reason (their shared set-up
    /// failed).
    pub fn fail_all(&mut self, names: &[&str], why: &str) {
        for n in names {
            self.fail(n, why);
        }
    }

    pub fn fail(&mut self, name: &str, why: &str) {
        if self
            .filter
            .as_ref()
            .is_some_and(|s| !name.contains(s.as_str()))
        {
            return;
        }
        self.failed += 1;
        say(&format!("FAIL {name}: {why}"));
    }

    /// Prints the closing line; returns whether nothing failed.
    pub fn finish(&self) -> bool {
        if self.skipped > 0 {
            say(&format!("{} skipped", self.skipped));
        }
        say(&format!("{} passed, {} failed", self.passed, self.failed));
        self.failed == 0
    }
}

/// `ensure!` with the actual values in the message.
#[macro_export]
macro_rules! check_eq {
    ($a:expr, $b:expr $(, $($ctx:tt)+)?) => {{
        let (a, b) = (&$a, &$b);
        if a != b {
            anyhow::bail!(
                "{} = {:?}, expected {:?}{}",
                stringify!($a), a, b,
                { let _s = String::new(); $( let _s = format!(" ({})", format!($($ctx)+)); )? _s }
            );
        }
    }};
}
