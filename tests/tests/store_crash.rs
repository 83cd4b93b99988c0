//! Crash safety of the store: a child process inserts, deletes and compacts in a loop, acknowledging every
//! committed operation on stdout; the parent SIGKILLs it at a random moment (often mid-commit), reopens the
//! store and checks that every acknowledged operation is there, byte-exact, and nothing else is half there.
//!
//! `PACHA_CRASH_TRIALS=200` runs a longer campaign; `PACHA_CRASH_SEED` replays one.
// Test code: helpers outside #[test] functions may unwrap and the child prints its acknowledgements.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use pacha_engine::Modality;
use pacha_engine::store::{
    Enrolment, ModalitySpec, Schema, Snapshot, Store, Template, check, l2_normalize,
};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "PACHA_CRASH_CHILD_DIR";
const CHILD_TEST: &str = "crash_child_worker";
const BATCH: usize = 40;
const MAX_OPS: usize = 400;

fn schema() -> Schema {
    Schema::new(vec![
        ModalitySpec {
            modality: Modality::Face,
            dim: 64,
        },
        ModalitySpec {
            modality: Modality::Finger(1),
            dim: 32,
        },
    ])
    .unwrap()
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn vector(seed: u64, dim: usize) -> Vec<f32> {
    (0..dim as u64)
        .map(|k| (mix(seed * 4096 + k) >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        .collect()
}

/// Record `i` of batch `b`: a face, plus a finger for two records in three.
fn record(b: usize, i: usize) -> Enrolment {
    let seed = (b * BATCH + i) as u64;
    let mut templates = vec![Template {
        modality: Modality::Face,
        vector: vector(seed * 2, 64),
        quality: 0.5,
    }];
    if !i.is_multiple_of(3) {
        templates.push(Template {
            modality: Modality::Finger(1),
            vector: vector(seed * 2 + 1, 32),
            quality: 0.25,
        });
    }
    Enrolment {
        subject_id: format!("S{b:04}-{i:02}"),
        templates,
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Op {
    Insert(usize),
    Delete(String),
    Compact,
}

/// The expected store contents: one entry per row, (batch, index, live).
#[derive(Clone, Debug, Default)]
struct Model {
    rows: Vec<(usize, usize, bool)>,
    batches: usize,
}

impl Model {
    /// The operation at step `s`, chosen deterministically from the model state.
    fn next_op(&self, s: usize) -> Op {
        let live: Vec<&(usize, usize, bool)> = self.rows.iter().filter(|r| r.2).collect();
        if s % 10 == 9 {
            Op::Compact
        } else if s % 3 == 2 && !live.is_empty() {
            let (b, i, _) = live[(s * 7919) % live.len()];
            Op::Delete(record(*b, *i).subject_id)
        } else {
            Op::Insert(self.batches)
        }
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Insert(b) => {
                self.rows.extend((0..BATCH).map(|i| (*b, i, true)));
                self.batches += 1;
            }
            Op::Delete(id) => {
                if let Some(r) = self
                    .rows
                    .iter_mut()
                    .find(|r| r.2 && record(r.0, r.1).subject_id == *id)
                {
                    r.2 = false;
                }
            }
            Op::Compact => self.rows.retain(|r| r.2),
        }
    }

    /// Whether `snap` holds exactly this model's state; `Err` says what differs.
    fn matches(&self, snap: &Snapshot) -> Result<(), String> {
        if snap.rows() != self.rows.len() {
            return Err(format!(
                "{} rows, model has {}",
                snap.rows(),
                self.rows.len()
            ));
        }
        let live = self.rows.iter().filter(|r| r.2).count();
        if snap.live() != live {
            return Err(format!("{} live, model has {live}", snap.live()));
        }
        for (row, &(b, i, is_live)) in self.rows.iter().enumerate() {
            let e = record(b, i);
            if snap.subject_id(row) != e.subject_id {
                return Err(format!(
                    "row {row} is {:?}, expected {:?}",
                    snap.subject_id(row),
                    e.subject_id
                ));
            }
            if snap.is_deleted(row) == is_live {
                return Err(format!(
                    "row {row} deleted = {}, expected {}",
                    snap.is_deleted(row),
                    !is_live
                ));
            }
            if is_live && snap.row_of(&e.subject_id) != Some(row) {
                return Err(format!(
                    "row_of({}) = {:?}",
                    e.subject_id,
                    snap.row_of(&e.subject_id)
                ));
            }
            for m in [Modality::Face, Modality::Finger(1)] {
                let want = e
                    .templates
                    .iter()
                    .find(|t| t.modality == m)
                    .map(|t| l2_normalize(&t.vector).unwrap());
                let got = snap.template(m, row);
                let same = match (&want, got) {
                    (None, None) => true,
                    (Some(w), Some(g)) => w.iter().zip(g).all(|(a, b)| a.to_bits() == b.to_bits()),
                    _ => false,
                };
                if !same {
                    return Err(format!("row {row} ({}) {m} template differs", e.subject_id));
                }
            }
        }
        Ok(())
    }
}

/// The child: runs operations until killed, acknowledging each committed one on stdout.
#[test]
fn crash_child_worker() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = Store::open(Path::new(&dir)).unwrap();
    let mut model = Model::default();
    let stdout = std::io::stdout();
    for s in 0..MAX_OPS {
        let op = model.next_op(s);
        match &op {
            Op::Insert(b) => {
                let recs: Vec<Enrolment> = (0..BATCH).map(|i| record(*b, i)).collect();
                assert_eq!(store.insert(&recs).unwrap().inserted, BATCH);
            }
            Op::Delete(id) => assert!(store.delete(id).unwrap()),
            Op::Compact => {
                store.compact().unwrap();
            }
        }
        model.apply(&op);
        let mut out = stdout.lock();
        writeln!(out, "ack {s}").unwrap();
        out.flush().unwrap();
    }
    writeln!(stdout.lock(), "done").unwrap();
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = mix(self.0);
        self.0 % n
    }
}

/// Operations acknowledged by a line `… ack N` (N + 1), else 0. libtest prints `test <name> ... ` before the
/// test's own output on the same line, so the marker is searched, not expected at the start.
fn ack_count(line: &str) -> usize {
    line.rsplit_once("ack ")
        .and_then(|(_, n)| n.trim().parse::<usize>().ok())
        .map_or(0, |n| n + 1)
}

/// One trial: returns the number of acknowledged operations.
fn trial(seed: u64) -> usize {
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    drop(Store::create(&dir, schema()).unwrap());
    let kill_after = 1 + rng.below(24) as usize;
    let delay = Duration::from_micros(rng.below(3000));
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            CHILD_TEST,
            "--nocapture",
            "--include-ignored",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = 0usize;
    let mut done = false;
    // Read acknowledgements until the kill point, then kill after a random sub-ms to ms delay.
    while acked < kill_after {
        match lines.next() {
            Some(Ok(l)) if l.contains("done") => {
                done = true;
                break;
            }
            Some(Ok(l)) => acked = acked.max(ack_count(&l)),
            _ => break,
        }
    }
    if !done {
        let t = Instant::now();
        while t.elapsed() < delay {
            std::hint::spin_loop();
        }
        child.kill().unwrap();
    }
    child.wait().unwrap();
    // Everything printed before the kill is acknowledged too.
    for l in lines.map_while(Result::ok) {
        acked = acked.max(ack_count(&l));
    }
    assert!(
        acked >= 1,
        "seed {seed}: the child acknowledged nothing (did it start?)"
    );

    let report = check(&dir).unwrap();
    assert!(
        report.is_clean(),
        "seed {seed}: check before reopen: {:?}",
        report.problems
    );
    let store = Store::open(&dir).unwrap();
    let snap = store.snapshot();
    let mut model = Model::default();
    for s in 0..acked {
        let op = model.next_op(s);
        model.apply(&op);
    }
    let committed = model.matches(&snap);
    let mut next = model.clone();
    let op = next.next_op(acked);
    next.apply(&op);
    let in_flight = next.matches(&snap);
    assert!(
        committed.is_ok() || in_flight.is_ok(),
        "seed {seed}: after {acked} acks the store matches neither the acknowledged state ({:?}) nor that plus the \
         in-flight {op:?} ({:?})",
        committed.err(),
        in_flight.err()
    );
    drop(snap);
    drop(store);
    let report = check(&dir).unwrap();
    assert!(
        report.is_clean() && report.warnings.is_empty(),
        "seed {seed}: check after reopen: {report:?}"
    );
    acked
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let trials: u64 = std::env::var("PACHA_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let base: u64 = std::env::var("PACHA_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    let start = Instant::now();
    let mut total = 0;
    for t in 0..trials {
        let seed = base.wrapping_add(t);
        total += trial(seed);
    }
    println!(
        "{trials} crash trials (base seed {base}), {total} acknowledged ops, {:.1?}",
        start.elapsed()
    );
}
