//! An upper bound on a stored pair's fused score from the i8 codes alone: what lets a candidate join of
//! one modality drop, as it finds them, the pairs whose fused score cannot reach the run's floor, without
//! reading their f32 rows in any modality.
//!
//! A join of one modality at its candidate cosine keeps every pair that passes there (face at ≈ 0.29 with
//! two fingers: 0.2 % of all pairs), although few of them reach the fused threshold: the other modalities
//! decide. For a kept pair the bound reads each other shared modality's codes and takes the cosine's upper
//! bound `sa·sb·(qa·qb) + bound` ([`pacha_index::quant::code_error_bound`], the bound the exact i8 join
//! filters with, rounding slack included); the joined modality's own cosine is known. Every modality's
//! evidence is monotone in its cosine ([`crate::fusion::ModalityModel::llr`]) and the fused FMR only falls
//! as the evidence sum grows, so the sum of the upper bounds' evidence, compared with the lowest sum that
//! reaches the floor on the pair's own fused distribution ([`Calibration::llr_needed`]) less one grid step,
//! rejects only pairs whose exact fused score is below the floor. The pairs it keeps are scored exactly.

use std::borrow::Cow;
use std::collections::HashMap;

use pacha_datasets::Modality;
use pacha_index::RowsI8;
use pacha_index::kernels::{dot_f32, dot_i8};
use pacha_index::quant::{code_error_bound, l1_bounds};

use crate::fusion::{Calibration, FusedKey, GRID_STEP, MAX_MODALITIES};
use crate::matcher::pair_quality;
use crate::store::Snapshot;

/// Fused keys the bound tabulates at most (modality subsets × band combinations); past it, no bound.
const MAX_KEYS: usize = 1024;

/// One fused modality of the bound.
struct Member<'a> {
    modality: Modality,
    /// Its calibration model index.
    pos: usize,
    banded: bool,
    /// The codes and their L1 bounds (`None`: no codes, the f32 rows are read).
    codes: Option<(RowsI8<'a>, Cow<'a, [f32]>)>,
}

/// The fused-score upper bound of a run (see the module docs).
pub struct FusedBound<'a> {
    snap: &'a Snapshot,
    cal: &'a Calibration,
    /// By schema position; `None` for a modality the calibration does not fuse.
    members: Vec<Option<Member<'a>>>,
    /// Per fused key, the lowest evidence sum that reaches the floor, less one grid step.
    needed: HashMap<FusedKey, f64>,
}

impl<'a> FusedBound<'a> {
    /// The bound for pairs of `snap` scored on `cal` against `floor`; `None` when the schema's modality
    /// subsets and bands give more than [`MAX_KEYS`] fused distributions (every pair is then kept).
    /// `known_l1` gives a schema position's codes' L1 bounds where the caller already has them (the run's
    /// i8 stages); the others are computed here.
    pub fn new(
        snap: &'a Snapshot,
        cal: &'a Calibration,
        floor: f64,
        known_l1: &dyn Fn(usize) -> Option<&'a [f32]>,
    ) -> Option<FusedBound<'a>> {
        let members: Vec<Option<Member<'a>>> = snap
            .schema()
            .modalities
            .iter()
            .take(MAX_MODALITIES)
            .enumerate()
            .map(|(si, spec)| {
                let pos = cal.position(spec.modality)?;
                let codes = snap.i8_rows(spec.modality).map(|c| {
                    let l1 = known_l1(si)
                        .filter(|l| l.len() == c.rows())
                        .map_or_else(|| Cow::Owned(l1_bounds(c)), Cow::Borrowed);
                    (c, l1)
                });
                Some(Member {
                    modality: spec.modality,
                    pos,
                    banded: cal.bands(pos).is_some(),
                    codes,
                })
            })
            .collect();
        let positions: Vec<usize> = members.iter().flatten().map(|m| m.pos).collect();
        let keys = cal.fused_keys(&positions, MAX_KEYS)?;
        let needed = keys
            .into_iter()
            .map(|k| (k, cal.llr_needed(k, floor) - GRID_STEP))
            .collect();
        Some(FusedBound {
            snap,
            cal,
            members,
            needed,
        })
    }

    /// False only when stored rows `a` and `b` score below the floor for certain. `known` is the schema
    /// position and exact cosine of a modality already scored (the joined one), used as it is.
    pub fn may_reach(&self, a: usize, b: usize, known: Option<(usize, f32)>) -> bool {
        let mut sum = 0.0;
        let mut members = [(0usize, None); MAX_MODALITIES];
        let mut n = 0;
        for (si, m) in self.members.iter().enumerate() {
            let Some(m) = m else { continue };
            if !self.snap.is_present(m.modality, a) || !self.snap.is_present(m.modality, b) {
                continue;
            }
            let cos = match (known, &m.codes) {
                (Some((k, c)), _) if k == si => c,
                (_, Some((codes, l1))) => {
                    let (sa, sb) = (codes.scale(a), codes.scale(b));
                    let dot = dot_i8(codes.row(a), codes.row(b)) as f32;
                    sa * sb * dot + code_error_bound(sa, l1[a], sb, l1[b], codes.dim())
                }
                (_, None) => match (
                    self.snap.template(m.modality, a),
                    self.snap.template(m.modality, b),
                ) {
                    (Some(x), Some(y)) => dot_f32(x, y),
                    _ => continue,
                },
            };
            sum += self.cal.models[m.pos].1.llr(f64::from(cos));
            let q = m.banded.then(|| pair_quality(self.snap, m.modality, a, b));
            members[n] = (m.pos, q);
            n += 1;
        }
        let key = self.cal.fused_key(&members[..n]);
        // A key outside the table (cannot happen: every subset and band is in it) keeps the pair.
        self.needed.get(&key).is_none_or(|&need| sum >= need)
    }
}
