//! Assignment: rows scored against the centroids in GEMM tiles, each row's probe lists (best first) and
//! homes, and the per-list member and visitor tables derived from that per-row table.

use super::*;

use rayon::prelude::*;

use crate::kernels::{dot_f32, gather, gemm};
use crate::view::{RowPager, stream_batches};

/// Rows assigned per GEMM block when assigning rows to centroids.
pub(super) const ASSIGN_TILE: usize = 256;
/// Rows per streamed assignment batch (the granularity of [`Ivf::build_streaming`]'s `release`).
pub(super) const ASSIGN_BATCH: usize = 1 << 16;
/// Probe counts above this use selection ([`top_select`]) rather than insertion ([`top_p`]).
pub(super) const SELECT_ABOVE: usize = 32;

/// One assignment tile's output: per row its home count and probe count, and the probe lists in a row.
#[derive(Default)]
struct AssignedChunk {
    homes: Vec<u8>,
    counts: Vec<usize>,
    lists: Vec<u32>,
}

/// A per-row table: each row's number of home lists (0 = absent row) and its probe lists, best first
/// (CSR offsets, `rows + 1` of them, into one flat array).
pub(super) struct ProbeTable {
    pub(super) home: Vec<u8>,
    pub(super) probe_off: Vec<usize>,
    pub(super) probe: Vec<u32>,
}

/// Scores of `n` dense rows (`n × d`) for each of the `c` unit `centroids` (`out`, `n × c`): their cosines,
/// of the rows centred on `mean` when it is not empty (`bias[j] = centroid_j · mean`).
#[allow(clippy::too_many_arguments)]
pub(super) fn score_against(
    rows: &[f32],
    n: usize,
    centroids: &[f32],
    c: usize,
    d: usize,
    mean: &[f32],
    bias: &[f32],
    out: &mut Vec<f32>,
) {
    gemm(rows, n, centroids, c, d, out);
    if mean.is_empty() {
        return;
    }
    let mm = dot_f32(mean, mean);
    for i in 0..n {
        let x = &rows[i * d..(i + 1) * d];
        let (xx, xm) = (dot_f32(x, x), dot_f32(x, mean));
        let norm = (xx - 2.0 * xm + mm).max(0.0).sqrt();
        let inv = if norm > 0.0 { 1.0 / norm } else { 0.0 };
        for (v, &b) in out[i * c..(i + 1) * c].iter_mut().zip(bias) {
            *v = (*v - b) * inv;
        }
    }
}

/// Fills a tile's list scores from its dense rows: `(rows, row count, out)`.
type ScoreFn<'a> = dyn Fn(&[f32], usize, &mut Vec<f32>) + Sync + 'a;
/// Puts a row's probe lists (best first) in `top` from its list scores; returns its number of homes.
type PickFn<'a> = dyn Fn(&[f32], &mut Vec<(f32, u32)>) -> u8 + Sync + 'a;

/// Assigns every row of `ids` (ascending) of `base` in streamed batches announced to and released from
/// `pager`: `score` fills a tile's list scores (`rows × lists`, from the tile's dense rows), `pick` puts a
/// row's probe lists in `top` (best first) and returns its number of homes. Rows are checked finite as
/// they are read. Rows not in `ids` get no lists.
pub(super) fn assign_streaming(
    base: RowsF32<'_>,
    ids: &[u32],
    lists: usize,
    pager: &dyn RowPager,
    score: &ScoreFn<'_>,
    pick: &PickFn<'_>,
) -> Result<ProbeTable, IndexError> {
    let (n, d, c) = (base.rows(), base.dim(), lists);
    let mut home = vec![0u8; n];
    let mut probe_off = vec![0usize; n + 1];
    let mut probe: Vec<u32> = Vec::new();
    stream_batches(
        ids,
        ASSIGN_BATCH,
        |i| i as usize,
        pager,
        |_, batch| {
            let chunks: Vec<&[u32]> = batch.chunks(ASSIGN_TILE).collect();
            let results: Vec<Result<AssignedChunk, IndexError>> = chunks
                .par_iter()
                .map_init(
                    || (Vec::new(), Vec::new(), Vec::new()),
                    |(rows, buf, top), chunk| {
                        gather(base, chunk, rows);
                        check_finite(rows, chunk, d)?;
                        score(rows, chunk.len(), buf);
                        let mut out = AssignedChunk::default();
                        for i in 0..chunk.len() {
                            let h = pick(&buf[i * c..(i + 1) * c], top);
                            out.homes.push(h);
                            out.counts.push(top.len());
                            out.lists.extend(top.iter().map(|t| t.1));
                        }
                        Ok(out)
                    },
                )
                .collect();
            for (chunk, res) in chunks.iter().zip(results) {
                let res = res?;
                for ((&i, &h), &k) in chunk.iter().zip(&res.homes).zip(&res.counts) {
                    home[i as usize] = h;
                    probe_off[i as usize + 1] = k;
                }
                probe.extend_from_slice(&res.lists);
            }
            Ok(())
        },
    )?;
    for i in 0..n {
        probe_off[i + 1] += probe_off[i];
    }
    probe.shrink_to_fit();
    Ok(ProbeTable {
        home,
        probe_off,
        probe,
    })
}

/// Keeps the `k` best (score desc, id asc) of `scores` in `top` (sorted best first).
pub(super) fn top_p(scores: &[f32], k: usize, top: &mut Vec<(f32, u32)>) {
    top.clear();
    for (j, &s) in scores.iter().enumerate() {
        if top.len() == k {
            match top.last() {
                Some(&(ws, _)) if s > ws => {}
                _ => continue,
            }
            top.pop();
        }
        // Insert keeping (score desc, id asc); equal scores keep the earlier (smaller) id first.
        let pos = top.partition_point(|&(ts, _)| ts >= s);
        top.insert(pos, (s, j as u32));
    }
}

/// The `k` best of `scores` as (score, list), by (score desc, list asc): [`top_p`]'s order, by selection
/// (for large `k`, where insertion would cost `k` per accepted score).
pub(super) fn top_select(scores: &[f32], k: usize, top: &mut Vec<(f32, u32)>) {
    top.clear();
    if k == 0 {
        return;
    }
    // The k-th largest score by selection on a copy of the bare scores, then only the entries at or
    // above it are paired with their ids and sorted (ties at the cut may add a few; truncation drops them).
    let cut = if k < scores.len() {
        let mut v = scores.to_vec();
        let (_, kth, _) = v.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        Some(*kth)
    } else {
        None
    };
    top.extend(
        scores
            .iter()
            .enumerate()
            .filter(|(_, s)| cut.is_none_or(|c| s.total_cmp(&c).is_ge()))
            .map(|(j, &s)| (s, j as u32)),
    );
    top.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    top.truncate(k);
}

impl Ivf {
    /// Builds the per-list member and visitor CSR tables from the per-row table: one pass counts each
    /// list's entries, a second places them (rows ascending within every list).
    pub(super) fn derive_lists(&mut self) {
        let c = self.lists;
        let mut mcount = vec![0usize; c + 1];
        let mut vcount = vec![0usize; c + 1];
        self.each_list_entry(|_, j, _, visits, member| {
            vcount[j + 1] += usize::from(visits);
            mcount[j + 1] += usize::from(member);
        });
        for j in 0..c {
            mcount[j + 1] += mcount[j];
            vcount[j + 1] += vcount[j];
        }
        let mut members = vec![0u32; mcount[c]];
        let mut visitors = vec![0u32; vcount[c]];
        let mut vis_home = vec![0u32; vcount[c]];
        let (mut mpos, mut vpos) = (mcount.clone(), vcount.clone());
        self.each_list_entry(|i, j, best, visits, member| {
            if visits {
                visitors[vpos[j]] = i;
                vis_home[vpos[j]] = best;
                vpos[j] += 1;
            }
            if member {
                members[mpos[j]] = i;
                mpos[j] += 1;
            }
        });
        self.mem_off = mcount;
        self.members = members;
        self.vis_off = vcount;
        self.visitors = visitors;
        self.vis_home = vis_home;
        self.single_home = self.home.iter().all(|&h| h <= 1);
    }

    /// Calls `f(row, list, row's best list, visits, member)` for every list of every present row, rows
    /// ascending: `visits` where the row visits the list (with one-way visits, lists from its best on),
    /// `member` where the list is one of its homes.
    fn each_list_entry(&self, mut f: impl FnMut(u32, usize, u32, bool, bool)) {
        for i in 0..self.rows {
            let h = self.home[i] as usize;
            if h == 0 {
                continue;
            }
            let lists = self.row_lists(i as u32).0;
            let Some(&best) = lists.first() else {
                continue;
            };
            for (r, &j) in lists.iter().enumerate() {
                f(
                    i as u32,
                    j as usize,
                    best,
                    !self.one_way || j >= best,
                    r < h,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Selection and insertion agree on the top `k` lists, ties included.
        #[test]
        fn top_select_matches_top_p(
            scores in prop::collection::vec(prop::sample::select(vec![-0.5f32, 0.0, 0.1, 0.25, 0.7]), 1..60),
            k in 1usize..70,
        ) {
            let k = k.min(scores.len());
            let (mut a, mut b) = (Vec::new(), Vec::new());
            top_p(&scores, k, &mut a);
            top_select(&scores, k, &mut b);
            prop_assert_eq!(a, b);
        }
    }
}
