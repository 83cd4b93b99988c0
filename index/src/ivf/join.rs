//! The threshold self-joins over the partition: per list, its visitors × its members (blocked GEMM, or
//! sign sketches then i8 and f32 rescoring), each pair reported once by its canonical discovery.

use super::*;
use std::ops::Range;

use rayon::prelude::*;

use crate::kernels::{dot_f32, dot_i8, gather, gemm, prefetch_row};
use crate::quant::code_error_bound;
use crate::sketch::{
    FILTER_CLASSES, PackedBlock, Sketches, StagedCut, filter_packed, filter_packed_classed, hamming,
};
use crate::view::RowsI8;

/// GEMM tile: rows of the visitor side.
const VIS_TILE: usize = 512;
/// GEMM tile: rows of the member side.
const MEM_TILE: usize = 1024;
/// GEMM scores at least `t - SLACK` are rescored with `dot_f32` (GEMM and kernel differ by rounding only).
const SLACK: f32 = 1e-3;

/// The i8 first stage of a sketched join's rescoring: the base's codes (same rows) and their
/// [`crate::quant::l1_bounds`].
#[derive(Clone, Copy, Debug)]
pub struct QuantStage<'a> {
    codes: RowsI8<'a>,
    l1: &'a [f32],
}

impl<'a> QuantStage<'a> {
    /// Pairs codes with their L1 bounds; errors if the bounds do not cover every row.
    pub fn new(codes: RowsI8<'a>, l1: &'a [f32]) -> Result<Self, IndexError> {
        if l1.len() != codes.rows() {
            return Err(IndexError::Shape(format!(
                "{} L1 bounds for {} rows of codes",
                l1.len(),
                codes.rows()
            )));
        }
        Ok(Self { codes, l1 })
    }
}

/// A joined pair `(a, b, exact score)`, `a < b`.
pub type JoinPair = (u32, u32, f32);

/// Most pair classes a sketched join takes ([`JoinCuts`]).
pub const MAX_JOIN_CLASSES: usize = FILTER_CLASSES;

/// The thresholds of a sketched join: a rescoring threshold and a sketch cut for every pair, or one per
/// class of pairs, where each row has a class and a pair belongs to the lower of its two rows' classes
/// (quality bands: a pair is scored in the band of its poorer template, so the band of the lower quality
/// is the lower band). A pair of class `c` passes iff its sketches pass `classes[c].1` and its exact score
/// reaches `classes[c].0`.
#[derive(Clone, Copy, Debug)]
pub struct JoinCuts<'a> {
    /// Per base row, its class; empty with one class.
    pub row_class: &'a [u8],
    /// Per class: its threshold `t` and staged sketch cut (every class with the same prefix words).
    pub classes: &'a [(f32, StagedCut)],
}

impl<'a> JoinCuts<'a> {
    /// One threshold and cut for every pair.
    pub fn uniform(class: &'a (f32, StagedCut)) -> JoinCuts<'a> {
        JoinCuts {
            row_class: &[],
            classes: std::slice::from_ref(class),
        }
    }

    /// The lowest threshold of any class (the join's rescoring floor).
    pub fn min_t(&self) -> f32 {
        self.classes
            .iter()
            .map(|c| c.0)
            .fold(f32::INFINITY, f32::min)
    }

    /// The class of row `r` (0 with one class).
    fn of(&self, r: u32) -> usize {
        if self.classes.len() == 1 {
            0
        } else {
            usize::from(self.row_class[r as usize])
        }
    }

    /// Errors unless the classes are 1 to [`MAX_JOIN_CLASSES`], share one prefix, have no NaN threshold,
    /// and (with more than one) every one of `rows` rows has a class among them.
    fn check(&self, rows: usize) -> Result<(), IndexError> {
        let n = self.classes.len();
        if n == 0 || n > MAX_JOIN_CLASSES {
            return Err(IndexError::Shape(format!(
                "{n} join classes (1 to {MAX_JOIN_CLASSES})"
            )));
        }
        if self.classes.iter().any(|c| c.0.is_nan()) {
            return Err(IndexError::Shape("threshold is NaN".into()));
        }
        if self
            .classes
            .iter()
            .any(|c| c.1.prefix_words != self.classes[0].1.prefix_words)
        {
            return Err(IndexError::Shape(
                "join classes differ in their sketch prefix".into(),
            ));
        }
        if n > 1 {
            if self.row_class.len() != rows {
                return Err(IndexError::Shape(format!(
                    "{} row classes for {rows} rows",
                    self.row_class.len()
                )));
            }
            if let Some(r) = self.row_class.iter().position(|&c| usize::from(c) >= n) {
                return Err(IndexError::Shape(format!(
                    "row {r} has class {} of {n}",
                    self.row_class[r]
                )));
            }
        }
        Ok(())
    }
}

/// Work counters of a sketched join (per-stage pair counts, for benchmarks and run summaries).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JoinStats {
    /// Visitor × member products compared by sketch (in the one-list triangle, those with visitor < member:
    /// the count is then the same however the rows are blocked or tiled).
    pub products: u64,
    /// Products within the sketch cut (counted like `products`).
    pub sketch_pass: u64,
    /// Canonical discoveries rescored (by the i8 stage if the join has one, else with `dot_f32`).
    pub rescored: u64,
    /// Rescorings read in f32 and scored with `dot_f32`: all of them without an i8 stage, else only those
    /// the i8 stage's error bound could not reject.
    #[serde(default)]
    pub exact_reads: u64,
    /// Rescored pairs whose exact score reached the join threshold.
    pub above: u64,
}

impl JoinStats {
    /// Field-wise sum.
    pub fn add(&self, o: &JoinStats) -> JoinStats {
        JoinStats {
            products: self.products + o.products,
            sketch_pass: self.sketch_pass + o.sketch_pass,
            rescored: self.rescored + o.rescored,
            exact_reads: self.exact_reads + o.exact_reads,
            above: self.above + o.above,
        }
    }
}

impl Ivf {
    /// True iff (list `j`, visitor `x`) is the smallest discovery of the pair `{x, y}` (y a member of j).
    fn canonical(&self, j: u32, x: u32, y: u32) -> bool {
        if self.single_home {
            return self.canonical_single(j, x, self.probe[self.probe_off[x as usize]], y);
        }
        let (px, hx) = self.row_lists(x);
        let (py, hy) = self.row_lists(y);
        let me = (j, x);
        // Discoveries with x visiting a home of y.
        for &l in &py[..hy] {
            if (l, x) < me && px.contains(&l) {
                return false;
            }
        }
        // Discoveries with y visiting a home of x.
        for &l in &px[..hx] {
            if (l, y) < me && py.contains(&l) {
                return false;
            }
        }
        true
    }

    /// [`Ivf::canonical`] with the visitor's probe lists as a bitset (`xbits`, over list ids): one scan of
    /// `y`'s probe lists instead of two.
    fn canonical_with(&self, xbits: &[u64], j: u32, x: u32, y: u32) -> bool {
        let (px, hx) = self.row_lists(x);
        let (py, hy) = self.row_lists(y);
        let me = (j, x);
        let in_x = |l: u32| xbits[l as usize / 64] >> (l % 64) & 1 == 1;
        for &l in &py[..hy] {
            if (l, x) < me && in_x(l) {
                return false;
            }
        }
        for &l in &px[..hx] {
            if (l, y) < me && py.contains(&l) {
                return false;
            }
        }
        true
    }

    /// [`Ivf::canonical`] when every row has one home: `y`'s home is `j`, `x`'s is `hx`, so the only other
    /// discovery is (`hx`, `y`), which exists iff `hx` is among `y`'s probes (read only when it would win).
    /// With one-way visits, `y` visits `hx` only if `hx ≥ j`, and `x` visited `j` so `j ≥ hx`: two
    /// discoveries only within one list, no probe table read at all.
    fn canonical_single(&self, j: u32, x: u32, hx: u32, y: u32) -> bool {
        if self.one_way {
            return hx != j || x < y;
        }
        !((hx, y) < (j, x) && self.row_lists(y).0.contains(&hx))
    }

    fn check(&self, base: &RowsF32<'_>, t: f32) -> Result<(), IndexError> {
        if base.dim() != self.dim {
            return Err(IndexError::Dim {
                expected: self.dim,
                got: base.dim(),
            });
        }
        if base.rows() != self.rows {
            return Err(IndexError::Shape(format!(
                "base has {} rows, the index was built on {}",
                base.rows(),
                self.rows
            )));
        }
        if t.is_nan() {
            return Err(IndexError::Shape("threshold is NaN".into()));
        }
        Ok(())
    }

    /// All pairs `a < b` with exact score (`dot_f32`) ≥ `t` among the candidates. Emitted range by range
    /// of the larger row `b` (ranges of 2¹⁸ rows), sorted by (a, b) within a range: globally (a, b) order
    /// for bases up to 262,144 rows.
    pub fn self_join(
        &self,
        base: RowsF32<'_>,
        t: f32,
        sink: &mut dyn FnMut(u32, u32, f32),
    ) -> Result<(), IndexError> {
        self.check(&base, t)?;
        // Bound memory by joining in row ranges; one range does the same work as part of the full join.
        const RANGE: usize = 1 << 18;
        let mut lo = 0;
        while lo < self.rows {
            let hi = (lo + RANGE).min(self.rows);
            for (a, b, s) in self.self_join_rows(base, lo..hi, t)? {
                sink(a, b, s);
            }
            lo = hi;
        }
        Ok(())
    }

    /// Pairs `a < b` (exact score ≥ `t`) whose larger row `b` is in `probes`, sorted by (a, b).
    pub fn self_join_rows(
        &self,
        base: RowsF32<'_>,
        probes: Range<usize>,
        t: f32,
    ) -> Result<Vec<(u32, u32, f32)>, IndexError> {
        self.check(&base, t)?;
        let (lo, hi) = (probes.start.min(self.rows), probes.end.min(self.rows));
        if lo >= hi {
            return Ok(Vec::new());
        }
        let units = self.units(lo, hi);
        let d = self.dim;
        let mut pairs: Vec<(u32, u32, f32)> = units
            .par_iter()
            .map_init(
                || (Vec::new(), Vec::new(), Vec::new()),
                |(va, ma, buf), (j, vr, mc)| {
                    let (j, vc, mc) = (*j, &self.visitors[vr.clone()], *mc);
                    gather(base, vc, va);
                    gather(base, mc, ma);
                    gemm(va, vc.len(), ma, mc.len(), d, buf);
                    let mut out = Vec::new();
                    for (i, &x) in vc.iter().enumerate() {
                        let row = &buf[i * mc.len()..(i + 1) * mc.len()];
                        for (k, &s) in row.iter().enumerate() {
                            let y = mc[k];
                            if s < t - SLACK || x == y || !self.canonical(j, x, y) {
                                continue;
                            }
                            let (a, b) = if x < y { (x, y) } else { (y, x) };
                            let exact = dot_f32(base.row(a as usize), base.row(b as usize));
                            if exact >= t {
                                out.push((a, b, exact));
                            }
                        }
                    }
                    out
                },
            )
            .flatten()
            .collect();
        pairs.sort_unstable_by_key(|p| (p.0, p.1));
        Ok(pairs)
    }

    /// Work units of the rows-`lo..hi` join: (list, visitor range as indices into `self.visitors`, member
    /// slice), tiled. Per list, visitors in the range × members below `hi`, and visitors below `lo` × members
    /// in the range.
    fn units(&self, lo: usize, hi: usize) -> Vec<(u32, Range<usize>, &[u32])> {
        let (lo32, hi32) = (lo as u32, hi as u32);
        let mut units: Vec<(u32, Range<usize>, &[u32])> = Vec::new();
        for j in 0..self.lists {
            let off = self.vis_off[j];
            let vis = self.visitors(j);
            let mem = self.members(j);
            let (v_lo, v_hi) = (
                vis.partition_point(|&x| x < lo32),
                vis.partition_point(|&x| x < hi32),
            );
            let (m_lo, m_hi) = (
                mem.partition_point(|&x| x < lo32),
                mem.partition_point(|&x| x < hi32),
            );
            if self.triangle {
                // One list, each pair once: every member chunk in range × the visitors before its last member
                // (the canonical test keeps visitor < member).
                for mc in mem[m_lo..m_hi].chunks(MEM_TILE) {
                    let Some(&last) = mc.last() else { continue };
                    let v_end = vis.partition_point(|&x| x < last);
                    for vs in (0..v_end).step_by(VIS_TILE) {
                        units.push((j as u32, off + vs..off + (vs + VIS_TILE).min(v_end), mc));
                    }
                }
                continue;
            }
            // Visitors in range × members below hi; visitors below lo × members in range.
            for (v, m) in [(v_lo..v_hi, &mem[..m_hi]), (0..v_lo, &mem[m_lo..m_hi])] {
                if v.is_empty() || m.is_empty() {
                    continue;
                }
                for vs in v.clone().step_by(VIS_TILE) {
                    let ve = (vs + VIS_TILE).min(v.end);
                    for mc in m.chunks(MEM_TILE) {
                        units.push((j as u32, off + vs..off + ve, mc));
                    }
                }
            }
        }
        units
    }

    /// Like [`Ivf::self_join_rows`], but every visitor × member product is first filtered by sign sketch:
    /// only pairs with Hamming distance ≤ `cut` (see [`crate::sketch`]) are rescored with `dot_f32`. `sketches`
    /// must hold the sketches of `base`'s rows. No f32 GEMM: a product costs one sketch comparison.
    pub fn self_join_rows_sketched(
        &self,
        base: RowsF32<'_>,
        sketches: &Sketches,
        probes: Range<usize>,
        t: f32,
        cut: StagedCut,
    ) -> Result<Vec<JoinPair>, IndexError> {
        let class = (t, cut);
        Ok(self
            .self_join_rows_sketched_with(
                base,
                sketches,
                None,
                probes,
                JoinCuts::uniform(&class),
                &|_, _, _| true,
            )?
            .0)
    }

    /// [`Ivf::self_join_rows_sketched`] with per-class thresholds and cuts ([`JoinCuts`]) and a verdict: a
    /// pair whose exact score reaches its class's `t` is kept only if `accept(a, b, score)` (e.g. a fused
    /// multi-modal score, computed inside the join so that candidates are never materialised). With several
    /// classes each member tile is packed with its members' classes and filtered in one call per visitor
    /// ([`filter_packed_classed`]), every product at its own pair's cut.
    /// With `quant`, survivors are first scored from their i8 codes, and read in f32
    /// only if the codes' error bound leaves the pair possibly at or above `t`: the result is the same, but
    /// the join's random reads go to the 4× smaller codes (a base larger than RAM then need not be resident).
    /// Also returns the join's work counters.
    #[allow(clippy::too_many_arguments)]
    pub fn self_join_rows_sketched_with(
        &self,
        base: RowsF32<'_>,
        sketches: &Sketches,
        quant: Option<QuantStage<'_>>,
        probes: Range<usize>,
        cuts: JoinCuts<'_>,
        accept: &(dyn Fn(u32, u32, f32) -> bool + Sync),
    ) -> Result<(Vec<JoinPair>, JoinStats), IndexError> {
        cuts.check(self.rows)?;
        self.check(&base, cuts.min_t())?;
        if sketches.rows() != self.rows {
            return Err(IndexError::Shape(format!(
                "{} sketches for an index of {} rows",
                sketches.rows(),
                self.rows
            )));
        }
        if let Some(q) = quant
            && (q.codes.rows() != self.rows || q.codes.dim() != self.dim)
        {
            return Err(IndexError::Shape(format!(
                "i8 codes of {} rows × {} for an index of {} rows × {}",
                q.codes.rows(),
                q.codes.dim(),
                self.rows,
                self.dim
            )));
        }
        let (lo, hi) = (probes.start.min(self.rows), probes.end.min(self.rows));
        if lo >= hi {
            return Ok((Vec::new(), JoinStats::default()));
        }
        let units = self.units(lo, hi);
        let words = sketches.words();
        let d = self.dim;
        // Starts loading the row a survivor is rescored from.
        let prefetch = |y: u32| match quant {
            Some(q) => prefetch_row(q.codes.row(y as usize)),
            None => prefetch_row(base.row(y as usize)),
        };
        let prefix = cuts.classes[0].1.prefix_words.clamp(1, words.max(1));
        let nc = cuts.classes.len();
        // Per visitor class, the prefix cut of each member class: a pair is cut at the lower class's.
        let tables: Vec<[u32; FILTER_CLASSES]> = (0..nc)
            .map(|cx| std::array::from_fn(|cy| cuts.classes[cx.min(cy).min(nc - 1)].1.prefix_cut))
            .collect();
        let (pairs, stats): (Vec<Vec<JoinPair>>, Vec<JoinStats>) = units
            .par_iter()
            .map_init(
                || {
                    (
                        PackedBlock::default(),
                        Vec::new(),
                        vec![0u64; self.lists.div_ceil(64)],
                        Vec::new(),
                    )
                },
                |(block, hits, xbits, surv), (j, vr, mc)| {
                    let (j, mc) = (*j, *mc);
                    let (vc, vh) = (&self.visitors[vr.clone()], &self.vis_home[vr.clone()]);
                    // The member tile packed once, each member with its class where there are several.
                    block.clear(prefix);
                    for &y in mc.iter() {
                        let sy = &sketches.row(y as usize)[..prefix];
                        if nc == 1 {
                            block.push(sy);
                        } else {
                            block.push_classed(sy, cuts.of(y) as u8);
                        }
                    }
                    let mut out = Vec::new();
                    // The triangle's units hold some visitor ≥ member products (cut by the canonical test);
                    // counting only visitor < member keeps the counters the same for any blocking of the rows.
                    let mut st = JoinStats {
                        products: if self.triangle {
                            mc.iter()
                                .map(|&y| vc.partition_point(|&x| x < y) as u64)
                                .sum()
                        } else {
                            (vc.len() * mc.len()) as u64
                        },
                        ..JoinStats::default()
                    };
                    for (i, (&x, &hx)) in vc.iter().zip(vh).enumerate() {
                        // Visitors' sketches are scattered rows: start loading the next one.
                        if let Some(&next) = vc.get(i + 1) {
                            prefetch_row(&sketches.row(next as usize)[..prefix]);
                        }
                        hits.clear();
                        let sx = sketches.row(x as usize);
                        let cx = cuts.of(x);
                        if nc == 1 {
                            filter_packed(&sx[..prefix], block, cuts.classes[0].1.prefix_cut, hits);
                        } else {
                            filter_packed_classed(&sx[..prefix], block, &tables[cx], hits);
                        }
                        if hits.is_empty() {
                            continue;
                        }
                        st.sketch_pass += if self.triangle {
                            hits.iter().filter(|&&k| mc[k as usize] > x).count() as u64
                        } else {
                            hits.len() as u64
                        };
                        // With one home per row, the canonical test needs only `hx` (no bitset).
                        let px = if self.single_home {
                            &[][..]
                        } else {
                            self.row_lists(x).0
                        };
                        for &l in px {
                            xbits[l as usize / 64] |= 1 << (l % 64);
                        }
                        surv.clear();
                        for &k in hits.iter() {
                            let y = mc[k as usize];
                            let c = cx.min(cuts.of(y));
                            if prefix < words
                                && hamming(sx, sketches.row(y as usize)) > cuts.classes[c].1.cut
                            {
                                continue;
                            }
                            let canonical = if self.single_home {
                                self.canonical_single(j, x, hx, y)
                            } else {
                                self.canonical_with(xbits, j, x, y)
                            };
                            if x != y && canonical {
                                surv.push((y, cuts.classes[c].0));
                            }
                        }
                        st.rescored += surv.len() as u64;
                        // Rescoring reads each survivor's row from memory: start loading the next one
                        // while the current one is scored.
                        if let Some(&(y, _)) = surv.first() {
                            prefetch(y);
                        }
                        for (i, &(y, t)) in surv.iter().enumerate() {
                            if let Some(&(next, _)) = surv.get(i + 1) {
                                prefetch(next);
                            }
                            let (a, b) = if x < y { (x, y) } else { (y, x) };
                            let (a_, b_) = (a as usize, b as usize);
                            if let Some(q) = quant {
                                let (sa, sb) = (q.codes.scale(a_), q.codes.scale(b_));
                                let est = sa * sb * dot_i8(q.codes.row(a_), q.codes.row(b_)) as f32;
                                let err = code_error_bound(sa, q.l1[a_], sb, q.l1[b_], d);
                                if est + err < t {
                                    continue;
                                }
                            }
                            st.exact_reads += 1;
                            let exact = dot_f32(base.row(a_), base.row(b_));
                            if exact >= t {
                                st.above += 1;
                                if accept(a, b, exact) {
                                    out.push((a, b, exact));
                                }
                            }
                        }
                        for &l in px {
                            xbits[l as usize / 64] = 0;
                        }
                    }
                    (out, st)
                },
            )
            .unzip();
        let stats = stats
            .into_iter()
            .fold(JoinStats::default(), |a, b| a.add(&b));
        let mut pairs: Vec<JoinPair> = pairs.into_iter().flatten().collect();
        pairs.sort_unstable_by_key(|p| (p.0, p.1));
        Ok((pairs, stats))
    }
}
