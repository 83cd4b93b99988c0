//! Power-loss simulation of the store (unit tests).
//!
//! A workload of inserts, deletes and a compaction runs against a store with the write layer's recorder on
//! ([`super::vfs::trace`]): every file creation, write, truncation, fsync, rename, removal and directory
//! fsync is logged in order, with the bytes written. A model of the disk replays the log (after each
//! operation the model's "everything reached the disk" state is compared with a copy of the real directory,
//! which proves the log explains every byte). At every cut point (before the first operation and after each
//! one) the harness builds states a power cut could leave, after the rules of a POSIX file system without
//! data journalling (the ALICE paper's "abstract persistence model"):
//!
//! - a file's content is what its last fsync made durable, plus any subset of the writes and truncations
//!   issued since, each either lost, applied, or torn: a byte prefix, a sector-granular prefix, the right
//!   length of zeros (size metadata persisted, data not), or an arbitrary subset of its 512-byte sectors
//!   (writes and sectors reordered);
//! - a directory's entries are what its last fsync made durable, plus a prefix (ordered metadata, as ext4
//!   journals it) or an arbitrary subset (weaker file systems) of the creations, renames and removals since;
//!   a file whose creation did not persist is gone whatever was fsynced into it.
//!
//! Each distinct state is written to a fresh directory and must: open read-only, pass [`super::check`],
//! open for writing, hold exactly the enrolments of the operations that had returned before the cut (bytes
//! identical: f32 row, i8 row and scale, quality), plus either all or none of the operation in flight, and
//! accept a further insert that a reopen then finds. The sweep is sized by `PACHA_POWERLOSS_ROUNDS` (the
//! workload repeated with new subjects, default 1) and `PACHA_POWERLOSS_VARIANTS` (random states per cut
//! point on top of the fixed ones, default 12).

use super::vfs::trace::{self, Files, Op, Skip};
use super::*;
use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};

const FACE: Modality = Modality::Face;
const F2: Modality = Modality::Finger(2);
const SECTOR: u64 = 512;

fn schema() -> Schema {
    Schema::of([(FACE, 24), (F2, 16)])
}

/// Deterministic xorshift generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn enrolment(id: &str, seed: u64, mods: &[Modality]) -> Enrolment {
    let s = schema();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    Enrolment {
        subject_id: id.to_string(),
        templates: mods
            .iter()
            .map(|&m| Template {
                modality: m,
                vector: (0..s.dim(m).unwrap())
                    .map(|_| (rng.below(2000) as f32 - 1000.0) / 997.0)
                    .collect(),
                quality: rng.below(11) as f32 / 10.0,
            })
            .collect(),
    }
}

/// One step of the workload.
enum Step {
    Insert(Vec<Enrolment>),
    Delete(Vec<String>),
    Compact,
}

/// The workload: inserts of 1 to 5 enrolments (some with one modality only, some already enrolled and
/// unchanged), deletes, a compaction and a re-enrolment of a deleted ID; `rounds` times with fresh IDs.
fn workload(rounds: usize) -> Vec<Step> {
    let both = [FACE, F2];
    let mut steps = Vec::new();
    for r in 0..rounds {
        let id = |k: usize| format!("r{r}-s{k}");
        let e = |k: usize, mods: &[Modality]| enrolment(&id(k), (r * 1000 + k) as u64, mods);
        steps.push(Step::Insert(vec![e(0, &both), e(1, &[FACE]), e(2, &both)]));
        steps.push(Step::Insert(vec![e(3, &[F2])]));
        steps.push(Step::Insert(vec![
            e(1, &[FACE]),
            e(4, &both),
            e(2, &both),
            e(5, &both),
            e(6, &[FACE]),
        ]));
        steps.push(Step::Delete(vec![id(2), id(4)]));
        steps.push(Step::Insert((7..11).map(|k| e(k, &both)).collect()));
        steps.push(Step::Compact);
        steps.push(Step::Insert(vec![e(11, &both), e(12, &[F2])]));
        steps.push(Step::Delete(vec![id(0)]));
        // Re-enrols a deleted ID with other templates.
        steps.push(Step::Insert(vec![
            enrolment(&id(2), 77 + r as u64, &both),
            e(13, &[FACE]),
        ]));
    }
    steps
}

/// What a store holds: subject ID of every live row to its bytes (per modality: presence, f32 row, i8 row,
/// scale, quality).
type Content = BTreeMap<String, Vec<u8>>;

fn content(snap: &Snapshot) -> Content {
    let mut out = Content::new();
    for r in 0..snap.rows() {
        if snap.is_deleted(r) {
            continue;
        }
        let mut b = Vec::new();
        for m in snap.schema().modality_list() {
            match (snap.template(m, r), snap.template_i8(m, r)) {
                (Some(t), Some((q, scale))) => {
                    b.push(1);
                    b.extend(t.iter().flat_map(|x| x.to_le_bytes()));
                    b.extend(q.iter().map(|&x| x as u8));
                    b.extend(scale.to_le_bytes());
                    b.extend(snap.quality(m, r).to_le_bytes());
                }
                (None, None) => b.push(0),
                _ => b.push(2),
            }
        }
        let prev = out.insert(snap.subject_id(r).to_string(), b);
        assert!(prev.is_none(), "two live rows of {}", snap.subject_id(r));
    }
    assert_eq!(out.len(), snap.live(), "live count disagrees with the rows");
    out
}

/// Runs the workload on a fresh store in `dir` with the recorder on. Returns the trace and the content
/// after each step (`states[0]` before the first). Step `i` is bracketed by marks `2i` (begins) and
/// `2i + 1` (returned).
fn run_traced(
    dir: &Path,
    steps: &[Step],
    skip: Option<Skip>,
) -> (trace::Trace, Files, Vec<Content>) {
    let store = Store::create(dir, schema()).unwrap();
    let initial = trace::read_files(dir);
    let mut states = vec![content(&store.snapshot())];
    trace::start(dir);
    trace::set_skip(skip);
    for (i, step) in steps.iter().enumerate() {
        trace::mark(2 * i);
        match step {
            Step::Insert(es) => {
                store.insert(es).unwrap();
            }
            Step::Delete(ids) => {
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                store.delete_all(&ids).unwrap();
            }
            Step::Compact => {
                store.compact().unwrap();
            }
        }
        trace::mark(2 * i + 1);
        states.push(content(&store.snapshot()));
    }
    trace::set_skip(None);
    let t = trace::stop();
    (t, initial, states)
}

/// A write or truncation issued to a file and not yet fsynced.
#[derive(Clone, Debug)]
enum FileOp {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

/// A change to the directory not yet made durable by a directory fsync.
#[derive(Clone, Debug)]
enum DirOp {
    Link(String, usize),
    Rename(String, String, usize),
    Unlink(String),
}

#[derive(Clone, Debug, Default)]
struct Inode {
    durable: Vec<u8>,
    pending: Vec<FileOp>,
}

/// The disk as the trace has left it so far: what is durable, and what is issued but not yet durable.
#[derive(Clone, Debug, Default)]
struct Model {
    inodes: Vec<Inode>,
    durable_dir: BTreeMap<String, usize>,
    live_dir: BTreeMap<String, usize>,
    pending_dir: Vec<DirOp>,
}

/// How one pending file operation fares in a power cut.
#[derive(Clone, Debug)]
enum Fate {
    Applied,
    Lost,
    /// Only the first this many bytes of the write reached the disk.
    Prefix(usize),
    /// The file grew to cover the write, its bytes did not arrive (zeros).
    Zeros,
    /// Only the write's 512-byte sectors whose flag is set reached the disk.
    Sectors(Vec<bool>),
}

fn apply(data: &mut Vec<u8>, op: &FileOp, fate: &Fate) {
    let write = |data: &mut Vec<u8>, off: usize, bytes: &[u8]| {
        if data.len() < off + bytes.len() {
            data.resize(off + bytes.len(), 0);
        }
        data[off..off + bytes.len()].copy_from_slice(bytes);
    };
    match (op, fate) {
        (_, Fate::Lost) => {}
        (FileOp::SetLen(n), _) => data.resize(*n as usize, 0),
        (FileOp::Write(off, b), Fate::Applied) => write(data, *off as usize, b),
        (FileOp::Write(off, b), Fate::Prefix(n)) => write(data, *off as usize, &b[..*n]),
        (FileOp::Write(off, b), Fate::Zeros) => write(data, *off as usize, &vec![0; b.len()]),
        (FileOp::Write(off, b), Fate::Sectors(keep)) => {
            for (k, chunk) in sector_chunks(*off, b.len()).into_iter().enumerate() {
                if keep[k] {
                    write(data, *off as usize + chunk.0, &b[chunk.0..chunk.1]);
                }
            }
        }
    }
}

/// The byte ranges (within the write) of the disk sectors a write at `off` of `len` bytes touches.
fn sector_chunks(off: u64, len: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < len {
        let abs = off + pos as u64;
        let end = ((abs / SECTOR + 1) * SECTOR - off) as usize;
        let end = end.min(len);
        out.push((pos, end));
        pos = end;
    }
    out
}

impl Model {
    fn from_files(files: &Files) -> Model {
        let mut m = Model::default();
        for (name, bytes) in files {
            m.inodes.push(Inode {
                durable: bytes.clone(),
                pending: Vec::new(),
            });
            m.durable_dir.insert(name.clone(), m.inodes.len() - 1);
        }
        m.live_dir = m.durable_dir.clone();
        m
    }

    fn ino(&self, name: &str) -> usize {
        *self
            .live_dir
            .get(name)
            .unwrap_or_else(|| panic!("operation on {name}, which the model does not have"))
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Create(name) => {
                self.inodes.push(Inode::default());
                let ino = self.inodes.len() - 1;
                self.live_dir.insert(name.clone(), ino);
                self.pending_dir.push(DirOp::Link(name.clone(), ino));
            }
            Op::Write(name, off, b) => {
                let ino = self.ino(name);
                self.inodes[ino]
                    .pending
                    .push(FileOp::Write(*off, b.clone()));
            }
            Op::SetLen(name, n) => {
                let ino = self.ino(name);
                self.inodes[ino].pending.push(FileOp::SetLen(*n));
            }
            Op::Fsync(name) => {
                let ino = self.ino(name);
                let node = &mut self.inodes[ino];
                for op in std::mem::take(&mut node.pending) {
                    apply(&mut node.durable, &op, &Fate::Applied);
                }
            }
            Op::Rename(from, to) => {
                let ino = self.ino(from);
                self.live_dir.remove(from);
                self.live_dir.insert(to.clone(), ino);
                self.pending_dir
                    .push(DirOp::Rename(from.clone(), to.clone(), ino));
            }
            Op::Remove(name) => {
                self.ino(name);
                self.live_dir.remove(name);
                self.pending_dir.push(DirOp::Unlink(name.clone()));
            }
            Op::SyncDir => {
                self.durable_dir = self.live_dir.clone();
                self.pending_dir.clear();
            }
            Op::Mark(_) => {}
        }
    }

    /// The files a power cut leaves: directory operations kept where `keep_dir(i)`, each pending file
    /// operation faring as `fate` says.
    fn crash(
        &self,
        keep_dir: impl Fn(usize) -> bool,
        mut fate: impl FnMut(&FileOp) -> Fate,
    ) -> Files {
        let mut names = self.durable_dir.clone();
        for (i, op) in self.pending_dir.iter().enumerate() {
            if !keep_dir(i) {
                continue;
            }
            match op {
                DirOp::Link(n, ino) => {
                    names.insert(n.clone(), *ino);
                }
                DirOp::Rename(a, b, ino) => {
                    if names.get(a) == Some(ino) {
                        names.remove(a);
                        names.insert(b.clone(), *ino);
                    }
                }
                DirOp::Unlink(n) => {
                    names.remove(n);
                }
            }
        }
        names
            .into_iter()
            .map(|(name, ino)| {
                let node = &self.inodes[ino];
                let mut data = node.durable.clone();
                for op in &node.pending {
                    let f = fate(op);
                    apply(&mut data, op, &f);
                }
                (name, data)
            })
            .collect()
    }

    /// Everything issued reached the disk.
    fn live(&self) -> Files {
        let mut m = self.clone();
        m.pending_dir.clear();
        m.durable_dir = m.live_dir.clone();
        m.crash(|_| true, |_| Fate::Applied)
    }
}

fn random_fate(rng: &mut Rng, op: &FileOp) -> Fate {
    let FileOp::Write(off, b) = op else {
        return if rng.chance(50) {
            Fate::Applied
        } else {
            Fate::Lost
        };
    };
    match rng.below(100) {
        0..35 => Fate::Applied,
        35..60 => Fate::Lost,
        60..70 => Fate::Prefix(rng.below(b.len() as u64 + 1) as usize),
        70..80 => {
            let chunks = sector_chunks(*off, b.len());
            let keep = rng.below(chunks.len() as u64 + 1) as usize;
            Fate::Prefix(if keep == 0 { 0 } else { chunks[keep - 1].1 })
        }
        80..88 => Fate::Zeros,
        _ => {
            let n = sector_chunks(*off, b.len()).len();
            Fate::Sectors((0..n).map(|_| rng.chance(50)).collect())
        }
    }
}

/// Figures of one sweep.
#[derive(Debug, Default)]
struct Sweep {
    ops: usize,
    cut_points: usize,
    trials: usize,
    unopenable: usize,
    lost_acknowledged: usize,
    failures: Vec<String>,
}

fn fingerprint(files: &Files) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    files.hash(&mut h);
    h.finish()
}

/// Scratch space for the crash states: tmpfs when there is one (fsyncs there cost nothing).
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::Builder::new()
            .prefix("pacha-powerloss")
            .tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().unwrap()
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Opens, checks and extends one crash state written to `dir`; `Err` describes what went wrong.
fn trial(dir: &Path, allowed: &[&Content], sweep: &mut Sweep, n: usize) -> Result<(), String> {
    let expect_one_of = |got: &Content, what: &str| -> Result<(), String> {
        if allowed.contains(&got) {
            return Ok(());
        }
        let base = allowed[0];
        let lost = base.iter().filter(|(k, v)| got.get(*k) != Some(v)).count();
        Err(format!(
            "{what}: content matches no allowed state ({} live rows; {lost} acknowledged enrolments \
             missing or changed)",
            got.len()
        ))
    };
    let ro = Store::open_read_only(dir).map_err(|e| {
        sweep.unopenable += 1;
        format!("read-only open: {e}")
    })?;
    let got = content(&ro.snapshot());
    drop(ro);
    if let Err(e) = expect_one_of(&got, "read-only open") {
        sweep.lost_acknowledged += allowed[0]
            .iter()
            .filter(|(k, v)| got.get(*k) != Some(v))
            .count();
        return Err(e);
    }
    let report = check(dir).map_err(|e| format!("check: {e}"))?;
    if !report.is_clean() {
        return Err(format!("check: {:?}", report.problems));
    }
    let store = Store::open(dir).map_err(|e| {
        sweep.unopenable += 1;
        format!("writer open: {e}")
    })?;
    let got = content(&store.snapshot());
    if let Err(e) = expect_one_of(&got, "writer open") {
        sweep.lost_acknowledged += allowed[0]
            .iter()
            .filter(|(k, v)| got.get(*k) != Some(v))
            .count();
        return Err(e);
    }
    let extra = enrolment(&format!("extra-{n}"), 5_000_000 + n as u64, &[FACE, F2]);
    store
        .insert(std::slice::from_ref(&extra))
        .map_err(|e| format!("further insert: {e}"))?;
    let mut want = got;
    want.extend(
        content(&store.snapshot())
            .remove(&extra.subject_id)
            .map(|b| (extra.subject_id.clone(), b)),
    );
    drop(store);
    let reopened = Store::open_read_only(dir).map_err(|e| format!("reopen after insert: {e}"))?;
    let after = content(&reopened.snapshot());
    if after != want || !after.contains_key(&extra.subject_id) {
        return Err("reopen after the further insert: content differs".into());
    }
    drop(reopened);
    let report = check(dir).map_err(|e| format!("check after insert: {e}"))?;
    if !report.is_clean() {
        return Err(format!("check after insert: {:?}", report.problems));
    }
    Ok(())
}

/// Runs the workload traced, then every cut point with `variants` random states on top of the fixed ones.
fn sweep(rounds: usize, variants: usize, skip: Option<Skip>, seed: u64) -> Sweep {
    let work = scratch();
    let steps = workload(rounds);
    let traced_dir = work.path().join("traced");
    let (tr, initial, states) = run_traced(&traced_dir, &steps, skip);
    let mut model = Model::from_files(&initial);
    let mut sw = Sweep {
        ops: tr.ops.iter().filter(|o| !matches!(o, Op::Mark(_))).count(),
        ..Sweep::default()
    };
    let mut seen = HashSet::new();
    let mut rng = Rng(seed | 1);
    let (mut begun, mut returned) = (0usize, 0usize);
    for k in 0..=tr.ops.len() {
        if k > 0 {
            let op = &tr.ops[k - 1];
            model.step(op);
            match op {
                Op::Mark(m) if m % 2 == 0 => begun += 1,
                Op::Mark(_) => returned += 1,
                _ => {}
            }
            // The log explains the disk: replaying it gives exactly the directory's files.
            assert!(
                model.live() == tr.disk[k - 1],
                "after operation {} ({op:?}) the disk differs from the replayed log: a write bypassed \
                 the store's write layer",
                k - 1
            );
            if matches!(op, Op::Mark(_)) {
                continue;
            }
        }
        sw.cut_points += 1;
        let mut allowed = vec![&states[returned]];
        if begun > returned {
            allowed.push(&states[returned + 1]);
        }
        let nd = model.pending_dir.len();
        let mut candidates: Vec<Files> = vec![
            model.crash(|_| false, |_| Fate::Lost),
            model.crash(|_| true, |_| Fate::Applied),
            model.crash(|_| true, |_| Fate::Lost),
            model.crash(|_| false, |_| Fate::Applied),
        ];
        // Each pending directory operation alone, and all but it (reordered metadata), data all persisted.
        for i in 0..nd {
            candidates.push(model.crash(|j| j == i, |_| Fate::Applied));
            candidates.push(model.crash(|j| j != i, |_| Fate::Applied));
        }
        for _ in 0..variants {
            let state = if rng.chance(50) {
                let p = rng.below(nd as u64 + 1) as usize;
                let r = &mut rng;
                let mut fates = |op: &FileOp| random_fate(r, op);
                model.crash(|i| i < p, &mut fates)
            } else {
                let keep: Vec<bool> = (0..nd).map(|_| rng.chance(50)).collect();
                let r = &mut rng;
                let mut fates = |op: &FileOp| random_fate(r, op);
                model.crash(|i| keep[i], &mut fates)
            };
            candidates.push(state);
        }
        for files in candidates {
            if !seen.insert((k, fingerprint(&files))) {
                continue;
            }
            sw.trials += 1;
            let dir = work.path().join(format!("t{}", sw.trials));
            create_private_dir_all(&dir).unwrap();
            for (name, bytes) in &files {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
            let n = sw.trials;
            if let Err(e) = trial(&dir, &allowed, &mut sw, n) {
                let at = k.checked_sub(1).map(|i| &tr.ops[i]);
                let op = match at {
                    Some(Op::Write(name, off, b)) => format!("write {name} @{off} ({} B)", b.len()),
                    Some(o) => format!("{o:?}"),
                    None => "start".into(),
                };
                sw.failures
                    .push(format!("cut after op {k} [{op}], trial {n}: {e}"));
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
    sw
}

fn report(name: &str, sw: &Sweep) {
    eprintln!(
        "powerloss {name}: {} operations traced, {} cut points, {} crash states opened; {} failed \
         ({} unopenable, {} acknowledged enrolments lost or changed)",
        sw.ops,
        sw.cut_points,
        sw.trials,
        sw.failures.len(),
        sw.unopenable,
        sw.lost_acknowledged
    );
}

#[test]
fn power_cut_at_every_point_of_an_ingest_loses_nothing_acknowledged() {
    let rounds = env_usize("PACHA_POWERLOSS_ROUNDS", 1);
    let variants = env_usize("PACHA_POWERLOSS_VARIANTS", 12);
    let sw = sweep(rounds, variants, None, 0x5EED);
    report("sweep", &sw);
    assert!(
        sw.failures.is_empty(),
        "{} of {} crash states failed, first: {:#?}",
        sw.failures.len(),
        sw.trials,
        &sw.failures[..sw.failures.len().min(10)]
    );
    // The sweep is what it claims to be: every operation of the workload is a cut point, and there are
    // thousands of distinct states at the default size.
    assert_eq!(sw.cut_points, sw.ops + 1);
    if variants >= 12 {
        assert!(
            sw.trials >= 1000 * rounds,
            "only {} crash states",
            sw.trials
        );
    }
}

#[test]
fn the_harness_catches_a_missing_directory_fsync() {
    // Without directory fsyncs a returned insert's manifest rename can be undone by the cut.
    let sw = sweep(1, 4, Some(Skip::DirSync), 7);
    report("no-dir-fsync", &sw);
    assert!(sw.lost_acknowledged > 0, "{sw:?}");
}

#[test]
fn the_harness_catches_a_missing_file_fsync() {
    // Without file fsyncs a committed manifest can name bytes that never reached the disk.
    let sw = sweep(1, 4, Some(Skip::FileSync), 11);
    report("no-file-fsync", &sw);
    assert!(sw.unopenable + sw.lost_acknowledged > 0, "{sw:?}");
}

#[test]
fn sector_chunks_follow_sector_boundaries() {
    assert_eq!(sector_chunks(0, 10), vec![(0, 10)]);
    assert_eq!(sector_chunks(500, 20), vec![(0, 12), (12, 20)]);
    assert_eq!(sector_chunks(512, 1024), vec![(0, 512), (512, 1024)]);
    assert_eq!(sector_chunks(64, 0), vec![]);
}
