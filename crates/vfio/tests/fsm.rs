//! The planner against the kernel's rules, for the four defined flag combinations.
//!
//! The tables below are written from `include/uapi/linux/vfio.h` ("FSM arcs", shortest path,
//! no saving-group state in the interior, STOP_COPY -> PRE_COPY[_P2P] refused, optional states
//! skipped) and checked against the combination list in `vfio_mig_get_next_state()`
//! (drivers/vfio/vfio_main.c, Linux 6.12). They are independent of the planner's code.
//!
//! Abbreviations: S=STOP R=RUNNING SC=STOP_COPY RS=RESUMING RP=RUNNING_P2P PC=PRE_COPY
//! PP=PRE_COPY_P2P. Each line is `FROM TARGET = STEPS...` or `FROM TARGET = refused`.

use livemig_vfio::sim::{Fault, SimConfig, SimDevice};
use livemig_vfio::{Error, MigrationDevice, MigrationFlags, MigrationState, data, fsm};

use MigrationState::*;

const STOP_COPY_ONLY: &str = "
S R = R
S SC = SC
S RS = RS
R S = S
R SC = S SC
R RS = S RS
SC S = S
SC R = S R
SC RS = S RS
RS S = S
RS R = S R
RS SC = S SC
";

const WITH_P2P: &str = "
S R = RP R
S SC = SC
S RS = RS
S RP = RP
R S = RP S
R SC = RP S SC
R RS = RP S RS
R RP = RP
SC S = S
SC R = S RP R
SC RS = S RS
SC RP = S RP
RS S = S
RS R = S RP R
RS SC = S SC
RS RP = S RP
RP S = S
RP R = R
RP SC = S SC
RP RS = S RS
";

const WITH_PRE_COPY: &str = "
S R = R
S SC = SC
S RS = RS
S PC = R PC
R S = S
R SC = S SC
R RS = S RS
R PC = PC
SC S = S
SC R = S R
SC RS = S RS
SC PC = refused
RS S = S
RS R = S R
RS SC = S SC
RS PC = S R PC
PC S = R S
PC R = R
PC SC = SC
PC RS = R S RS
";

const WITH_BOTH: &str = "
S R = RP R
S SC = SC
S RS = RS
S RP = RP
S PC = RP R PC
S PP = RP PP
R S = RP S
R SC = RP S SC
R RS = RP S RS
R RP = RP
R PC = PC
R PP = RP PP
SC S = S
SC R = S RP R
SC RS = S RS
SC RP = S RP
SC PC = refused
SC PP = refused
RS S = S
RS R = S RP R
RS SC = S SC
RS RP = S RP
RS PC = S RP R PC
RS PP = S RP PP
RP S = S
RP R = R
RP SC = S SC
RP RS = S RS
RP PC = R PC
RP PP = PP
PC S = R RP S
PC R = R
PC SC = PP SC
PC RS = R RP S RS
PC RP = R RP
PC PP = PP
PP S = RP S
PP R = RP R
PP SC = SC
PP RS = RP S RS
PP RP = RP
PP PC = PC
";

fn abbrev(s: &str) -> MigrationState {
    match s {
        "S" => Stop,
        "R" => Running,
        "SC" => StopCopy,
        "RS" => Resuming,
        "RP" => RunningP2p,
        "PC" => PreCopy,
        "PP" => PreCopyP2p,
        other => panic!("bad abbreviation {other}"),
    }
}

/// `Some(path)` for an accepted request, `None` for a refused one.
type Expected =
    std::collections::HashMap<(MigrationState, MigrationState), Option<Vec<MigrationState>>>;

fn parse(table: &str) -> Expected {
    let mut out = Expected::new();
    for line in table.lines().filter(|l| !l.trim().is_empty()) {
        let (pair, rhs) = line.split_once('=').expect("FROM TO = ...");
        let mut it = pair.split_whitespace();
        let from = abbrev(it.next().unwrap());
        let to = abbrev(it.next().unwrap());
        let rhs = rhs.trim();
        let path = if rhs == "refused" {
            None
        } else {
            Some(rhs.split_whitespace().map(abbrev).collect())
        };
        assert!(out.insert((from, to), path).is_none(), "duplicate {line}");
    }
    out
}

fn combos() -> Vec<(MigrationFlags, Expected)> {
    let [a, b, c, d] = MigrationFlags::DEFINED_COMBINATIONS;
    vec![
        (a, parse(STOP_COPY_ONLY)),
        (b, parse(WITH_P2P)),
        (c, parse(WITH_PRE_COPY)),
        (d, parse(WITH_BOTH)),
    ]
}

const NON_ERROR: [MigrationState; 7] = [
    Stop, Running, StopCopy, Resuming, RunningP2p, PreCopy, PreCopyP2p,
];

#[test]
fn tables_cover_every_supported_pair() {
    for (flags, table) in combos() {
        let n = flags.states().count();
        assert_eq!(table.len(), n * (n - 1), "table for {flags} is incomplete");
    }
}

#[test]
fn planner_matches_the_kernel_rules_for_all_49_pairs() {
    for (flags, table) in combos() {
        for cur in NON_ERROR {
            for target in NON_ERROR {
                let got = fsm::plan(cur, target, flags);
                let supported = cur.supported_by(flags) && target.supported_by(flags);
                match (supported, cur == target, table.get(&(cur, target))) {
                    (false, _, _) => match got {
                        Err(Error::StateNotSupported { state, missing }) => {
                            assert!(state == cur || state == target);
                            assert!(!missing.is_empty() && !flags.contains(missing));
                        }
                        other => {
                            panic!("{flags}: {cur}->{target} should name a missing flag: {other:?}")
                        }
                    },
                    (true, true, _) => assert_eq!(got.unwrap(), vec![], "{flags}: {cur}->{cur}"),
                    (true, false, Some(Some(path))) => {
                        assert_eq!(&got.unwrap(), path, "{flags}: {cur}->{target}")
                    }
                    (true, false, Some(None)) => assert!(
                        matches!(got, Err(Error::Blocked { from, to }) if from == cur && to == target),
                        "{flags}: {cur}->{target} must be refused, got {got:?}"
                    ),
                    (true, false, None) => panic!("table misses {cur}->{target} for {flags}"),
                }
            }
        }
    }
}

#[test]
fn error_state_rules() {
    let f = MigrationFlags::DEFINED_COMBINATIONS[3];
    assert!(matches!(
        fsm::plan(Error, Running, f),
        Err(Error::NeedsReset)
    ));
    assert!(matches!(
        fsm::plan(Running, Error, f),
        Err(Error::ErrorNotRequestable)
    ));
    assert!(matches!(
        fsm::plan(Running, Stop, MigrationFlags::P2P),
        Err(Error::InvalidFlags { .. })
    ));
}

/// Every multi-step path is checked against the kernel's combined-transition list verbatim.
#[test]
fn full_feature_combinations_match_vfio_main_c_list() {
    let listed = [
        "PC PP SC",
        "PC R RP",
        "PC R RP S",
        "PC R RP S RS",
        "PP RP R",
        "PP RP S",
        "PP RP S RS",
        "RS S RP",
        "RS S RP PP",
        "RS S RP R",
        "RS S RP R PC",
        "RS S SC",
        "R RP PP",
        "R RP S",
        "R RP S RS",
        "R RP S SC",
        "RP R PC",
        "RP S RS",
        "RP S SC",
        "S RP PP",
        "S RP R",
        "S RP R PC",
        "SC S RS",
        "SC S RP",
        "SC S RP R",
    ];
    let f = MigrationFlags::DEFINED_COMBINATIONS[3];
    let mut multi = 0;
    for cur in NON_ERROR {
        for target in NON_ERROR {
            if let Ok(path) = fsm::plan(cur, target, f)
                && path.len() >= 2
            {
                multi += 1;
                let mut full = vec![cur];
                full.extend(path);
                let text: Vec<&str> = full
                    .iter()
                    .map(|s| match s {
                        Stop => "S",
                        Running => "R",
                        StopCopy => "SC",
                        Resuming => "RS",
                        RunningP2p => "RP",
                        PreCopy => "PC",
                        PreCopyP2p => "PP",
                        Error => "E",
                    })
                    .collect();
                assert!(
                    listed.contains(&text.join(" ").as_str()),
                    "{text:?} not in the kernel list"
                );
            }
        }
    }
    assert_eq!(multi, listed.len());
}

/// A simulated device in `state`, with its arc log empty. RESUMING is entered for real, with a
/// valid stream from another device, so that leaving it validates and loads.
fn sim_in(flags: MigrationFlags, state: MigrationState) -> SimDevice {
    let dev = SimDevice::new(SimConfig::new(flags));
    if state == Resuming {
        let mut src = SimDevice::new(SimConfig {
            seed: 99,
            ..SimConfig::new(flags)
        });
        let mut out = src.transition(StopCopy).unwrap().data.unwrap();
        let mut bytes = Vec::new();
        data::save_stop_copy(&mut out, &mut bytes).unwrap();
        dev.force_state(Stop);
        let mut dst = dev.clone();
        let mut input = dst.transition(Resuming).unwrap().data.unwrap();
        data::write_resuming(&mut input, &bytes).unwrap();
    } else {
        dev.force_state(state);
    }
    dev.take_arcs();
    dev
}

/// The simulated driver takes the same arcs for a combined SET as the planner predicts, and the
/// arc-by-arc walk returns a data session exactly when the final arc opens one.
#[test]
fn transitions_take_the_planned_arcs() {
    for (flags, table) in combos() {
        for (&(cur, target), expected) in &table {
            let Some(path) = expected else { continue };
            // Kernel-style combined request.
            let mut dev = sim_in(flags, cur);
            let created = dev.set_migration_state(target).unwrap();
            let arcs = dev.arcs();
            let mut at = cur;
            let want: Vec<_> = path
                .iter()
                .map(|&s| {
                    let arc = (at, s);
                    at = s;
                    arc
                })
                .collect();
            assert_eq!(arcs, want, "{flags}: {cur}->{target}");
            // Arc-by-arc walk.
            let mut dev = sim_in(flags, cur);
            let t = dev.transition(target).unwrap();
            assert_eq!(&t.path, path);
            assert_eq!(dev.migration_state().unwrap(), target);
            let last_from = if path.len() >= 2 {
                path[path.len() - 2]
            } else {
                cur
            };
            let opens = matches!(
                (last_from, target),
                (Running, PreCopy) | (RunningP2p, PreCopyP2p) | (Stop, StopCopy) | (Stop, Resuming)
            );
            assert_eq!(t.data.is_some(), opens, "{flags}: {cur}->{target}");
            assert_eq!(created.is_some(), opens, "{flags}: {cur}->{target}");
        }
    }
}

/// Fault injection at every arc of every path: the error names the failed arc and the target,
/// and reports the state the device was left in — the arc's start, or ERROR.
#[test]
fn fault_at_every_step_reports_arc_and_resulting_state() {
    let mut cases = 0;
    for (flags, table) in combos() {
        for (&(cur, target), expected) in &table {
            let Some(path) = expected else { continue };
            for k in 0..path.len() {
                let from = if k == 0 { cur } else { path[k - 1] };
                let to = path[k];
                for to_error in [false, true] {
                    let mut dev = sim_in(flags, cur);
                    dev.inject(Fault::Arc { from, to, to_error });
                    let err = dev.transition(target).unwrap_err();
                    let left = if to_error { Error } else { from };
                    match &err {
                        Error::ArcFailed {
                            from: f,
                            to: t,
                            target: tg,
                            left_in,
                            source,
                        } => {
                            assert_eq!((*f, *t, *tg), (from, to, target), "{flags}: {err}");
                            assert_eq!(*left_in, Some(left), "{flags}: {err}");
                            assert_eq!(source.errno(), Some(libc::EIO));
                        }
                        other => panic!("{flags}: {cur}->{target}: unexpected {other:?}"),
                    }
                    assert_eq!(err.needs_reset(), to_error);
                    assert_eq!(dev.migration_state().unwrap(), left);
                    // The arcs before the failed one ran, in order; nothing after it.
                    assert_eq!(dev.arcs().len(), k);
                    if to_error {
                        assert!(matches!(dev.transition(Running), Err(Error::NeedsReset)));
                        dev.reset().unwrap();
                        assert_eq!(dev.migration_state().unwrap(), Running);
                    }
                    cases += 1;
                }
            }
        }
    }
    // Sum of the path lengths in the four tables (18 + 36 + 31 + 77), once staying in the arc's
    // start state and once entering ERROR.
    assert_eq!(cases, 2 * 162);
}

/// A failure while reading the state back is reported as "could not be read back".
#[test]
fn unreadable_state_after_failure_is_reported() {
    let f = MigrationFlags::DEFINED_COMBINATIONS[3];
    let mut dev = sim_in(f, Running);
    dev.inject(Fault::Arc {
        from: RunningP2p,
        to: Stop,
        to_error: false,
    });
    dev.inject(Fault::StateRead);
    // The initial state read fails first, so the transition cannot even start.
    assert!(dev.transition(StopCopy).is_err());
    dev.clear_faults();
    dev.inject(Fault::Arc {
        from: RunningP2p,
        to: Stop,
        to_error: false,
    });
    let err = dev.transition(StopCopy).unwrap_err();
    assert!(
        err.to_string().contains("device left in RUNNING_P2P"),
        "{err}"
    );
}
