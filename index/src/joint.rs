//! A joint threshold join over several modalities' i8 codes: every pair is scanned in every member
//! modality, and kept when an upper bound on its summed evidence can reach what the pair needs. Complete by
//! construction for any test whose per-member bounds are monotone (slopes ≥ 0) and above the evidence.
//!
//! # Why
//! With several fused modalities, a pair reaches the fused threshold on the *sum* of its modalities'
//! evidence. Joined one modality at a time, each join must keep every pair whose cosine could still be
//! completed by the others at their best, a low cosine (≈ 0.25–0.3 for a face with two fingers) that
//! ≈ 0.2 % of all pairs pass, and the survivors are rescored and bounded one by one. Here the products of
//! all members are computed for the same register block and the test sums their bounds in registers: a
//! pair passes only where its *joint* evidence can reach the floor (≈ 10⁻⁵ of pairs).
//!
//! # The test ([`JointTest`])
//! Member `k`'s evidence `L_k(c)` (monotone in the cosine) is bounded above by a piecewise linear
//! function `ℓ_k` of [`JOINT_LINES`] pieces ([`JointLine`]: from its knot on, `α·c + β`, `α ≥ 0`, each piece
//! starting no lower than the previous one ends, so `ℓ_k` never falls); a pair whose rows share members `S`
//! (bit `k` of its key: both rows present in member `k`) passes iff `Σ_{k∈S} ℓ_k(u_k) ≥ needed[S]`, where `u_k`
//! is an upper bound on the pair's exact cosine in member `k`: the i8 filter's `x̂` of [`crate::exact_i8`]
//! (the codes' estimate plus their rigorous error bound) plus that join's rounding bound and the f32
//! kernel's slack. Since `ℓ_k` never falls, `u_k ≥ c_k` gives a sum at least the one of the exact cosines,
//! so a pair whose exact test ([`JointTest::passes`]) holds always passes the scan. The scan evaluates
//! `ℓ_k(x̂ + δ)` as `α·x̂ + (β + α·δ)` on the piece whose knot less `δ` the f32 `x̂` reaches, and the sum in
//! f32: `needed` is lowered by a bound on those roundings (the scan does every widening itself).
//!
//! # Kernels
//! The i8 products are [`crate::exact_i8`]'s packed register blocks, one per member for the same rows; the
//! test runs on the block's lanes (AVX-512: 16 lanes, the key's `needed` by `vpermps`; AVX2: 8 lanes;
//! portable), with the same operations in the same order in every kernel, so all take the same decisions.

use std::ops::Range;

use rayon::prelude::*;

use crate::IndexError;
use crate::exact_i8::{
    I8Kernel, MAX_BLOCK, MAX_MR, QuantRows, RowParams, block_dots, lane_mask, pack_base,
    pack_probe, pack_row, rounding_bound, row_params,
};
use crate::quant::CODE_BOUND_SLACK;

/// Most member modalities of a joint join (a pair's key indexes a 16-entry table).
pub const MAX_JOINT: usize = 4;
/// Lines bounding each member's evidence.
pub const JOINT_LINES: usize = 4;
/// Probe rows per work item.
const QUERY_TILE: usize = 512;
/// Base rows per work item.
const BASE_TILE: usize = 1024;
/// Largest packed copy of the rows a self-join makes once for all its bands (bytes: one per code); past it,
/// each band packs its base tiles itself.
const PREPACK_MAX_BYTES: usize = 2 << 30;

/// One piece of a member's evidence bound: `slope·c + intercept` for cosines from `from` on (up to the
/// next piece's `from`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JointLine {
    /// First cosine of the piece (`−∞` for the first piece).
    pub from: f32,
    /// `α ≥ 0`.
    pub slope: f32,
    /// `β`.
    pub intercept: f32,
}

impl JointLine {
    /// `slope·c + intercept` in f64 (exact for f32 inputs up to one rounding).
    fn at(&self, c: f64) -> f64 {
        f64::from(self.slope) * c + f64::from(self.intercept)
    }
}

/// The joint test (see the module docs): per member its evidence's upper bound, per shared-member subset
/// the bound sum a pair needs.
#[derive(Clone, Debug, PartialEq)]
pub struct JointTest {
    /// Per member: the pieces of its evidence bound, knots ascending, the first from `−∞`.
    pub lines: Vec<[JointLine; JOINT_LINES]>,
    /// Per subset of members (bit `k`: member `k` shared by both rows), the least bound sum that may reach
    /// the floor; `+∞` where no pair can (and for the empty subset).
    pub needed: [f32; 1 << MAX_JOINT],
}

impl JointTest {
    /// Checks the shape: 1 to [`MAX_JOINT`] members; per member finite pieces with `α ≥ 0`, the first from
    /// `−∞`, knots ascending, each piece starting no lower than the previous ends (a bound that never
    /// falls); no `NaN` in `needed`.
    pub fn check(&self) -> Result<(), IndexError> {
        if self.lines.is_empty() || self.lines.len() > MAX_JOINT {
            return Err(IndexError::Shape(format!(
                "joint test: {} members (1 to {MAX_JOINT})",
                self.lines.len()
            )));
        }
        for (k, lines) in self.lines.iter().enumerate() {
            let pieces_ok = lines
                .iter()
                .all(|l| l.slope.is_finite() && l.intercept.is_finite() && l.slope >= 0.0);
            let knots_ok = lines[0].from == f32::NEG_INFINITY
                && lines[1..].iter().all(|l| l.from.is_finite())
                && lines.windows(2).all(|w| {
                    let c = f64::from(w[1].from);
                    w[0].from < w[1].from && w[1].at(c) >= w[0].at(c)
                });
            if !pieces_ok || !knots_ok {
                return Err(IndexError::Shape(format!(
                    "joint test: member {k}'s pieces {lines:?} (finite, slopes ≥ 0, knots ascending, never falling)"
                )));
            }
        }
        if self.needed.iter().any(|v| v.is_nan()) {
            return Err(IndexError::Shape("joint test: NaN needed sum".into()));
        }
        Ok(())
    }

    /// Member `k`'s evidence bound at cosine `c` (in f64): the piece of the last knot at or below `c`.
    pub fn bound(&self, k: usize, c: f64) -> f64 {
        let lines = &self.lines[k];
        lines
            .iter()
            .rev()
            .find(|l| f64::from(l.from) <= c)
            .unwrap_or(&lines[0])
            .at(c)
    }

    /// The exact test of a pair sharing the members in `key` with exact cosines `cos` (by member; entries of
    /// members outside `key` are ignored): what the scan may never reject.
    pub fn passes(&self, key: u8, cos: &[f32]) -> bool {
        let key = usize::from(key) & ((1 << self.lines.len()) - 1);
        let sum: f64 = (0..self.lines.len())
            .filter(|&k| key & (1 << k) != 0)
            .map(|k| self.bound(k, f64::from(cos[k])))
            .sum();
        sum >= f64::from(self.needed[key])
    }
}

/// Counters of a joint join.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JointStats {
    /// Pairs scanned (each through every member's codes).
    pub pairs: u64,
    /// i8 products computed (pairs × members).
    pub products: u64,
    /// Pairs the test kept.
    pub kept: u64,
}

/// The widened test one scan evaluates, in the kernels' f32 (see the module docs).
struct Scan {
    /// Per member: pieces `(knot, α, β)` with the knot lowered and `β` raised by `δ = rounding + slack`
    /// (the first knot `−∞`).
    lines: [[(f32, f32, f32); JOINT_LINES]; MAX_JOINT],
    /// `needed` lowered by the sum's rounding bound.
    needed: [f32; 1 << MAX_JOINT],
    /// Per member: `d/4`, the VNNI offset term of the filter.
    qd: [f32; MAX_JOINT],
    members: usize,
}

impl Scan {
    /// The test widened for a join of probe rows with parameters `a` against base rows `b` (by member), of
    /// dimensions `dims`.
    fn new(test: &JointTest, a: &[RowParams], b: &[RowParams], dims: &[usize]) -> Scan {
        let mut lines = [[(f32::INFINITY, 0.0f32, 0.0f32); JOINT_LINES]; MAX_JOINT];
        let mut qd = [0.0f32; MAX_JOINT];
        let (mut scale, mut slopes) = (0.0f64, 0.0f64);
        for (k, ((pa, pb), d)) in a.iter().zip(b).zip(dims).enumerate() {
            let (e, mag) = rounding_bound(pa, pb, *d);
            let widen = f64::from(CODE_BOUND_SLACK) + e;
            let (mut top, mut steep) = (0.0f64, 0.0f64);
            for (j, l) in test.lines[k].iter().enumerate() {
                let b2 = ((f64::from(l.intercept) + f64::from(l.slope) * widen) as f32).next_up();
                let from = if j == 0 {
                    f32::NEG_INFINITY
                } else {
                    ((f64::from(l.from) - widen) as f32).next_down()
                };
                lines[k][j] = (from, l.slope, b2);
                top = top.max(f64::from(l.slope) * (mag + widen) + f64::from(b2).abs());
                steep = steep.max(f64::from(l.slope));
            }
            qd[k] = 0.25 * *d as f32;
            scale += top;
            slopes += steep;
        }
        // Each member's bound: one product and one sum rounded, then one sum per member: at most
        // (members + 2) roundings of magnitudes ≤ `scale`, 16 units of roundoff cover them. The knots,
        // lowered by `δ` and rounded down, may pick a piece up to two units of roundoff of a cosine early,
        // where it lies at most `α·2⁻²²` below the bound (it starts no lower than the previous piece ends).
        let margin = 16.0 * f64::from(f32::EPSILON) * scale + 1e-6 * slopes;
        let mut needed = [f32::INFINITY; 1 << MAX_JOINT];
        for (key, n) in needed.iter_mut().enumerate().skip(1) {
            let v = test.needed.get(key).copied().unwrap_or(f32::INFINITY);
            if v.is_finite() {
                *n = ((f64::from(v) - margin) as f32).next_down();
            } else if v < 0.0 {
                *n = f32::NEG_INFINITY;
            }
        }
        Scan {
            lines,
            needed,
            qd,
            members: dims.len(),
        }
    }
}

/// A joint join's inputs: the members' rows (same row numbers), each row's presence and the test.
pub struct JointJoin<'a> {
    members: Vec<QuantRows<'a>>,
    presence: &'a [u8],
    test: &'a JointTest,
}

impl<'a> JointJoin<'a> {
    /// Checks that the members describe the same rows, `presence` has one byte per row (bit `k`: the row
    /// takes part in member `k`; 0: the row gives no pairs) and the test has one line set per member.
    pub fn new(
        members: Vec<QuantRows<'a>>,
        presence: &'a [u8],
        test: &'a JointTest,
    ) -> Result<JointJoin<'a>, IndexError> {
        test.check()?;
        check_side("joint join", &members, presence, test)?;
        Ok(JointJoin {
            members,
            presence,
            test,
        })
    }

    /// All pairs `(a, b)`, `b` in `probes`, `a < b`, that pass the widened test, sorted, with the counters
    /// (the dedup form: each probe row against every earlier row).
    pub fn probe_join(
        &self,
        probes: Range<usize>,
    ) -> Result<(Vec<(u32, u32)>, JointStats), IndexError> {
        self.probe_join_with_kernel(I8Kernel::detect(), probes)
    }

    /// [`JointJoin::probe_join`] with a chosen kernel (tests and benches; an unavailable one runs the
    /// portable path).
    #[doc(hidden)]
    pub fn probe_join_with_kernel(
        &self,
        kernel: I8Kernel,
        probes: Range<usize>,
    ) -> Result<(Vec<(u32, u32)>, JointStats), IndexError> {
        let rows = self.presence.len();
        let end = probes.end.min(rows);
        let start = probes.start.min(end);
        let mut items = Vec::new();
        for q0 in (start..end).step_by(QUERY_TILE) {
            let q1 = (q0 + QUERY_TILE).min(end);
            // Base rows below the band's last row only.
            for b0 in (0..q1 - 1).step_by(BASE_TILE) {
                items.push((q0..q1, b0..(b0 + BASE_TILE).min(q1 - 1)));
            }
        }
        let sliced: Vec<QuantRows<'a>> =
            self.members.iter().map(|m| m.slice_rows(0, end)).collect();
        let bands = (end - start).div_ceil(QUERY_TILE);
        let packed_bytes: usize = sliced.iter().map(|m| m.rows() * m.dim()).sum();
        // Where several bands meet the same base tiles, every tile would be packed once per band: pack all
        // the rows once instead (as many bytes as their codes), within a memory budget.
        let prepared = if bands >= 2 && packed_bytes <= PREPACK_MAX_BYTES {
            Some(PreparedBase::with_kernel(kernel, &sliced)?)
        } else {
            None
        };
        let own: Vec<RowParams>;
        let (kernel, params, base_panels) = match &prepared {
            Some(p) => (p.kernel, p.params.as_slice(), Some(&p.panels[..])),
            None => {
                own = sliced
                    .iter()
                    .map(row_params)
                    .collect::<Result<_, IndexError>>()?;
                (kernel, own.as_slice(), None)
            }
        };
        let sides = Sides {
            probe: &self.members,
            base: &self.members,
            base_panels,
            probe_presence: self.presence,
            base_presence: self.presence,
            probe_params: params,
            base_params: params,
            triangle: true,
        };
        Ok(sides.run(kernel, self.test, &items))
    }
}

/// Checks one side of a joint join: one member per test line set, all describing the same rows, one presence
/// byte per row.
fn check_side(
    what: &str,
    members: &[QuantRows<'_>],
    presence: &[u8],
    test: &JointTest,
) -> Result<(), IndexError> {
    if members.len() != test.lines.len() {
        return Err(IndexError::Shape(format!(
            "{what}: {} members, a test for {}",
            members.len(),
            test.lines.len()
        )));
    }
    let rows = members.first().map_or(0, QuantRows::rows);
    if members.iter().any(|m| m.rows() != rows) || presence.len() != rows {
        return Err(IndexError::Shape(format!(
            "{what}: member rows {:?}, {} presence bytes",
            members.iter().map(QuantRows::rows).collect::<Vec<_>>(),
            presence.len()
        )));
    }
    Ok(())
}

/// Checks that member `k` of the probes has dimension `dims[k]` (the base side's).
fn check_dims(probes: &[QuantRows<'_>], dims: &[usize]) -> Result<(), IndexError> {
    if let Some((k, (p, d))) = probes
        .iter()
        .zip(dims)
        .enumerate()
        .find(|(_, (p, d))| p.dim() != **d)
    {
        return Err(IndexError::Shape(format!(
            "joint cross join: member {k} has dimension {} on the probe side, {d} on the base side",
            p.dim()
        )));
    }
    Ok(())
}

/// A joint join of separate probe rows against base rows (an identify batch against the store): every
/// probe row against every base row, through every member's codes.
pub struct JointCross<'a> {
    probes: Vec<QuantRows<'a>>,
    probe_presence: &'a [u8],
    base: Base<'a>,
    base_presence: &'a [u8],
    test: &'a JointTest,
}

/// The base side of a cross join: rows prepared by the scan itself, or once for many scans.
enum Base<'a> {
    Rows(Vec<QuantRows<'a>>),
    Prepared(&'a PreparedBase),
}

/// Stored rows prepared once for many cross joins ([`JointCross::with_prepared`]): per member, every row's
/// parameters (scale, half L1 bound, VNNI correction) and its codes packed into the kernel's panels, the
/// work a scan otherwise does on every call (at 1 M rows × 1 024 code bytes, ≈ 0.5 s against ≈ 0.05 s of
/// products for a batch of 10 probes). Holds as many bytes as the codes, plus 12 per row and member.
#[derive(Clone)]
pub struct PreparedBase {
    kernel: I8Kernel,
    rows: usize,
    dims: Vec<usize>,
    params: Vec<RowParams>,
    /// Per member: all rows in panels of `nr` rows (`[panel][k/4][nr][4]`, see `pack_base`).
    panels: Vec<Vec<u8>>,
}

impl PreparedBase {
    /// Prepares `members` (same rows, one per test member) for the detected kernel.
    pub fn new(members: &[QuantRows<'_>]) -> Result<PreparedBase, IndexError> {
        Self::with_kernel(I8Kernel::detect(), members)
    }

    /// [`PreparedBase::new`] for a chosen kernel (tests; an unavailable one prepares for the portable path).
    #[doc(hidden)]
    pub fn with_kernel(
        kernel: I8Kernel,
        members: &[QuantRows<'_>],
    ) -> Result<PreparedBase, IndexError> {
        let kernel = if kernel.available() {
            kernel
        } else {
            I8Kernel::Scalar
        };
        let mut base = PreparedBase {
            kernel,
            rows: 0,
            dims: members.iter().map(QuantRows::dim).collect(),
            params: Vec::new(),
            panels: vec![Vec::new(); members.len()],
        };
        base.extend(members)?;
        Ok(base)
    }

    /// Appends rows `more` (one view per member of the rows that follow those prepared, e.g. rows
    /// committed since): their parameters, and their codes packed into the panels (the last partial panel
    /// filled in place).
    pub fn extend(&mut self, more: &[QuantRows<'_>]) -> Result<(), IndexError> {
        let added = more.first().map_or(0, QuantRows::rows);
        if more.len() != self.dims.len()
            || more
                .iter()
                .zip(&self.dims)
                .any(|(m, &d)| m.dim() != d || m.rows() != added)
        {
            return Err(IndexError::Shape(format!(
                "prepared joint base of dimensions {:?}: rows of {:?} rows, dimensions {:?} appended",
                self.dims,
                more.iter().map(QuantRows::rows).collect::<Vec<_>>(),
                more.iter().map(QuantRows::dim).collect::<Vec<_>>()
            )));
        }
        let mut params = Vec::with_capacity(more.len());
        for m in more {
            // Row numbers in errors are the base's, not the appended rows'.
            params.push(row_params(m).map_err(|e| match e {
                IndexError::InvalidVector { id, problem } => IndexError::InvalidVector {
                    id: id + self.rows,
                    problem,
                },
                e => e,
            })?);
        }
        if self.params.is_empty() {
            self.params = params;
        } else {
            for (have, p) in self.params.iter_mut().zip(params) {
                have.append(p);
            }
        }
        let (nr, xor) = (self.kernel.nr(), self.kernel.base_xor());
        let rows = self.rows + added;
        let from = self.rows;
        for ((m, panels), &d) in more.iter().zip(&mut self.panels).zip(&self.dims) {
            let panel_bytes = self.kernel.k4(d) * 4 * nr;
            let total = rows.div_ceil(nr) * panel_bytes;
            // Zeroed memory from the allocator (untouched pages until written), written below in parallel.
            if panels.is_empty() {
                *panels = vec![0u8; total];
            } else {
                panels.resize(total, 0);
            }
            // Panels in parallel (each holds its own rows), from the one the first new row falls in: a panel
            // without earlier rows is first set to padding (`0 ^ xor`); a partial one already is.
            let first = from / nr;
            panels[first * panel_bytes..]
                .par_chunks_mut(panel_bytes)
                .enumerate()
                .for_each(|(k, panel)| {
                    let r0 = (first + k) * nr;
                    if r0 >= from {
                        panel.fill(xor);
                    }
                    for r in r0.max(from)..(r0 + nr).min(rows) {
                        pack_row(panel, r - r0, nr, m.codes.row(r - from), xor);
                    }
                });
        }
        self.rows = rows;
        Ok(())
    }

    /// Rows prepared.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes held (packed codes and row parameters).
    pub fn bytes(&self) -> usize {
        self.panels.iter().map(Vec::len).sum::<usize>()
            + self.params.iter().map(RowParams::bytes).sum::<usize>()
    }
}

impl<'a> JointCross<'a> {
    /// Checks that each side's members describe the same rows, with one presence byte per row (bit `k`:
    /// the row has member `k`; 0: the row takes part in no pair), that both sides have one member per test
    /// line set, and that member `k` has the same dimension on both sides.
    pub fn new(
        probes: Vec<QuantRows<'a>>,
        probe_presence: &'a [u8],
        base: Vec<QuantRows<'a>>,
        base_presence: &'a [u8],
        test: &'a JointTest,
    ) -> Result<JointCross<'a>, IndexError> {
        check_side("joint cross join, base side", &base, base_presence, test)?;
        let dims: Vec<usize> = base.iter().map(QuantRows::dim).collect();
        Self::checked(
            probes,
            probe_presence,
            Base::Rows(base),
            &dims,
            base_presence,
            test,
        )
    }

    /// [`JointCross::new`] against a [`PreparedBase`] (its rows, parameters and panels; `base_presence` one
    /// byte per prepared row): the scan packs only the probes.
    pub fn with_prepared(
        probes: Vec<QuantRows<'a>>,
        probe_presence: &'a [u8],
        base: &'a PreparedBase,
        base_presence: &'a [u8],
        test: &'a JointTest,
    ) -> Result<JointCross<'a>, IndexError> {
        if base.dims.len() != test.lines.len() || base_presence.len() != base.rows {
            return Err(IndexError::Shape(format!(
                "joint cross join: a prepared base of {} members and {} rows, a test for {}, {} presence bytes",
                base.dims.len(),
                base.rows,
                test.lines.len(),
                base_presence.len()
            )));
        }
        Self::checked(
            probes,
            probe_presence,
            Base::Prepared(base),
            &base.dims,
            base_presence,
            test,
        )
    }

    /// The join once the base side is checked: the test's shape, the probe side, its dimensions against
    /// the base's `dims`.
    fn checked(
        probes: Vec<QuantRows<'a>>,
        probe_presence: &'a [u8],
        base: Base<'a>,
        dims: &[usize],
        base_presence: &'a [u8],
        test: &'a JointTest,
    ) -> Result<JointCross<'a>, IndexError> {
        test.check()?;
        check_side(
            "joint cross join, probe side",
            &probes,
            probe_presence,
            test,
        )?;
        check_dims(&probes, dims)?;
        Ok(JointCross {
            probes,
            probe_presence,
            base,
            base_presence,
            test,
        })
    }

    /// All pairs `(probe row, base row)` that pass the widened test, sorted, with the counters.
    pub fn join(&self) -> Result<(Vec<(u32, u32)>, JointStats), IndexError> {
        self.join_with_kernel(I8Kernel::detect())
    }

    /// [`JointCross::join`] with a chosen kernel (tests and benches; an unavailable one runs the portable
    /// path; against a prepared base, its kernel).
    #[doc(hidden)]
    pub fn join_with_kernel(
        &self,
        kernel: I8Kernel,
    ) -> Result<(Vec<(u32, u32)>, JointStats), IndexError> {
        let params = |members: &[QuantRows<'_>]| -> Result<Vec<RowParams>, IndexError> {
            members.iter().map(row_params).collect()
        };
        let probe_params = params(&self.probes)?;
        let own;
        let (kernel, base, base_params, base_panels) = match &self.base {
            Base::Rows(rows) => {
                own = params(rows)?;
                (kernel, rows.as_slice(), own.as_slice(), None)
            }
            Base::Prepared(p) => (p.kernel, &[][..], p.params.as_slice(), Some(&p.panels[..])),
        };
        let (np, nb) = (self.probe_presence.len(), self.base_presence.len());
        let mut items = Vec::new();
        for q0 in (0..np).step_by(QUERY_TILE) {
            for b0 in (0..nb).step_by(BASE_TILE) {
                items.push((q0..(q0 + QUERY_TILE).min(np), b0..(b0 + BASE_TILE).min(nb)));
            }
        }
        let sides = Sides {
            probe: &self.probes,
            base,
            base_panels,
            probe_presence: self.probe_presence,
            base_presence: self.base_presence,
            probe_params: &probe_params,
            base_params,
            triangle: false,
        };
        Ok(sides.run(kernel, self.test, &items))
    }
}

/// The two sides of a joint scan, per member: rows, presence and row parameters (the same slices on both
/// sides for a self-join, which then keeps base rows below the probe row only: `triangle`).
struct Sides<'a, 'p> {
    probe: &'p [QuantRows<'a>],
    /// Empty where the base is prepared (`base_panels`).
    base: &'p [QuantRows<'a>],
    /// Per member, every base row's codes already packed ([`PreparedBase`]).
    base_panels: Option<&'p [Vec<u8>]>,
    probe_presence: &'p [u8],
    base_presence: &'p [u8],
    probe_params: &'p [RowParams],
    base_params: &'p [RowParams],
    triangle: bool,
}

impl Sides<'_, '_> {
    /// Every work item (probe band × base tile) in parallel; the kept pairs `(a, b)` sorted: `a < b` for
    /// the triangle (base row, probe row), else `(probe row, base row)`.
    fn run(
        &self,
        kernel: I8Kernel,
        test: &JointTest,
        items: &[(Range<usize>, Range<usize>)],
    ) -> (Vec<(u32, u32)>, JointStats) {
        let kernel = if kernel.available() {
            kernel
        } else {
            I8Kernel::Scalar
        };
        let dims: Vec<usize> = self.probe.iter().map(QuantRows::dim).collect();
        let scan = Scan::new(test, self.probe_params, self.base_params, &dims);
        let ctx = Ctx {
            kernel,
            sides: self,
            scan: &scan,
        };
        let parts: Vec<(Vec<(u32, u32)>, JointStats)> = items
            .par_iter()
            .map_init(Scratch::default, |sc, (band, tile)| {
                ctx.item(sc, band.clone(), tile.clone())
            })
            .collect();
        let mut stats = JointStats::default();
        let mut out = Vec::with_capacity(parts.iter().map(|p| p.0.len()).sum());
        for (p, s) in parts {
            out.extend(p);
            stats.pairs += s.pairs;
            stats.products += s.products;
            stats.kept += s.kept;
        }
        out.sort_unstable();
        (out, stats)
    }
}

#[derive(Default)]
struct Scratch {
    a: Vec<Vec<i8>>,
    b: Vec<Vec<u8>>,
}

struct Ctx<'a, 'p, 's> {
    kernel: I8Kernel,
    sides: &'s Sides<'a, 'p>,
    scan: &'s Scan,
}

/// One register block's lane quantities, per member.
struct Lanes {
    /// Probe rows: scale, half L1 bound, presence.
    sa: [[f32; MAX_MR]; MAX_JOINT],
    uah: [[f32; MAX_MR]; MAX_JOINT],
    pa: [i32; MAX_MR],
    /// Base lanes: scale, half L1 bound, presence.
    sb: [[f32; 32]; MAX_JOINT],
    ubh: [[f32; 32]; MAX_JOINT],
    pb: [i32; 32],
}

impl Ctx<'_, '_, '_> {
    /// One band (probe rows, absolute) × tile (base rows): every member's packed scan, the joint test.
    #[allow(clippy::needless_range_loop)] // rows and lanes index several parallel arrays
    fn item(
        &self,
        sc: &mut Scratch,
        band: Range<usize>,
        tile: Range<usize>,
    ) -> (Vec<(u32, u32)>, JointStats) {
        let k = self.kernel;
        let (mr, nr) = (k.mr(), k.nr());
        let sides = self.sides;
        let nm = sides.probe.len();
        sc.a.resize_with(nm, Vec::new);
        sc.b.resize_with(nm, Vec::new);
        let mut kps = [0usize; MAX_JOINT];
        for (m, prows) in sides.probe.iter().enumerate() {
            let k4 = k.k4(prows.dim());
            kps[m] = k4 * 4;
            pack_probe(k, &prows.codes, band.clone(), kps[m], &mut sc.a[m]);
            if sides.base_panels.is_none() {
                pack_base(
                    &sides.base[m].codes,
                    tile.clone(),
                    nr,
                    k4,
                    k.base_xor(),
                    &mut sc.b[m],
                );
            }
        }
        // Panel 0 of the tile: in the scratch, or where the tile starts in the prepared panels (tiles start
        // at multiples of `nr`).
        let first_panel = if sides.base_panels.is_some() {
            tile.start / nr
        } else {
            0
        };
        let (ppres, bpres) = (sides.probe_presence, sides.base_presence);
        let nb = band.len().div_ceil(mr) * mr;
        let mut st = JointStats::default();
        let mut out = Vec::new();
        let mut dots = [[0i32; MAX_BLOCK]; MAX_JOINT];
        let mut masks = [0u32; MAX_MR];
        let mut corr = [[0i32; MAX_MR]; MAX_JOINT];
        let mut lanes = Lanes {
            sa: [[0.0; MAX_MR]; MAX_JOINT],
            uah: [[0.0; MAX_MR]; MAX_JOINT],
            pa: [0; MAX_MR],
            sb: [[0.0; 32]; MAX_JOINT],
            ubh: [[0.0; 32]; MAX_JOINT],
            pb: [0; 32],
        };
        for p in 0..tile.len().div_ceil(nr) {
            let j0 = tile.start + p * nr;
            let jn = nr.min(tile.end - j0);
            lanes.pb = [0; 32];
            for l in 0..jn {
                lanes.pb[l] = i32::from(bpres[j0 + l]);
            }
            // A panel of absent rows is counted (its pairs are in the join's range) but not scanned.
            let base_empty = lanes.pb.iter().all(|&x| x == 0);
            if !base_empty {
                for (m, rp) in sides.base_params.iter().enumerate() {
                    lanes.sb[m] = [0.0; 32];
                    lanes.ubh[m] = [0.0; 32];
                    for l in 0..jn {
                        lanes.sb[m][l] = rp.s[j0 + l];
                        lanes.ubh[m][l] = rp.uh[j0 + l];
                    }
                }
            }
            for g in 0..nb / mr {
                let r0 = g * mr;
                let rn = mr.min(band.len() - r0);
                let i0 = band.start + r0;
                // Only lanes j < i: a block whose first base row is past its last probe row has none.
                if sides.triangle && j0 + 1 >= i0 + rn {
                    continue;
                }
                lanes.pa = [0; MAX_MR];
                for r in 0..rn {
                    lanes.pa[r] = i32::from(ppres[i0 + r]);
                }
                if lanes.pa.iter().all(|&x| x == 0) {
                    continue;
                }
                // Each present probe row's lanes in the pair set (the triangle's j < i).
                let mut live = [0usize; MAX_MR];
                for r in 0..rn {
                    if lanes.pa[r] != 0 {
                        live[r] = if sides.triangle {
                            (i0 + r).saturating_sub(j0).min(jn)
                        } else {
                            jn
                        };
                        st.pairs += live[r] as u64;
                    }
                }
                if base_empty {
                    continue;
                }
                for (m, rp) in sides.probe_params.iter().enumerate() {
                    lanes.sa[m] = [0.0; MAX_MR];
                    lanes.uah[m] = [0.0; MAX_MR];
                    corr[m] = [0; MAX_MR];
                    for r in 0..rn {
                        lanes.sa[m][r] = rp.s[i0 + r];
                        lanes.uah[m][r] = rp.uh[i0 + r];
                        if k == I8Kernel::Vnni {
                            corr[m][r] = rp.corr[i0 + r];
                        }
                    }
                    let kp = kps[m];
                    let panels = sides.base_panels.map_or(&sc.b[m], |b| &b[m]);
                    let q = first_panel + p;
                    block_dots(
                        k,
                        &sc.a[m][r0 * kp..(r0 + mr) * kp],
                        kp,
                        &panels[q * kp * nr..(q + 1) * kp * nr],
                        &corr[m],
                        &mut dots[m],
                    );
                }
                joint_filter(k, &dots, &lanes, self.scan, &mut masks);
                for r in 0..rn {
                    if lanes.pa[r] == 0 {
                        continue;
                    }
                    let i = i0 + r;
                    let mut bits = masks[r] & lane_mask(live[r]);
                    while bits != 0 {
                        let l = bits.trailing_zeros() as usize;
                        bits &= bits - 1;
                        out.push(if sides.triangle {
                            ((j0 + l) as u32, i as u32)
                        } else {
                            (i as u32, (j0 + l) as u32)
                        });
                    }
                }
            }
        }
        st.products = st.pairs * nm as u64;
        st.kept = out.len() as u64;
        (out, st)
    }
}

/// `masks[r]` bit `l` set iff lane `(r, l)` passes the widened test.
fn joint_filter(
    kernel: I8Kernel,
    dots: &[[i32; MAX_BLOCK]; MAX_JOINT],
    lanes: &Lanes,
    scan: &Scan,
    masks: &mut [u32; MAX_MR],
) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        I8Kernel::Vnni | I8Kernel::Amx if kernel.available() => {
            // SAFETY: the CPU has AVX-512F (`available` checked it with BW and VNNI, or with AMX).
            unsafe { joint_filter_avx512(kernel.mr(), dots, lanes, scan, masks) }
        }
        #[cfg(target_arch = "x86_64")]
        I8Kernel::Avx2 if kernel.available() => {
            // SAFETY: the CPU has AVX2 (`available` just checked).
            unsafe { joint_filter_avx2(dots, lanes, scan, masks) }
        }
        _ => joint_filter_scalar(kernel.mr(), kernel.nr(), dots, lanes, scan, masks),
    }
}

/// The portable [`joint_filter`]: the reference order of operations.
#[allow(clippy::needless_range_loop)] // members index several parallel arrays
fn joint_filter_scalar(
    mr: usize,
    nr: usize,
    dots: &[[i32; MAX_BLOCK]; MAX_JOINT],
    lanes: &Lanes,
    scan: &Scan,
    masks: &mut [u32; MAX_MR],
) {
    for (r, mask) in masks.iter_mut().enumerate().take(mr) {
        let mut bits = 0u32;
        for l in 0..nr {
            let key = (lanes.pa[r] & lanes.pb[l]) as usize & ((1 << MAX_JOINT) - 1);
            let mut sum = 0.0f32;
            for m in 0..scan.members {
                let (sa, sb) = (lanes.sa[m][r], lanes.sb[m][l]);
                let x = (sa * sb) * (dots[m][r * nr + l] as f32 + scan.qd[m])
                    + sa * lanes.ubh[m][l]
                    + lanes.uah[m][r] * sb;
                let (_, a0, c0) = scan.lines[m][0];
                let mut b = a0 * x + c0;
                for &(from, a, c) in &scan.lines[m][1..] {
                    if x >= from {
                        b = a * x + c;
                    }
                }
                if key & (1 << m) != 0 {
                    sum += b;
                }
            }
            if sum >= scan.needed[key] {
                bits |= 1 << l;
            }
        }
        *mask = bits;
    }
}

/// AVX-512 [`joint_filter`] for the VNNI and AMX blocks (`mr` × 32), the scalar one's operations in its
/// order.
///
/// # Safety
/// The CPU supports AVX-512F; `mr ≤ MAX_MR`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // members index several parallel arrays
#[target_feature(enable = "avx512f")]
unsafe fn joint_filter_avx512(
    mr: usize,
    dots: &[[i32; MAX_BLOCK]; MAX_JOINT],
    lanes: &Lanes,
    scan: &Scan,
    masks: &mut [u32; MAX_MR],
) {
    use std::arch::x86_64::*;
    // SAFETY: `needed` holds 16 f32.
    let need = unsafe { _mm512_loadu_ps(scan.needed.as_ptr()) };
    let lowbits = _mm512_set1_epi32((1 << MAX_JOINT) - 1);
    for (r, mask) in masks.iter_mut().enumerate().take(mr) {
        let pa = _mm512_set1_epi32(lanes.pa[r]);
        let mut bits = 0u32;
        for h in 0..2 {
            // SAFETY: `pb` holds 32 i32; 16 are read from 16h ≤ 16.
            let pb = unsafe { _mm512_loadu_si512(lanes.pb.as_ptr().add(16 * h).cast()) };
            let key = _mm512_and_si512(_mm512_and_si512(pa, pb), lowbits);
            let mut sum = _mm512_setzero_ps();
            for m in 0..scan.members {
                let sa = _mm512_set1_ps(lanes.sa[m][r]);
                let uah = _mm512_set1_ps(lanes.uah[m][r]);
                // SAFETY: `sb` and `ubh` hold 32 f32 per member; 16 are read from 16h ≤ 16.
                let sb = unsafe { _mm512_loadu_ps(lanes.sb[m].as_ptr().add(16 * h)) };
                // SAFETY: `sb` and `ubh` hold 32 f32 per member; 16 are read from 16h ≤ 16.
                let ubh = unsafe { _mm512_loadu_ps(lanes.ubh[m].as_ptr().add(16 * h)) };
                // SAFETY: `dots[m]` holds MAX_BLOCK = 1 024 i32; 16 are read from r·32 + 16h ≤ 32·(MAX_MR − 1) + 16.
                let d = unsafe { _mm512_loadu_si512(dots[m].as_ptr().add(r * 32 + 16 * h).cast()) };
                let df = _mm512_add_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(scan.qd[m]));
                let w = _mm512_mul_ps(_mm512_mul_ps(sa, sb), df);
                let y = _mm512_add_ps(w, _mm512_mul_ps(sa, ubh));
                let x = _mm512_add_ps(y, _mm512_mul_ps(uah, sb));
                let (_, a0, c0) = scan.lines[m][0];
                let mut b = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(a0), x), _mm512_set1_ps(c0));
                for &(from, a, c) in &scan.lines[m][1..] {
                    let v = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(a), x), _mm512_set1_ps(c));
                    let on = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(from));
                    b = _mm512_mask_blend_ps(on, b, v);
                }
                let has = _mm512_test_epi32_mask(key, _mm512_set1_epi32(1 << m));
                sum = _mm512_mask_add_ps(sum, has, sum, b);
            }
            let nk = _mm512_permutexvar_ps(key, need);
            let k = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(sum, nk);
            bits |= u32::from(k) << (16 * h);
        }
        *mask = bits;
    }
}

/// AVX2 [`joint_filter`] for the AVX2 block (4 × 16), the scalar one's operations in its order.
///
/// # Safety
/// The CPU supports AVX2.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // members index several parallel arrays
#[target_feature(enable = "avx2")]
unsafe fn joint_filter_avx2(
    dots: &[[i32; MAX_BLOCK]; MAX_JOINT],
    lanes: &Lanes,
    scan: &Scan,
    masks: &mut [u32; MAX_MR],
) {
    use std::arch::x86_64::*;
    // SAFETY: `needed` holds 16 f32: halves 0..8 and 8..16.
    let (need_lo, need_hi) = unsafe {
        (
            _mm256_loadu_ps(scan.needed.as_ptr()),
            _mm256_loadu_ps(scan.needed.as_ptr().add(8)),
        )
    };
    let lowbits = _mm256_set1_epi32((1 << MAX_JOINT) - 1);
    let eight = _mm256_set1_epi32(8);
    for (r, mask) in masks.iter_mut().enumerate().take(4) {
        let pa = _mm256_set1_epi32(lanes.pa[r]);
        let mut bits = 0u32;
        for h in 0..2 {
            // SAFETY: `pb` holds 32 i32; 8 are read from 8h ≤ 8.
            let pb = unsafe { _mm256_loadu_si256(lanes.pb.as_ptr().add(8 * h).cast()) };
            let key = _mm256_and_si256(_mm256_and_si256(pa, pb), lowbits);
            let mut sum = _mm256_setzero_ps();
            for m in 0..scan.members {
                let sa = _mm256_set1_ps(lanes.sa[m][r]);
                let uah = _mm256_set1_ps(lanes.uah[m][r]);
                // SAFETY: `sb` and `ubh` hold 32 f32 per member; 8 are read from 8h ≤ 8.
                let sb = unsafe { _mm256_loadu_ps(lanes.sb[m].as_ptr().add(8 * h)) };
                // SAFETY: `sb` and `ubh` hold 32 f32 per member; 8 are read from 8h ≤ 8.
                let ubh = unsafe { _mm256_loadu_ps(lanes.ubh[m].as_ptr().add(8 * h)) };
                // SAFETY: `dots[m]` holds MAX_BLOCK = 1 024 i32; 8 are read from r·16 + 8h ≤ 56.
                let d = unsafe { _mm256_loadu_si256(dots[m].as_ptr().add(r * 16 + 8 * h).cast()) };
                let df = _mm256_add_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(scan.qd[m]));
                let w = _mm256_mul_ps(_mm256_mul_ps(sa, sb), df);
                let y = _mm256_add_ps(w, _mm256_mul_ps(sa, ubh));
                let x = _mm256_add_ps(y, _mm256_mul_ps(uah, sb));
                let (_, a0, c0) = scan.lines[m][0];
                let mut b = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(a0), x), _mm256_set1_ps(c0));
                for &(from, a, c) in &scan.lines[m][1..] {
                    let v = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(a), x), _mm256_set1_ps(c));
                    let on = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(from));
                    b = _mm256_blendv_ps(b, v, on);
                }
                let bit = _mm256_set1_epi32(1 << m);
                let has = _mm256_cmpeq_epi32(_mm256_and_si256(key, bit), bit);
                // Adding +0 where the member is not shared leaves the sum as the scalar path's skip does.
                sum = _mm256_add_ps(sum, _mm256_and_ps(b, _mm256_castsi256_ps(has)));
            }
            let lo = _mm256_permutevar8x32_ps(need_lo, key);
            let hi = _mm256_permutevar8x32_ps(need_hi, key);
            let upper = _mm256_cmpeq_epi32(_mm256_and_si256(key, eight), eight);
            let nk = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(upper));
            let k = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(sum, nk)) as u32;
            bits |= (k & 0xff) << (8 * h);
        }
        *mask = bits;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exact_i8::tests::kernels;
    use crate::kernels::dot_f32;
    use crate::quant::{l1_bounds, quantize_rows};
    use crate::view::RowsF32;
    use proptest::prelude::*;

    /// Unit rows in `d` dimensions; every 5th row leans on the row `lag` before it (pairs near any cosine).
    fn rows(n: usize, d: usize, seed: u64, lag: usize, lean: f32) -> Vec<f32> {
        let mut s = crate::rng::SplitMix(seed);
        let mut v = vec![0.0f32; n * d];
        for x in v.iter_mut() {
            *x = (s.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        }
        for i in (lag..n).step_by(5) {
            let (lo, hi) = v.split_at_mut(i * d);
            let src = &lo[(i - lag) * d..(i - lag + 1) * d];
            for (x, &y) in hi[..d].iter_mut().zip(src) {
                *x = (1.0 - lean) * *x + lean * y;
            }
        }
        for r in v.chunks_exact_mut(d) {
            let n = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            r.iter_mut().for_each(|x| *x /= n);
        }
        v
    }

    struct Fixture {
        f32s: Vec<Vec<f32>>,
        dims: Vec<usize>,
        quant: Vec<crate::QuantizedRows>,
        l1: Vec<Vec<f32>>,
        presence: Vec<u8>,
    }

    impl Fixture {
        fn new(n: usize, dims: &[usize], seed: u64) -> Fixture {
            let f32s: Vec<Vec<f32>> = dims
                .iter()
                .enumerate()
                .map(|(k, &d)| {
                    rows(
                        n,
                        d,
                        seed ^ (k as u64 * 0x9e37),
                        3 + k,
                        0.4 + 0.15 * k as f32,
                    )
                })
                .collect();
            let quant: Vec<_> = f32s
                .iter()
                .zip(dims)
                .map(|(v, &d)| quantize_rows(RowsF32::dense(v, d).unwrap()))
                .collect();
            let l1 = quant.iter().map(|q| l1_bounds(q.view())).collect();
            let mut s = crate::rng::SplitMix(seed ^ 0xabc);
            let full = (1u8 << dims.len()) - 1;
            // Most rows have every member; some lack one, a few take no part at all.
            let presence = (0..n)
                .map(|_| match s.next_u64() % 10 {
                    0 => full & !(1 << (s.next_u64() as usize % dims.len())),
                    1 if n > 50 => 0,
                    _ => full,
                })
                .collect();
            Fixture {
                f32s,
                dims: dims.to_vec(),
                quant,
                l1,
                presence,
            }
        }

        fn members(&self) -> Vec<QuantRows<'_>> {
            (0..self.dims.len())
                .map(|k| {
                    QuantRows::new(
                        RowsF32::dense(&self.f32s[k], self.dims[k]).unwrap(),
                        self.quant[k].view(),
                        &self.l1[k],
                    )
                    .unwrap()
                })
                .collect()
        }

        fn cos(&self, k: usize, a: usize, b: usize) -> f32 {
            let d = self.dims[k];
            dot_f32(
                &self.f32s[k][a * d..(a + 1) * d],
                &self.f32s[k][b * d..(b + 1) * d],
            )
        }

        /// Pairs `(a, b)`, `b` in `probes`, `a < b`, that the exact test passes.
        fn exact(&self, test: &JointTest, probes: Range<usize>) -> Vec<(u32, u32)> {
            let mut out = Vec::new();
            for b in probes {
                for a in 0..b {
                    let key = self.presence[a] & self.presence[b];
                    let cos: Vec<f32> = (0..self.dims.len()).map(|k| self.cos(k, a, b)).collect();
                    if key != 0 && test.passes(key, &cos) {
                        out.push((a as u32, b as u32));
                    }
                }
            }
            out
        }
    }

    /// A test with evidence like a calibrated face and fingers: flat well below the impostor body, rising
    /// through the tail; `need` scales the sums needed.
    fn test_of(members: usize, need: f32, steep: f32) -> JointTest {
        let lines = (0..members)
            .map(|k| {
                let s = steep * (1.0 + 0.3 * k as f32);
                let piece = |from: f32, slope: f32, intercept: f32| JointLine {
                    from,
                    slope,
                    intercept,
                };
                // Each piece starts a little above where the previous one ends (never falling).
                let p1 = piece(-0.2, 0.3 * s, -8.0 + 0.06 * s + 0.01);
                let p2 = piece(0.2, s, p1.intercept + 0.2 * (p1.slope - s) + 0.5);
                let p3 = piece(
                    0.5,
                    3.0 * s,
                    p2.intercept + 0.5 * (p2.slope - 3.0 * s) + 0.01,
                );
                [piece(f32::NEG_INFINITY, 0.0, -8.0), p1, p2, p3]
            })
            .collect();
        let mut needed = [f32::INFINITY; 1 << MAX_JOINT];
        for (key, n) in needed
            .iter_mut()
            .enumerate()
            .skip(1)
            .take((1 << members) - 1)
        {
            *n = need + key.count_ones() as f32;
        }
        JointTest { lines, needed }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Every pair the exact test passes is found, by every kernel, and all kernels return the same
        /// pairs; a strict test keeps few of them.
        #[test]
        fn joint_join_keeps_every_pair_the_exact_test_passes(
            n in 2usize..180, members in 1usize..=MAX_JOINT, seed in any::<u64>(),
            need in -10.0f32..12.0, steep in 5.0f32..40.0, start_frac in 0.0f64..1.0,
        ) {
            let dims: Vec<usize> = (0..members).map(|k| [96, 40, 64, 33][k]).collect();
            let fx = Fixture::new(n, &dims, seed);
            let test = test_of(members, need, steep);
            let start = ((n as f64 * start_frac) as usize).min(n - 1);
            let want = fx.exact(&test, start..n);
            let join = JointJoin::new(fx.members(), &fx.presence, &test).unwrap();
            let mut first: Option<Vec<(u32, u32)>> = None;
            for k in kernels() {
                let (got, st) = join.probe_join_with_kernel(k, start..n).unwrap();
                let set: std::collections::HashSet<_> = got.iter().copied().collect();
                for p in &want {
                    prop_assert!(set.contains(p), "kernel {}: exact pair {p:?} missed", k.name());
                }
                for &(a, b) in &got {
                    prop_assert!(a < b && (b as usize) >= start && fx.presence[a as usize] & fx.presence[b as usize] != 0);
                }
                prop_assert_eq!(st.kept as usize, got.len());
                match &first {
                    None => first = Some(got),
                    Some(f) => prop_assert_eq!(f, &got, "kernel {} differs", k.name()),
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// The cross form (probe rows of their own against base rows): every (probe, base) pair the exact
        /// test passes is found by every kernel, the kernels agree, and every kept pair shares a member.
        #[test]
        fn joint_cross_keeps_every_pair_the_exact_test_passes(
            n in 2usize..160, members in 1usize..=MAX_JOINT, seed in any::<u64>(),
            need in -10.0f32..12.0, steep in 5.0f32..40.0, from_frac in 0.0f64..1.0, len in 1usize..70,
        ) {
            let dims: Vec<usize> = (0..members).map(|k| [96, 40, 64, 33][k]).collect();
            let fx = Fixture::new(n, &dims, seed);
            let test = test_of(members, need, steep);
            // Probes: rows s..e of the fixture, as views of their own (their own row parameters).
            let s = ((n as f64 * from_frac) as usize).min(n - 1);
            let e = (s + len).min(n);
            let probes: Vec<QuantRows<'_>> = fx.members().iter().map(|m| m.slice_rows(s, e)).collect();
            let mut want = Vec::new();
            for i in s..e {
                for j in 0..n {
                    let key = fx.presence[i] & fx.presence[j];
                    let cos: Vec<f32> = (0..members).map(|k| fx.cos(k, i, j)).collect();
                    if key != 0 && test.passes(key, &cos) {
                        want.push(((i - s) as u32, j as u32));
                    }
                }
            }
            let join = JointCross::new(probes, &fx.presence[s..e], fx.members(), &fx.presence, &test).unwrap();
            let mut first: Option<Vec<(u32, u32)>> = None;
            for k in kernels() {
                let (got, st) = join.join_with_kernel(k).unwrap();
                let set: std::collections::HashSet<_> = got.iter().copied().collect();
                for p in &want {
                    prop_assert!(set.contains(p), "kernel {}: exact pair {p:?} missed", k.name());
                }
                for &(a, b) in &got {
                    prop_assert!(fx.presence[s + a as usize] & fx.presence[b as usize] != 0);
                }
                prop_assert_eq!(st.kept as usize, got.len());
                let present = (s..e).filter(|&i| fx.presence[i] != 0).count() as u64;
                prop_assert_eq!(st.pairs, present * n as u64);
                // Against the base prepared once (in two steps: some rows, then the rest appended), the
                // same pairs and counters.
                let cut = (n * 2 / 3).max(1);
                let part: Vec<QuantRows<'_>> = fx.members().iter().map(|m| m.slice_rows(0, cut)).collect();
                let mut prepared = PreparedBase::with_kernel(k, &part).unwrap();
                prop_assert_eq!(prepared.rows(), cut);
                let rest: Vec<QuantRows<'_>> = fx.members().iter().map(|m| m.slice_rows(cut, n)).collect();
                prepared.extend(&rest).unwrap();
                prop_assert_eq!(prepared.rows(), n);
                let probes2: Vec<QuantRows<'_>> = fx.members().iter().map(|m| m.slice_rows(s, e)).collect();
                let again = JointCross::with_prepared(probes2, &fx.presence[s..e], &prepared, &fx.presence, &test)
                    .unwrap()
                    .join()
                    .unwrap();
                prop_assert_eq!(&again.0, &got, "kernel {} prepared", k.name());
                prop_assert_eq!(again.1, st);
                match &first {
                    None => first = Some(got),
                    Some(f) => prop_assert_eq!(f, &got, "kernel {} differs", k.name()),
                }
            }
        }
    }

    /// The cross form is selective: a demanding test keeps a small share of the pairs, and with
    /// `needed = −∞` it keeps exactly the pairs sharing a member.
    #[test]
    fn joint_cross_is_selective_and_complete() {
        let dims = [128, 64, 64];
        let fx = Fixture::new(700, &dims, 11);
        let test = test_of(3, 10.0, 25.0);
        let probes: Vec<QuantRows<'_>> =
            fx.members().iter().map(|m| m.slice_rows(0, 100)).collect();
        let join = JointCross::new(
            probes.clone(),
            &fx.presence[..100],
            fx.members(),
            &fx.presence,
            &test,
        )
        .unwrap();
        let (got, st) = join.join().unwrap();
        assert!(!got.is_empty(), "each present probe passes against itself");
        assert!(
            (got.len() as u64) * 20 < st.pairs,
            "kept {} of {}",
            got.len(),
            st.pairs
        );
        let mut all = test.clone();
        all.needed = [f32::NEG_INFINITY; 1 << MAX_JOINT];
        all.needed[0] = f32::INFINITY;
        let join = JointCross::new(
            probes,
            &fx.presence[..100],
            fx.members(),
            &fx.presence,
            &all,
        )
        .unwrap();
        let (every, _) = join.join().unwrap();
        let sharing = (0..100)
            .map(|i| {
                (0..700)
                    .filter(|&j| fx.presence[i] & fx.presence[j] != 0)
                    .count()
            })
            .sum::<usize>();
        assert_eq!(every.len(), sharing);
        // Shapes: a member missing on one side, or presence of the wrong length, is refused; so is a
        // prepared base of other rows or dimensions.
        let prepared = PreparedBase::new(&fx.members()).unwrap();
        assert_eq!(prepared.rows(), 700);
        assert!(prepared.bytes() >= 700 * 256);
        let p100 = || fx.members().iter().map(|m| m.slice_rows(0, 100)).collect();
        assert!(
            JointCross::with_prepared(
                p100(),
                &fx.presence[..100],
                &prepared,
                &fx.presence[..9],
                &test
            )
            .is_err()
        );
        let fewer = Fixture::new(50, &[128, 64, 32], 3);
        assert!(
            JointCross::with_prepared(
                fewer.members(),
                &fewer.presence,
                &prepared,
                &fx.presence,
                &test
            )
            .is_err()
        );
        let mut grown = PreparedBase::new(&fx.members()).unwrap();
        let odd = Fixture::new(10, &[128, 64, 32], 5);
        assert!(grown.extend(&odd.members()).is_err(), "other dimensions");
        assert_eq!(grown.rows(), 700);
        let two: Vec<QuantRows<'_>> = fx.members().into_iter().take(2).collect();
        assert!(JointCross::new(two, &fx.presence, fx.members(), &fx.presence, &test).is_err());
        assert!(
            JointCross::new(
                fx.members(),
                &fx.presence[..9],
                fx.members(),
                &fx.presence,
                &test
            )
            .is_err()
        );
    }

    /// The test separates: with a demanding `needed`, the scan keeps a small share of the pairs and the
    /// exact test's pairs are among them; with `needed = −∞` every pair of rows sharing a member is kept.
    #[test]
    fn joint_join_is_selective_and_complete() {
        let dims = [128, 64, 64];
        let fx = Fixture::new(600, &dims, 7);
        let test = test_of(3, 10.0, 25.0);
        let join = JointJoin::new(fx.members(), &fx.presence, &test).unwrap();
        let (got, st) = join.probe_join(100..600).unwrap();
        let want = fx.exact(&test, 100..600);
        assert!(!want.is_empty(), "the fixture has pairs that pass");
        let set: std::collections::HashSet<_> = got.iter().copied().collect();
        assert!(want.iter().all(|p| set.contains(p)));
        assert!(
            (got.len() as u64) * 20 < st.pairs,
            "kept {} of {} pairs",
            got.len(),
            st.pairs
        );
        assert_eq!(st.products, st.pairs * 3);
        let mut all = test.clone();
        all.needed = [f32::NEG_INFINITY; 1 << MAX_JOINT];
        all.needed[0] = f32::INFINITY;
        let join = JointJoin::new(fx.members(), &fx.presence, &all).unwrap();
        let (every, _) = join.probe_join(100..600).unwrap();
        let sharing = (100..600)
            .map(|b| {
                (0..b)
                    .filter(|&a| fx.presence[a] & fx.presence[b] != 0)
                    .count()
            })
            .sum::<usize>();
        assert_eq!(every.len(), sharing);
    }

    /// A self-join of several bands packs the rows once ([`PreparedBase`]); one band at a time packs each
    /// base tile itself. Both give the same pairs and counters on every kernel, and contain the exact pairs.
    #[test]
    fn rows_packed_once_for_all_bands_give_the_pairs_of_bands_packed_alone() {
        let dims = [70, 33];
        let n = 1300;
        let fx = Fixture::new(n, &dims, 11);
        let test = test_of(2, 4.0, 20.0);
        let join = JointJoin::new(fx.members(), &fx.presence, &test).unwrap();
        let want = fx.exact(&test, 0..n);
        assert!(!want.is_empty(), "the fixture has pairs that pass");
        for k in kernels() {
            let (whole, st) = join.probe_join_with_kernel(k, 0..n).unwrap();
            let (mut parts, mut pairs) = (Vec::new(), 0);
            for r in [0..QUERY_TILE, QUERY_TILE..2 * QUERY_TILE, 2 * QUERY_TILE..n] {
                let (got, s) = join.probe_join_with_kernel(k, r).unwrap();
                parts.extend(got);
                pairs += s.pairs;
            }
            parts.sort_unstable();
            assert_eq!(whole, parts, "kernel {}", k.name());
            assert_eq!(st.pairs, pairs, "kernel {}", k.name());
            let set: std::collections::HashSet<_> = whole.iter().copied().collect();
            assert!(want.iter().all(|p| set.contains(p)), "kernel {}", k.name());
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        let fx = Fixture::new(10, &[32, 32], 1);
        let test = test_of(3, 1.0, 10.0);
        assert!(JointJoin::new(fx.members(), &fx.presence, &test).is_err());
        let mut bad = test_of(2, 1.0, 10.0);
        bad.lines[1][2].slope = -1.0;
        assert!(JointJoin::new(fx.members(), &fx.presence, &bad).is_err());
        // A bound that falls at a knot is refused.
        let mut falls = test_of(2, 1.0, 10.0);
        falls.lines[0][2].intercept -= 5.0;
        assert!(JointJoin::new(fx.members(), &fx.presence, &falls).is_err());
        let mut unordered = test_of(2, 1.0, 10.0);
        unordered.lines[0][2].from = -0.5;
        assert!(JointJoin::new(fx.members(), &fx.presence, &unordered).is_err());
        let ok = test_of(2, 1.0, 10.0);
        assert!(JointJoin::new(fx.members(), &fx.presence[..9], &ok).is_err());
    }
}
