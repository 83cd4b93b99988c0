//! Identify batches with a completeness audit: [`Engine::identify_batch`] answers many probes and proves,
//! on a seeded sample of them, how much of what an exact search of the gallery reports the candidate path
//! found (the contract of [`crate::audit`], for 1:N search).
//!
//! For each sampled probe the oracle is an exact blocked-GEMM threshold join of the probe against every
//! enrolment, per modality at the complete candidate cosine of the run's floor
//! ([`pacha_index::exact::threshold_join`], none of the IVF code), fused. The audit reports:
//! - **contract recall**: the exact search's candidates at or above the threshold, cut to `max_results` by the
//!   same order as the answer (score, then subject ID), and how many the answer holds;
//! - **boundary recall** per modality: the enrolments whose cosine reaches the candidate cosine and how many
//!   the candidate path reached (the hardest rows for the index: the hits sit above them); for a probe
//!   answered by a joint scan ([`BatchScan`]), the enrolments among those whose exact cosines pass the
//!   scan's test, all of which it must have kept (boundary entry `joint(…)`).
//!
//! The verdict follows the dedup audit: complete by construction when no index is used (an exact scan of every
//! enrolment, or of a named gallery) or every probe took an exact or joint scan and the sample shows no miss,
//! else the contract figure when the sample holds enough pairs to bound recall at `min_recall` (or shows a
//! miss), else the boundary figure.

use crate::audit::{AuditOptions, RecallFigure, pairs_needed};
use crate::engine::{IdentifyOptions, IdentifyResult, answer, probe_candidate_cosines};
use crate::fusion::{Calibration, threshold_for_fpir};
use crate::joint::{Preparation, ProbeScan};
use crate::matcher::{Probe, compare_probe};
use crate::store::Snapshot;
use crate::store::Template;
use crate::{Engine, EngineError};
use pacha_index::RowsF32;
use pacha_index::kernels::dot_f32;
use pacha_index::rng::SplitMix;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

/// Default probes an identify batch audits.
pub const DEFAULT_IDENTIFY_AUDIT_PROBES: usize = 200;

/// The answers to a batch of probes and the batch's completeness audit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdentifyBatch {
    /// One answer per probe, in order.
    pub results: Vec<IdentifyResult>,
    /// The audit (`None` when turned off).
    pub audit: Option<IdentifyAudit>,
    /// How long each probe's answer took (the audit excluded).
    #[serde(default)]
    pub latency: Latency,
}

/// Wall-clock time per probe of an identify batch, in milliseconds: what a caller waiting on one answer sees.
///
/// Probes searched one by one run one after another (each uses every core for its own search): theirs are
/// single-probe latencies. A probe answered by a joint scan is charged its share of the scan (the scan's
/// time over its probes) plus its own exact rescoring: a cost per probe, not the wait of one caller (all its
/// answers come at the scan's end; `joint_scans` shows each scan). The first probe of a process searched on
/// its own also plans the index's probe rule for its candidate cosine (a pilot, cached afterwards):
/// `first_ms` shows the batch's first probe apart.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Probes timed.
    pub probes: usize,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest probe.
    pub max_ms: f64,
    /// The first probe (the one that may have planned the probe rule).
    pub first_ms: f64,
    /// The batch's joint scans (each probe they answered is charged its share of the scan plus its own
    /// exact rescoring).
    #[serde(default)]
    pub joint_scans: Vec<JointScanInfo>,
}

/// One joint scan of an identify batch: a group of probes holding the same fused modalities against every
/// enrolment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JointScanInfo {
    /// The scan's members, e.g. `joint(face+finger2+finger7)`.
    pub key: String,
    /// Probes of the group.
    pub probes: usize,
    /// Seconds of the scan (the exact rescoring excluded).
    pub seconds: f64,
    /// Probe × enrolment pairs scanned.
    pub pairs: u64,
    /// Pairs the scan kept (then compared exactly).
    pub kept: u64,
    /// Predicted milliseconds per probe of the scan.
    pub predicted_ms_per_probe: f64,
    /// Predicted milliseconds per probe searched on its own (`auto` chose from the two; `None` when the
    /// joint scan was asked for), with its share of the pilots the index would run first to plan the search
    /// where it has not yet, less what earlier joint scans of these modalities cost over one-by-one search.
    pub predicted_ms_one_by_one: Option<f64>,
    /// Stored rows whose preparation for the scan (row parameters, packed codes) an earlier batch left in
    /// the engine ([`crate::joint::ScanCache`]); the rest were prepared for this batch, inside `seconds`.
    #[serde(default)]
    pub reused_rows: usize,
}

impl Latency {
    /// The summary of per-probe times `ms` (in probe order); nearest-rank percentiles.
    pub fn of(ms: &[f64]) -> Latency {
        if ms.is_empty() {
            return Latency::default();
        }
        let mut sorted = ms.to_vec();
        sorted.sort_by(f64::total_cmp);
        let q =
            |p: f64| sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
        Latency {
            probes: ms.len(),
            mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p99_ms: q(0.99),
            max_ms: sorted[sorted.len() - 1],
            first_ms: ms[0],
            joint_scans: Vec::new(),
        }
    }
}

/// How complete an identify batch's answers are, measured against exact search on sampled probes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IdentifyAudit {
    /// Probes searched exactly.
    pub sampled_probes: usize,
    /// Probes in the batch.
    pub probes: usize,
    /// Seed of the sample.
    pub seed: u64,
    /// The decision threshold.
    pub threshold: f64,
    /// Exact search's candidates at or above the threshold (top `max_results`) that the answers hold.
    pub contract: RecallFigure,
    /// Per modality: enrolments at or above the candidate cosine that the candidate path reached.
    pub boundary: Vec<(String, Option<RecallFigure>)>,
    /// All modalities' boundary figures pooled.
    pub boundary_pooled: RecallFigure,
    /// The recall the verdict rests on (a 95 % lower bound).
    pub lower_bound: f64,
    /// Which evidence `lower_bound` comes from, in words.
    pub evidence: String,
    /// The recall the batch had to prove.
    pub min_recall: f64,
    /// True iff `lower_bound ≥ min_recall`.
    pub passed: bool,
    /// Seconds of exact search.
    pub seconds: f64,
    /// The identify path of each modality searched through the index (`(modality, "ivf" | "sketch" |
    /// "exact")`, see [`crate::idpath`]); empty when no index was used.
    #[serde(default)]
    pub paths: Vec<(String, String)>,
}

/// How an identify batch searches its probes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchScan {
    /// The joint scan ([`crate::joint::ProbeScan`]) for each group of probes holding the same fused
    /// modalities where it is predicted cheaper than searching the group's probes one by one.
    #[default]
    Auto,
    /// The joint scan for every group it can serve (at most [`pacha_index::joint::MAX_JOINT`] fused
    /// modalities, each with i8 codes); the others one by one.
    Joint,
    /// Every probe searched on its own (the index's paths, or an exact scan).
    PerProbe,
}

/// Seconds per probe × row pair and per code byte of the joint scan, both cores (the i8 products and the
/// test; measured, see BENCHMARKS.md "Joint scan of identify batches").
const JOINT_PAIR_BYTE_S: f64 = 2.0e-12;
/// Seconds per stored code byte of each band of up to 512 probes (packing the rows' codes), and once per
/// batch (their L1 bounds and row parameters), both cores: 0.27–0.45 ns measured at 1 M face + 2 fingers
/// with 1 to 100 probes (one band), 0.11 ns with 945 (two).
const JOINT_ROW_BYTE_S: f64 = 0.3e-9;

/// Seconds per stored code byte of each band of up to 512 probes when the stored rows were prepared before
/// ([`crate::joint::ScanCache`]): streaming their packed codes, both cores; 0.061–0.069 ns measured with one
/// probe at 1 M face + 2 fingers (16 GB/s).
const JOINT_STREAM_BYTE_S: f64 = 0.065e-9;

/// Seconds per stored code byte of preparing every row for later scans ([`crate::joint::ScanCache`]), both
/// cores: 1.33 s for 1.06 GB at 1 M face + 2 fingers (fresh memory written), turin.
const JOINT_PREPARE_BYTE_S: f64 = 1.25e-9;

/// Predicted milliseconds of the joint scan of `probes` probes against `rows` rows of `bytes` code bytes,
/// with the first `prepared` rows prepared by an earlier batch (`None`: prepared by the scan itself, every
/// band packing them again).
fn joint_ms(rows: usize, bytes: usize, probes: usize, prepared: Option<usize>) -> f64 {
    let base = rows as f64 * bytes as f64;
    let bands = probes.div_ceil(pacha_index::exact_i8::QUERY_TILE) as f64;
    let products = base * probes as f64 * JOINT_PAIR_BYTE_S;
    let rest = match prepared {
        Some(p) => {
            let new = rows.saturating_sub(p) as f64 * bytes as f64;
            base * bands * JOINT_STREAM_BYTE_S + new * JOINT_ROW_BYTE_S
        }
        None => base * (bands + 1.0) * JOINT_ROW_BYTE_S,
    };
    (products + rest) * 1e3
}

/// Predicted milliseconds of one joint scan of `probes` probes over `rows` stored rows of `bytes` code bytes,
/// by what the scan cache holds for the member set: unseen (the scan packs its own rows), seen once (this
/// scan prepares every row, then streams them prepared), or prepared up to some row.
fn joint_state_ms(state: Preparation, rows: usize, bytes: usize, probes: usize) -> f64 {
    match state {
        Preparation::Unseen => joint_ms(rows, bytes, probes, None),
        Preparation::Seen => {
            joint_ms(rows, bytes, probes, Some(rows))
                + rows as f64 * bytes as f64 * JOINT_PREPARE_BYTE_S * 1e3
        }
        Preparation::Prepared(p) => joint_ms(rows, bytes, probes, Some(p)),
    }
}

/// Predicted milliseconds per probe of searching `probes` probes one by one at `one` ms each when the
/// index must first run `pilots` ms of pilots to plan the search, of which earlier joint scans of the same
/// modalities have already "paid" `rent` ms by costing that much more than one-by-one search (ski rental:
/// joint scans are rented until their extra cost reaches the pilots' price, then the search is planned).
fn one_by_one_ms(one: f64, pilots: f64, rent: f64, probes: usize) -> f64 {
    one + (pilots - rent).max(0.0) / probes.max(1) as f64
}

/// A group of the batch's probes answered by one joint scan.
struct JointGroup {
    scan: ProbeScan,
    /// Positions of the group's probes in the batch.
    probes: Vec<usize>,
    /// Per probe of the group, the rows the scan kept.
    kept: Vec<Vec<usize>>,
    /// Why the group took the joint scan: predicted ms per probe joint, and one by one (`auto` only).
    predicted: (f64, Option<f64>),
}

impl Engine {
    /// Predicted milliseconds of searching `probe` on its own: per modality, the index's cached plan, or
    /// without one the cheaper of its exact and sketch scans ([`crate::AnnSet::identify_estimate`], no pilot
    /// run); an exact scan of every row without an index. With the milliseconds of the pilots the first
    /// such search would run to plan its modalities (0 where planned, or without an index).
    fn per_probe_ms(
        &self,
        snap: &Snapshot,
        cal: &Calibration,
        probe: &Probe,
        floor: f64,
        ann: Option<&crate::AnnSet>,
    ) -> (f64, f64) {
        let (mut ms, mut pilots) = (0.0, 0.0);
        for (mi, c) in probe_candidate_cosines(snap, cal, probe, floor)
            .into_iter()
            .enumerate()
        {
            let Some(c) = c else { continue };
            let spec = &snap.schema().modalities[mi];
            let (one, pilot) = match ann {
                Some(a) => {
                    let impostor = cal
                        .model(spec.modality)
                        .map(|m| (m.impostor.mean, m.impostor.sd));
                    a.identify_estimate(snap, mi, c, impostor)
                }
                None => (
                    snap.rows() as f64 * crate::idpath::EXACT_ROW_S_512 * spec.dim as f64 / 512.0
                        * 1e3,
                    0.0,
                ),
            };
            ms += one;
            pilots += pilot;
        }
        (ms, pilots)
    }

    /// Identifies every probe of `probes` ([`Engine::identify`], one answer each) and audits the batch on a
    /// seeded sample of `audit.probes` probes (0 turns the audit off). Every probe is validated before any is
    /// searched; an invalid one is named by its position (`probe 7`).
    ///
    /// Probes holding the same fused modalities form a group; a group is answered by one joint scan of
    /// every probe × enrolment pair through those modalities' i8 codes ([`crate::joint::ProbeScan`],
    /// complete by construction) where `options.batch_scan` asks for it or predicts it cheaper than
    /// searching the probes one by one, else probe by probe. A named gallery is always compared exactly.
    pub fn identify_batch(
        &self,
        probes: &[Vec<Template>],
        options: &IdentifyOptions<'_>,
        audit: &AuditOptions,
    ) -> Result<IdentifyBatch, EngineError> {
        // One snapshot and calibration for every search and the audit: rows committed meanwhile are in
        // neither, so the audit checks exactly what the searches saw.
        let snap = self.snapshot();
        let valid: Vec<Probe> = probes
            .iter()
            .enumerate()
            .map(|(i, p)| Probe::new(&format!("probe {i}"), p, snap.schema()))
            .collect::<Result<_, _>>()?;
        let cal = self.matching_calibration(&snap)?;
        if options.max_results == 0 {
            return Err(EngineError::InvalidArgument(
                "max_results must be at least 1".into(),
            ));
        }
        let n = match options.gallery {
            Some(g) => g.len(),
            None => snap.live(),
        };
        let threshold = threshold_for_fpir(options.target_fpir, n)?;
        let floor = options.min_score.unwrap_or(threshold);
        let ann = self.usable_ann()?.filter(|a| a.covers(&snap));
        let indexed = options.gallery.is_none()
            && snap.live() > crate::candidates::AUTO_EXACT_MAX_ROWS
            && ann.is_some();
        // Groups by the fused modalities each probe holds.
        let mut groups: BTreeMap<Vec<usize>, Vec<usize>> = BTreeMap::new();
        if options.gallery.is_none() && options.batch_scan != BatchScan::PerProbe {
            for (i, p) in valid.iter().enumerate() {
                let members: Vec<usize> = snap
                    .schema()
                    .modalities
                    .iter()
                    .enumerate()
                    .filter(|&(mi, s)| {
                        p.templates[mi].is_some() && cal.position(s.modality).is_some()
                    })
                    .map(|(mi, _)| mi)
                    .collect();
                groups.entry(members).or_default().push(i);
            }
        }
        let mut joint: Vec<JointGroup> = Vec::new();
        for (members, idx) in groups {
            let Some(scan) = ProbeScan::new(&snap, &cal, floor, &members)? else {
                continue;
            };
            let bytes: usize = members
                .iter()
                .map(|&mi| snap.schema().modalities[mi].dim)
                .sum();
            let n = idx.len() as f64;
            let state = self.scan_cache.state(&snap, &scan);
            let per_joint = joint_state_ms(state, snap.rows(), bytes, idx.len()) / n;
            // One by one: every probe's search, plus the pilots that would plan it where the index has not
            // yet, less what earlier joint scans of the set cost over searching one by one (rent until the
            // rent paid equals the price of buying: a long-lived engine plans once it has paid that much,
            // a one-shot batch of a few probes never pays for a pilot it would not amortise).
            let one_by_one = (options.batch_scan == BatchScan::Auto).then(|| {
                let (one, pilots) = self.per_probe_ms(
                    &snap,
                    &cal,
                    &valid[idx[0]],
                    floor,
                    ann.as_deref().filter(|_| indexed),
                );
                let rent = self.scan_cache.rent_ms(&snap, &scan);
                tracing::debug!(
                    "{}: {} probes: joint {per_joint:.2} ms per probe ({state:?}); one by one {one:.2} ms + pilots {pilots:.0} ms less {rent:.0} ms paid",
                    scan.key,
                    idx.len()
                );
                (one, one_by_one_ms(one, pilots, rent, idx.len()))
            });
            if one_by_one.is_none_or(|(_, one)| per_joint < one) {
                if let Some((one, _)) = one_by_one {
                    self.scan_cache
                        .add_rent(&snap, &scan, ((per_joint - one) * n).max(0.0));
                }
                joint.push(JointGroup {
                    scan,
                    probes: idx,
                    kept: Vec::new(),
                    predicted: (per_joint, one_by_one.map(|(_, with_pilots)| with_pilots)),
                });
            }
        }
        let mut results: Vec<Option<IdentifyResult>> = vec![None; valid.len()];
        let mut ms = vec![0.0f64; valid.len()];
        let mut joint_of: Vec<Option<(usize, usize)>> = vec![None; valid.len()];
        let mut scans = Vec::with_capacity(joint.len());
        for (g, group) in joint.iter_mut().enumerate() {
            let t = Instant::now();
            let members: Vec<&Probe> = group.probes.iter().map(|&i| &valid[i]).collect();
            let prepared = self.scan_cache.get(&snap, &group.scan)?;
            let (kept, stats) = group.scan.search(
                &snap,
                &members,
                prepared.as_ref().map(|(base, _)| base.as_ref()),
            )?;
            let share = t.elapsed().as_secs_f64() * 1e3 / group.probes.len() as f64;
            for (k, (&i, rows)) in group.probes.iter().zip(&kept).enumerate() {
                let t = Instant::now();
                results[i] = Some(answer(
                    &snap,
                    &cal,
                    &valid[i],
                    rows,
                    threshold,
                    floor,
                    options.max_results,
                ));
                ms[i] = share + t.elapsed().as_secs_f64() * 1e3;
                joint_of[i] = Some((g, k));
            }
            scans.push(JointScanInfo {
                key: group.scan.key.clone(),
                probes: group.probes.len(),
                seconds: share * group.probes.len() as f64 / 1e3,
                pairs: stats.pairs,
                kept: stats.kept,
                predicted_ms_per_probe: group.predicted.0,
                predicted_ms_one_by_one: group.predicted.1,
                reused_rows: prepared.map_or(0, |(_, reused)| reused),
            });
            group.kept = kept;
        }
        for (i, p) in valid.iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            let t = Instant::now();
            results[i] = Some(self.identify_probe(&snap, &cal, p, options)?);
            ms[i] = t.elapsed().as_secs_f64() * 1e3;
        }
        let results: Vec<IdentifyResult> = results.into_iter().flatten().collect();
        let mut latency = Latency::of(&ms);
        latency.joint_scans = scans;
        if audit.probes == 0 || probes.is_empty() {
            return Ok(IdentifyBatch {
                results,
                audit: None,
                latency,
            });
        }
        let t0 = Instant::now();
        let keys: Vec<String> = snap
            .schema()
            .modalities
            .iter()
            .map(|s| s.modality.key())
            .collect();
        let mut pool: Vec<usize> = (0..probes.len()).collect();
        let k = audit.probes.min(pool.len());
        SplitMix(audit.seed).shuffle_prefix(&mut pool, k);
        pool.truncate(k);
        pool.sort_unstable();
        let needed = pairs_needed(audit.min_recall);
        if !indexed && joint.is_empty() {
            let why = if options.gallery.is_some() {
                "every enrolment of the named gallery compared exactly"
            } else {
                "every enrolment scanned exactly (no index in use)"
            };
            return Ok(IdentifyBatch {
                results,
                latency,
                audit: Some(IdentifyAudit {
                    sampled_probes: 0,
                    probes: probes.len(),
                    seed: audit.seed,
                    threshold,
                    contract: RecallFigure::default(),
                    boundary: keys.iter().map(|k| (k.clone(), None)).collect(),
                    boundary_pooled: RecallFigure::default(),
                    lower_bound: 1.0,
                    evidence: format!("complete by construction: {why}"),
                    min_recall: audit.min_recall,
                    passed: true,
                    seconds: 0.0,
                    paths: Vec::new(),
                }),
            });
        }
        // Each probe's candidate cosines depend only on which modalities it has (computed once per pattern).
        let mut by_pattern: HashMap<Vec<bool>, Vec<Option<f32>>> = HashMap::new();
        let probe_cos: Vec<Vec<Option<f32>>> = valid
            .iter()
            .map(|p| {
                let pattern: Vec<bool> = p.templates.iter().map(Option::is_some).collect();
                by_pattern
                    .entry(pattern)
                    .or_insert_with(|| probe_candidate_cosines(&snap, &cal, p, floor))
                    .clone()
            })
            .collect();
        // Exact boundary rows of each sampled probe, per modality (independent of the candidate path): the
        // rows at or above that probe's own candidate cosine.
        let mut exact: Vec<Vec<HashSet<usize>>> = vec![vec![HashSet::new(); keys.len()]; k];
        for (mi, spec) in snap.schema().modalities.iter().enumerate() {
            // A probe without this modality's template has no cosine for it.
            let with: Vec<usize> = (0..k)
                .filter(|&i| probe_cos[pool[i]][mi].is_some())
                .collect();
            let lowest = with
                .iter()
                .filter_map(|&i| probe_cos[pool[i]][mi])
                .reduce(f32::min);
            let (Some(view), Some(c)) = (snap.f32_rows(spec.modality), lowest) else {
                continue;
            };
            let mut dense = Vec::with_capacity(with.len() * spec.dim);
            for &i in &with {
                if let Some(t) = &valid[pool[i]].templates[mi] {
                    dense.extend_from_slice(t);
                }
            }
            let probe = RowsF32::dense(&dense, spec.dim)?;
            let m = spec.modality;
            let skip = |q: u32| !snap.is_present(m, q as usize) || snap.is_deleted(q as usize);
            // GEMM and the scoring kernel differ by rounding: search a hair lower, decide on `dot_f32`.
            for p in pacha_index::exact::threshold_join(probe, view, c - 1e-4, None, Some(&skip))? {
                let i = with[p.a as usize];
                if let (Some(q), Some(own)) =
                    (&valid[pool[i]].templates[mi], probe_cos[pool[i]][mi])
                    && dot_f32(q, view.row(p.b as usize)) >= own
                {
                    exact[i][mi].insert(p.b as usize);
                }
            }
        }
        let mut contract = (0u64, 0u64);
        let mut bnd = vec![(0u64, 0u64); keys.len()];
        // Per joint group: the sampled probes' rows whose exact cosines pass the scan's test (its boundary).
        let mut jbnd = vec![(0u64, 0u64); joint.len()];
        for (i, &pi) in pool.iter().enumerate() {
            let union: HashSet<usize> = exact[i].iter().flatten().copied().collect();
            match joint_of[pi] {
                Some((g, kk)) => {
                    let kept = &joint[g].kept[kk];
                    for &r in &union {
                        if joint[g].scan.exact_passes(&snap, &valid[pi], r) {
                            jbnd[g].1 += 1;
                            jbnd[g].0 += u64::from(kept.binary_search(&r).is_ok());
                        }
                    }
                }
                None => {
                    let reached = self.identify_candidates(&snap, &cal, &valid[pi], floor)?;
                    for (mi, rows) in exact[i].iter().enumerate() {
                        let got: HashSet<usize> =
                            reached.get(mi).into_iter().flatten().copied().collect();
                        bnd[mi].0 += rows.iter().filter(|r| got.contains(r)).count() as u64;
                        bnd[mi].1 += rows.len() as u64;
                    }
                }
            }
            let mut top: Vec<(f64, &str)> = union
                .into_iter()
                .map(|r| {
                    (
                        compare_probe(&snap, &cal, &valid[pi], r).fused.score,
                        snap.subject_id(r),
                    )
                })
                .filter(|&(s, _)| s >= floor)
                .collect();
            top.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
            top.truncate(options.max_results);
            let answered: HashSet<&str> = results[pi]
                .candidates
                .iter()
                .map(|c| c.subject_id.as_str())
                .collect();
            for (_, id) in top.into_iter().filter(|&(s, _)| s >= threshold) {
                contract.1 += 1;
                contract.0 += u64::from(answered.contains(id));
            }
        }
        let mut pooled = (0u64, 0u64);
        let mut boundary: Vec<(String, Option<RecallFigure>)> = Vec::new();
        for (key, &(f, n)) in keys
            .iter()
            .zip(&bnd)
            .chain(joint.iter().map(|g| &g.scan.key).zip(&jbnd))
        {
            pooled = (pooled.0 + f, pooled.1 + n);
            boundary.push((key.clone(), (n > 0).then(|| RecallFigure::new(f, n))));
        }
        let contract = RecallFigure::new(contract.0, contract.1);
        let pooled = RecallFigure::new(pooled.0, pooled.1);
        // The paths the one-by-one answers took through the index (plans are cached per modality and
        // candidate cosine): those of the patterns of probes not answered by a joint scan.
        let one_by_one: Vec<usize> = (0..valid.len())
            .filter(|&i| joint_of[i].is_none())
            .collect();
        let seq_indexed = indexed && !one_by_one.is_empty();
        let plans: Vec<crate::idpath::IdentifyPlan> = if seq_indexed {
            ann.as_ref()
                .map(|a| a.identify_plans())
                .unwrap_or_default()
                .into_iter()
                .filter(|p| {
                    keys.iter()
                        .position(|k| *k == p.modality)
                        .is_some_and(|mi| {
                            one_by_one
                                .iter()
                                .any(|&i| probe_cos[i].get(mi).copied().flatten() == Some(p.cosine))
                        })
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut paths: Vec<(String, String)> = plans
            .iter()
            .map(|p| (p.modality.clone(), p.path.name().to_string()))
            .collect();
        paths.extend(
            joint
                .iter()
                .map(|g| (g.scan.key.clone(), "joint".to_string())),
        );
        // Without a partition (exact scans, sketch scans, joint scans) a row at the candidate cosine is lost
        // only through the sketch filter, whose drop the binomial model bounds: the dedup audit's "brute"
        // rule. Probes answered one by one without an index were scanned exactly.
        let drop_bound: Option<f64> = if !seq_indexed {
            Some(0.0)
        } else if plans.is_empty() {
            None
        } else {
            plans
                .iter()
                .map(|p| p.drop_bound)
                .try_fold(0.0, |acc, d| d.map(|d| acc + d))
        };
        let mut how = Vec::new();
        if !joint.is_empty() {
            let keys: Vec<&str> = joint.iter().map(|g| g.scan.key.as_str()).collect();
            how.push(format!(
                "{} probes by the joint i8 scan of every enrolment ({}, a rigorous bound on the summed evidence)",
                valid.len() - one_by_one.len(),
                keys.join(", ")
            ));
        }
        if !one_by_one.is_empty() {
            how.push(format!(
                "{} probes one by one ({})",
                one_by_one.len(),
                if seq_indexed {
                    "the index's paths"
                } else {
                    "every enrolment scanned exactly, no index in use"
                }
            ));
        }
        let sample = format!(
            "sample: {} of {} contract candidates, {} of {} enrolments at the boundary",
            contract.found, contract.pairs, pooled.found, pooled.pairs
        );
        let no_miss = contract.found == contract.pairs && pooled.found == pooled.pairs;
        let (lower_bound, evidence) = if let (Some(drop), true) = (drop_bound, no_miss) {
            if drop == 0.0 {
                (
                    1.0,
                    format!("complete by construction: {}; {sample}", how.join("; ")),
                )
            } else {
                (
                    1.0 - drop,
                    format!(
                        "complete up to the sketch filter: {}; every enrolment's sign sketch scanned, a row at \
                         the candidate cosine dropped with probability ≤ {drop:.1e} (binomial model at the \
                         complete cuts); {sample}",
                        how.join("; ")
                    ),
                )
            }
        } else if contract.pairs >= needed || contract.found < contract.pairs {
            (
                contract.lower,
                format!(
                    "contract pairs: {} of {} candidates at or above the threshold found",
                    contract.found, contract.pairs
                ),
            )
        } else {
            (
                pooled.lower,
                format!(
                    "boundary pairs: {} contract pairs (all found) cannot bound recall at {} (needs {needed}); {} of {} \
                     enrolments at the boundary reached — the hardest rows for the candidate path",
                    contract.pairs, audit.min_recall, pooled.found, pooled.pairs
                ),
            )
        };
        Ok(IdentifyBatch {
            results,
            latency,
            audit: Some(IdentifyAudit {
                sampled_probes: k,
                probes: probes.len(),
                seed: audit.seed,
                threshold,
                contract,
                boundary,
                boundary_pooled: pooled,
                lower_bound,
                evidence,
                min_recall: audit.min_recall,
                passed: lower_bound >= audit.min_recall,
                seconds: t0.elapsed().as_secs_f64(),
                paths,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{
        JOINT_PREPARE_BYTE_S, Latency, Preparation, joint_ms, joint_state_ms, one_by_one_ms,
    };

    /// The one-by-one price carries the pilots' unpaid share until joint scans have cost that much extra;
    /// a lone probe at 1 M face + 2 fingers then takes the joint scan, first unprepared, and once the rows
    /// are kept, a scan that streams them.
    #[test]
    fn pilots_are_charged_until_the_rent_paid_reaches_them() {
        assert_eq!(one_by_one_ms(100.0, 0.0, 0.0, 1), 100.0);
        assert_eq!(one_by_one_ms(100.0, 7000.0, 0.0, 1), 7100.0);
        assert_eq!(one_by_one_ms(100.0, 7000.0, 0.0, 10), 800.0);
        assert_eq!(one_by_one_ms(100.0, 7000.0, 6000.0, 1), 1100.0);
        assert_eq!(one_by_one_ms(100.0, 7000.0, 9000.0, 1), 100.0);
        assert_eq!(one_by_one_ms(5.0, 3000.0, 0.0, 0), 3005.0);
        // 1 M rows × 1 024 code bytes, one probe: ≈ 0.6 s unprepared, ≈ 67 ms prepared, ≈ 0.7 s more to
        // prepare rows enrolled since the preparation was 700 k rows old.
        let (rows, bytes) = (1_000_000, 1024);
        let cold = joint_ms(rows, bytes, 1, None);
        let warm = joint_ms(rows, bytes, 1, Some(rows));
        let stale = joint_ms(rows, bytes, 1, Some(300_000));
        assert!((550.0..700.0).contains(&cold), "{cold}");
        assert!((60.0..75.0).contains(&warm), "{warm}");
        assert!(stale > warm + 200.0 && stale < cold + 100.0, "{stale}");
        // Seen once: the scan prepares every row (1.25 ns per byte) and then streams them prepared; the
        // rows are counted once, not also as newly enrolled.
        let seen = joint_state_ms(Preparation::Seen, rows, bytes, 1);
        let prepare = rows as f64 * bytes as f64 * JOINT_PREPARE_BYTE_S * 1e3;
        assert!((seen - (warm + prepare)).abs() < 1e-6, "{seen}");
        assert_eq!(joint_state_ms(Preparation::Unseen, rows, bytes, 1), cold);
        assert_eq!(
            joint_state_ms(Preparation::Prepared(rows), rows, bytes, 1),
            warm
        );
        assert!(warm < one_by_one_ms(97.0, 7000.0, 0.0, 1));
        assert!(cold < one_by_one_ms(97.0, 7000.0, 0.0, 1));
    }

    #[test]
    fn latency_uses_nearest_rank_percentiles_and_keeps_the_first_probe_apart() {
        // 100 probes: the first slow (it planned the rule), the rest 1..=99 ms in shuffled order.
        let mut ms: Vec<f64> = (1..=99).map(f64::from).rev().collect();
        ms.insert(0, 500.0);
        let l = Latency::of(&ms);
        assert_eq!(l.probes, 100);
        assert_eq!(l.first_ms, 500.0);
        assert_eq!(l.max_ms, 500.0);
        // Sorted: 1..=99 then 500; nearest rank ⌈p·n⌉.
        assert_eq!(l.p50_ms, 50.0);
        assert_eq!(l.p90_ms, 90.0);
        assert_eq!(l.p99_ms, 99.0);
        assert!((l.mean_ms - (4950.0 + 500.0) / 100.0).abs() < 1e-9);
        let one = Latency::of(&[3.0]);
        assert_eq!((one.p50_ms, one.p99_ms, one.first_ms), (3.0, 3.0, 3.0));
        assert_eq!(Latency::of(&[]), Latency::default());
    }
}
