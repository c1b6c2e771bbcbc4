//! Migration charts (SVG through plotters): bytes on the wire against time, one line per
//! migration, and beside it each migration's downtime as a bar split into its phases.
//!
//! ```text
//!  ┌ title ───────────────────────────────────────────────────────────────┐
//!  │ panel: bytes sent (GiB) ▲      ___ livemig       │ downtime (ms)      │
//!  │                         │   __/  __ QEMU 1 ch.   │ livemig ████▒▒░    │
//!  │                         │__/___/                 │ QEMU    ██████     │
//!  │                         └──────────────▶ time (s)│                    │
//!  └──────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! `livemig chart --input FILE -o OUT.svg` reads [`ChartInput`] as JSON (the peer benchmark,
//! `cargo xtask bench-peer`, writes it); `--chart FILE` on `livemig vm migrate`, `livemig
//! migrate` and `livemig simulate` draws the one migration just made from its report:
//!
//! ```json
//! { "title": "Paused VM, 4 GiB",
//!   "panels": [ { "title": "4 GiB, 25% non-zero",
//!                 "traces": [ { "label": "livemig",
//!                               "timeline": [[0, 0], [10000, 52428800]],
//!                               "downtime": [ { "phase": "send", "us": 1200 } ] } ] } ] }
//! ```
//!
//! `timeline` holds `[microseconds since the migration began, bytes sent so far]` in time
//! order; `downtime` (optional, empty for a paused VM) the downtime's phases in order.

use std::path::Path;

use anyhow::{Context, Result, bail};
use livemig::engine::MigrationReport;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// A chart: a title and one panel (a row) per case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChartInput {
    /// Drawn above everything.
    pub title: String,
    /// One row each, top to bottom.
    pub panels: Vec<Panel>,
}

/// One case: its migrations side by side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Panel {
    /// The case.
    pub title: String,
    /// One migration each (a line, and a bar if it has a downtime).
    pub traces: Vec<Trace>,
}

/// One migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trace {
    /// Who migrated (the legend's text).
    pub label: String,
    /// `(microseconds since the start, bytes sent so far)`, in time order.
    pub timeline: Vec<(u64, u64)>,
    /// The downtime's phases in order (empty: no downtime to show).
    #[serde(default)]
    pub downtime: Vec<Phase>,
}

/// One phase of a downtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// Its name (the legend's text; equal names share a colour).
    pub phase: String,
    /// Its length, microseconds.
    pub us: u64,
}

/// Panels and traces a chart may hold (beyond them it would not be legible).
const MAX_PANELS: usize = 8;
const MAX_TRACES: usize = 8;

/// Colours of the downtime phases (apart from the lines' colours).
const PHASE_PALETTE: [RGBColor; 8] = [
    RGBColor(102, 194, 165),
    RGBColor(252, 141, 98),
    RGBColor(141, 160, 203),
    RGBColor(231, 138, 195),
    RGBColor(166, 216, 84),
    RGBColor(255, 217, 47),
    RGBColor(229, 196, 148),
    RGBColor(179, 179, 179),
];

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

impl ChartInput {
    /// Parses and checks a chart input; errors name the panel, trace or point at fault.
    pub fn from_json(text: &str) -> Result<ChartInput> {
        let c: ChartInput =
            serde_json::from_str(text).map_err(|e| anyhow::anyhow!("not a chart input: {e}"))?;
        c.check()?;
        Ok(c)
    }

    /// Checks what JSON cannot say: something to draw, time in order, names present.
    pub fn check(&self) -> Result<()> {
        if self.panels.is_empty() {
            bail!("chart {:?} has no panels", self.title);
        }
        if self.panels.len() > MAX_PANELS {
            bail!(
                "chart {:?} has {} panels (at most {MAX_PANELS})",
                self.title,
                self.panels.len()
            );
        }
        for (pi, p) in self.panels.iter().enumerate() {
            let pn = format!("panel {} ({:?})", pi + 1, p.title);
            if p.traces.is_empty() {
                bail!("{pn} has no traces");
            }
            if p.traces.len() > MAX_TRACES {
                bail!("{pn} has {} traces (at most {MAX_TRACES})", p.traces.len());
            }
            for (ti, t) in p.traces.iter().enumerate() {
                if t.label.trim().is_empty() {
                    bail!("{pn}: trace {} has an empty label", ti + 1);
                }
                let tn = format!("{pn}, trace {:?}", t.label);
                if t.timeline.is_empty() {
                    bail!("{tn}: the timeline is empty");
                }
                for (i, w) in t.timeline.windows(2).enumerate() {
                    if w[1].0 < w[0].0 {
                        bail!(
                            "{tn}: timeline point {} at {} us comes before point {} at {} us",
                            i + 2,
                            w[1].0,
                            i + 1,
                            w[0].0
                        );
                    }
                }
                for (i, ph) in t.downtime.iter().enumerate() {
                    if ph.phase.trim().is_empty() {
                        bail!("{tn}: downtime phase {} has an empty name", i + 1);
                    }
                }
            }
        }
        Ok(())
    }

    /// One panel, one trace: a migration from its report.
    pub fn from_report(title: &str, label: &str, r: &MigrationReport) -> ChartInput {
        ChartInput {
            title: title.to_string(),
            panels: vec![Panel {
                title: format!(
                    "{} rounds, {:.1} MiB, total {:.2} s, downtime {:.1} ms",
                    r.rounds.len() + 1,
                    r.bytes as f64 / 1048576.0,
                    r.total_us as f64 / 1e6,
                    r.downtime_us as f64 / 1e3
                ),
                traces: vec![Trace {
                    label: label.to_string(),
                    timeline: if r.timeline.is_empty() {
                        vec![(0, 0), (r.total_us, r.bytes)]
                    } else {
                        r.timeline.clone()
                    },
                    downtime: livemig_phases(r),
                }],
            }],
        }
    }
}

/// A livemig report's downtime by phase (the engine's `DowntimeReport`, in order).
pub fn livemig_phases(r: &MigrationReport) -> Vec<Phase> {
    let p = &r.downtime_phases;
    [
        ("stop + final harvest", p.stop_and_harvest_us),
        ("device save", p.device_save_us),
        ("send", p.send_us),
        ("in flight", p.in_flight_us),
        ("destination load", p.destination_load_us),
        ("destination run", p.destination_run_us),
    ]
    .into_iter()
    .map(|(phase, us)| Phase {
        phase: phase.into(),
        us,
    })
    .collect()
}

/// A duration for a legend: ms below 1 s, else s.
fn secs(us: u64) -> String {
    if us < 1_000_000 {
        format!("{:.1} ms", us as f64 / 1e3)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

/// The unit bytes are shown in: GiB from 1 GiB on, else MiB.
fn byte_unit(max: u64) -> (&'static str, f64) {
    if max >= 1 << 30 {
        ("GiB", (1u64 << 30) as f64)
    } else {
        ("MiB", (1u64 << 20) as f64)
    }
}

const WIDTH: u32 = 1280;
const PANEL_HEIGHT: u32 = 400;
const TITLE_HEIGHT: u32 = 50;

/// Draws the chart as an SVG document.
pub fn render(c: &ChartInput) -> Result<String> {
    c.check()?;
    let mut svg = String::new();
    {
        let height = TITLE_HEIGHT + PANEL_HEIGHT * c.panels.len() as u32;
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let body = root
            .titled(&c.title, ("sans-serif", 26).into_font().color(&BLACK))
            .map_err(draw_err)?;
        let rows = body.split_evenly((c.panels.len(), 1));
        for (p, area) in c.panels.iter().zip(&rows) {
            draw_panel(p, area)?;
        }
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

fn draw_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {e}")
}

fn draw_panel(p: &Panel, area: &DrawingArea<SVGBackend<'_>, Shift>) -> Result<()> {
    let with_bars = p.traces.iter().any(|t| !t.downtime.is_empty());
    let (lines, bars) = if with_bars {
        let (l, b) = area.split_horizontally((62).percent_width());
        (l, Some(b))
    } else {
        (area.clone(), None)
    };
    draw_lines(p, &lines, with_bars)?;
    if let Some(b) = bars {
        draw_bars(p, &b)?;
    }
    Ok(())
}

fn draw_lines(p: &Panel, area: &DrawingArea<SVGBackend<'_>, Shift>, with_bars: bool) -> Result<()> {
    let max_us = p
        .traces
        .iter()
        .filter_map(|t| t.timeline.last().map(|x| x.0))
        .max()
        .unwrap_or(0)
        .max(1000);
    let max_bytes = p
        .traces
        .iter()
        .flat_map(|t| t.timeline.iter().map(|x| x.1))
        .max()
        .unwrap_or(0)
        .max(1 << 20);
    let (unit, div) = byte_unit(max_bytes);
    let x_max = max_us as f64 / 1e6 * 1.03;
    let y_max = max_bytes as f64 / div * 1.08;
    let caption = if with_bars {
        p.title.clone()
    } else {
        format!("{} (no downtime: the VM is paused)", p.title)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 19))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("time since the migration began (s)")
        .y_desc(format!("bytes sent ({unit})"))
        .axis_desc_style(("sans-serif", 15))
        .label_style(("sans-serif", 13))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(draw_err)?;
    for (i, t) in p.traces.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let (last_us, last_bytes) = *t.timeline.last().expect("checked: not empty");
        let label = format!(
            "{}: {}, {:.2} {unit}",
            t.label,
            secs(last_us),
            last_bytes as f64 / div
        );
        chart
            .draw_series(LineSeries::new(
                t.timeline
                    .iter()
                    .map(|&(us, b)| (us as f64 / 1e6, b as f64 / div)),
                color.stroke_width(2),
            ))
            .map_err(draw_err)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

fn draw_bars(p: &Panel, area: &DrawingArea<SVGBackend<'_>, Shift>) -> Result<()> {
    let traces: Vec<&Trace> = p.traces.iter().filter(|t| !t.downtime.is_empty()).collect();
    let total = |t: &Trace| t.downtime.iter().map(|ph| ph.us).sum::<u64>();
    let max_ms = traces.iter().map(|t| total(t)).max().unwrap_or(0) as f64 / 1e3;
    let x_max = (max_ms * 1.3).max(0.1);
    let mut names: Vec<&str> = Vec::new();
    for t in &traces {
        for ph in &t.downtime {
            if !names.contains(&ph.phase.as_str()) {
                names.push(&ph.phase);
            }
        }
    }
    let labels: Vec<String> = traces.iter().map(|t| t.label.clone()).collect();
    // The phases' legend goes in a strip below the bars, two columns.
    let legend_rows = names.len().div_ceil(2) as u32;
    let (area, legend) = area.split_vertically(area.dim_in_pixel().1 - 14 - 20 * legend_rows);
    let mut chart = ChartBuilder::on(&area)
        .caption("downtime: vCPUs stop to run", ("sans-serif", 19))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(130)
        .build_cartesian_2d(0f64..x_max, (0..traces.len()).into_segmented())
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .set_tick_mark_size(LabelAreaPosition::Left, 0)
        .light_line_style(WHITE.mix(0.0))
        .x_desc("downtime (ms)")
        .axis_desc_style(("sans-serif", 15))
        .label_style(("sans-serif", 13))
        .y_label_formatter(&|v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(draw_err)?;
    for (ni, name) in names.iter().enumerate() {
        let color = PHASE_PALETTE[ni % PHASE_PALETTE.len()];
        let mut rects = Vec::new();
        for (ti, t) in traces.iter().enumerate() {
            let mut start = 0u64;
            for ph in &t.downtime {
                if ph.phase == *name && ph.us > 0 {
                    let mut r = Rectangle::new(
                        [
                            (start as f64 / 1e3, SegmentValue::Exact(ti)),
                            ((start + ph.us) as f64 / 1e3, SegmentValue::Exact(ti + 1)),
                        ],
                        color.filled(),
                    );
                    r.set_margin(14, 14, 0, 0);
                    rects.push(r);
                }
                start += ph.us;
            }
        }
        chart.draw_series(rects).map_err(draw_err)?;
        let half = legend.dim_in_pixel().0 as i32 / 2;
        let (x, y) = (
            110 + (ni as i32 % 2) * (half - 40),
            6 + (ni as i32 / 2) * 20,
        );
        legend
            .draw(&Rectangle::new([(x, y), (x + 13, y + 13)], color.filled()))
            .map_err(draw_err)?;
        legend
            .draw(&Text::new(
                name.to_string(),
                (x + 19, y),
                ("sans-serif", 13).into_font(),
            ))
            .map_err(draw_err)?;
    }
    chart
        .draw_series(traces.iter().enumerate().map(|(ti, t)| {
            Text::new(
                format!(" {}", secs(total(t))),
                (total(t) as f64 / 1e3, SegmentValue::CenterOf(ti)),
                ("sans-serif", 14).into_font(),
            )
        }))
        .map_err(draw_err)?;
    Ok(())
}

/// Writes the chart of one migration report to `path`.
pub fn write_report(path: &Path, title: &str, r: &MigrationReport) -> Result<()> {
    let svg = render(&ChartInput::from_report(title, "livemig", r))?;
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

/// `livemig chart`: draws `input` (JSON, [`ChartInput`]) into `output`.
pub fn run(input: &Path, output: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let c = ChartInput::from_json(&text).with_context(|| input.display().to_string())?;
    let svg = render(&c)?;
    std::fs::write(output, svg).with_context(|| format!("writing {}", output.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> &'static str {
        r#"{"title": "t", "panels": [
              {"title": "paused", "traces": [
                  {"label": "livemig", "timeline": [[0, 0], [10000, 1048576], [25000, 3145728]]},
                  {"label": "QEMU", "timeline": [[0, 0], [40000, 3200000]]}]},
              {"title": "running", "traces": [
                  {"label": "livemig", "timeline": [[0, 0], [9000, 5000000]],
                   "downtime": [{"phase": "send", "us": 1500}, {"phase": "in flight", "us": 300}]},
                  {"label": "QEMU", "timeline": [[0, 0], [12000, 6000000]],
                   "downtime": [{"phase": "STOP to RESUME", "us": 4200}]}]}]}"#
    }

    #[test]
    fn a_good_input_draws_every_trace_and_phase() {
        let c = ChartInput::from_json(good()).unwrap();
        assert_eq!(c.panels.len(), 2);
        let svg = render(&c).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        for text in [
            "livemig: 25.0 ms, 3.00 MiB",
            "QEMU: 40.0 ms, 3.05 MiB",
            "in flight",
            "STOP to RESUME",
            "4.2 ms",
            "1.8 ms",
            "bytes sent (MiB)",
            "downtime (ms)",
            "paused (no downtime: the VM is paused)",
        ] {
            assert!(svg.contains(text), "the SVG lacks {text:?}");
        }
    }

    #[test]
    fn bad_inputs_are_refused_naming_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"title": "t", "panels": []}"#,
                "chart \"t\" has no panels",
            ),
            (
                r#"{"title": "t", "panels": [{"title": "p", "traces": []}]}"#,
                "panel 1 (\"p\") has no traces",
            ),
            (
                r#"{"title": "t", "panels": [{"title": "p", "traces": [
                    {"label": "a", "timeline": [[0, 0], [20, 5], [10, 6]]}]}]}"#,
                "panel 1 (\"p\"), trace \"a\": timeline point 3 at 10 us comes before point 2 at 20 us",
            ),
            (
                r#"{"title": "t", "panels": [{"title": "p", "traces": [
                    {"label": "a", "timeline": []}]}]}"#,
                "trace \"a\": the timeline is empty",
            ),
            (
                r#"{"title": "t", "panels": [{"title": "p", "traces": [
                    {"label": " ", "timeline": [[0, 0]]}]}]}"#,
                "trace 1 has an empty label",
            ),
            (
                r#"{"title": "t", "panels": [{"title": "p", "traces": [
                    {"label": "a", "timeline": [[0, 0]], "downtime": [{"phase": "", "us": 3}]}]}]}"#,
                "downtime phase 1 has an empty name",
            ),
            (
                r#"{"title": "t", "panels": [{"title": "p", "traces": [
                    {"label": "a", "timeline": [[0, 0]], "colour": "red"}]}]}"#,
                "unknown field `colour`",
            ),
            (
                r#"{"title": "t", "panels": [{"title": "p", "traces": [
                    {"label": "a", "timeline": [[0, -5]]}]}]}"#,
                "invalid value: integer `-5`",
            ),
            (r#"{"title": "t""#, "not a chart input"),
        ];
        for (json, want) in cases {
            let e = ChartInput::from_json(json).unwrap_err().to_string();
            assert!(e.contains(want), "{json}: {e:?} does not contain {want:?}");
        }
    }

    #[test]
    fn durations_read_in_ms_below_a_second_and_in_s_above() {
        assert_eq!(secs(2_500), "2.5 ms");
        assert_eq!(secs(999_900), "999.9 ms");
        assert_eq!(secs(1_000_000), "1.00 s");
        assert_eq!(secs(4_350_000), "4.35 s");
        assert_eq!(byte_unit(1 << 30).0, "GiB");
        assert_eq!(byte_unit((1 << 30) - 1).0, "MiB");
    }

    #[test]
    fn a_report_becomes_one_panel_with_the_engines_phases() {
        let mut r = MigrationReport {
            total_us: 50_000,
            bytes: 7 << 20,
            downtime_us: 2_100,
            timeline: vec![(0, 0), (10_000, 3 << 20), (50_000, 7 << 20)],
            ..MigrationReport::default()
        };
        r.downtime_phases.send_us = 1_000;
        r.downtime_phases.in_flight_us = 1_100;
        let c = ChartInput::from_report("one", "livemig", &r);
        assert_eq!(c.panels[0].traces[0].timeline, r.timeline);
        let ph = &c.panels[0].traces[0].downtime;
        assert_eq!(ph.len(), 6);
        assert_eq!(ph.iter().map(|p| p.us).sum::<u64>(), 2_100);
        assert_eq!(ph[2].phase, "send");
        let svg = render(&c).unwrap();
        assert!(svg.contains("2.1 ms") && svg.contains("livemig: 50.0 ms, 7.00 MiB"));
    }
}
