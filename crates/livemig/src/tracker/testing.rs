//! The [`DirtyTracker`] contract as a check (feature `testing`): every implementation runs
//! [`check`] in its own tests, over a [`Subject`] that knows how to make its pages dirty.
//!
//! ```text
//!   harvest before start ── Err          stop before start ── Ok
//!   start, dirty A, harvest ── A (only)  harvest again ── nothing (read and clear)
//!   dirty B, start again, harvest ── not B (a restart forgets)
//!   dirty C, harvest ── C                 stop, harvest ── Err, stop again ── Ok
//!   start, dirty D, harvest ── D          (tracking again after a stop)
//!   [a fault armed] dirty E, harvest ── Err; stop ── Ok; start, dirty F, harvest ── F
//! ```

use crate::bitmap::PageBitmap;
use crate::memory::PAGE_SIZE;

use super::DirtyTracker;

/// Pages a [`Subject`] just dirtied, and what the next harvest may report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirtied {
    /// Pages the next harvest must report (may be empty when the writer's exact pages are not
    /// known, as with a running guest; then the harvest must report at least one page).
    pub must: Vec<u64>,
    /// Pages `[start, end)`: the harvest may report nothing outside them.
    pub within: (u64, u64),
}

impl Dirtied {
    /// Exactly page `pfn` was written, on a tracker whose granule is `granule` pages.
    pub fn page(pfn: u64, granule: u64) -> Dirtied {
        let g = granule.max(1);
        let start = pfn / g * g;
        Dirtied {
            must: vec![pfn],
            within: (start, start + g),
        }
    }
}

/// A tracker under test and the means to dirty what it watches.
pub trait Subject {
    /// The tracker.
    type Tracker: DirtyTracker;
    /// Guest pages the tracker covers (the harvest bitmap's size).
    fn pages(&self) -> u64;
    /// Dirties some page(s) the way the tracker watches them (a vCPU write, a DMA write, a
    /// model write), a different page on each call where it can (`nth` counts the calls).
    fn dirty(&mut self, t: &mut Self::Tracker, nth: u32) -> Dirtied;
    /// Makes the tracker's next harvest fail part-way; `false` when this subject cannot
    /// inject such a fault (the report says the rule was not exercised).
    fn fail_next_harvest(&mut self, t: &mut Self::Tracker) -> bool {
        let _ = t;
        false
    }
}

/// What [`check`] exercised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Checked {
    /// Rules checked.
    pub rules: u32,
    /// Whether the error-part-way-through-a-harvest rule ran (the subject could inject it).
    pub harvest_error: bool,
}

fn harvest<T: DirtyTracker>(t: &mut T, pages: u64, what: &str) -> Result<Vec<u64>, String> {
    let mut into = PageBitmap::new(pages, PAGE_SIZE);
    let n = t
        .harvest(&mut into)
        .map_err(|e| format!("{}: {what}: harvest failed: {e}", t.name()))?;
    let got: Vec<u64> = into.runs().flat_map(|(p, n)| p..p + n).collect();
    if n < got.len() as u64 {
        return Err(format!(
            "{}: {what}: harvest said {n} page(s) but marked {}",
            t.name(),
            got.len()
        ));
    }
    Ok(got)
}

fn covers(name: &str, what: &str, got: &[u64], d: &Dirtied) -> Result<(), String> {
    if let Some(p) = d.must.iter().find(|p| !got.contains(p)) {
        return Err(format!(
            "{name}: {what}: page {p:#x} was dirtied and not reported (reported {got:x?})"
        ));
    }
    if let Some(p) = got.iter().find(|&&p| p < d.within.0 || p >= d.within.1) {
        return Err(format!(
            "{name}: {what}: page {p:#x} reported, outside what was dirtied ({:#x}..{:#x})",
            d.within.0, d.within.1
        ));
    }
    if got.is_empty() {
        return Err(format!("{name}: {what}: nothing reported after a write"));
    }
    Ok(())
}

fn empty(name: &str, what: &str, got: &[u64]) -> Result<(), String> {
    if got.is_empty() {
        Ok(())
    } else {
        Err(format!("{name}: {what}: expected no page, got {got:x?}"))
    }
}

/// Runs the contract over a fresh tracker of `s`; the first rule broken, named.
pub fn check<S: Subject>(s: &mut S, mut t: S::Tracker) -> Result<Checked, String> {
    let pages = s.pages();
    let name = t.name();
    let mut c = Checked::default();
    let rule = |c: &mut Checked| c.rules += 1;

    if t.harvest(&mut PageBitmap::new(pages, PAGE_SIZE)).is_ok() {
        return Err(format!("{name}: a harvest before start succeeded"));
    }
    rule(&mut c);
    t.stop()
        .map_err(|e| format!("{name}: stop before start failed: {e}"))?;
    rule(&mut c);

    t.start()
        .map_err(|e| format!("{name}: start failed: {e}"))?;
    let a = s.dirty(&mut t, 0);
    covers(&name, "after start", &harvest(&mut t, pages, "first")?, &a)?;
    rule(&mut c);
    empty(
        &name,
        "a second harvest with no write",
        &harvest(&mut t, pages, "second")?,
    )?;
    rule(&mut c);

    let b = s.dirty(&mut t, 1);
    t.start()
        .map_err(|e| format!("{name}: a second start failed: {e}"))?;
    let after = harvest(&mut t, pages, "after a restart")?;
    if let Some(p) = b.must.iter().find(|p| after.contains(p)) {
        return Err(format!(
            "{name}: page {p:#x}, dirtied before a second start, was reported after it"
        ));
    }
    rule(&mut c);

    let cc = s.dirty(&mut t, 2);
    covers(
        &name,
        "after a restart",
        &harvest(&mut t, pages, "after a restart")?,
        &cc,
    )?;
    rule(&mut c);

    t.stop().map_err(|e| format!("{name}: stop failed: {e}"))?;
    if t.harvest(&mut PageBitmap::new(pages, PAGE_SIZE)).is_ok() {
        return Err(format!("{name}: a harvest after stop succeeded"));
    }
    rule(&mut c);
    t.stop()
        .map_err(|e| format!("{name}: a second stop failed: {e}"))?;
    rule(&mut c);

    t.start()
        .map_err(|e| format!("{name}: start after stop failed: {e}"))?;
    let d = s.dirty(&mut t, 3);
    covers(
        &name,
        "after stop and start",
        &harvest(&mut t, pages, "after stop and start")?,
        &d,
    )?;
    rule(&mut c);

    if s.fail_next_harvest(&mut t) {
        let _ = s.dirty(&mut t, 4);
        if t.harvest(&mut PageBitmap::new(pages, PAGE_SIZE)).is_ok() {
            return Err(format!("{name}: a harvest with a fault armed succeeded"));
        }
        t.stop()
            .map_err(|e| format!("{name}: stop after a failed harvest failed: {e}"))?;
        t.start()
            .map_err(|e| format!("{name}: start after a failed harvest failed: {e}"))?;
        let f = s.dirty(&mut t, 5);
        covers(
            &name,
            "after a failed harvest, stop and start",
            &harvest(&mut t, pages, "after a failed harvest")?,
            &f,
        )?;
        c.harvest_error = true;
        rule(&mut c);
    }
    t.stop()
        .map_err(|e| format!("{name}: the last stop failed: {e}"))?;
    Ok(c)
}
