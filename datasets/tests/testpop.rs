//! Test populations (`testpop`): determinism, ground truth, and each kind's intended property.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // test helpers unwrap; tests print their measured figures

use pacha_datasets::*;
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};

const KINDS: [Preset; 6] = [
    Preset::IsotropicMates,
    Preset::LookalikeFamilies,
    Preset::HeavyTail,
    Preset::PowerLaw,
    Preset::SkewedClusters,
    Preset::FingersOnly,
];

/// A config of `preset` with a face of `face` dims (0 for fingers-only) and the given fingers.
fn cfg(
    preset: Preset,
    records: u64,
    seed: u64,
    face: usize,
    fingers: &[(u8, usize)],
) -> PopulationConfig {
    PopulationConfig {
        face_dim: if preset.has_face() { face } else { 0 },
        fingers: fingers.to_vec(),
        ..testpop::config(preset, records, seed)
    }
}

fn all(g: &Generator) -> GeneratedBatch {
    g.generate(0, g.records() as usize)
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

fn block(b: &GeneratedBatch, m: Modality) -> &ModalityBlock {
    b.records.blocks.iter().find(|x| x.modality == m).unwrap()
}

/// Cosines of every pair `(i, j)`, `i < j`, both present, for which `keep(i, j)` holds.
fn pair_cosines(blk: &ModalityBlock, keep: impl Fn(usize, usize) -> bool + Sync) -> Vec<f64> {
    let n = blk.present.len();
    (0..n)
        .into_par_iter()
        .flat_map_iter(|i| {
            let keep = &keep;
            (i + 1..n)
                .filter(move |&j| blk.present[i] && blk.present[j] && keep(i, j))
                .map(move |j| dot(blk.row(i), blk.row(j)))
        })
        .collect()
}

fn quantile(v: &mut [f64], p: f64) -> f64 {
    v.sort_unstable_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0);
    (m, var.sqrt())
}

fn share(v: &[f64], lo: f64, hi: f64) -> f64 {
    v.iter().filter(|&&x| (lo..=hi).contains(&x)).count() as f64 / v.len() as f64
}

fn genuine_cosines(g: &Generator, b: &GeneratedBatch, m: Modality) -> Vec<f64> {
    let blk = block(b, m);
    g.truth_pairs()
        .iter()
        .filter(|t| blk.present[t.a as usize] && blk.present[t.b as usize])
        .map(|t| dot(blk.row(t.a as usize), blk.row(t.b as usize)))
        .collect()
}

#[test]
fn deterministic_across_batch_splits_and_thread_counts() {
    for kind in KINDS {
        let c = cfg(kind, 1500, 11, 48, &[(2, 32), (7, 40)]);
        let g = Generator::new(c.clone()).unwrap();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let two = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let whole = one.install(|| all(&g));
        let pieces: Vec<GeneratedBatch> = two.install(|| g.batches(333).collect());
        assert_eq!(pieces.len(), 5);
        let mut ids = Vec::new();
        let mut persons = Vec::new();
        for p in &pieces {
            ids.extend(p.records.ids.iter().cloned());
            persons.extend(p.persons.iter().copied());
        }
        assert_eq!(ids, whole.records.ids, "{kind:?}");
        assert_eq!(persons, whole.persons, "{kind:?}");
        for (bi, wb) in whole.records.blocks.iter().enumerate() {
            let data: Vec<f32> = pieces
                .iter()
                .flat_map(|p| p.records.blocks[bi].data.iter().copied())
                .collect();
            let present: Vec<bool> = pieces
                .iter()
                .flat_map(|p| p.records.blocks[bi].present.iter().copied())
                .collect();
            let quality: Vec<f32> = pieces
                .iter()
                .flat_map(|p| p.records.blocks[bi].quality.iter().copied())
                .collect();
            assert!(data == wb.data, "{kind:?} {}: data differs", wb.modality);
            assert_eq!(present, wb.present, "{kind:?}");
            assert_eq!(quality, wb.quality, "{kind:?}");
        }
        // A fresh generator reproduces a batch in the middle; another seed does not.
        let again = Generator::new(c.clone()).unwrap().generate(700, 50);
        assert_eq!(again, g.generate(700, 50), "{kind:?}");
        let other = Generator::new(PopulationConfig { seed: 12, ..c }).unwrap();
        assert!(other.generate(700, 50).records.blocks[0].data != again.records.blocks[0].data);
    }
}

#[test]
fn truth_is_exactly_the_same_person_pairs() {
    for kind in KINDS {
        let g = Generator::new(cfg(kind, 3000, 5, 32, &[(2, 16), (7, 16)])).unwrap();
        let b = all(&g);
        let mut by_person: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for (r, &p) in b.persons.iter().enumerate() {
            assert_eq!(p, g.person_of(r as u64));
            by_person.entry(p).or_default().push(r as u64);
        }
        assert_eq!(by_person.len() as u64, g.persons(), "{kind:?}");
        let expected: BTreeSet<(u64, u64)> = by_person
            .values()
            .flat_map(|rs| {
                rs.iter()
                    .enumerate()
                    .flat_map(move |(i, &a)| rs[i + 1..].iter().map(move |&b| (a, b)))
            })
            .collect();
        let truth = g.truth_pairs();
        let got: BTreeSet<(u64, u64)> = truth.iter().map(|t| (t.a, t.b)).collect();
        assert_eq!(got, expected, "{kind:?}");
        for t in &truth {
            assert_eq!(g.person_of(t.a), t.person);
            assert_eq!(g.person_of(t.b), t.person);
        }
        let clusters: Vec<(u64, Vec<u64>)> = by_person
            .into_iter()
            .filter(|(_, rs)| rs.len() >= 2)
            .collect();
        assert_eq!(g.clusters(), clusters, "{kind:?}");
        // 1 % re-enrolments (a few planned ones can be dropped by the plan's collision rule).
        assert!(
            (25..=30).contains(&g.duplicate_records()),
            "{kind:?}: {}",
            g.duplicate_records()
        );
        // Every record is unit norm where present, zero where absent.
        for blk in &b.records.blocks {
            for i in 0..blk.present.len() {
                let n = dot(blk.row(i), blk.row(i));
                if blk.present[i] {
                    assert!((n - 1.0).abs() < 1e-4, "{kind:?} row {i} norm² {n}");
                } else {
                    assert_eq!(n, 0.0);
                }
            }
        }
    }
}

#[test]
fn isotropic_mates_score_070() {
    let c = PopulationConfig {
        duplicate_rate: 0.05,
        ..cfg(Preset::IsotropicMates, 3000, 1, 512, &[])
    };
    let g = Generator::new(c).unwrap();
    let b = all(&g);
    let mut genuine = genuine_cosines(&g, &b, Modality::Face);
    let (m, sd) = mean_sd(&genuine);
    let within = share(&genuine, 0.65, 0.75);
    let p = &b.persons;
    let imp = pair_cosines(block(&b, Modality::Face), |i, j| {
        p[i] != p[j] && j < i + 200
    });
    let (im, isd) = mean_sd(&imp);
    println!(
        "isotropic-mates: genuine n={} mean={m:.4} sd={sd:.4} within ±0.05: {within:.3} min={:.3}; impostor mean={im:.4} sd={isd:.4}",
        genuine.len(),
        quantile(&mut genuine, 0.0)
    );
    assert!(genuine.len() >= 120);
    assert!((0.68..=0.72).contains(&m), "genuine mean {m}");
    assert!(within >= 0.95, "only {within} of mates within 0.70 ± 0.05");
    assert!(
        im.abs() < 0.005 && (0.035..0.055).contains(&isd),
        "impostor {im} ± {isd}"
    );
}

#[test]
fn lookalike_families_cluster_just_around_candidate_cosines() {
    let g = Generator::new(cfg(Preset::LookalikeFamilies, 3000, 2, 512, &[(2, 64)])).unwrap();
    let b = all(&g);
    // Family sizes, over the complete 64-person blocks.
    let persons = g.persons();
    let full = persons / 64 * 64;
    let mut sizes: HashMap<u64, u64> = HashMap::new();
    for p in 0..full {
        *sizes.entry(g.group_of(p).unwrap()).or_default() += 1;
    }
    let (lo, hi) = (sizes.values().min().unwrap(), sizes.values().max().unwrap());
    let mean = full as f64 / sizes.len() as f64;
    println!(
        "lookalike-families: {} families, sizes {lo}..={hi}, mean {mean:.2}",
        sizes.len()
    );
    assert!(
        *lo >= 2 && *hi <= 12 && *hi >= 9,
        "family sizes {lo}..={hi}"
    );
    assert!((3.5..=5.5).contains(&mean), "mean family size {mean}");
    let fam: Vec<u64> = b.persons.iter().map(|&p| g.group_of(p).unwrap()).collect();
    let p = &b.persons;
    let mut within = pair_cosines(block(&b, Modality::Face), |i, j| {
        fam[i] == fam[j] && p[i] != p[j]
    });
    let mut outside = pair_cosines(block(&b, Modality::Face), |i, j| fam[i] != fam[j]);
    let mid = share(&within, 0.40, 0.60);
    let (p10, p50, p90) = (
        quantile(&mut within, 0.1),
        quantile(&mut within, 0.5),
        quantile(&mut within, 0.9),
    );
    let out_max = quantile(&mut outside, 1.0);
    let mut genuine = genuine_cosines(&g, &b, Modality::Face);
    let (g10, g90) = (quantile(&mut genuine, 0.1), quantile(&mut genuine, 0.9));
    println!(
        "  within-family n={} p10={p10:.3} p50={p50:.3} p90={p90:.3} in 0.40–0.60: {mid:.3}; outside max={out_max:.3}; genuine p10={g10:.3} p90={g90:.3}",
        within.len()
    );
    assert!(within.len() >= 3000);
    assert!(mid >= 0.45, "only {mid} of family pairs in 0.40–0.60");
    assert!(
        (0.28..=0.40).contains(&p10) && (0.55..=0.70).contains(&p90),
        "spread {p10}..{p90}"
    );
    assert!(out_max < 0.3, "unrelated pairs reach {out_max}");
    assert!(g10 > 0.55 && g90 < 0.90, "genuine {g10}..{g90}");
    // Relatives look alike in the face only: their fingers score like strangers'.
    let fingers = pair_cosines(block(&b, Modality::Finger(2)), |i, j| {
        fam[i] == fam[j] && p[i] != p[j]
    });
    let (fm, fsd) = mean_sd(&fingers);
    println!("  within-family finger2 mean={fm:.4} sd={fsd:.4}");
    assert!(fm.abs() < 0.01 && fsd < 0.15, "family fingers {fm} ± {fsd}");
}

#[test]
fn heavy_tail_has_a_fat_impostor_upper_tail() {
    let g = Generator::new(cfg(Preset::HeavyTail, 2000, 3, 512, &[])).unwrap();
    let b = all(&g);
    let p = &b.persons;
    let mut imp = pair_cosines(block(&b, Modality::Face), |i, j| p[i] != p[j]);
    let (m, sd) = mean_sd(&imp);
    let cut = m + 5.0 * sd;
    let above = imp.iter().filter(|&&x| x > cut).count();
    let rate = above as f64 / imp.len() as f64;
    let high = imp.iter().filter(|&&x| x >= 0.4).count();
    let max = quantile(&mut imp, 1.0);
    // P(Z > 5) of a Gaussian.
    let gauss = 2.87e-7;
    println!(
        "heavy-tail: impostor n={} mean={m:.4} sd={sd:.4}; > mean+5sd ({cut:.3}): {above} ({rate:.2e}, Gaussian {gauss:.1e}); >= 0.4: {high}; max {max:.3}",
        imp.len()
    );
    assert!(rate > 100.0 * gauss && above >= 50, "tail share {rate}");
    assert!(high >= 10 && max < 0.95, "{high} pairs >= 0.4, max {max}");
    let genuine = genuine_cosines(&g, &b, Modality::Face);
    assert!(mean_sd(&genuine).0 > 0.6);
}

/// Eigenvalues (descending) of a symmetric `d × d` matrix by cyclic Jacobi.
fn eigenvalues(mut a: Vec<f64>, d: usize) -> Vec<f64> {
    for _sweep in 0..30 {
        let off: f64 = (0..d)
            .flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * d + j] * a[i * d + j])
            .sum();
        if off < 1e-20 {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let (c, s) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
                for k in 0..d {
                    let (akp, akq) = (a[k * d + p], a[k * d + q]);
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p * d + k], a[q * d + k]);
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
            }
        }
    }
    let mut ev: Vec<f64> = (0..d).map(|i| a[i * d + i]).collect();
    ev.sort_unstable_by(|x, y| y.total_cmp(x));
    ev
}

#[test]
fn power_law_spectrum_decays_as_k_to_the_minus_1_5() {
    let d = 96;
    let g = Generator::new(cfg(Preset::PowerLaw, 4000, 4, d, &[])).unwrap();
    let b = all(&g);
    let blk = block(&b, Modality::Face);
    let rows: Vec<usize> = (0..blk.present.len()).filter(|&i| blk.present[i]).collect();
    let mut cov = vec![0.0f64; d * d];
    for &r in &rows {
        let x = blk.row(r);
        for i in 0..d {
            for j in 0..d {
                cov[i * d + j] += f64::from(x[i]) * f64::from(x[j]);
            }
        }
    }
    cov.iter_mut().for_each(|c| *c /= rows.len() as f64);
    let ev = eigenvalues(cov, d);
    // The capture noise adds an isotropic floor ≈ the smallest eigenvalues (the identities' own λ_d is far
    // below it): subtract it, then fit the least-squares slope of log λ_k against log k over k = 1..8.
    let floor = ev[d - d / 4..].iter().sum::<f64>() / (d / 4) as f64;
    let pts: Vec<(f64, f64)> = (0..8)
        .map(|k| (((k + 1) as f64).ln(), (ev[k] - floor).ln()))
        .collect();
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / 8.0,
        pts.iter().map(|p| p.1).sum::<f64>() / 8.0,
    );
    let slope = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>()
        / pts.iter().map(|p| (p.0 - mx).powi(2)).sum::<f64>();
    let top = ev[0] / ev.iter().sum::<f64>();
    let p = &b.persons;
    let (im, isd) = mean_sd(&pair_cosines(blk, |i, j| p[i] != p[j] && j < i + 100));
    let (gm, gsd) = mean_sd(&genuine_cosines(&g, &b, Modality::Face));
    println!(
        "power-law: top eigenvalues {:?}, floor {floor:.5}, slope over k=1..8 {slope:.3}, top share {top:.3}; genuine {gm:.3} ± {gsd:.3}, impostor {im:.4} ± {isd:.4}",
        ev[..10]
            .iter()
            .map(|x| format!("{x:.4}"))
            .collect::<Vec<_>>()
    );
    // Normalising each identity compresses the leading ratios (|x| grows with the top components): for
    // unit-normalised draws of λ_k ∝ k^-1.5 at d = 96 the expected slope over k = 1..8 is ≈ -1.25 (a direct
    // simulation of E[x_k²/|x|²]); λ_k ∝ 1/k would give ≈ -0.8 and an isotropic population ≈ 0.
    assert!((-1.4..=-1.1).contains(&slope), "spectrum slope {slope}");
    assert!(isd > 0.15, "impostor sd {isd}: not concentrated");
    assert!((0.15..=0.5).contains(&top), "top eigenvalue share {top}");
    // No isotropic floor: the smallest eigenvalues are the capture noise only, far below the top.
    assert!(ev[d - 1] < ev[0] / 50.0);
}

#[test]
fn skewed_clusters_are_very_unequal_and_tight() {
    let g = Generator::new(cfg(Preset::SkewedClusters, 3000, 6, 256, &[])).unwrap();
    let b = all(&g);
    let cl: Vec<u64> = b.persons.iter().map(|&p| g.group_of(p).unwrap()).collect();
    let mut sizes: HashMap<u64, usize> = HashMap::new();
    for &c in &cl {
        *sizes.entry(c).or_default() += 1;
    }
    let largest = *sizes.values().max().unwrap() as f64 / cl.len() as f64;
    let tiny = sizes.values().filter(|&&s| s <= 3).count();
    println!(
        "skewed-clusters: {} occupied clusters, largest {largest:.3} of records, {tiny} with <= 3 records",
        sizes.len()
    );
    assert!(largest >= 0.10, "largest cluster holds {largest}");
    assert!(
        sizes.len() >= 300 && tiny * 2 >= sizes.len(),
        "{} clusters, {tiny} tiny",
        sizes.len()
    );
    let p = &b.persons;
    let blk = block(&b, Modality::Face);
    let mut same = pair_cosines(blk, |i, j| cl[i] == cl[j] && p[i] != p[j]);
    let cross = pair_cosines(blk, |i, j| cl[i] != cl[j] && j < i + 100);
    let (sm, _) = mean_sd(&same);
    let (s10, s90) = (quantile(&mut same, 0.1), quantile(&mut same, 0.9));
    let (cm, csd) = mean_sd(&cross);
    // Per-cluster mean cosines of the occupied clusters with >= 10 records.
    let mut per: Vec<f64> = sizes
        .iter()
        .filter(|&(_, &s)| s >= 10)
        .map(|(&c, _)| {
            mean_sd(&pair_cosines(blk, |i, j| {
                cl[i] == c && cl[j] == c && p[i] != p[j]
            }))
            .0
        })
        .collect();
    per.sort_unstable_by(f64::total_cmp);
    println!(
        "  within-cluster mean={sm:.3} p10={s10:.3} p90={s90:.3}; per-cluster means {:.3}..{:.3}; cross mean={cm:.4} sd={csd:.4}",
        per[0],
        per[per.len() - 1]
    );
    assert!((0.2..=0.5).contains(&sm), "within-cluster mean {sm}");
    assert!(per[0] >= 0.15 && per[per.len() - 1] <= 0.55, "{per:?}");
    assert!(cm.abs() < 0.01 && csd < 0.1, "cross-cluster {cm} ± {csd}");
}

#[test]
fn fingers_only_has_no_face_and_misses_one_finger_sometimes() {
    let g = Generator::new(testpop::config(Preset::FingersOnly, 3000, 7)).unwrap();
    assert_eq!(
        g.modalities(),
        vec![(Modality::Finger(2), 256), (Modality::Finger(7), 256)]
    );
    let b = all(&g);
    assert!(
        b.records
            .blocks
            .iter()
            .all(|blk| blk.modality != Modality::Face)
    );
    let (f2, f7) = (
        block(&b, Modality::Finger(2)),
        block(&b, Modality::Finger(7)),
    );
    let one = (0..3000)
        .filter(|&i| f2.present[i] != f7.present[i])
        .count();
    let none = (0..3000)
        .filter(|&i| !f2.present[i] && !f7.present[i])
        .count();
    let missing_share = one as f64 / 3000.0;
    assert_eq!(none, 0);
    assert!(
        (0.035..=0.065).contains(&missing_share),
        "missing one finger: {missing_share}"
    );
    assert!((0..3000).any(|i| !f2.present[i]) && (0..3000).any(|i| !f7.present[i]));
    let p = &b.persons;
    for f in [Modality::Finger(2), Modality::Finger(7)] {
        let genuine = genuine_cosines(&g, &b, f);
        let imp = pair_cosines(block(&b, f), |i, j| p[i] != p[j] && j < i + 100);
        let ((gm, gsd), (im, isd)) = (mean_sd(&genuine), mean_sd(&imp));
        println!(
            "fingers-only {f}: genuine mean={gm:.3} sd={gsd:.3}; impostor mean={im:.4} sd={isd:.4}"
        );
        assert!((0.45..=0.75).contains(&gm), "{f} genuine mean {gm}");
        assert!(
            im.abs() < 0.01 && (0.04..=0.12).contains(&isd),
            "{f} impostor {im} ± {isd}"
        );
    }
    // A face dimension is a configuration error for this kind.
    let bad = PopulationConfig {
        face_dim: 512,
        ..testpop::config(Preset::FingersOnly, 10, 1)
    };
    assert!(Generator::new(bad).is_err());
}

#[test]
fn presets_parse_and_round_trip() {
    for p in Preset::ALL {
        assert_eq!(p.name().parse::<Preset>().unwrap(), p);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Preset>(&json).unwrap(), p);
        let kebab = format!("\"{}\"", p.name());
        assert_eq!(serde_json::from_str::<Preset>(&kebab).unwrap(), p);
    }
    assert!("gaussian".parse::<Preset>().is_err());
}

#[test]
fn write_population_writes_every_kind() {
    for kind in KINDS {
        let dir = tempfile::tempdir().unwrap();
        let c = PopulationConfig {
            impostor_pairs: 5000,
            ..cfg(kind, 600, 9, 64, &[(2, 32), (7, 32)])
        };
        let s = write_population(&c, dir.path(), &mut |_, _| {}).unwrap();
        let m = PopulationManifest::read(dir.path()).unwrap();
        assert_eq!(m, s.manifest);
        assert_eq!(m.config.preset, kind);
        assert_eq!(
            dir.path().join("face.npy").exists(),
            kind.has_face(),
            "{kind:?}"
        );
        for (_, file, dim) in &m.files {
            let npy = NpyMatrix::open(dir.path().join(file)).unwrap();
            assert_eq!((npy.rows(), npy.dim()), (600, *dim));
        }
        let truth = read_truth(dir.path().join("truth.csv")).unwrap();
        assert_eq!(truth.len() as u64, m.truth_pairs);
        assert!(m.truth_pairs >= 5);
        let subjects = read_subjects(dir.path().join("subjects.csv")).unwrap();
        assert_eq!(subjects.ids.len(), 600);
        for st in &m.stats {
            assert!(st.genuine.mean > st.impostor.mean + 0.25, "{kind:?} {st:?}");
        }
    }
}
