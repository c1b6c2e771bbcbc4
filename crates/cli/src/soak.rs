//! `livemig vm soak-peer` (hidden): one end of the ping-pong soak (`crates/cli/tests/soak.rs`,
//! `cargo xtask soak`). A long-lived process that holds at most one test VM and obeys one
//! command per line on standard input, answering each with one JSON line on standard output
//! (`{"reply": ...}`); while a migration runs it also prints `{"event": ...}` lines (the
//! phases it enters), so the controller can kill it at a chosen phase.
//!
//! ```text
//!   boot                     boot a test VM here (none may be held)
//!   send ADDR [FAULT]        migrate the held VM to ADDR over mutual TLS
//!   receive [FAULT]          listen on 127.0.0.1:0 ({"event":"listening","addr":..}), receive
//!   resume | discard         the operator's decision for a source left stopped (undecided)
//!   verify                   the guest checks its own memory
//!   status                   VM held? running? KVM_RUN entries, both engines' last outcomes,
//!                            open fds, VmRSS
//!   FAULT = cut@PHASE        shut the connection down on entering PHASE
//!         | corrupt@PHASE    flip one byte of the next plaintext write above TLS from PHASE on
//!   PHASE (source)      = compat | start | precopyN | stopcopy | handover
//!   PHASE (destination) = compat | receive | roundN | stopcopy | resume
//! ```
//!
//! After a failed migration each side follows its engine: a source whose outcome is
//! [`Runs::Here`] keeps running, one left [`Runs::Undecided`] waits for `resume` or `discard`
//! (the controller decides as an operator would, from the other side's state), and a
//! destination drops its incoming VM unless its outcome is [`Runs::Here`].

use std::io::{BufRead, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use livemig::engine::{Destination, DestinationEvent, Event, Outcome, Runs, Source};
use livemig::error::Phase;
use livemig::link::DataSink;
use livemig::transport::Abort;
use livemig_kvm::{TestVm, platform};
use serde_json::{Value, json};

use crate::secure::{self, ChannelArgs, Conn, Security};
use crate::testvm::{VmArgs, VmMigArgs};

/// Options of `vm soak-peer`.
#[derive(Args, Clone, Debug)]
pub struct SoakPeerArgs {
    #[command(flatten)]
    vm: VmArgs,
    #[command(flatten)]
    mig: VmMigArgs,
    #[command(flatten)]
    chan: ChannelArgs,
    /// Negative control: after a successful send, run the VM here again (it then runs on both
    /// sides).
    #[arg(long, hide = true)]
    x_run_after_send: bool,
    /// Negative control: park the vCPUs of a VM received (it is held but does not run).
    #[arg(long, hide = true)]
    x_park_received: bool,
    /// Negative control: overwrite the guest's working sets just before it verifies.
    #[arg(long, hide = true)]
    x_scribble: bool,
    /// Negative control: leak one open file per migration.
    #[arg(long, hide = true)]
    x_leak_fd: bool,
    /// Negative control: leak this many MiB (written, so resident) per migration.
    #[arg(long, hide = true, default_value_t = 0)]
    x_leak_mib: u64,
}

/// A fault done inside this process.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fault {
    Cut(String),
    Corrupt(String),
}

fn parse_fault(s: Option<&str>) -> Result<Option<Fault>> {
    let Some(s) = s else { return Ok(None) };
    match s.split_once('@') {
        Some(("cut", p)) => Ok(Some(Fault::Cut(p.into()))),
        Some(("corrupt", p)) => Ok(Some(Fault::Corrupt(p.into()))),
        _ => bail!("unknown fault {s:?} (cut@PHASE or corrupt@PHASE)"),
    }
}

fn source_phase(p: &Phase) -> String {
    match p {
        Phase::Setup => "setup".into(),
        Phase::Compat => "compat".into(),
        Phase::Start => "start".into(),
        Phase::PreCopy(r) => format!("precopy{r}"),
        Phase::StopCopy => "stopcopy".into(),
        Phase::Handover => "handover".into(),
        Phase::Receive => "receive".into(),
        Phase::Resume => "resume".into(),
        Phase::Recovery => "recovery".into(),
    }
}

fn dest_phase(e: &DestinationEvent) -> String {
    match e {
        DestinationEvent::Phase(p) => source_phase(p),
        DestinationEvent::Round(r) => format!("round{r}"),
        DestinationEvent::StopCopy => "stopcopy".into(),
    }
}

/// Prints one JSON line on standard output.
fn say(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// The sending direction with a byte flipper: once armed, the first byte of the next write
/// is flipped (above TLS, so the record is sealed with the wrong byte inside).
struct Corrupting {
    inner: Box<dyn DataSink>,
    armed: Arc<AtomicBool>,
}

impl Write for Corrupting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !buf.is_empty() && self.armed.swap(false, Ordering::SeqCst) {
            let mut b = buf.to_vec();
            b[0] ^= 0x5a;
            return self.inner.write(&b);
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl DataSink for Corrupting {
    fn close(&mut self) -> std::io::Result<()> {
        self.inner.close()
    }
}

/// What a fault needs from the connection: its abort (for a cut) and the flipper's switch.
struct Armed {
    abort: Arc<Abort>,
    corrupt: Arc<AtomicBool>,
    fault: Option<Fault>,
    fired: Arc<AtomicBool>,
}

impl Armed {
    /// Wraps `conn`'s sending direction and abort.
    fn wrap(conn: Conn, fault: Option<Fault>) -> (Conn, Armed) {
        let abort: Arc<Abort> = Arc::new(conn.abort);
        let corrupt = Arc::new(AtomicBool::new(false));
        let a = Arc::clone(&abort);
        let conn = Conn {
            data: Box::new(Corrupting {
                inner: conn.data,
                armed: Arc::clone(&corrupt),
            }),
            back: conn.back,
            abort: Box::new(move || a()),
            peer: conn.peer,
        };
        let armed = Armed {
            abort,
            corrupt,
            fault,
            fired: Arc::new(AtomicBool::new(false)),
        };
        (conn, armed)
    }

    /// The event hook's part: announce `phase`, and do the fault when it is the one.
    fn hook(&self, side: &'static str) -> impl Fn(String) + Send + 'static {
        let (abort, corrupt, fault, fired) = (
            Arc::clone(&self.abort),
            Arc::clone(&self.corrupt),
            self.fault.clone(),
            Arc::clone(&self.fired),
        );
        move |phase: String| {
            say(&json!({"event": "phase", "side": side, "phase": phase}));
            match &fault {
                Some(Fault::Cut(p)) if *p == phase && !fired.swap(true, Ordering::SeqCst) => {
                    abort();
                }
                Some(Fault::Corrupt(p)) if *p == phase && !fired.swap(true, Ordering::SeqCst) => {
                    corrupt.store(true, Ordering::SeqCst);
                }
                _ => {}
            }
        }
    }
}

struct Peer {
    args: SoakPeerArgs,
    sec: Security,
    vm: Option<TestVm>,
    /// A source left stopped by an undecided handover, awaiting `resume` or `discard`.
    pending: Option<Source>,
    last_source: Option<Outcome>,
    last_dest: Option<Outcome>,
    migrations: u64,
    leaked_files: Vec<std::fs::File>,
    leaked_mem: Vec<Vec<u8>>,
}

fn open_fds() -> Result<u64> {
    Ok(std::fs::read_dir("/proc/self/fd")
        .context("reading /proc/self/fd")?
        .count() as u64)
}

fn rss_kib() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/self/status")
}

fn outcome_json(o: &Option<Outcome>) -> Value {
    match o {
        Some(o) => json!(o),
        None => Value::Null,
    }
}

impl Peer {
    /// Counts a migration this process takes part in; for the negative controls, what a
    /// leaking peer would leave behind for each.
    fn count_migration(&mut self) -> Result<()> {
        self.migrations += 1;
        if self.args.x_leak_fd {
            self.leaked_files
                .push(std::fs::File::open("/dev/null").context("opening /dev/null")?);
        }
        if self.args.x_leak_mib > 0 {
            self.leaked_mem
                .push(vec![0x5a; (self.args.x_leak_mib << 20) as usize]);
        }
        Ok(())
    }

    fn boot(&mut self) -> Result<Value> {
        if self.vm.is_some() {
            bail!("a VM is held here already");
        }
        let t = TestVm::boot(&self.args.vm.config()).map_err(|e| anyhow!("{e}"))?;
        self.vm = Some(t);
        self.last_source = None;
        self.last_dest = None;
        Ok(json!({"booted": true}))
    }

    fn send(&mut self, addr: &str, fault: Option<Fault>) -> Result<Value> {
        if self.pending.is_some() {
            bail!("the last source awaits resume or discard");
        }
        self.count_migration()?;
        let t = self.vm.as_ref().context("no VM held here")?;
        // Until the engine decides, the VM runs here untouched.
        self.last_source = Some(Outcome {
            runs: Runs::Here,
            why: "no migration started".into(),
            vcpu_entries: Some(t.vm.entries()),
        });
        let sp = platform::source(&t.vm, vec![], None, None).map_err(|e| anyhow!("{e}"))?;
        let mut source = Source::new(sp, self.args.mig.config());
        let conn = secure::dial(addr, &self.sec).context("no migration started")?;
        let (conn, armed) = Armed::wrap(conn, fault);
        let hook = armed.hook("source");
        source.on_event(move |e| {
            if let Event::Phase(p) = e {
                hook(source_phase(p));
            }
        });
        let r = source.migrate_over(conn);
        let fired = armed.fired.load(Ordering::SeqCst);
        drop(armed);
        let o = source.outcome().clone();
        self.last_source = Some(o.clone());
        let out = match &r {
            Ok(rep) => json!({
                "ok": true, "fault_fired": fired, "outcome": o,
                "rounds": rep.rounds.len(), "bytes": rep.bytes, "downtime_us": rep.downtime_us,
            }),
            Err(e) => json!({
                "ok": false, "fault_fired": fired, "outcome": o, "error": e.chain(),
                "stopped": source.is_stopped(),
            }),
        };
        match (r.is_ok(), o.runs) {
            (true, _) if self.args.x_run_after_send => {
                // Negative control: the VM runs here again although the destination runs it.
                if let Some(t) = &self.vm {
                    t.vm.unpause(livemig_kvm::vm::pause::ENGINE);
                }
            }
            (_, Runs::Here) => {}
            (_, Runs::NotHere) => {
                drop(source);
                self.vm = None;
            }
            (_, Runs::Undecided) => self.pending = Some(source),
        }
        Ok(out)
    }

    fn receive(&mut self, fault: Option<Fault>) -> Result<Value> {
        if self.vm.is_some() {
            bail!("a VM is held here already");
        }
        // No VM here until the engine decides it runs here.
        self.last_dest = None;
        self.count_migration()?;
        let t = TestVm::incoming(&self.args.vm.config()).map_err(|e| anyhow!("{e}"))?;
        let dp = platform::destination(&t.vm, vec![], true).map_err(|e| anyhow!("{e}"))?;
        let mut dest = Destination::new(dp);
        dest.set_phase_deadline(self.args.chan.phase_deadline());
        let l = TcpListener::bind("127.0.0.1:0").context("listening on 127.0.0.1:0")?;
        say(&json!({"event": "listening", "addr": l.local_addr()?.to_string()}));
        let sec = self.sec.clone();
        let mut incoming = secure::Incoming::new(&l, &sec);
        let conn = incoming.main()?;
        let (conn, armed) = Armed::wrap(conn, fault);
        let hook = armed.hook("destination");
        dest.on_event(move |e| hook(dest_phase(&e)));
        let r = dest.receive_channels(
            conn.back,
            conn.data,
            conn.abort,
            &mut crate::net::accept_page_channels(&mut incoming),
        );
        let fired = armed.fired.load(Ordering::SeqCst);
        drop(armed);
        let o = dest.outcome().clone();
        self.last_dest = Some(o.clone());
        let out = match &r {
            Ok(rep) => json!({
                "ok": true, "fault_fired": fired, "outcome": o, "pages": rep.pages,
                "bytes": rep.bytes,
            }),
            Err(e) => json!({"ok": false, "fault_fired": fired, "outcome": o, "error": e.chain()}),
        };
        drop(dest);
        drop(incoming);
        drop(l);
        if o.runs == Runs::Here && self.args.x_park_received {
            t.vm.pause(livemig_kvm::vm::pause::OPERATOR);
        }
        if o.runs == Runs::Here {
            self.vm = Some(t);
        }
        Ok(out)
    }

    fn decide(&mut self, resume: bool) -> Result<Value> {
        let mut s = self
            .pending
            .take()
            .context("no source awaits a decision here")?;
        if resume {
            s.resume()
                .map_err(|e| anyhow!("resuming the source: {}", e.chain()))?;
            self.last_source = Some(s.outcome().clone());
            Ok(json!({"resumed": true, "outcome": s.outcome()}))
        } else {
            let cleanup = s
                .discard()
                .map_err(|e| anyhow!("discarding the source: {}", e.chain()))?;
            self.last_source = Some(s.outcome().clone());
            drop(s);
            self.vm = None;
            Ok(json!({"discarded": true, "cleanup": cleanup}))
        }
    }

    fn verify(&self) -> Result<Value> {
        let t = self.vm.as_ref().context("no VM held here")?;
        if self.args.x_scribble {
            // Negative control: every working-set page (from 16 MiB, the guest's WS_BASE)
            // overwritten while the vCPUs are parked; after they resume, each rewrites at most
            // 64 pages (its command poll interval) before it verifies.
            use livemig::memory::GuestMemory;
            t.vm.pause(livemig_kvm::vm::pause::OPERATOR);
            let pages = u64::from(t.cfg.vcpus) * u64::from(t.cfg.pages);
            for p in 0..pages {
                t.vm.memory()
                    .write((16 << 20) + p * 4096, &[0xa5; 4096])
                    .map_err(|e| anyhow!("{e}"))?;
            }
            t.vm.unpause(livemig_kvm::vm::pause::OPERATOR);
        }
        Ok(json!(crate::testvm::verify(t)?))
    }

    fn status(&self) -> Result<Value> {
        let (entries, steps) = match &self.vm {
            Some(t) => (Some(t.vm.entries()), Some(t.monitor.steps())),
            None => (None, None),
        };
        Ok(json!({
            "holds": self.vm.is_some(),
            "pending": self.pending.is_some(),
            "entries": entries,
            "steps": steps,
            "source_outcome": outcome_json(&self.last_source),
            "dest_outcome": outcome_json(&self.last_dest),
            "migrations": self.migrations,
            "fds": open_fds()?,
            "rss_kib": rss_kib()?,
        }))
    }

    fn command(&mut self, line: &str) -> Result<Value> {
        let mut w = line.split_whitespace();
        match (w.next(), w.next(), w.next()) {
            (Some("boot"), None, _) => self.boot(),
            (Some("send"), Some(addr), f) => self.send(addr, parse_fault(f)?),
            (Some("receive"), f, None) => self.receive(parse_fault(f)?),
            (Some("resume"), None, _) => self.decide(true),
            (Some("discard"), None, _) => self.decide(false),
            (Some("verify"), None, _) => self.verify(),
            (Some("status"), None, _) => self.status(),
            _ => bail!("unknown command {line:?}"),
        }
    }
}

/// Runs the peer until standard input closes.
pub fn peer(args: SoakPeerArgs) -> Result<()> {
    livemig_kvm::kvm_usable().map_err(|why| anyhow!("KVM is not usable here: {why}"))?;
    let sec = args.chan.security()?;
    if matches!(sec, Security::Plain) {
        bail!("the soak runs over TLS only");
    }
    let mut p = Peer {
        args,
        sec,
        vm: None,
        pending: None,
        last_source: None,
        last_dest: None,
        migrations: 0,
        leaked_files: Vec::new(),
        leaked_mem: Vec::new(),
    };
    say(&json!({"event": "ready", "pid": std::process::id()}));
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading standard input")?;
        if line.trim().is_empty() {
            continue;
        }
        let reply = match p.command(&line) {
            Ok(v) => json!({"reply": line.trim(), "ok": true, "result": v}),
            Err(e) => json!({"reply": line.trim(), "ok": false, "error": format!("{e:#}")}),
        };
        say(&reply);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_unknown_ones_are_refused() {
        assert_eq!(parse_fault(None).unwrap(), None);
        assert_eq!(
            parse_fault(Some("cut@precopy1")).unwrap(),
            Some(Fault::Cut("precopy1".into()))
        );
        assert_eq!(
            parse_fault(Some("corrupt@resume")).unwrap(),
            Some(Fault::Corrupt("resume".into()))
        );
        assert!(parse_fault(Some("melt@compat")).is_err());
        assert!(parse_fault(Some("cut")).is_err());
    }

    /// A sink whose bytes the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl DataSink for Shared {
        fn close(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_armed_sink_flips_exactly_one_byte_once() {
        let out = Shared::default();
        let armed = Arc::new(AtomicBool::new(false));
        let mut c = Corrupting {
            inner: Box::new(out.clone()),
            armed: Arc::clone(&armed),
        };
        c.write_all(b"abc").unwrap();
        assert_eq!(*out.0.lock().unwrap(), b"abc", "not armed: nothing flipped");
        armed.store(true, Ordering::SeqCst);
        c.write_all(b"def").unwrap();
        c.write_all(b"ghi").unwrap();
        let mut want = b"abc".to_vec();
        want.extend_from_slice(&[b'd' ^ 0x5a, b'e', b'f']);
        want.extend_from_slice(b"ghi");
        assert_eq!(*out.0.lock().unwrap(), want);
        assert!(!armed.load(Ordering::SeqCst), "the switch is spent");
    }
}
