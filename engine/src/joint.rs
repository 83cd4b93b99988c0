//! The joint candidate path of a multi-modal run: one scan of every pair through all fused modalities' i8
//! codes, keeping a pair only where its summed evidence can reach the floor ([`pacha_index::joint`]).
//!
//! Per-modality joins must each keep every pair whose cosine the other modalities could still complete at
//! their best: with a face and two fingers that is a cosine near 0.25–0.3 in every modality, 0.2 % of all
//! pairs per join, each rescored and bounded one by one. When every fused modality would be scanned
//! exhaustively anyway (the pilots chose the exact i8 join for each), the joint scan computes the same
//! products and tests them together.
//!
//! # The test, and why it keeps every pair that reaches the floor
//! A pair sharing modalities `S` reaches the floor iff `Σ_{m∈S} L_m(c_m) ≥` the least evidence sum that
//! reaches it on the pair's own fused distribution (modality subset × quality bands:
//! [`Calibration::llr_needed`], less one grid step as in [`crate::fusedbound`]). Here:
//! - each modality's evidence `L_m` ([`crate::fusion::ModalityModel::llr`], monotone) is bounded above by
//!   the largest of [`JOINT_LINES`] lines: a constant up to the impostor mean, then over three domains a
//!   line from the domain's start at the steepest slope to any later point of it (a chord where the
//!   evidence is convex, the tangent over its concave cap at the evidence ceiling); the domains' two
//!   inner ends are chosen to make the bound tightest where impostor pairs meet the threshold (one
//!   standard deviation above the impostor mean up to the cosine where the modality alone reaches it).
//!   Each line's intercept is made valid on its domain cell by cell: on a cell
//!   `[c_i, c_{i+1}]` of a 16 384-cell grid, `L(c) − α·c ≤ L(c_{i+1}) − α·c_i` (monotone `L`, `α ≥ 0`), so
//!   the intercept is the largest of those over the domain's cells, whatever the shape of `L`;
//! - the needed sum of a subset of modalities is at most the least over all its band combinations
//!   ([`Calibration::llr_needed_any_band`]: each banded modality at its pointwise lowest band survival).
//!
//! The scan evaluates that test on upper bounds of the cosines from the codes, widened for its rounding
//! ([`pacha_index::joint`]); the pairs it keeps are scored exactly like any candidate.

use pacha_datasets::Modality;
use pacha_index::exact_i8::QuantRows;
use pacha_index::joint::{
    JOINT_LINES, JointCross, JointJoin, JointLine, JointStats, JointTest, MAX_JOINT, PreparedBase,
};
use pacha_index::kernels::dot_f32;
use pacha_index::quant::{QuantizedRows, l1_bounds, quantize_rows};
use pacha_index::{RowsF32, RowsI8};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use crate::EngineError;
use crate::fusion::{Calibration, GRID_STEP, ModalityModel};
use crate::matcher::Probe;
use crate::policy::RunIndex;
use crate::store::Snapshot;

/// Cells of the grid the lines' intercepts are made valid on.
const CELLS: usize = 16_384;
/// Candidate knots of the pieces.
const KNOTS: usize = 32;

/// What a run's joint path is, for its summary and checkpoint key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JointInfo {
    /// The name its counters and audit evidence go under, e.g. `joint(face+finger2+finger7)`.
    pub key: String,
    /// Member modality keys, in schema order.
    pub members: Vec<String>,
    /// Per member, its evidence bound's pieces `(from cosine, slope, intercept)` (the first from −∞, shown
    /// as −1).
    pub lines: Vec<Vec<(f32, f32, f32)>>,
    /// Per subset of members (bit `k`: member `k`), the least bound sum that may reach the floor
    /// (`None`: no pair sharing exactly those members can).
    pub needed: Vec<Option<f32>>,
}

/// A run's joint path: its members, test and each row's presence.
pub struct JointPlan {
    /// Schema positions of the members.
    pub members: Vec<usize>,
    modalities: Vec<Modality>,
    /// The test the scan applies.
    pub test: JointTest,
    /// Per row: bit `k` iff the row is live and has member `k`'s template.
    presence: Vec<u8>,
    /// L1 bounds of members whose plan did not compute them.
    own_l1: Vec<Option<Vec<f32>>>,
    /// For the summary.
    pub info: JointInfo,
}

impl JointPlan {
    /// The joint path of a run over `snap` scored on `cal` against `floor`, when `run` planned every fused
    /// modality of the schema onto the exact i8 join (or `force`, which then takes any plan), there are 2 to
    /// [`MAX_JOINT`] of them and each has i8 codes. `None` otherwise (the run joins modality by modality).
    pub fn new(
        snap: &Snapshot,
        cal: &Calibration,
        floor: f64,
        run: &RunIndex,
        force: bool,
    ) -> Result<Option<JointPlan>, EngineError> {
        let refuse = |why: String| {
            if force {
                Err(EngineError::InvalidArgument(format!(
                    "the joint path cannot run: {why}"
                )))
            } else {
                Ok(None)
            }
        };
        let fused: Vec<(usize, Modality, usize)> = snap
            .schema()
            .modalities
            .iter()
            .enumerate()
            .filter_map(|(mi, s)| Some((mi, s.modality, cal.position(s.modality)?)))
            .collect();
        if fused.len() < 2 || fused.len() > MAX_JOINT {
            return refuse(format!(
                "{} fused modalities (2 to {MAX_JOINT})",
                fused.len()
            ));
        }
        let mut own_l1 = Vec::new();
        for &(mi, m, _) in &fused {
            let Some(codes) = snap.i8_rows(m) else {
                return refuse(format!("{m} has no i8 codes"));
            };
            match run.exact_i8(mi) {
                Some(_) => own_l1.push(None),
                None if force => own_l1.push(Some(l1_bounds(codes))),
                None => return Ok(None),
            }
        }
        let positions: Vec<usize> = fused.iter().map(|f| f.2).collect();
        let test = joint_test(cal, floor, &positions)?;
        let modalities: Vec<Modality> = fused.iter().map(|f| f.1).collect();
        let presence = row_presence(snap, &modalities);
        let keys: Vec<String> = modalities.iter().map(|m| m.key()).collect();
        let info = JointInfo {
            key: format!("joint({})", keys.join("+")),
            members: keys,
            lines: test
                .lines
                .iter()
                .map(|l| {
                    l.iter()
                        .map(|p| (p.from.max(-1.0), p.slope, p.intercept))
                        .collect()
                })
                .collect(),
            needed: test.needed[..1 << fused.len()]
                .iter()
                .map(|v| v.is_finite().then_some(*v))
                .collect(),
        };
        Ok(Some(JointPlan {
            members: fused.iter().map(|f| f.0).collect(),
            modalities,
            test,
            presence,
            own_l1,
            info,
        }))
    }

    /// True iff modality `mi` (schema position) is a member.
    pub fn has(&self, mi: usize) -> bool {
        self.members.contains(&mi)
    }

    /// The pairs `(a, b)`, `b` in `probes`, `a < b`, the scan keeps, and its counters.
    pub fn join(
        &self,
        snap: &Snapshot,
        run: &RunIndex,
        probes: Range<usize>,
    ) -> Result<(Vec<(u32, u32)>, JointStats), EngineError> {
        let mut rows = Vec::with_capacity(self.members.len());
        for (k, (&mi, &m)) in self.members.iter().zip(&self.modalities).enumerate() {
            let (Some(view), Some(codes)) = (snap.f32_rows(m), snap.i8_rows(m)) else {
                return Err(EngineError::InvalidArgument(format!(
                    "the joint path lost {m}'s rows"
                )));
            };
            let l1 = match (&self.own_l1[k], run.exact_i8(mi)) {
                (Some(own), _) => own.as_slice(),
                (None, Some(l1)) => l1,
                (None, None) => {
                    return Err(EngineError::InvalidArgument(format!(
                        "the joint path has no L1 bounds of {m}"
                    )));
                }
            };
            rows.push(QuantRows::new(view, codes, l1)?);
        }
        let join = JointJoin::new(rows, &self.presence, &self.test)?;
        Ok(join.probe_join(probes)?)
    }

    /// The exact test on stored rows `a` and `b` (their f32 templates): what the audit's oracle counts as
    /// the joint path's boundary (the scan may never miss such a pair).
    pub fn exact_passes(&self, snap: &Snapshot, a: usize, b: usize) -> bool {
        let key =
            self.presence.get(a).copied().unwrap_or(0) & self.presence.get(b).copied().unwrap_or(0);
        if key == 0 {
            return false;
        }
        let mut cos = [0.0f32; MAX_JOINT];
        for (k, &m) in self.modalities.iter().enumerate() {
            if let (Some(x), Some(y)) = (snap.template(m, a), snap.template(m, b)) {
                cos[k] = dot_f32(x, y);
            }
        }
        self.test.passes(key, &cos)
    }
}

/// Per row of `snap`: bit `k` iff the row is live and holds a template of `modalities[k]`.
fn row_presence(snap: &Snapshot, modalities: &[Modality]) -> Vec<u8> {
    (0..snap.rows())
        .into_par_iter()
        .map(|r| {
            if snap.is_deleted(r) {
                return 0;
            }
            modalities
                .iter()
                .enumerate()
                .filter(|&(_, &m)| snap.is_present(m, r))
                .fold(0u8, |b, (k, _)| b | 1 << k)
        })
        .collect()
}

/// The joint test of the fused models at calibration positions `positions` (the members, in order) for
/// `floor`: per member its evidence bound, per subset the least bound sum that may reach the floor (see the
/// module docs).
fn joint_test(
    cal: &Calibration,
    floor: f64,
    positions: &[usize],
) -> Result<JointTest, EngineError> {
    let mut needed = [f32::INFINITY; 1 << MAX_JOINT];
    for (subset, n) in needed
        .iter_mut()
        .enumerate()
        .take(1 << positions.len())
        .skip(1)
    {
        let mask = positions
            .iter()
            .enumerate()
            .filter(|&(k, _)| subset & (1 << k) != 0)
            .fold(0u32, |m, (_, &p)| m | 1 << p);
        let need = cal.llr_needed_any_band(mask, floor) - GRID_STEP;
        // Rounded down: the f32 sum needed is never above the real one.
        *n = if need.is_finite() {
            (need as f32).next_down()
        } else {
            need as f32
        };
    }
    let top = needed
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let lines: Vec<[JointLine; JOINT_LINES]> = positions
        .iter()
        .map(|&pos| evidence_lines(&cal.models[pos].1, f64::from(top)))
        .collect();
    let test = JointTest { lines, needed };
    test.check()?;
    Ok(test)
}

/// The joint scan of an identify batch's probes that all hold templates of the same fused modalities
/// against every live row of a snapshot: one pass of every probe × row pair through those modalities' i8
/// codes, keeping the rows whose joint evidence bound can reach the floor (complete by construction, like
/// the dedup's joint path).
pub struct ProbeScan {
    /// Schema positions of the members.
    pub members: Vec<usize>,
    modalities: Vec<Modality>,
    /// The test the scan applies.
    pub test: JointTest,
    /// The key the scan's audit evidence and path go under, e.g. `joint(face+finger2+finger7)`.
    pub key: String,
}

impl ProbeScan {
    /// The scan of probes holding templates of exactly the schema positions `members` (1 to [`MAX_JOINT`],
    /// each fused by `cal` and with i8 codes in `snap`) at `floor`; `None` when any is not.
    pub fn new(
        snap: &Snapshot,
        cal: &Calibration,
        floor: f64,
        members: &[usize],
    ) -> Result<Option<ProbeScan>, EngineError> {
        if members.is_empty() || members.len() > MAX_JOINT {
            return Ok(None);
        }
        let mut positions = Vec::with_capacity(members.len());
        let mut modalities = Vec::with_capacity(members.len());
        for &mi in members {
            let Some(spec) = snap.schema().modalities.get(mi) else {
                return Ok(None);
            };
            let (Some(pos), Some(_)) = (cal.position(spec.modality), snap.i8_rows(spec.modality))
            else {
                return Ok(None);
            };
            positions.push(pos);
            modalities.push(spec.modality);
        }
        let test = joint_test(cal, floor, &positions)?;
        // A test that every pair sharing some members passes (a floor at or below 0) keeps most of the
        // store for every probe: nothing to gain over comparing every row, and a batch's kept pairs would
        // not fit in memory. Such groups are searched one by one.
        if test.needed[1..1 << members.len()].contains(&f32::NEG_INFINITY) {
            return Ok(None);
        }
        let keys: Vec<String> = modalities.iter().map(|m| m.key()).collect();
        Ok(Some(ProbeScan {
            members: members.to_vec(),
            modalities,
            test,
            key: format!("joint({})", keys.join("+")),
        }))
    }

    /// Per probe of `probes` (each holding every member's template), the rows of `snap` the scan keeps,
    /// ascending, with the counters; against `prepared` (every row of `snap` prepared, e.g. by a
    /// [`ScanCache`]) where given, else the scan prepares the stored rows itself.
    pub fn search(
        &self,
        snap: &Snapshot,
        probes: &[&Probe],
        prepared: Option<&PreparedBase>,
    ) -> Result<(Vec<Vec<usize>>, JointStats), EngineError> {
        let prepared = prepared.filter(|p| p.rows() == snap.rows());
        let t0 = std::time::Instant::now();
        let n = snap.rows();
        let presence = row_presence(snap, &self.modalities);
        let t_presence = t0.elapsed().as_secs_f64();
        let mut probe_f32 = Vec::with_capacity(self.members.len());
        for (&mi, &m) in self.members.iter().zip(&self.modalities) {
            let dim = snap.schema().modalities[mi].dim;
            let mut dense = Vec::with_capacity(probes.len() * dim);
            for p in probes {
                let Some(t) = p.templates.get(mi).and_then(Option::as_ref) else {
                    return Err(EngineError::InvalidArgument(format!(
                        "the joint scan of {} got probe {} without its {m} template",
                        self.key, p.name
                    )));
                };
                dense.extend_from_slice(t);
            }
            probe_f32.push((dense, dim));
        }
        let probe_codes: Vec<QuantizedRows> = probe_f32
            .iter()
            .map(|(v, d)| Ok(quantize_rows(RowsF32::dense(v, *d)?)))
            .collect::<Result<_, EngineError>>()?;
        let probe_l1: Vec<Vec<f32>> = probe_codes.iter().map(|q| l1_bounds(q.view())).collect();
        let probe_rows = probe_f32
            .iter()
            .zip(&probe_codes)
            .zip(&probe_l1)
            .map(|(((v, d), q), l1)| Ok(QuantRows::new(RowsF32::dense(v, *d)?, q.view(), l1)?))
            .collect::<Result<Vec<_>, EngineError>>()?;
        let t_probes = t0.elapsed().as_secs_f64();
        let full = ((1u16 << self.members.len()) - 1) as u8;
        let probe_presence = vec![full; probes.len()];
        let stored;
        let join = match prepared {
            Some(base) => {
                JointCross::with_prepared(probe_rows, &probe_presence, base, &presence, &self.test)?
            }
            None => {
                stored = self.stored(snap, 0..n)?;
                JointCross::new(
                    probe_rows,
                    &probe_presence,
                    quant_rows(&stored.0, &stored.1)?,
                    &presence,
                    &self.test,
                )?
            }
        };
        let t_setup = t0.elapsed().as_secs_f64();
        let (pairs, stats) = join.join()?;
        tracing::debug!(
            "{}: {} probes x {n} rows: presence {t_presence:.3} s, probe codes {:.3} s, stored rows' L1 bounds {:.3} s, scan {:.3} s ({}), {} pairs kept",
            self.key,
            probes.len(),
            t_probes - t_presence,
            t_setup - t_probes,
            t0.elapsed().as_secs_f64() - t_setup,
            if prepared.is_some() {
                "stored rows prepared before"
            } else {
                "stored rows prepared by the scan"
            },
            stats.kept
        );
        let mut out = vec![Vec::new(); probes.len()];
        for (p, r) in pairs {
            out[p as usize].push(r as usize);
        }
        Ok((out, stats))
    }

    /// The members' stored rows `range` of `snap`: per member its f32 view and codes, and the codes' L1
    /// bounds (computed here).
    #[allow(clippy::type_complexity)] // a view pair per member, and the bounds they borrow
    fn stored<'s>(
        &self,
        snap: &'s Snapshot,
        range: Range<usize>,
    ) -> Result<(Vec<(RowsF32<'s>, RowsI8<'s>)>, Vec<Vec<f32>>), EngineError> {
        let mut views = Vec::with_capacity(self.modalities.len());
        let mut l1 = Vec::with_capacity(self.modalities.len());
        for &m in &self.modalities {
            let (Some(view), Some(codes)) = (snap.f32_rows(m), snap.i8_rows(m)) else {
                return Err(EngineError::InvalidArgument(format!(
                    "the joint scan lost {m}'s rows"
                )));
            };
            let codes = codes.slice_rows(range.start, range.end);
            l1.push(l1_bounds(codes));
            views.push((view.slice_rows(range.start, range.end), codes));
        }
        Ok((views, l1))
    }

    /// Bytes of the members' stored rows prepared ([`PreparedBase::bytes`], predicted).
    fn prepared_bytes(&self, snap: &Snapshot) -> usize {
        let per_row: usize = self
            .members
            .iter()
            .map(|&mi| snap.schema().modalities[mi].dim.div_ceil(4) * 4 + 12)
            .sum();
        snap.rows() * per_row
    }

    /// The exact test of `probe` against stored row `r` (their f32 templates): the pairs the scan may never
    /// miss (the audit's boundary for the scan).
    pub fn exact_passes(&self, snap: &Snapshot, probe: &Probe, r: usize) -> bool {
        if snap.is_deleted(r) {
            return false;
        }
        let mut key = 0u8;
        let mut cos = [0.0f32; MAX_JOINT];
        for (k, (&mi, &m)) in self.members.iter().zip(&self.modalities).enumerate() {
            if let (Some(Some(q)), Some(y)) = (probe.templates.get(mi), snap.template(m, r)) {
                cos[k] = dot_f32(q, y);
                key |= 1 << k;
            }
        }
        key != 0 && self.test.passes(key, &cos)
    }
}

/// A piecewise linear upper bound on `model`'s evidence that never falls (see the module docs): a constant
/// up to the first knot, then three pieces, each from its knot at the steepest slope to any later point of
/// its domain (a chord where the evidence is convex, a tangent over a concave cap); the three knots
/// minimise the largest gap above the evidence between one impostor standard deviation above the mean and
/// the cosine where the evidence reaches `top`.
pub fn evidence_lines(model: &ModalityModel, top: f64) -> [JointLine; JOINT_LINES] {
    let at = |i: usize| -1.0 + 2.0 * i as f64 / CELLS as f64;
    let l: Vec<f64> = (0..=CELLS).map(|i| model.llr(at(i))).collect();
    let cell = |c: f64| (((c + 1.0) * CELLS as f64 / 2.0).round() as usize).min(CELLS);
    let (mu, sd) = (model.impostor.mean, model.impostor.sd.max(1e-3));
    // Where the bound must fit: from one impostor deviation above the mean to where the evidence alone
    // reaches `top`; its knots may sit from the mean (or where the evidence leaves its floor, if that is
    // earlier) on.
    let fit_lo = cell((mu + sd).clamp(-0.98, 0.95));
    let hi = if top.is_finite() {
        model.cosine_for_llr(top).map_or(CELLS, cell)
    } else {
        CELLS
    }
    .clamp(fit_lo + KNOTS, CELLS - 1);
    let fit_lo = fit_lo.min(hi - KNOTS);
    let rise = (0..=CELLS).find(|&i| l[i] > l[0] + 0.5).unwrap_or(CELLS);
    let lo = cell(mu.clamp(-0.99, 0.9)).min(rise).clamp(1, hi - KNOTS);
    // Intercept of slope `a` on cells `i0..i1` (each cell `[c_i, c_{i+1}]` bounded by `L(c_{i+1}) − a·c_i`;
    // every `step`-th cell for the search, whose cells then span `step` grid steps).
    let intercept = |a: f64, i0: usize, i1: usize, step: usize| -> f64 {
        (i0..i1)
            .step_by(step)
            .map(|i| l[(i + step).min(i1)] - a * at(i))
            .fold(f64::NEG_INFINITY, f64::max)
    };
    // The steepest slope from the domain's start to any later point of it.
    let steepest = |i0: usize, i1: usize, step: usize| -> f64 {
        (i0 + 1..=i1)
            .step_by(step)
            .chain(std::iter::once(i1))
            .map(|i| (l[i] - l[i0]) / (at(i) - at(i0)))
            .fold(0.0f64, f64::max)
    };
    let domains = |s: [usize; 3]| [(0, s[0]), (s[0], s[1]), (s[1], s[2]), (s[2], CELLS)];
    let knots: Vec<usize> = (0..KNOTS)
        .map(|k| lo + (hi - lo) * k / (KNOTS - 1))
        .collect();
    let probe: Vec<usize> = (0..=200)
        .map(|k| fit_lo + (hi - fit_lo) * k / 200)
        .collect();
    let mut best = (f64::INFINITY, [lo, lo + 1, hi]);
    for (x, &s0) in knots.iter().enumerate() {
        for (y, &s1) in knots.iter().enumerate().skip(x + 1) {
            for &s2 in &knots[y + 1..] {
                let d = domains([s0, s1, s2]);
                let pieces: Vec<(f64, f64)> = d
                    .iter()
                    .map(|&(i0, i1)| {
                        let a = if i0 == 0 { 0.0 } else { steepest(i0, i1, 16) };
                        (a, intercept(a, i0, i1, 16))
                    })
                    .collect();
                let gap = probe
                    .iter()
                    .map(|&i| {
                        let j = d.iter().rposition(|&(i0, _)| i0 <= i).unwrap_or(0);
                        pieces[j].0 * at(i) + pieces[j].1 - l[i]
                    })
                    .fold(0.0f64, f64::max);
                if gap < best.0 {
                    best = (gap, [s0, s1, s2]);
                }
            }
        }
    }
    let mut out = [JointLine {
        from: f32::NEG_INFINITY,
        slope: 0.0,
        intercept: 0.0,
    }; JOINT_LINES];
    let d = domains(best.1);
    for (j, &(i0, i1)) in d.iter().enumerate() {
        // The knot as f32, and the cells covering the piece's domain between the f32 knots.
        let from = if j == 0 {
            f32::NEG_INFINITY
        } else {
            at(i0) as f32
        };
        let c0 = if j == 0 {
            0
        } else {
            ((f64::from(from) + 1.0) * CELLS as f64 / 2.0).floor() as usize
        };
        let c1 = match d.get(j + 1) {
            Some(&(n0, _)) => ((at(n0) as f32 as f64 + 1.0) * CELLS as f64 / 2.0).ceil() as usize,
            None => CELLS,
        }
        .clamp(c0 + 1, CELLS);
        let a = if j == 0 {
            0.0
        } else {
            steepest(i0, i1, 1) as f32
        };
        let b = intercept(f64::from(a), c0, c1, 1);
        // f64 rounding of the grid, then rounded up to f32: never below the real intercept.
        let mut piece = JointLine {
            from,
            slope: a,
            intercept: ((b + 1e-9 * (1.0 + b.abs())) as f32).next_up(),
        };
        // Never falling: a piece starts no lower than the previous one ends.
        if j > 0 {
            let c = f64::from(from);
            let prev = &out[j - 1];
            let end = f64::from(prev.slope) * c + f64::from(prev.intercept);
            while f64::from(piece.slope) * c + f64::from(piece.intercept) < end {
                let need = end - f64::from(piece.slope) * c;
                piece.intercept = (need as f32).max(piece.intercept).next_up();
            }
        }
        out[j] = piece;
    }
    out
}

/// Most bytes of stored rows a [`ScanCache`] keeps prepared (1 M face + 2 fingers: ≈ 1 GB).
pub const SCAN_CACHE_BYTES: usize = 4 << 30;

/// Stored rows prepared for identify's joint scans ([`PreparedBase`]), kept between the batches of a
/// long-lived engine: without it every batch computes every stored row's parameters and packs its codes
/// again (≈ 0.5 s at 1 M face + 2 fingers, what makes a batch of 10 probes cost 50–90 ms each). One entry
/// per set of member modalities, for the store generation it was prepared on (compaction renumbers rows);
/// rows appended since are prepared on the next batch.
///
/// A set is prepared on its *second* scan: preparing every row at once costs more than one scan's own
/// preparation (1.3 s against 0.5 s at 1 M face + 2 fingers: a gigabyte of fresh memory written), which a
/// process answering one batch (the CLI) would pay for nothing. At most [`SCAN_CACHE_BYTES`] in all: a set
/// that would not fit is prepared by each scan itself, the least recently used sets are dropped to make
/// room.
#[derive(Default)]
pub struct ScanCache {
    entries: Mutex<Vec<CacheEntry>>,
}

/// One member set of one store generation.
struct CacheEntry {
    generation: u64,
    modalities: Vec<Modality>,
    /// Joint scans served.
    scans: usize,
    /// The prepared rows, from the second scan on.
    base: Option<Arc<PreparedBase>>,
    /// Predicted milliseconds the set's joint scans cost over searching their probes one by one
    /// ([`ScanCache::add_rent`]).
    rent_ms: f64,
    /// Held while the set's rows are prepared or extended (outside the entries' lock): a batch of the same
    /// set arriving meanwhile waits for that preparation and reuses it instead of making its own copy.
    preparing: Arc<Mutex<()>>,
}

/// How far a member set's stored rows are prepared ([`ScanCache::state`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preparation {
    /// Never scanned: the next scan prepares its own rows.
    Unseen,
    /// Scanned before, not prepared: the next scan prepares every row and keeps them.
    Seen,
    /// This many rows prepared: the next scan prepares only the rows enrolled since.
    Prepared(usize),
}

impl ScanCache {
    /// Runs `f` on the entry of `scan`'s member set for `snap`'s generation (made if missing; entries of
    /// other generations dropped).
    fn with_entry<T>(
        &self,
        snap: &Snapshot,
        scan: &ProbeScan,
        f: impl FnOnce(&mut CacheEntry) -> T,
    ) -> T {
        // A poisoned lock is taken as is: every closure here leaves the entries whole (preparation runs in
        // `get` with the base taken out, outside this lock), so a panic elsewhere leaves nothing half-built.
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|e| e.generation == snap.generation());
        let i = match entries.iter().position(|e| e.modalities == scan.modalities) {
            Some(i) => i,
            None => {
                entries.push(CacheEntry {
                    generation: snap.generation(),
                    modalities: scan.modalities.clone(),
                    scans: 0,
                    base: None,
                    rent_ms: 0.0,
                    preparing: Arc::default(),
                });
                entries.len() - 1
            }
        };
        f(&mut entries[i])
    }

    /// How far the stored rows of `snap` are prepared for `scan` (what [`ScanCache::get`] will do; a set
    /// over [`SCAN_CACHE_BYTES`] is never prepared: every scan prepares its own).
    pub fn state(&self, snap: &Snapshot, scan: &ProbeScan) -> Preparation {
        if scan.prepared_bytes(snap) > SCAN_CACHE_BYTES {
            return Preparation::Unseen;
        }
        self.with_entry(snap, scan, |e| match &e.base {
            _ if e.scans == 0 => Preparation::Unseen,
            Some(b) if b.rows() <= snap.rows() => Preparation::Prepared(b.rows()),
            Some(_) => Preparation::Unseen,
            None => Preparation::Seen,
        })
    }

    /// Milliseconds the set's joint scans were predicted to cost over searching one by one (what the auto
    /// choice has paid instead of planning the one-by-one search).
    pub fn rent_ms(&self, snap: &Snapshot, scan: &ProbeScan) -> f64 {
        self.with_entry(snap, scan, |e| e.rent_ms)
    }

    /// Adds `ms` to [`ScanCache::rent_ms`].
    pub fn add_rent(&self, snap: &Snapshot, scan: &ProbeScan, ms: f64) {
        self.with_entry(snap, scan, |e| e.rent_ms += ms);
    }

    /// The stored rows of `snap` prepared for `scan`: cached, extended by the rows appended since, or
    /// prepared now and kept (from the set's second scan on); with the number of rows an earlier call had
    /// prepared. `None` on the set's first scan, where they would exceed [`SCAN_CACHE_BYTES`], or where
    /// `snap` has fewer rows than the cached preparation (an older snapshot): the scan then prepares its
    /// own.
    pub fn get(
        &self,
        snap: &Snapshot,
        scan: &ProbeScan,
    ) -> Result<Option<(Arc<PreparedBase>, usize)>, EngineError> {
        let (first, preparing) = self.with_entry(snap, scan, |e| {
            e.scans += 1;
            (e.scans == 1, Arc::clone(&e.preparing))
        });
        if first || scan.prepared_bytes(snap) > SCAN_CACHE_BYTES {
            return Ok(None);
        }
        // One preparation of the set at a time (a panic in one leaves the base out: the next prepares anew).
        let _turn = preparing.lock().unwrap_or_else(PoisonError::into_inner);
        let n = snap.rows();
        let taken = self.with_entry(snap, scan, |e| match &e.base {
            Some(b) if b.rows() > n => Err(()),
            _ => Ok(e.base.take()),
        });
        let Ok(taken) = taken else {
            return Ok(None);
        };
        // Prepared outside the entries' lock: other sets' scans go on meanwhile; this set's next batch
        // waits on `_turn`.
        let (base, reused) = match taken {
            Some(b) if b.rows() == n => (b, n),
            Some(mut b) => {
                let from = b.rows();
                let (views, l1) = scan.stored(snap, from..n)?;
                let more = quant_rows(&views, &l1)?;
                // Where another batch still scans the cached rows, they are copied first (a copy costs a
                // tenth of preparing them again).
                Arc::make_mut(&mut b).extend(&more)?;
                (b, from)
            }
            None => (Arc::new(prepare(scan, snap)?), 0),
        };
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        // Most recently used last; drop the oldest preparations until the new one fits.
        let held = |entries: &[CacheEntry]| -> usize {
            entries
                .iter()
                .filter_map(|e| e.base.as_ref())
                .map(|b| b.bytes())
                .sum()
        };
        let Some(i) = entries
            .iter()
            .position(|e| e.generation == snap.generation() && e.modalities == scan.modalities)
        else {
            // A compaction dropped the entry meanwhile: the rows are of an older generation.
            return Ok(Some((base, reused)));
        };
        let mut entry = entries.remove(i);
        while held(&entries) + base.bytes() > SCAN_CACHE_BYTES {
            match entries.iter().position(|e| e.base.is_some()) {
                Some(k) => entries[k].base = None,
                None => break,
            }
        }
        entry.base = Some(Arc::clone(&base));
        entries.push(entry);
        Ok(Some((base, reused)))
    }
}

/// Every stored row of `snap` prepared for `scan`.
fn prepare(scan: &ProbeScan, snap: &Snapshot) -> Result<PreparedBase, EngineError> {
    let t0 = std::time::Instant::now();
    let (views, l1) = scan.stored(snap, 0..snap.rows())?;
    let t_l1 = t0.elapsed().as_secs_f64();
    let base = PreparedBase::new(&quant_rows(&views, &l1)?)?;
    tracing::debug!(
        "{}: {} stored rows prepared for joint scans in {:.3} s (L1 bounds {t_l1:.3} s), {} bytes kept",
        scan.key,
        base.rows(),
        t0.elapsed().as_secs_f64(),
        base.bytes()
    );
    Ok(base)
}

/// Per member, its view and codes with their L1 bounds as one i8 join side.
fn quant_rows<'s>(
    views: &[(RowsF32<'s>, RowsI8<'s>)],
    l1: &'s [Vec<f32>],
) -> Result<Vec<QuantRows<'s>>, EngineError> {
    views
        .iter()
        .zip(l1)
        .map(|((v, c), l1)| Ok(QuantRows::new(*v, *c, l1)?))
        .collect()
}

/// The joint counters in the summary's per-join form: every scanned pair is an i8 product of each member
/// (`products`, all `rescored` by the test), `above` the pairs kept.
pub fn join_stats(st: &JointStats) -> pacha_index::ivf::JoinStats {
    pacha_index::ivf::JoinStats {
        products: st.products,
        sketch_pass: 0,
        rescored: st.products,
        exact_reads: 0,
        above: st.kept,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pacha_datasets::Modality;

    /// The lines lie above the evidence everywhere (checked densely, between the grid's cells too), rise,
    /// and stay close to it where impostors meet the threshold.
    #[test]
    fn evidence_lines_bound_the_evidence_and_fit_it() {
        for m in [Modality::Face, Modality::Finger(2)] {
            let model = ModalityModel::default_for(m);
            for top in [5.0, 13.0, 40.0] {
                let lines = evidence_lines(&model, top);
                let test = JointTest {
                    lines: vec![lines],
                    needed: [0.0; 1 << MAX_JOINT],
                };
                test.check().expect("pieces ascending, never falling");
                let bound = |c: f64| test.bound(0, c);
                for k in 0..=200_000 {
                    let c = -1.0 + 2.0 * f64::from(k) / 200_000.0;
                    assert!(bound(c) >= model.llr(c), "{m:?} top {top}: c {c}");
                }
                // Beyond ±1 (rounding of unit rows) the evidence is clamped and the bound still holds.
                assert!(bound(-1.0 - 1e-6) >= model.llr(-1.0));
                assert!(bound(1.0 + 1e-6) >= model.llr(1.0));
                let (mu, sd) = (model.impostor.mean, model.impostor.sd);
                let end = model.cosine_for_llr(top).unwrap_or(1.0);
                let worst = (0..=100)
                    .map(|k| mu + sd + (end - mu - sd) * f64::from(k) / 100.0)
                    .map(|c| bound(c) - model.llr(c))
                    .fold(0.0f64, f64::max);
                assert!(worst < 3.0, "{m:?} top {top}: gap {worst}");
            }
        }
    }
}
