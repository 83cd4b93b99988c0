//! Run-time probing: which lists every row visits in one join, chosen per run from measurements.
//!
//! A saved index holds centroids and a build-time probe table of fixed depth. A threshold join needs a
//! depth that depends on the threshold and on the data (pairs near a low threshold sit in lists far
//! apart), so a run re-derives the table with a [`ProbeRule`] chosen for it ([`Ivf::reprobe`]): every row
//! probes its `min` best lists and every further list whose score is within `margin` of its best, up to
//! `max` — boundary rows (several lists nearly as good as their best) probe more, well-placed rows fewer.
//! [`Ivf::pair_requirement`] gives, for a pair, what a rule needs to reach it, so that a pilot on sampled
//! pairs can choose the cheapest rule that reaches all of them. [`Ivf::brute`] is the degenerate index
//! (one list holding every row) for data that gives a partition no leverage: its join compares every pair
//! once, by sketch.

use super::*;
use crate::IndexError;
use crate::kernels::dot_f32;
use crate::view::{RowPager, RowsF32};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How rows choose their probe lists for one join: the `min` best lists, plus every list scoring within
/// `margin` of the row's best, at most `max` lists.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeRule {
    /// Lists every row probes (its best first).
    pub min: usize,
    /// Score margin below a row's best within which it also probes a list.
    pub margin: f32,
    /// Most lists a row probes.
    pub max: usize,
}

impl ProbeRule {
    /// A fixed depth: every row probes its `p` best lists.
    pub fn fixed(p: usize) -> Self {
        ProbeRule {
            min: p,
            margin: 0.0,
            max: p,
        }
    }

    /// Lists probed by a row whose scores, sorted descending, are `sorted` (all of the index's lists).
    pub fn count(&self, sorted: &[f32]) -> usize {
        let Some(&best) = sorted.first() else {
            return 0;
        };
        let within = sorted.partition_point(|&s| s >= best - self.margin);
        within.max(self.min).min(self.max).min(sorted.len()).max(1)
    }

    /// True iff a row probes the list it ranks `rank` (0 = best) with a score `gap` below its best.
    pub fn reaches(&self, rank: usize, gap: f32) -> bool {
        rank < self.min.min(self.max) || (gap <= self.margin && rank < self.max)
    }
}

/// What a probe rule needs to reach a list from a row: the list's rank among the row's lists (0 = best,
/// ties by list id) and how far its score is below the row's best.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reach {
    /// Rank of the list.
    pub rank: usize,
    /// Best score minus the list's score (≥ 0).
    pub gap: f32,
}

impl Reach {
    /// The reach of list `j` from a row with `scores` (one per list).
    pub fn of(scores: &[f32], j: usize) -> Reach {
        let sj = scores[j];
        let mut rank = 0;
        let mut best = f32::NEG_INFINITY;
        for (k, &s) in scores.iter().enumerate() {
            if s > sj || (s == sj && k < j) {
                rank += 1;
            }
            best = best.max(s);
        }
        Reach {
            rank,
            gap: best - sj,
        }
    }
}

impl Ivf {
    /// Scores of `n` dense rows (`rows`, `n × dim`) for every list (`out`, `n × lists`): the cosine of the
    /// row (centred on the index's mean if it has one) with each centroid — the assignment's ranking key
    /// on the assignment's scale, so margins are comparable across rows.
    pub fn score_rows(&self, rows: &[f32], n: usize, out: &mut Vec<f32>) {
        score_against(
            rows,
            n,
            &self.centroids,
            self.lists,
            self.dim,
            &self.mean,
            &self.bias,
            out,
        );
    }

    /// The centroids (`lists × dim`, row-major): the partition's identity.
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }

    /// Members per list (the join's work per visit).
    pub fn member_counts(&self) -> Vec<usize> {
        (0..self.lists).map(|j| self.members(j).len()).collect()
    }

    /// A copy of this index's partition over every row of `base` (which may hold more rows than the index
    /// was built on: rows enrolled since get a home in their best list, as the built ones have) in which
    /// each present row has one home, its best list, and probes the lists `rule` gives it. `pager` streams
    /// the rows as in [`Ivf::build_streaming`].
    pub fn reprobe(
        &self,
        base: RowsF32<'_>,
        present: &(dyn Fn(usize) -> bool + Sync),
        rule: ProbeRule,
        pager: &dyn RowPager,
    ) -> Result<Ivf, IndexError> {
        check_base(&base)?;
        if base.dim() != self.dim {
            return Err(IndexError::Dim {
                expected: self.dim,
                got: base.dim(),
            });
        }
        if rule.min == 0 || rule.max < rule.min || rule.margin.is_nan() || rule.margin < 0.0 {
            return Err(IndexError::Shape(format!("invalid probe rule {rule:?}")));
        }
        let c = self.lists;
        let ids: Vec<u32> = (0..base.rows())
            .filter(|&i| present(i))
            .map(|i| i as u32)
            .collect();
        let table = assign_streaming(
            base,
            &ids,
            c,
            pager,
            &|rows, m, buf| self.score_rows(rows, m, buf),
            &|scores, top| {
                let best = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let within = scores.iter().filter(|&&s| s >= best - rule.margin).count();
                top_select(scores, within.max(rule.min).min(rule.max).clamp(1, c), top);
                1
            },
        )?;
        let widest = table
            .probe_off
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0);
        Ok(Ivf::assemble(
            self.dim,
            c,
            widest,
            (self.centroids.clone(), self.mean.clone(), self.bias.clone()),
            table,
            false,
            false,
        ))
    }

    /// The degenerate index over `rows` rows of dimension `dim`: one list holding every present row. Its
    /// join compares every pair exactly once (a visitor only with the members after it), so with a sketch
    /// filter it is a brute-force sketch join: complete up to the sketch cut, at `N²/2` products.
    pub fn brute(
        rows: usize,
        dim: usize,
        present: &(dyn Fn(usize) -> bool + Sync),
    ) -> Result<Ivf, IndexError> {
        if rows > u32::MAX as usize {
            return Err(IndexError::Shape(format!(
                "{rows} rows exceed the u32 row-id range"
            )));
        }
        let home: Vec<u8> = (0..rows).map(|i| u8::from(present(i))).collect();
        let mut probe_off = vec![0usize; rows + 1];
        for i in 0..rows {
            probe_off[i + 1] = probe_off[i] + usize::from(home[i]);
        }
        let probe = vec![0u32; probe_off[rows]];
        Ok(Ivf::assemble(
            dim,
            1,
            1,
            (vec![0.0; dim], Vec::new(), Vec::new()),
            ProbeTable {
                home,
                probe_off,
                probe,
            },
            false,
            true,
        ))
    }

    /// 1:N search by rule: rows with exact score ≥ `t` among the members of the lists `rule` gives the
    /// query, sorted by (score desc, row asc). A query of the wrong dimension or with NaN finds nothing.
    pub fn search_rule(
        &self,
        base: RowsF32<'_>,
        query: &[f32],
        t: f32,
        rule: ProbeRule,
    ) -> Vec<(u32, f32)> {
        if query.len() != self.dim
            || base.dim() != self.dim
            || base.rows() != self.rows
            || t.is_nan()
        {
            return Vec::new();
        }
        let mut scores = Vec::new();
        self.score_rows(query, 1, &mut scores);
        scores.truncate(self.lists);
        if scores.iter().any(|s| s.is_nan()) {
            return Vec::new();
        }
        let mut sorted = scores.clone();
        sorted.sort_unstable_by(|a, b| b.total_cmp(a));
        let k = rule.count(&sorted);
        let mut top = Vec::new();
        top_select(&scores, k, &mut top);
        // A row with several homes is a member of several probed lists: score it once.
        let mut rows: Vec<u32> = top
            .iter()
            .flat_map(|&(_, j)| self.members(j as usize).iter().copied())
            .collect();
        rows.sort_unstable();
        rows.dedup();
        // Rayon over the members: a deep rule probes a large share of the rows.
        let mut out: Vec<(u32, f32)> = rows
            .into_par_iter()
            .with_min_len(1024)
            .filter_map(|r| {
                let s = dot_f32(query, base.row(r as usize));
                (s >= t).then_some((r, s))
            })
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    }

    /// Home list of each of `n` dense rows (`rows`) and the full score vectors (`n × lists`, kept in
    /// `scores`): for pilots that measure what a rule needs.
    pub fn homes_and_scores(&self, rows: &[f32], n: usize, scores: &mut Vec<f32>) -> Vec<u32> {
        let c = self.lists;
        scores.clear();
        scores.resize(n * c, 0.0);
        let d = self.dim;
        scores
            .par_chunks_mut(ASSIGN_TILE * c)
            .zip(rows.par_chunks(ASSIGN_TILE * d))
            .for_each_init(Vec::new, |buf, (out, rs)| {
                let m = rs.len() / d;
                self.score_rows(rs, m, buf);
                out.copy_from_slice(&buf[..m * c]);
            });
        scores
            .par_chunks_exact(c)
            .map(|s| {
                let mut best = (0u32, f32::NEG_INFINITY);
                for (j, &v) in s.iter().enumerate() {
                    if v > best.1 {
                        best = (j as u32, v);
                    }
                }
                best.0
            })
            .collect()
    }
}

impl Ivf {
    /// How deep row `a` must probe to reach one of row `b`'s home lists: the best rank (0 = best, ties by
    /// list id) of `b`'s homes among `a`'s centroid similarities; `None` if either row is absent or out of
    /// range. With two-way visits the join compares `a` and `b` iff either rank (a→b, b→a) is below
    /// `probes`; with one-way visits (one home per row) iff the rank towards the home with the larger id is.
    /// For recall analysis.
    pub fn probe_rank(&self, base: RowsF32<'_>, a: usize, b: usize) -> Option<usize> {
        if a >= self.rows || b >= self.rows || self.home[a] == 0 || self.home[b] == 0 {
            return None;
        }
        let q = base.row(a);
        let scores: Vec<f32> = (0..self.lists).map(|j| self.list_score(q, j)).collect();
        let (pb, hb) = self.row_lists(b as u32);
        pb[..hb]
            .iter()
            .map(|&t| {
                let (t, st) = (t as usize, scores[t as usize]);
                scores
                    .iter()
                    .enumerate()
                    .filter(|&(j, &s)| s > st || (s == st && j < t))
                    .count()
            })
            .min()
    }

    /// How the join's visit rule reaches the pair {`a`, `b`}: the probe depth it needs (the smaller
    /// [`Ivf::probe_rank`] of the directions the rule allows: both two-way; one-way, only the visit towards
    /// the home with the larger id) and whether this index's own per-row probe counts reach it. `None` if
    /// either row is absent or out of range. For recall analysis.
    pub fn pair_reach(&self, base: RowsF32<'_>, a: usize, b: usize) -> Option<(usize, bool)> {
        let (ra, rb) = (self.probe_rank(base, a, b)?, self.probe_rank(base, b, a)?);
        let (ka, kb) = (self.row_probes(a), self.row_probes(b));
        Some(if !self.one_way {
            (ra.min(rb), ra < ka || rb < kb)
        } else if self.home_list(b) >= self.home_list(a) {
            (ra, ra < ka)
        } else {
            (rb, rb < kb)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_count_and_reach_agree() {
        let sorted = [0.9f32, 0.88, 0.85, 0.7, 0.6, 0.1];
        let r = ProbeRule {
            min: 2,
            margin: 0.06,
            max: 5,
        };
        assert_eq!(r.count(&sorted), 3);
        for (rank, &s) in sorted.iter().enumerate() {
            assert_eq!(r.reaches(rank, 0.9 - s), rank < 3, "rank {rank}");
        }
        assert_eq!(ProbeRule::fixed(4).count(&sorted), 4);
        let wide = ProbeRule {
            min: 1,
            margin: 1.0,
            max: 4,
        };
        assert_eq!(wide.count(&sorted), 4);
        assert!(!wide.reaches(4, 0.3));
    }

    #[test]
    fn reach_ranks_ties_by_list_id() {
        let scores = [0.5f32, 0.7, 0.5, 0.9];
        assert_eq!(Reach::of(&scores, 3).rank, 0);
        assert_eq!(Reach::of(&scores, 0).rank, 2);
        assert_eq!(Reach::of(&scores, 2).rank, 3);
        assert!((Reach::of(&scores, 2).gap - 0.4).abs() < 1e-6);
    }
}
