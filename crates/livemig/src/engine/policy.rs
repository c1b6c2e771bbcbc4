//! The round policy: after each pre-copy round, what the source does next. A pure function of
//! the round's figures and the policy's own counters (no I/O, no clock), so the rules can be
//! tested over tables of rounds; [`Source`](super::Source) feeds it and carries out its answer.
//!
//! ```text
//!                 after_round(facts)
//!   fits = remaining <= link rate x downtime limit, and every device's initial data was read
//!     fits, rounds and settle rounds left, pages left > 1 ms of link, guest dirties < 1/2 link
//!        ──> Settle          (one more short round shrinks the stop)
//!     fits, no round acknowledgements   ──> SwitchOver(Converged)
//!     fits, round acknowledgements      ──> AwaitAck ── the engine waits for this round's ack,
//!                                                       then after_ack(facts, device load)
//!                                              load fits ──> SwitchOver(Converged)
//!     does not fit (or the load does not):
//!        round limit reached ──> SwitchOver(RoundLimit(why))
//!        auto-converge on, the guest dirtied > 1/2 of what the round sent twice ──> Throttle(%)
//!        otherwise ──> Continue
//!
//!   before the stop: hard_deadline_check(estimate) ── over the deadline ──> give up (the source
//!                                                     runs on, the error says why)
//! ```

use crate::memory::PAGE_SIZE;

use super::config::{AutoConverge, SETTLE_ROUNDS};

/// The settings the policy decides with (from [`SourceConfig`](super::SourceConfig)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyConfig {
    /// The downtime limit, microseconds.
    pub downtime_limit_us: u64,
    /// The most pre-copy rounds.
    pub max_rounds: u32,
    /// Auto-converge steps, if on.
    pub auto_converge: Option<AutoConverge>,
    /// The hard deadline on the stop, microseconds, if any.
    pub hard_deadline_us: Option<u64>,
}

/// What one pre-copy round measured, as the policy sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundFacts {
    /// The round (1-based).
    pub round: u32,
    /// Bytes stop-and-copy would send now: dirty pages plus the devices' pending state.
    pub remaining: u64,
    /// The devices' part of `remaining`.
    pub device_estimate: u64,
    /// The best measured link rate, bytes/s.
    pub bandwidth: u64,
    /// Pages the harvest after the round found dirty.
    pub dirtied: u64,
    /// Stream bytes the round sent.
    pub sent: u64,
    /// The round's wall time, microseconds (at least 1).
    pub round_us: u64,
    /// Devices whose initial PRE_COPY data is not all read yet (the switchover waits).
    pub initial_pending: Vec<usize>,
    /// The destination acknowledges rounds (negotiated).
    pub round_acks: bool,
    /// The vCPU throttle in force, percent.
    pub throttle: u8,
    /// Pages found dirty over the whole pre-copy so far, and its duration in microseconds
    /// (for the non-convergence message).
    pub dirty_total: u64,
    /// See `dirty_total`.
    pub precopy_us: u64,
}

/// What the destination's acknowledgements say of its device loads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceLoad {
    /// How long the destination's devices would take to load the remaining device state, at
    /// the rate they loaded pre-copy state; `None` before they loaded any.
    pub estimate_us: Option<u64>,
    /// What they loaded so far: microseconds and bytes.
    pub loaded_us: u64,
    /// See `loaded_us`.
    pub loaded_bytes: u64,
}

/// Why the switchover happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Convergence {
    /// The estimate fits the downtime limit.
    Converged,
    /// The round limit was reached first; the reason names the rates.
    RoundLimit(String),
}

/// The policy's answer after a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Another round, as before.
    Continue,
    /// Another round, with the vCPU throttle at this percent (auto-converge).
    Throttle(u8),
    /// The estimate fits, but another short round shrinks the stop (see [`SETTLE_ROUNDS`]).
    Settle,
    /// The estimate fits: wait for the destination's acknowledgement of this round, then ask
    /// [`Policy::after_ack`] with what it says of the device loads.
    AwaitAck,
    /// Stop the VM and copy the rest.
    SwitchOver(Convergence),
}

/// The round policy's counters between rounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    cfg: PolicyConfig,
    /// Settle rounds run so far.
    settle: u32,
    /// Rounds in a row in which the guest dirtied more than half of what the round sent.
    dirty_high: u32,
}

impl Policy {
    /// A policy before the first round.
    pub fn new(cfg: PolicyConfig) -> Policy {
        Policy {
            cfg,
            settle: 0,
            dirty_high: 0,
        }
    }

    /// What the link moves within the downtime limit, bytes.
    pub fn budget(&self, bandwidth: u64) -> u64 {
        (u128::from(bandwidth) * u128::from(self.cfg.downtime_limit_us) / 1_000_000)
            .min(u128::from(u64::MAX)) as u64
    }

    /// After round `f.round`.
    pub fn after_round(&mut self, f: &RoundFacts) -> Step {
        let fits = f.remaining <= self.budget(f.bandwidth) && f.initial_pending.is_empty();
        if fits && f.round < self.cfg.max_rounds && self.settle < SETTLE_ROUNDS {
            // It fits, but while the guest dirties pages much slower than the link moves them,
            // one more short round shrinks what the stop must send (QEMU likewise iterates
            // while its pending estimate keeps falling).
            let pages_left = f.remaining.saturating_sub(f.device_estimate);
            let dirty_bps = f
                .dirtied
                .saturating_mul(PAGE_SIZE)
                .saturating_mul(1_000_000)
                / f.round_us.max(1);
            let floor = f.bandwidth / 1000;
            if pages_left > floor && dirty_bps.saturating_mul(2) < f.bandwidth {
                self.settle += 1;
                return Step::Settle;
            }
        }
        if fits {
            if f.round_acks {
                return Step::AwaitAck;
            }
            return Step::SwitchOver(Convergence::Converged);
        }
        self.not_fitting(f, String::new())
    }

    /// After [`Step::AwaitAck`]: the destination acknowledged the round; its devices' load
    /// time for the remaining device state must fit the limit too (QEMU's estimate leaves it
    /// out).
    pub fn after_ack(&mut self, f: &RoundFacts, load: DeviceLoad) -> Step {
        let send_us = send_time_us(f.remaining, f.bandwidth);
        match load.estimate_us {
            Some(load_us) if send_us.saturating_add(load_us) > self.cfg.downtime_limit_us => {
                let note = format!(
                    "; the destination's devices would take about {} ms to load the remaining \
                     {} bytes of device state (they loaded {} bytes in {} ms during pre-copy)",
                    load_us / 1000,
                    f.device_estimate,
                    load.loaded_bytes,
                    load.loaded_us / 1000
                );
                self.not_fitting(f, note)
            }
            _ => Step::SwitchOver(Convergence::Converged),
        }
    }

    /// The round did not fit: the round limit, an auto-converge step, or another round.
    fn not_fitting(&mut self, f: &RoundFacts, mut load_note: String) -> Step {
        if f.round >= self.cfg.max_rounds {
            let rate = f
                .dirty_total
                .saturating_mul(PAGE_SIZE)
                .saturating_mul(1_000_000)
                / f.precopy_us.max(1);
            if !f.initial_pending.is_empty() {
                load_note += &format!(
                    "; the initial PRE_COPY data of device(s) {:?} was not all read yet",
                    f.initial_pending
                );
            }
            return Step::SwitchOver(Convergence::RoundLimit(format!(
                "pre-copy did not converge in {} round(s): the guest dirtied {rate} B/s against \
                 a link rate of {} B/s; {} bytes were left against a budget of {} for the {} ms \
                 downtime limit{}{load_note}",
                f.round,
                f.bandwidth,
                f.remaining,
                self.budget(f.bandwidth),
                self.cfg.downtime_limit_us / 1000,
                if self.cfg.auto_converge.is_some() {
                    format!(" (vCPU throttle at {}%)", f.throttle)
                } else {
                    " (auto-converge is off)".into()
                }
            )));
        }
        self.auto_converge(f)
    }

    /// Auto-converge (QEMU's `auto-converge` rule, migration/ram.c
    /// `migration_trigger_throttle`): when in two rounds the guest dirtied more than half of
    /// what the round sent, throttle the vCPUs (initial step, then by the increment, up to the
    /// maximum). The host enforces it; the guest is never asked to slow itself.
    fn auto_converge(&mut self, f: &RoundFacts) -> Step {
        let Some(ac) = self.cfg.auto_converge else {
            return Step::Continue;
        };
        if f.dirtied.saturating_mul(PAGE_SIZE) > f.sent / 2 {
            self.dirty_high += 1;
        }
        if self.dirty_high < 2 {
            return Step::Continue;
        }
        self.dirty_high = 0;
        let next = if f.throttle == 0 {
            ac.initial
        } else {
            f.throttle.saturating_add(ac.increment)
        };
        Step::Throttle(next.min(ac.max))
    }

    /// Before the VM stops: whether stop-and-copy fits the hard deadline — `left` bytes at
    /// `bandwidth`, plus `load_us` for the destination's devices to load their state. The
    /// reason when it does not (the source gives up and runs on).
    pub fn hard_deadline_check(
        &self,
        left: u64,
        bandwidth: u64,
        device: u64,
        load_us: Option<u64>,
    ) -> Result<(), String> {
        let Some(limit_us) = self.cfg.hard_deadline_us else {
            return Ok(());
        };
        let send_us = send_time_us(left, bandwidth);
        let load_us = load_us.unwrap_or(0);
        let need_us = send_us.saturating_add(load_us);
        if need_us <= limit_us {
            return Ok(());
        }
        Err(format!(
            "stop-and-copy would take about {:.1} ms ({left} bytes at {bandwidth} B/s{}), over \
             the hard deadline of {} ms; not stopping the VM",
            need_us as f64 / 1000.0,
            if load_us > 0 {
                format!(
                    ", and {:.1} ms for the destination's devices to load {device} bytes",
                    load_us as f64 / 1000.0
                )
            } else {
                String::new()
            },
            limit_us as f64 / 1000.0
        ))
    }
}

/// Microseconds to move `bytes` at `bandwidth` bytes/s (a zero rate counts as 1 B/s).
pub fn send_time_us(bytes: u64, bandwidth: u64) -> u64 {
    (u128::from(bytes) * 1_000_000 / u128::from(bandwidth.max(1))).min(u128::from(u64::MAX)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn cfg() -> PolicyConfig {
        PolicyConfig {
            downtime_limit_us: 300_000,
            max_rounds: 5,
            auto_converge: None,
            hard_deadline_us: None,
        }
    }

    /// A round on a 100 MB/s link (budget 30 MB at 300 ms) that sent `sent` bytes in 1 s
    /// and left `remaining` with the guest dirtying `dirtied` pages.
    fn round(round: u32, remaining: u64, dirtied: u64, sent: u64) -> RoundFacts {
        RoundFacts {
            round,
            remaining,
            device_estimate: 0,
            bandwidth: 100 * MB,
            dirtied,
            sent,
            round_us: 1_000_000,
            initial_pending: vec![],
            round_acks: false,
            throttle: 0,
            dirty_total: dirtied * u64::from(round),
            precopy_us: 1_000_000 * u64::from(round),
        }
    }

    /// Runs `rounds` through a fresh policy (acknowledgements answered with `load`), applying
    /// throttle steps as the engine does; the steps taken.
    fn run(cfg: PolicyConfig, rounds: &[RoundFacts], load: DeviceLoad) -> Vec<Step> {
        let mut p = Policy::new(cfg);
        let mut throttle = 0;
        let mut steps = Vec::new();
        for f in rounds {
            let f = RoundFacts {
                throttle,
                ..f.clone()
            };
            let mut s = p.after_round(&f);
            if s == Step::AwaitAck {
                steps.push(s);
                s = p.after_ack(&f, load);
            }
            if let Step::Throttle(t) = s {
                throttle = t;
            }
            let end = matches!(s, Step::SwitchOver(_));
            steps.push(s);
            if end {
                break;
            }
        }
        steps
    }

    #[test]
    fn a_table_of_rounds() {
        use Convergence::*;
        use Step::*;
        let none = DeviceLoad::default();
        struct Case {
            what: &'static str,
            cfg: PolicyConfig,
            rounds: Vec<RoundFacts>,
            load: DeviceLoad,
            steps: Vec<Step>,
        }
        let ac = PolicyConfig {
            auto_converge: Some(AutoConverge::default()),
            max_rounds: 6,
            ..cfg()
        };
        let heavy = |r| round(r, 200 * MB, (80 * MB) / PAGE_SIZE, 100 * MB);
        let cases = vec![
            Case {
                what: "over budget until it fits; an idle guest leaves nothing to settle",
                cfg: cfg(),
                rounds: vec![
                    round(1, 80 * MB, 20_000, 100 * MB),
                    round(2, 10 * 4096, 10, MB),
                ],
                load: none,
                steps: vec![Continue, SwitchOver(Converged)],
            },
            Case {
                what: "fits with 1 MB left of a slow dirtier: up to three settle rounds, then stop",
                cfg: cfg(),
                rounds: (1..=5).map(|r| round(r, MB, 16, MB)).collect(),
                load: none,
                steps: vec![Settle, Settle, Settle, SwitchOver(Converged)],
            },
            Case {
                what: "fits, but the guest dirties faster than half the link: no settle round",
                cfg: cfg(),
                rounds: vec![round(1, MB, (60 * MB) / PAGE_SIZE, 100 * MB)],
                load: none,
                steps: vec![SwitchOver(Converged)],
            },
            Case {
                what: "the last round may not settle",
                cfg: PolicyConfig {
                    max_rounds: 1,
                    ..cfg()
                },
                rounds: vec![round(1, MB, 16, MB)],
                load: none,
                steps: vec![SwitchOver(Converged)],
            },
            Case {
                what: "with acknowledgements: the device load fits",
                cfg: cfg(),
                rounds: vec![RoundFacts {
                    round_acks: true,
                    ..round(1, 10 * 4096, 10, MB)
                }],
                load: DeviceLoad {
                    estimate_us: Some(100_000),
                    loaded_us: 1000,
                    loaded_bytes: 4096,
                },
                steps: vec![AwaitAck, SwitchOver(Converged)],
            },
            Case {
                what: "auto-converge: a step every two heavy rounds, then the round limit",
                cfg: ac,
                rounds: (1..=6).map(heavy).collect(),
                load: none,
                steps: vec![
                    Continue,
                    Throttle(20),
                    Continue,
                    Throttle(30),
                    Continue,
                    SwitchOver(RoundLimit(String::new())),
                ],
            },
        ];
        for c in cases {
            let got = run(c.cfg, &c.rounds, c.load);
            // Round-limit reasons are checked on their own below.
            let got: Vec<Step> = got
                .into_iter()
                .map(|s| match s {
                    SwitchOver(RoundLimit(_)) => SwitchOver(RoundLimit(String::new())),
                    s => s,
                })
                .collect();
            assert_eq!(got, c.steps, "{}", c.what);
        }
    }

    #[test]
    fn a_slow_destination_device_load_keeps_pre_copy_going_and_is_named() {
        let f = RoundFacts {
            round_acks: true,
            device_estimate: 10 * MB,
            ..round(2, 10 * MB, 10, MB)
        };
        let mut p = Policy::new(cfg());
        assert_eq!(p.after_round(&f), Step::AwaitAck);
        let load = DeviceLoad {
            estimate_us: Some(400_000),
            loaded_us: 40_000,
            loaded_bytes: MB,
        };
        assert_eq!(p.after_ack(&f, load), Step::Continue);
        // At the round limit the reason carries the load figures.
        let last = RoundFacts { round: 5, ..f };
        let Step::SwitchOver(Convergence::RoundLimit(why)) = p.after_ack(&last, load) else {
            panic!("expected the round limit");
        };
        assert!(
            why.contains("would take about 400 ms to load the remaining 10485760 bytes"),
            "{why}"
        );
        assert!(why.contains("(auto-converge is off)"), "{why}");
    }

    #[test]
    fn pending_initial_device_data_holds_the_switchover() {
        let f = RoundFacts {
            initial_pending: vec![1],
            ..round(1, 4096, 0, MB)
        };
        let mut p = Policy::new(cfg());
        assert_eq!(p.after_round(&f), Step::Continue);
        let last = RoundFacts { round: 5, ..f };
        let Step::SwitchOver(Convergence::RoundLimit(why)) = p.after_round(&last) else {
            panic!("expected the round limit");
        };
        assert!(
            why.contains("the initial PRE_COPY data of device(s) [1] was not all read yet"),
            "{why}"
        );
    }

    #[test]
    fn the_round_limit_names_the_rates_and_the_throttle() {
        let mut p = Policy::new(PolicyConfig {
            max_rounds: 2,
            auto_converge: Some(AutoConverge::default()),
            ..cfg()
        });
        let f = RoundFacts {
            throttle: 40,
            ..round(2, 200 * MB, 1000, 100 * MB)
        };
        let Step::SwitchOver(Convergence::RoundLimit(why)) = p.after_round(&f) else {
            panic!("expected the round limit");
        };
        assert_eq!(
            why,
            format!(
                "pre-copy did not converge in 2 round(s): the guest dirtied {} B/s against a \
                 link rate of {} B/s; {} bytes were left against a budget of {} for the 300 ms \
                 downtime limit (vCPU throttle at 40%)",
                1000 * PAGE_SIZE,
                100 * MB,
                200 * MB,
                30 * MB
            )
        );
    }

    #[test]
    fn auto_converge_stops_at_its_maximum_and_needs_two_heavy_rounds() {
        let ac = AutoConverge {
            initial: 50,
            increment: 40,
            max: 60,
        };
        let mut p = Policy::new(PolicyConfig {
            auto_converge: Some(ac),
            max_rounds: 100,
            ..cfg()
        });
        let heavy = |throttle| RoundFacts {
            throttle,
            ..round(1, 200 * MB, (80 * MB) / PAGE_SIZE, 100 * MB)
        };
        let light = RoundFacts {
            throttle: 0,
            ..round(1, 200 * MB, 1, 100 * MB)
        };
        assert_eq!(p.after_round(&heavy(0)), Step::Continue);
        assert_eq!(p.after_round(&light), Step::Continue, "a light round");
        assert_eq!(
            p.after_round(&heavy(0)),
            Step::Throttle(50),
            "two heavy rounds"
        );
        assert_eq!(p.after_round(&heavy(50)), Step::Continue);
        assert_eq!(
            p.after_round(&heavy(50)),
            Step::Throttle(60),
            "capped at max"
        );
        // Off: never a step.
        let mut off = Policy::new(cfg());
        for _ in 0..4 {
            assert_eq!(off.after_round(&heavy(0)), Step::Continue);
        }
    }

    #[test]
    fn the_hard_deadline_gives_up_before_the_stop() {
        let p = Policy::new(PolicyConfig {
            hard_deadline_us: Some(50_000),
            ..cfg()
        });
        assert_eq!(p.hard_deadline_check(MB, 100 * MB, 0, None), Ok(()));
        let e = p
            .hard_deadline_check(10 * MB, 100 * MB, 0, None)
            .unwrap_err();
        assert_eq!(
            e,
            "stop-and-copy would take about 100.0 ms (10485760 bytes at 104857600 B/s), over \
             the hard deadline of 50 ms; not stopping the VM"
        );
        let e = p
            .hard_deadline_check(MB, 100 * MB, 4096, Some(45_000))
            .unwrap_err();
        assert!(
            e.contains(", and 45.0 ms for the destination's devices to load 4096 bytes"),
            "{e}"
        );
        assert_eq!(
            Policy::new(cfg()).hard_deadline_check(u64::MAX, 1, 0, Some(u64::MAX)),
            Ok(()),
            "no deadline, no check"
        );
    }

    #[test]
    fn figures_at_their_limits_do_not_overflow() {
        let mut p = Policy::new(PolicyConfig {
            auto_converge: Some(AutoConverge::default()),
            ..cfg()
        });
        let f = RoundFacts {
            round: 5,
            remaining: u64::MAX,
            device_estimate: u64::MAX,
            bandwidth: u64::MAX,
            dirtied: u64::MAX,
            sent: u64::MAX,
            round_us: 0,
            dirty_total: u64::MAX,
            precopy_us: 0,
            throttle: u8::MAX,
            ..RoundFacts::default()
        };
        let _ = p.after_round(&f);
        let _ = p.after_ack(
            &f,
            DeviceLoad {
                estimate_us: Some(u64::MAX),
                loaded_us: u64::MAX,
                loaded_bytes: u64::MAX,
            },
        );
        assert_eq!(send_time_us(u64::MAX, 0), u64::MAX);
    }
}
