//! What a migration shows while it runs and after: the progress bar of a source and the
//! printed report.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use livemig::engine::{Event, MigrationReport, Source};

/// The progress display of a source: a bar of the round's pages (bytes of guest memory, with
/// rate and ETA), the phase, the dirty rate, the downtime stopping now would cost and the
/// stream bytes so far, refreshed from the engine's [`livemig::engine::ProgressView`] ten times
/// a second; a line per finished round above it. Hidden under `--json` or without a terminal.
pub(crate) struct LiveBar {
    pb: ProgressBar,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LiveBar {
    pub(crate) fn finish_and_clear(mut self) {
        self.stop_thread();
        self.pb.finish_and_clear();
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LiveBar {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// The live progress display of `source` (hidden when `quiet` or stderr is no terminal);
/// `also` sees every engine event as well (the VMM's own reactions, e.g. lifting a bandwidth
/// cap at stop-and-copy).
pub(crate) fn progress(
    quiet: bool,
    source: &mut Source,
    mut also: impl FnMut(&Event<'_>) + Send + 'static,
) -> LiveBar {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let stop = Arc::new(AtomicBool::new(false));
    if quiet || !std::io::stderr().is_terminal() {
        source.on_event(also);
        return LiveBar {
            pb: ProgressBar::hidden(),
            stop,
            thread: None,
        };
    }
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} {elapsed} {msg}\n  [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("template"),
    );
    let phase = Arc::new(Mutex::new(String::from("starting")));
    let (p, bar) = (Arc::clone(&phase), pb.clone());
    source.on_event(move |e| {
        also(e);
        match e {
        Event::Phase(ph) => *p.lock().unwrap_or_else(|e| e.into_inner()) = ph.to_string(),
        Event::Round(r) => bar.println(format!(
            "round {:>3}: {:>8} dirty, {:>8} pages, {:>6} zero, {:>9} device bytes, {:>6.1} MiB, {:>6.1} ms",
            r.round,
            r.dirty_pages,
            r.pages,
            r.zero_pages,
            r.device_bytes,
            r.bytes as f64 / 1048576.0,
            r.elapsed_us as f64 / 1e3
        )),
        }
    });
    let view = source.progress_view();
    let (bar, halt) = (pb.clone(), Arc::clone(&stop));
    let thread = std::thread::spawn(move || {
        let mut round = u32::MAX;
        while !halt.load(Ordering::Relaxed) {
            let s = view.snapshot();
            if s.round != round {
                round = s.round;
                bar.reset_eta();
            }
            // Position first: a frame drawn in between shows the new round's start against
            // the old length, never the old round's end against the new one.
            bar.set_position(s.round_done.min(s.round_pages) * 4096);
            bar.set_length(s.round_pages * 4096);
            let phase = phase.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let mut msg = phase;
            if s.round > 0 {
                msg.push_str(&format!(
                    " | dirty {} pages/s | downtime now ~{} | {} sent",
                    // Measured from the end of round 1 on.
                    if s.round <= 1 {
                        "?".to_string()
                    } else {
                        s.dirty_rate.to_string()
                    },
                    if s.expected_downtime_us == 0 {
                        "?".to_string()
                    } else {
                        format!("{:.1} ms", s.expected_downtime_us as f64 / 1e3)
                    },
                    indicatif::HumanBytes(s.bytes)
                ));
            }
            bar.set_message(msg);
            bar.tick();
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    LiveBar {
        pb,
        stop,
        thread: Some(thread),
    }
}

/// The state a failed migration leaves the source in, for its error message.
pub(crate) fn source_state(source: &Source) -> &'static str {
    if source.is_stopped() {
        "the source stays stopped with its state intact (the destination may be running the VM)"
    } else {
        "the source runs again"
    }
}

pub(crate) fn print_report(r: &MigrationReport) {
    println!("dirty tracking:");
    for (d, c) in &r.tracking {
        println!("  {d}: {c:?}");
    }
    println!("round  dirty pages   pages sent   zero pages   device bytes   MiB sent    ms");
    for x in r.rounds.iter().chain(std::iter::once(&r.stop_copy)) {
        println!(
            "{:>5}  {:>11}  {:>11}  {:>11}  {:>13}  {:>8.1}  {:>6.1}{}",
            x.round,
            x.dirty_pages,
            x.pages,
            x.zero_pages,
            x.device_bytes,
            x.bytes as f64 / 1048576.0,
            x.elapsed_us as f64 / 1e3,
            if x.round == r.stop_copy.round {
                "  (stop-and-copy)"
            } else {
                ""
            }
        );
    }
    println!(
        "dirty rate {} pages/s; {} after {} pre-copy round(s)",
        r.dirty_rate,
        if r.converged {
            "converged"
        } else {
            "round limit reached"
        },
        r.rounds.len()
    );
    println!(
        "downtime {:.1} ms (limit {:.1} ms{}), total {:.2} s, {:.1} MiB sent",
        r.downtime_us as f64 / 1e3,
        r.downtime_limit_us as f64 / 1e3,
        if r.downtime_us <= r.downtime_limit_us {
            ", met"
        } else {
            ", EXCEEDED"
        },
        r.total_us as f64 / 1e6,
        r.bytes as f64 / 1048576.0
    );
    let p = &r.downtime_phases;
    println!(
        "downtime by phase (ms): stop + final harvest {:.1}, device save {:.1}, send {:.1}, in \
         flight {:.1}, destination load {:.1}, destination run {:.1}",
        p.stop_and_harvest_us as f64 / 1e3,
        p.device_save_us as f64 / 1e3,
        p.send_us as f64 / 1e3,
        p.in_flight_us as f64 / 1e3,
        p.destination_load_us as f64 / 1e3,
        p.destination_run_us as f64 / 1e3
    );
    for w in &r.source_cleanup {
        println!("warning: {w}");
    }
}
