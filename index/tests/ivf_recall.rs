//! Recall and contract tests of the IVF threshold join against the exact join.
//!
//! Scale runs (release): `PACHA_IVF_N=100000 cargo test --release -p pacha-index --test ivf_recall
//! -- --ignored --nocapture scale` (optional `PACHA_IVF_EXACT=0` skips the exact join, `PACHA_IVF_PROBES`,
//! `PACHA_IVF_LISTS` override the parameters).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Instant;

use pacha_index::exact;
use pacha_index::ivf::{Ivf, IvfParams, JoinCuts, ProbeRule, QuantStage};
use pacha_index::kernels::dot_f32;
use pacha_index::quant::{l1_bounds, quantize_rows};
use pacha_index::sketch::{Sketcher, StagedCut, cut_for_cosine};
use pacha_index::view::RowsF32;
use proptest::prelude::*;

/// SplitMix64 with Box–Muller normals: fast, seeded, no dependency on generator crates' APIs.
struct Rng(u64);
impl Rng {
    fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unif(&mut self) -> f64 {
        ((self.u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.u64() % n as u64) as usize
    }
    fn normals(&mut self, out: &mut [f32]) {
        for pair in out.chunks_mut(2) {
            let (u, v) = (self.unif(), self.unif());
            let r = (-2.0 * u.ln()).sqrt();
            let th = std::f64::consts::TAU * v;
            pair[0] = (r * th.cos()) as f32;
            if pair.len() > 1 {
                pair[1] = (r * th.sin()) as f32;
            }
        }
    }
}

fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
}

#[derive(Clone, Copy, Debug)]
enum Preset {
    /// Pure random unit vectors.
    Isotropic,
    /// normalise(√w·low-rank (r = 32, decaying spectrum, 64 clusters) + √(1−w)·isotropic noise).
    Structured,
}

/// `n` unit rows of dim `d`; 1 % of rows are replaced by mates of other rows at cosine ≈ `mate_cos`
/// (± 0.05). Returns the data and the planted (source, mate) pairs.
fn population(
    preset: Preset,
    n: usize,
    d: usize,
    mate_cos: f32,
    seed: u64,
) -> (Vec<f32>, Vec<(usize, usize)>) {
    let mut rng = Rng(seed);
    let mut data = vec![0.0f32; n * d];
    match preset {
        Preset::Isotropic => {
            rng.normals(&mut data);
        }
        Preset::Structured => {
            let (r, k, w) = (32usize, 64usize, 0.35f32);
            let mut basis = vec![0.0f32; r * d];
            rng.normals(&mut basis);
            let spec: Vec<f32> = (0..r).map(|i| 1.0 / (1.0 + i as f32).powf(0.7)).collect();
            let mut centers = vec![0.0f32; k * r];
            rng.normals(&mut centers);
            let mut z = vec![0.0f32; r];
            let mut lat = vec![0.0f32; d];
            for row in data.chunks_mut(d) {
                let c = rng.below(k);
                rng.normals(&mut z);
                for i in 0..r {
                    z[i] = spec[i] * (0.6 * centers[c * r + i] + 0.8 * z[i]);
                }
                lat.iter_mut().for_each(|x| *x = 0.0);
                for i in 0..r {
                    for (l, &b) in lat.iter_mut().zip(&basis[i * d..(i + 1) * d]) {
                        *l += z[i] * b;
                    }
                }
                normalise(&mut lat);
                rng.normals(row);
                normalise(row);
                for (x, &l) in row.iter_mut().zip(&lat) {
                    *x = w.sqrt() * l + (1.0 - w).sqrt() * *x;
                }
            }
        }
    }
    for row in data.chunks_mut(d) {
        normalise(row);
    }
    // Plant mates: distinct targets, sources that are not targets.
    let m = n / 100;
    let mut is_target = vec![false; n];
    let mut targets = Vec::new();
    while targets.len() < m {
        let t = rng.below(n);
        if !is_target[t] {
            is_target[t] = true;
            targets.push(t);
        }
    }
    let mut planted = Vec::new();
    let mut u = vec![0.0f32; d];
    for &t in &targets {
        let s = loop {
            let s = rng.below(n);
            if !is_target[s] {
                break s;
            }
        };
        let c = mate_cos + 0.1 * (rng.unif() as f32 - 0.5);
        rng.normals(&mut u);
        normalise(&mut u);
        let src = data[s * d..(s + 1) * d].to_vec();
        let row = &mut data[t * d..(t + 1) * d];
        for ((x, &a), &b) in row.iter_mut().zip(&src).zip(&u) {
            *x = c * a + (1.0 - c * c).sqrt() * b;
        }
        normalise(row);
        planted.push((s.min(t), s.max(t)));
    }
    (data, planted)
}

fn ivf_pairs(ivf: &Ivf, base: RowsF32<'_>, t: f32) -> Vec<(u32, u32, f32)> {
    let mut v = Vec::new();
    ivf.self_join(base, t, &mut |a, b, s| v.push((a, b, s)))
        .unwrap();
    v
}

/// Recall of `got` against the exact pairs with score ≥ t + 1e-4 (GEMM and kernel differ by rounding).
fn recall(truth: &[exact::Pair], got: &[(u32, u32, f32)], t: f32) -> (f64, usize) {
    let got: HashSet<(u32, u32)> = got.iter().map(|p| (p.0, p.1)).collect();
    let sure: Vec<&exact::Pair> = truth.iter().filter(|p| p.score >= t + 1e-4).collect();
    let hit = sure.iter().filter(|p| got.contains(&(p.a, p.b))).count();
    (
        if sure.is_empty() {
            1.0
        } else {
            hit as f64 / sure.len() as f64
        },
        sure.len(),
    )
}

/// Contract checks on a join output: a < b, sorted, unique, exact scores ≥ t, only present rows.
fn check_output(
    base: RowsF32<'_>,
    got: &[(u32, u32, f32)],
    t: f32,
    present: &dyn Fn(usize) -> bool,
) {
    for w in got.windows(2) {
        assert!(
            (w[0].0, w[0].1) < (w[1].0, w[1].1),
            "unsorted or duplicate pair {w:?}"
        );
    }
    for &(a, b, s) in got {
        assert!(a < b);
        assert!(
            present(a as usize) && present(b as usize),
            "absent row in ({a},{b})"
        );
        assert_eq!(s, dot_f32(base.row(a as usize), base.row(b as usize)));
        assert!(s >= t);
    }
}

fn recall_case(preset: Preset, mate_cos: f32, t: f32, seed: u64, params: &IvfParams, bar: f64) {
    let (n, d) = (20_000, 512);
    let (data, planted) = population(preset, n, d, mate_cos, seed);
    let base = RowsF32::dense(&data, d).unwrap();
    let t0 = Instant::now();
    let ivf = Ivf::build(base, &|_| true, params).unwrap();
    let got = ivf_pairs(&ivf, base, t);
    let t_ivf = t0.elapsed();
    let t1 = Instant::now();
    let truth = exact::self_join(base, t, None).unwrap();
    let t_exact = t1.elapsed();
    let (r, m) = recall(&truth, &got, t);
    check_output(base, &got, t, &|_| true);
    // The planted mates are real pairs of the population (guards the generator, not the index).
    assert!(
        m >= planted.len() / 2,
        "{preset:?}: only {m} true pairs for {} mates",
        planted.len()
    );
    assert!(
        r >= bar,
        "{preset:?} cos {mate_cos} t {t}: recall {r} over {m} pairs (ivf {t_ivf:?}, exact {t_exact:?})"
    );
}

#[test]
fn recall_structured() {
    recall_case(
        Preset::Structured,
        0.6,
        0.4,
        1,
        &IvfParams::default(),
        0.999,
    );
}

#[test]
fn recall_isotropic_cos07() {
    recall_case(Preset::Isotropic, 0.7, 0.4, 2, &IvfParams::default(), 0.999);
}

#[test]
fn recall_isotropic_cos05() {
    // Mates at cosine 0.5 in isotropic 512-d are the hard case and do NOT reach 0.999: the pair partition
    // of random data cannot separate cos 0.43 from cos 0 (measured: 0.995 here even with 160 of 283
    // lists probed; a missed pair at cos 0.435 had homes in lists its partner did not probe). With the
    // defaults this case measured 0.965: the bar here guards against regressions only.
    recall_case(Preset::Isotropic, 0.5, 0.4, 3, &IvfParams::default(), 0.95);
}

#[test]
fn absent_rows_never_appear_and_tiles_match_full_join() {
    let (n, d) = (4_000, 128);
    let (mut data, _) = population(Preset::Structured, n, d, 0.7, 4);
    // Every 7th row is missing: a zero row, not present.
    for i in (0..n).step_by(7) {
        data[i * d..(i + 1) * d].iter_mut().for_each(|x| *x = 0.0);
    }
    let present = |i: usize| !i.is_multiple_of(7);
    let base = RowsF32::dense(&data, d).unwrap();
    let params = IvfParams {
        lists: Some(40),
        assign: 2,
        margin: 0.05,
        ..IvfParams::default()
    };
    let ivf = Ivf::build(base, &present, &params).unwrap();
    for j in 0..ivf.lists() {
        assert!(ivf.members(j).iter().all(|&r| present(r as usize)));
    }
    let t = 0.3;
    let got = ivf_pairs(&ivf, base, t);
    assert!(!got.is_empty());
    check_output(base, &got, t, &present);
    // Tiled, resumable runs give exactly the full join.
    let mut tiled = Vec::new();
    for lo in (0..n).step_by(777) {
        tiled.extend(ivf.self_join_rows(base, lo..(lo + 777).min(n), t).unwrap());
    }
    // Each range is sorted by (a, b); ranges partition the pairs by their larger row.
    tiled.sort_by_key(|p| (p.0, p.1));
    assert_eq!(tiled, got);
    // Skip-filter of the exact join agrees on which rows exist.
    let skip = |i: u32| !present(i as usize);
    let truth = exact::self_join(base, t, Some(&skip)).unwrap();
    let (r, _) = recall(&truth, &got, t);
    assert!(r >= 0.99, "recall {r}");
}

/// Records the paging hints of a streaming pass.
#[derive(Default)]
struct Pager {
    read: std::sync::Mutex<Vec<std::ops::Range<usize>>>,
    released: std::sync::Mutex<Vec<std::ops::Range<usize>>>,
}

impl pacha_index::RowPager for Pager {
    fn will_read(&self, rows: std::ops::Range<usize>) {
        self.read.lock().unwrap().push(rows);
    }
    fn release(&self, rows: std::ops::Range<usize>) {
        self.released.lock().unwrap().push(rows);
    }
}

/// Rewrites a version-3 index file in version 2's layout (rows' probe lists padded with `u32::MAX` to the
/// widest row), as an older pacha wrote it.
fn to_version_2(v3: &[u8]) -> Vec<u8> {
    let u64_at = |o: usize| u64::from_le_bytes(v3[o..o + 8].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(v3[o..o + 4].try_into().unwrap());
    assert_eq!(u32_at(8), 3);
    let (dim, rows, lists, probes) = (u64_at(12), u64_at(20), u64_at(28), u64_at(36));
    assert_eq!(u64_at(44) & 2, 0, "a centred index has no version-2 form");
    let head = 8 + 4 + 5 * 8;
    let homes = head + lists * dim * 4;
    let counts = homes + rows;
    let mut out = v3[..counts].to_vec();
    out[8..12].copy_from_slice(&2u32.to_le_bytes());
    let mut flat = counts + rows * 4;
    for i in 0..rows {
        let k = u32_at(counts + i * 4) as usize;
        for r in 0..probes {
            let l = if r < k {
                u32_at(flat + r * 4)
            } else {
                u32::MAX
            };
            out.extend_from_slice(&l.to_le_bytes());
        }
        flat += k * 4;
    }
    assert_eq!(flat, v3.len() - 4);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

#[test]
fn save_load_round_trip_and_corruption() {
    let (n, d) = (3_000, 64);
    let (data, _) = population(Preset::Isotropic, n, d, 0.8, 5);
    let base = RowsF32::dense(&data, d).unwrap();
    let params = IvfParams {
        assign: 2,
        margin: 0.1,
        centre: true,
        ..IvfParams::default()
    };
    let ivf = Ivf::build(base, &|i| i != 17, &params).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.ivf");
    ivf.save(&path).unwrap();
    let back = Ivf::load(&path).unwrap();
    assert_eq!(back, ivf);
    assert_eq!(ivf_pairs(&back, base, 0.5), ivf_pairs(&ivf, base, 0.5));
    assert!(!ivf_pairs(&ivf, base, 0.5).is_empty());
    // The streamed build is the same index, and releases every row once the samples and each batch
    // have been read.
    let pager = Pager::default();
    let streamed = Ivf::build_streaming(base, &|i| i != 17, &params, &pager).unwrap();
    assert_eq!(streamed, ivf);
    let (read, released) = (
        pager.read.into_inner().unwrap(),
        pager.released.into_inner().unwrap(),
    );
    assert_eq!(released.first(), Some(&(0..n)));
    assert_eq!(released.last().map(|r| r.end), Some(n));
    // Every batch released was announced before, in the same ascending order.
    assert_eq!(read, released[1..].to_vec());
    // A version-2 file (the padded per-row table, no centring) of an uncentred index loads to the same
    // index.
    let raw = Ivf::build(
        base,
        &|i| i != 17,
        &IvfParams {
            centre: false,
            ..params.clone()
        },
    )
    .unwrap();
    assert_ne!(raw, ivf);
    let raw_path = dir.path().join("raw.ivf");
    raw.save(&raw_path).unwrap();
    let v2 = to_version_2(&std::fs::read(&raw_path).unwrap());
    let old = dir.path().join("v2.ivf");
    std::fs::write(&old, &v2).unwrap();
    assert_eq!(Ivf::load(&old).unwrap(), raw);
    // A table with a repeated or out-of-range list id under a valid checksum is refused, naming the row.
    let good = std::fs::read(&path).unwrap();
    let body = good.len() - 4;
    assert_eq!(
        crc32fast::hash(&good[..body]).to_le_bytes(),
        good[body..],
        "the file ends with the crc32 of the rest"
    );
    let k = ivf.row_probes(n - 1);
    assert!(k >= 2, "the last row probes {k} lists");
    let first = body - 4 * k;
    for (patch, want) in [
        (good[first..first + 4].to_vec(), "repeated list id"),
        (
            (ivf.lists() as u32).to_le_bytes().to_vec(),
            "invalid or repeated list id",
        ),
    ] {
        let mut bad = good.clone();
        bad[first + 4..first + 8].copy_from_slice(&patch);
        let crc = crc32fast::hash(&bad[..body]);
        bad[body..].copy_from_slice(&crc.to_le_bytes());
        let p = dir.path().join("bad.ivf");
        std::fs::write(&p, &bad).unwrap();
        let err = Ivf::load(&p).unwrap_err().to_string();
        assert!(
            err.contains(&format!("row {}", n - 1)) && err.contains(want),
            "{err}"
        );
    }
    // Flip one byte: checksum error, not a panic.
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        Ivf::load(&path),
        Err(pacha_index::IndexError::Corrupt { .. })
    ));
    std::fs::write(&path, &bytes[..10]).unwrap();
    assert!(matches!(
        Ivf::load(&path),
        Err(pacha_index::IndexError::Corrupt { .. })
    ));
    assert!(matches!(
        Ivf::load(&dir.path().join("missing")),
        Err(pacha_index::IndexError::Io { .. })
    ));
    // Wrong base shape is an error.
    let small = RowsF32::dense(&data[..d * 10], d).unwrap();
    assert!(ivf.self_join_rows(small, 0..10, 0.5).is_err());
}

#[test]
fn deterministic_across_thread_counts() {
    let (n, d) = (3_000, 64);
    let (data, _) = population(Preset::Structured, n, d, 0.7, 6);
    let base = RowsF32::dense(&data, d).unwrap();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let ivf = Ivf::build(base, &|_| true, &IvfParams::default()).unwrap();
            let pairs = ivf_pairs(&ivf, base, 0.4);
            (ivf, pairs)
        })
    };
    assert_eq!(run(1), run(3));
}

#[test]
fn search_finds_planted_mates() {
    let (n, d) = (5_000, 128);
    let (data, planted) = population(Preset::Structured, n, d, 0.7, 7);
    let base = RowsF32::dense(&data, d).unwrap();
    let ivf = Ivf::build(base, &|_| true, &IvfParams::default()).unwrap();
    let mut found = 0;
    for &(a, b) in &planted {
        let hits = ivf.search_rule(base, base.row(a), 0.4, ProbeRule::fixed(16));
        for w in hits.windows(2) {
            assert!(w[0].1 >= w[1].1);
        }
        for &(r, s) in &hits {
            assert_eq!(s, dot_f32(base.row(a), base.row(r as usize)));
            assert!(s >= 0.4);
        }
        found += usize::from(hits.iter().any(|h| h.0 as usize == b));
    }
    assert!(
        found * 100 >= planted.len() * 95,
        "search found {found} of {} mates",
        planted.len()
    );
    assert!(
        ivf.search_rule(base, &[0.0; 3], 0.4, ProbeRule::fixed(4))
            .is_empty()
    );
}

/// A join with per-class thresholds and cuts (quality bands) gives, for the pairs of each class (the lower
/// of its rows' classes), exactly what a uniform join at that class's threshold and cut gives them: on the
/// brute-force index and on a partition, whole and in row ranges, with and without the i8 stage.
#[test]
fn a_classed_join_equals_each_class_joined_alone() {
    let (n, d) = (8_000, 512);
    let (data, _) = population(Preset::Structured, n, d, 0.6, 13);
    let base = RowsF32::dense(&data, d).unwrap();
    let sketches = Sketcher::new(d, 1024, 3)
        .unwrap()
        .sketch_rows(base, &|_| true)
        .unwrap();
    let mut rng = Rng(77);
    let row_class: Vec<u8> = (0..n).map(|_| rng.below(3) as u8).collect();
    let classes: Vec<(f32, StagedCut)> = [0.35f32, 0.42, 0.5]
        .iter()
        .map(|&t| {
            (
                t,
                StagedCut {
                    prefix_words: 8,
                    prefix_cut: cut_for_cosine(512, f64::from(t), 1e-4),
                    cut: cut_for_cosine(1024, f64::from(t), 1e-4),
                },
            )
        })
        .collect();
    let class_of = |a: u32, b: u32| row_class[a as usize].min(row_class[b as usize]) as usize;
    let codes = quantize_rows(base);
    let l1 = l1_bounds(codes.view());
    let quant = QuantStage::new(codes.view(), &l1).unwrap();
    let brute = Ivf::brute(n, d, &|_| true).unwrap();
    let part = Ivf::build(base, &|_| true, &IvfParams::default()).unwrap();
    for (name, ivf) in [("brute", &brute), ("partition", &part)] {
        let join = |cuts: JoinCuts<'_>, rows: std::ops::Range<usize>, q: Option<QuantStage<'_>>| {
            ivf.self_join_rows_sketched_with(base, &sketches, q, rows, cuts, &|_, _, _| true)
                .unwrap()
                .0
        };
        let classed = JoinCuts {
            row_class: &row_class,
            classes: &classes,
        };
        let got = join(classed, 0..n, None);
        check_output(base, &got, 0.35, &|_| true);
        let mut want = Vec::new();
        for (c, class) in classes.iter().enumerate() {
            let alone = join(JoinCuts::uniform(class), 0..n, None);
            want.extend(alone.into_iter().filter(|p| class_of(p.0, p.1) == c));
        }
        want.sort_by_key(|p| (p.0, p.1));
        assert!(want.len() >= 50, "{name}: only {} pairs", want.len());
        assert_eq!(got, want, "{name}");
        // Fewer pairs than the lowest class's threshold alone: the higher classes cut more.
        let lowest = join(JoinCuts::uniform(&classes[0]), 0..n, None);
        assert!(
            got.len() < lowest.len(),
            "{name}: {} vs {}",
            got.len(),
            lowest.len()
        );
        let mut tiled = Vec::new();
        for lo in (0..n).step_by(3_000) {
            tiled.extend(join(classed, lo..(lo + 3_000).min(n), Some(quant)));
        }
        tiled.sort_by_key(|p| (p.0, p.1));
        assert_eq!(tiled, got, "{name}: tiled with the i8 stage");
    }
    // Classes that do not cover the rows, or a row outside them, are refused.
    let short = JoinCuts {
        row_class: &row_class[..10],
        classes: &classes,
    };
    assert!(
        brute
            .self_join_rows_sketched_with(base, &sketches, None, 0..n, short, &|_, _, _| true)
            .is_err()
    );
    let mut bad = row_class.clone();
    bad[5] = 3;
    let outside = JoinCuts {
        row_class: &bad,
        classes: &classes,
    };
    assert!(
        brute
            .self_join_rows_sketched_with(base, &sketches, None, 0..n, outside, &|_, _, _| true)
            .is_err()
    );
}

#[test]
fn sketched_join_keeps_what_the_gemm_join_finds() {
    let (n, d, t) = (20_000, 512, 0.4f32);
    let (data, _) = population(Preset::Structured, n, d, 0.6, 5);
    let base = RowsF32::dense(&data, d).unwrap();
    let ivf = Ivf::build(base, &|_| true, &IvfParams::default()).unwrap();
    let gemm = ivf_pairs(&ivf, base, t);
    let sk = Sketcher::new(d, 512, 9).unwrap();
    let sketches = sk.sketch_rows(base, &|_| true).unwrap();
    // A cut that lets every pair through gives the GEMM join exactly (both rescore with dot_f32).
    let all = ivf
        .self_join_rows_sketched(base, &sketches, 0..n, t, StagedCut::single(512))
        .unwrap();
    check_output(base, &all, t, &|_| true);
    let sure: HashSet<(u32, u32)> = gemm
        .iter()
        .filter(|p| p.2 >= t + 1e-4)
        .map(|p| (p.0, p.1))
        .collect();
    let all_set: HashSet<(u32, u32)> = all.iter().map(|p| (p.0, p.1)).collect();
    assert!(sure.is_subset(&all_set));
    // The model cut (drop ≤ 1e-6 at cosine t) must keep every pair the GEMM join found here, while
    // passing far fewer products to rescoring (checked through the output only: same pairs).
    let cut = cut_for_cosine(512, f64::from(t), 1e-6);
    assert!(cut < 256, "cut {cut} filters nothing");
    let cutted = ivf
        .self_join_rows_sketched(base, &sketches, 0..n, t, StagedCut::single(cut))
        .unwrap();
    check_output(base, &cutted, t, &|_| true);
    let got: HashSet<(u32, u32)> = cutted.iter().map(|p| (p.0, p.1)).collect();
    let missed = sure.difference(&got).count();
    assert!(sure.len() >= 150, "only {} pairs", sure.len());
    assert_eq!(
        missed,
        0,
        "sketch cut {cut} missed {missed} of {}",
        sure.len()
    );
    // Row ranges partition the pairs.
    let mut tiled = Vec::new();
    for lo in (0..n).step_by(6_000) {
        tiled.extend(
            ivf.self_join_rows_sketched(
                base,
                &sketches,
                lo..(lo + 6_000).min(n),
                t,
                StagedCut::single(cut),
            )
            .unwrap(),
        );
    }
    tiled.sort_by_key(|p| (p.0, p.1));
    assert_eq!(tiled, cutted);
    // Two stages over 1024-bit sketches: a subset of the prefix stage alone, and still complete here.
    let sk2 = Sketcher::new(d, 1024, 9)
        .unwrap()
        .sketch_rows(base, &|_| true)
        .unwrap();
    // Streamed sketching gives the same sketches and releases every row.
    let pager = Pager::default();
    let streamed = Sketcher::new(d, 1024, 9)
        .unwrap()
        .sketch_rows_streaming(base, &|_| true, &pager)
        .unwrap();
    let (read, released) = (
        pager.read.into_inner().unwrap(),
        pager.released.into_inner().unwrap(),
    );
    assert_eq!(read, released);
    assert_eq!(released.iter().map(|r| r.len()).sum::<usize>(), n);
    assert!((0..n).all(|i| streamed.row(i) == sk2.row(i)));
    let staged_join = |full_cut: u32| {
        let cuts = StagedCut {
            prefix_words: 8,
            prefix_cut: cut,
            cut: full_cut,
        };
        ivf.self_join_rows_sketched(base, &sk2, 0..n, t, cuts)
            .unwrap()
    };
    let prefix_only = staged_join(1024);
    let cut2 = cut_for_cosine(1024, f64::from(t), 1e-6);
    let staged = staged_join(cut2);
    check_output(base, &staged, t, &|_| true);
    let pre: HashSet<(u32, u32)> = prefix_only.iter().map(|p| (p.0, p.1)).collect();
    assert!(staged.iter().all(|p| pre.contains(&(p.0, p.1))));
    // The i8 rescoring stage changes nothing in the output (its error bound is rigorous), and reads
    // only a small share of the survivors in f32.
    let codes = quantize_rows(base);
    let l1 = l1_bounds(codes.view());
    let quant = QuantStage::new(codes.view(), &l1).unwrap();
    let class = (
        t,
        StagedCut {
            prefix_words: 8,
            prefix_cut: cut,
            cut: cut2,
        },
    );
    let cuts = JoinCuts::uniform(&class);
    let (plain, plain_stats) = ivf
        .self_join_rows_sketched_with(base, &sk2, None, 0..n, cuts, &|_, _, _| true)
        .unwrap();
    let (quantised, q_stats) = ivf
        .self_join_rows_sketched_with(base, &sk2, Some(quant), 0..n, cuts, &|_, _, _| true)
        .unwrap();
    assert_eq!(quantised, plain);
    assert_eq!(plain, staged);
    assert_eq!(plain_stats.exact_reads, plain_stats.rescored);
    assert_eq!(q_stats.rescored, plain_stats.rescored);
    assert_eq!(q_stats.above, plain_stats.above);
    assert!(
        q_stats.exact_reads >= q_stats.above && q_stats.exact_reads * 10 < q_stats.rescored,
        "{q_stats:?}"
    );
    // Codes of another shape are an error, not a wrong answer.
    let short = QuantStage::new(codes.view().slice_rows(0, n - 1), &l1[..n - 1]).unwrap();
    assert!(
        ivf.self_join_rows_sketched_with(base, &sk2, Some(short), 0..n, cuts, &|_, _, _| true)
            .is_err()
    );
    let got2: HashSet<(u32, u32)> = staged.iter().map(|p| (p.0, p.1)).collect();
    assert_eq!(
        sure.difference(&got2).count(),
        0,
        "two-stage cut {cut2} missed pairs"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn join_is_a_subset_of_exact_and_well_formed(
        n in 1usize..300, d in 1usize..24, lists in 1usize..20, assign in 1usize..4,
        probes in 1usize..8, seed in any::<u64>(), t in -0.2f32..0.9,
    ) {
        let mut rng = Rng(seed);
        let mut data = vec![0.0f32; n * d];
        rng.normals(&mut data);
        for row in data.chunks_mut(d) { normalise(row); }
        let present = |i: usize| i % 5 != 3;
        let base = RowsF32::dense(&data, d).unwrap();
        let params = IvfParams { lists: Some(lists), assign, margin: 0.2, probes: probes.max(assign),
            seed, ..IvfParams::default() };
        let ivf = Ivf::build(base, &present, &params).unwrap();
        let got = ivf_pairs(&ivf, base, t);
        check_output(base, &got, t, &present);
        // The sketched join with a cut that passes everything finds the same pairs (same canonical rule).
        let sk = Sketcher::new(d, 64, seed).unwrap().sketch_rows(base, &present).unwrap();
        let sketched = ivf.self_join_rows_sketched(base, &sk, 0..n, t, StagedCut::single(64)).unwrap();
        prop_assert_eq!(&sketched, &got);
        // With every list probed nothing can be missed.
        let all = IvfParams { probes: lists.max(assign), ..params };
        let full = Ivf::build(base, &present, &all).unwrap();
        let got_all = ivf_pairs(&full, base, t);
        let mut want = Vec::new();
        for a in 0..n { for b in a + 1..n {
            if present(a) && present(b) {
                let s = dot_f32(base.row(a), base.row(b));
                if s >= t { want.push((a as u32, b as u32, s)); }
            }
        }}
        prop_assert_eq!(got_all, want);
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "scale run: PACHA_IVF_N=100000 cargo test --release ... -- --ignored --nocapture scale"]
#[allow(clippy::print_stdout)]
fn scale() {
    let n = env("PACHA_IVF_N", 100_000);
    let d = env("PACHA_IVF_D", 512);
    let do_exact = env("PACHA_IVF_EXACT", 1) == 1;
    let mut params = IvfParams::default();
    if let Some(p) = std::env::var("PACHA_IVF_PROBES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        params.probes = p;
    }
    if let Some(l) = std::env::var("PACHA_IVF_LISTS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        params.lists = Some(l);
    }
    if let Some(a) = std::env::var("PACHA_IVF_ASSIGN")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        params.assign = a;
        params.margin = 1.0;
    }
    let presets = std::env::var("PACHA_IVF_PRESETS").unwrap_or_else(|_| "s:0.6,i:0.7,i:0.5".into());
    for spec in presets.split(',') {
        let (p, c) = spec.split_once(':').unwrap();
        let preset = if p == "s" {
            Preset::Structured
        } else {
            Preset::Isotropic
        };
        let mate_cos: f32 = c.parse().unwrap();
        let (data, _) = population(preset, n, d, mate_cos, 42);
        let base = RowsF32::dense(&data, d).unwrap();
        let t0 = Instant::now();
        let ivf = Ivf::build(base, &|_| true, &params).unwrap();
        let t_build = t0.elapsed();
        let frac = ivf.candidate_products() as f64 / (n as f64 * (n as f64 - 1.0));
        for t in [0.35f32, 0.45] {
            let t1 = Instant::now();
            let got = ivf_pairs(&ivf, base, t);
            let t_join = t1.elapsed();
            let line = format!(
                "{preset:?} mates@{mate_cos} n={n} d={d} lists={} probes={} t={t}: build {:.2}s join {:.2}s \
                 pairs {} products/N² {:.4}",
                ivf.lists(),
                params.probes,
                t_build.as_secs_f64(),
                t_join.as_secs_f64(),
                got.len(),
                frac
            );
            if do_exact {
                let t2 = Instant::now();
                let truth = exact::self_join(base, t, None).unwrap();
                let (r, m) = recall(&truth, &got, t);
                println!(
                    "{line} | exact {:.2}s pairs {m} recall {r:.5}",
                    t2.elapsed().as_secs_f64()
                );
            } else {
                println!("{line}");
            }
        }
    }
}

/// Every visit rule (two-way, one-way, wide rows, several homes) joins exactly the pairs its definition
/// reaches (`pair_reach`, computed from centroid ranks, not from the join's tables), on both join paths, tile
/// by tile, and survives a save/load round trip.
#[test]
fn visit_rules_join_exactly_the_pairs_they_reach() {
    let (n, d, t) = (3_000, 64, 0.3f32);
    let (data, _) = population(Preset::Structured, n, d, 0.6, 11);
    let base = RowsF32::dense(&data, d).unwrap();
    let present = |i: usize| i % 50 != 7;
    let exact_pairs: Vec<(usize, usize)> = (0..n)
        .filter(|&i| present(i))
        .flat_map(|a| {
            ((a + 1)..n)
                .filter(move |&b| present(b))
                .filter(move |&b| dot_f32(base.row(a), base.row(b)) >= t)
                .map(move |b| (a, b))
        })
        .collect();
    let sketches = Sketcher::new(d, 64, 3)
        .unwrap()
        .sketch_rows(base, &present)
        .unwrap();
    let rules = [
        IvfParams {
            lists: Some(40),
            probes: 6,
            ..IvfParams::default()
        },
        IvfParams {
            lists: Some(40),
            probes: 6,
            one_way: true,
            ..IvfParams::default()
        },
        IvfParams {
            lists: Some(40),
            probes: 4,
            wide_share: 0.2,
            wide_probes: 12,
            ..IvfParams::default()
        },
        IvfParams {
            lists: Some(40),
            probes: 6,
            assign: 2,
            margin: 0.05,
            wide_share: 0.1,
            wide_probes: 10,
            ..IvfParams::default()
        },
    ];
    let dir = tempfile::tempdir().unwrap();
    for params in &rules {
        let ivf = Ivf::build(base, &present, params).unwrap();
        let reached = |a: usize, b: usize| ivf.pair_reach(base, a, b).unwrap().1;
        let want: Vec<(u32, u32)> = exact_pairs
            .iter()
            .filter(|&&(a, b)| reached(a, b))
            .map(|&(a, b)| (a as u32, b as u32))
            .collect();
        assert!(
            want.len() * 10 > exact_pairs.len(),
            "{params:?}: {} of {} pairs reached",
            want.len(),
            exact_pairs.len()
        );
        let pairs = |v: Vec<(u32, u32, f32)>| v.into_iter().map(|p| (p.0, p.1)).collect::<Vec<_>>();
        assert_eq!(
            pairs(ivf_pairs(&ivf, base, t)),
            want,
            "{params:?}: GEMM join"
        );
        let all = StagedCut::single(64);
        let sketched = ivf
            .self_join_rows_sketched(base, &sketches, 0..n, t, all)
            .unwrap();
        assert_eq!(pairs(sketched), want, "{params:?}: sketched join");
        let mut tiled = Vec::new();
        for lo in (0..n).step_by(700) {
            tiled.extend(pairs(
                ivf.self_join_rows_sketched(base, &sketches, lo..(lo + 700).min(n), t, all)
                    .unwrap(),
            ));
        }
        tiled.sort_unstable();
        assert_eq!(tiled, want, "{params:?}: tiles");
        let path = dir.path().join("x.ivf");
        ivf.save(&path).unwrap();
        assert_eq!(Ivf::load(&path).unwrap(), ivf, "{params:?}: round trip");
    }
    // One-way visits need one home per row.
    let bad = IvfParams {
        assign: 2,
        one_way: true,
        ..IvfParams::default()
    };
    assert!(Ivf::build(base, &present, &bad).is_err());
}
