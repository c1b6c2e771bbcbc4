//! Whole migrations inside one process, over the simulated link: the destination on a second
//! thread, the source on the caller's, joined when both are done. For tests, simulations and
//! examples; a VMM runs [`Source`] and [`Destination`] in two processes over a
//! [`Channel`](crate::transport::Channel).
//!
//! ```text
//!   migrate_local:           Source ── pipe (stream) ──────────> Destination (thread)
//!                                   <── pipe (return path) ─────
//!   migrate_local_channels:  the same main pair, plus page channel i over pipe i
//! ```

use std::io::{self, Read};

use crate::engine::{Destination, MigrationReport, ReceiveReport, Source};
use crate::error::{Error, Phase, Result};
use crate::link::{Cut, LinkChannel, LinkConfig, LinkReader, LinkWriter, pipe};
use crate::transport::{Abort, DataSink};

/// Runs one migration between `source` and `destination` in this process over an in-process
/// link (the destination on a second thread). Throwing `cut` drops both directions.
pub fn migrate_local(
    source: &mut Source,
    destination: &mut Destination,
    link: LinkConfig,
    cut: &Cut,
) -> (Result<MigrationReport>, Result<ReceiveReport>) {
    let (data_w, data_r) = pipe(link, cut.clone());
    let (back_w, back_r) = pipe(link, cut.clone());
    std::thread::scope(|s| {
        let d = s.spawn(move || destination.receive(data_r, back_w));
        let r = source.migrate(data_w, back_r);
        let dr = d.join().unwrap_or_else(|_| {
            Err(Error::Protocol {
                phase: Phase::Receive,
                reason: "the destination thread panicked".into(),
            })
        });
        (r, dr)
    })
}

/// As [`migrate_local`], with page channels: the main channel over `link`, page channel i over
/// `pages[i - 1]` (so one can be slower than the others). The source's
/// [`SourceConfig::channels`](crate::engine::SourceConfig::channels) must be `pages.len()`. The
/// destination is handed the page channels in reverse order (it must sort them by the index
/// each one names). Throwing `cut` drops every link.
pub fn migrate_local_channels(
    source: &mut Source,
    destination: &mut Destination,
    link: LinkConfig,
    pages: &[LinkConfig],
    cut: &Cut,
) -> (Result<MigrationReport>, Result<ReceiveReport>) {
    let (data_w, data_r) = pipe(link, cut.clone());
    let (back_w, back_r) = pipe(link, cut.clone());
    let mut writers: Vec<Option<LinkWriter>> = Vec::new();
    let mut readers: Vec<LinkReader> = Vec::new();
    for cfg in pages {
        let (w, r) = pipe(*cfg, cut.clone());
        writers.push(Some(w));
        readers.push(r);
    }
    let channel = LinkChannel {
        data: data_w,
        back: back_r,
        cut: cut.clone(),
    };
    std::thread::scope(|s| {
        let dcut = cut.clone();
        let d = s.spawn(move || {
            let abort_cut = dcut.clone();
            destination.receive_channels(
                data_r,
                back_w,
                Box::new(move || abort_cut.cut()),
                &mut || {
                    let r = readers.pop().ok_or_else(|| {
                        io::Error::new(io::ErrorKind::NotFound, "no more page channels")
                    })?;
                    let c = dcut.clone();
                    Ok((
                        Box::new(r) as Box<dyn Read + Send>,
                        Box::new(move || c.cut()),
                    ))
                },
            )
        });
        let r = source.migrate_channels(channel, &mut |index| {
            let w = (index as usize)
                .checked_sub(1)
                .and_then(|i| writers.get_mut(i))
                .and_then(Option::take)
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, format!("no page channel {index}"))
                })?;
            let c = cut.clone();
            Ok((
                Box::new(w) as Box<dyn DataSink>,
                Box::new(move || c.cut()) as Abort,
            ))
        });
        let dr = d.join().unwrap_or_else(|_| {
            Err(Error::Protocol {
                phase: Phase::Receive,
                reason: "the destination thread panicked".into(),
            })
        });
        (r, dr)
    })
}
