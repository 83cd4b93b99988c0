//! The impostor tail fitted at calibration (issue 17): counted exhaustively on a pool of rows, fitted with a
//! generalised Pareto model, checked against the count, saved with the calibration, and used by the scores.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use pacha_engine::Modality;
use pacha_engine::engine::CalibrateOptions;
use pacha_engine::engine::tail_pool;
use pacha_engine::evaluation::{
    FUSED_POOL_SEED, FUSED_THRESHOLDS, fused_count, fused_count_within, modality_dependence,
};
use pacha_tests::{config, load, load_edited};
use std::collections::{HashMap, HashSet};

#[test]
fn calibration_fits_and_checks_a_counted_tail_and_reopens_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let pop = load(dir.path(), &config(12_000, 5), None);
    let e = &pop.engine;
    e.calibrate(&CalibrateOptions {
        genuine: Some(&pop.truth),
        tail_rows: 8_000,
        tail_rows_max: 0, // this pool, not a grown one (growth: a_labelled_pool_grows_…)
        ..CalibrateOptions::default()
    })
    .unwrap();
    let cal = e.calibration();
    assert_eq!(cal.tail_checks.len(), cal.models.len());
    for (m, model) in &cal.models {
        let t = model
            .impostor_tail
            .unwrap_or_else(|| panic!("{m}: no tail"));
        // About 8 000 rows (the hub-stratified pool draws each row by its own chance) are 3.2e7 pairs (fewer
        // where a finger is missing); the labelled genuine pairs are out.
        assert!(t.pairs > 25_000_000 && t.pairs < 34_000_000, "{m}: {t:?}");
        assert_eq!(
            t.truncated_at, None,
            "labelled calibrations are not truncated"
        );
        assert!(t.exceedances > 1_000, "{m}: {t:?}");
        assert!(
            model.impostor_body.is_some(),
            "{m}: the body is read off the sampled pairs"
        );
        let check = cal
            .tail_checks
            .iter()
            .find(|c| c.modality == m.key())
            .unwrap();
        assert!(
            check.excluded_genuine > 0,
            "{m}: truth pairs should fall in the pool"
        );
        // In sample, where thousands of events were counted, the fitted tail follows the count closely.
        for row in check.model.iter().filter(|r| r.events >= 1_000) {
            let q = row.ratio.unwrap();
            assert!((0.85..1.18).contains(&q), "{m} at {}: {q}", row.level);
        }
        // Every resolved row says how much its events cluster on shared rows; its interval is the effective
        // count's (wider than the Poisson one wherever the design effect exceeds 1), around the measurement.
        for row in check.model.iter().filter(|r| r.measured.is_some()) {
            let d = row.design_effect.unwrap();
            assert!(d >= 1.0 && d.is_finite(), "{m} at {}: {d}", row.level);
            let (lo, hi) = row.ci.unwrap();
            let measured = row.measured.unwrap();
            assert!(lo <= measured && measured <= hi, "{m} at {}", row.level);
            // No narrower, relatively, than Poisson on the raw events (the hub-stratified pool's share is
            // weighted, so the raw events over the raw pairs is not its measurement).
            let (plo, phi) = pacha_engine::audit::clopper_pearson(row.events, row.pairs, 0.95);
            assert!(
                hi / lo >= (phi / plo) * (1.0 - 1e-9),
                "{m} at {}",
                row.level
            );
            assert_eq!(row.ratio_ci, Some((lo / row.level, hi / row.level)));
        }
        assert!(
            check
                .model
                .iter()
                .any(|r| r.design_effect.unwrap_or(1.0) > 1.0),
            "{m}: families and look-alikes share rows among the counted events"
        );
        // Levels beyond what 3.2e7 pairs can resolve are marked, not given a ratio.
        let deep = check.model.iter().find(|r| r.level == 1e-9).unwrap();
        assert_eq!(deep.ratio, None);
        // The score uses the tail: a single-modality FMR above u is the tail's survival.
        let s = t.u + 2.0 * t.sigma;
        let want = t.sf(s);
        assert!((model.impostor_sf(s) - want).abs() <= 1e-15 + want * 1e-12);
    }

    // The fitted calibration is saved and read back whole on reopen.
    let before = (*e.calibration()).clone();
    let dirpath = e.store().dir().to_path_buf();
    drop(pop);
    let again = pacha_engine::Engine::open(&dirpath).unwrap();
    let after = again.calibration();
    assert_eq!(after.models, before.models);
    assert_eq!(after.tail_checks, before.tail_checks);
}

#[test]
fn a_hub_stratified_pool_estimates_every_pair_of_the_store() {
    use pacha_engine::engine::TailPool;
    let dir = tempfile::tempdir().unwrap();
    let pop = load(dir.path(), &config(12_000, 5), Some(&[Modality::Face]));
    let e = &pop.engine;
    e.calibrate(&CalibrateOptions {
        genuine: Some(&pop.truth),
        tail_rows: 5_000,
        tail_rows_max: 0, // this pool, not a grown one
        quality_bands: 0,
        tail_pool: TailPool::Hubs,
        ..CalibrateOptions::default()
    })
    .unwrap();
    let cal = e.calibration();
    let check = &cal.tail_checks[0];
    assert_eq!(check.pool_kind, TailPool::Hubs);
    let model = &cal.models[0].1;
    let tail = model.impostor_tail.expect("a tail");
    // 5 000 drawn rows are about 1.25e7 counted pairs, weighted up to the store's 7.2e7.
    assert!(
        tail.pairs > 8_000_000 && tail.pairs < 17_000_000,
        "{tail:?}"
    );
    // Every pair of the store, counted: the hub-stratified model must match it where it resolves thousands
    // of events (the store's own share, not a pool's).
    let snap = e.snapshot();
    let rows: Vec<usize> = (0..snap.rows()).collect();
    let truth = truth_rows(&snap, &pop.truth);
    let all = pacha_engine::engine::count_pool_tail(&snap, Modality::Face, &rows, tail.u, &truth)
        .unwrap()
        .expect("a count");
    // (Measured here: 1.01 / 0.99 / 1.01 at 1e-4 / 1e-5 / 1e-6, the pool holding 6 901 of the store's
    // 7 208 events at 1e-4 from a sixth of its pairs: the hubs are counted with certainty.)
    for row in check.model.iter().filter(|r| r.events >= 50) {
        let measured_all = all.at_or_above(row.cosine) as f64 / all.pairs as f64;
        let q = measured_all / row.level;
        assert!(
            (0.9..1.11).contains(&q),
            "at {}: store {q} ({} events in the pool)",
            row.level,
            row.events
        );
        // In sample the model reads its own weighted count.
        let own = row.ratio.unwrap();
        assert!(
            (0.9..1.11).contains(&own),
            "at {}: in sample {own}",
            row.level
        );
        assert!(row.design_effect.unwrap() >= 1.0);
        let (lo, hi) = row.ci.unwrap();
        assert!(lo <= row.measured.unwrap() && row.measured.unwrap() <= hi);
    }
    assert!(check.model.iter().filter(|r| r.events >= 50).count() >= 3);
    // The evaluation's check draws a second hub-stratified pool (another seed): a second estimate of the
    // store's pairs, which agrees with the model where thousands of events were counted, and says it is no
    // out-of-sample check.
    let mut notes = Vec::new();
    let checks =
        pacha_engine::evaluation::out_of_sample_tails(&snap, &cal, &truth, 5_000, &mut notes)
            .unwrap();
    assert_eq!(checks[0].pool_kind, TailPool::Hubs);
    assert!(
        notes.iter().any(|n| n.contains("not out of sample")),
        "{notes:?}"
    );
    for row in checks[0].model.iter().filter(|r| r.events >= 500) {
        let q = row.ratio.unwrap();
        assert!((0.9..1.11).contains(&q), "check at {}: {q}", row.level);
    }
    // A check pool as large as the store is every pair of it, unweighted, and says so.
    let mut notes = Vec::new();
    let whole =
        pacha_engine::evaluation::out_of_sample_tails(&snap, &cal, &truth, snap.rows(), &mut notes)
            .unwrap();
    assert_eq!(whole[0].pool_kind, TailPool::Uniform);
    assert_eq!(whole[0].pairs, all.pairs);
    assert!(
        notes.iter().any(|n| n.contains("every pair of the store")),
        "{notes:?}"
    );
    assert!(
        !notes.iter().any(|n| n.contains("not out of sample")),
        "{notes:?}"
    );
    // Saved and read back with its kind.
    let dirpath = e.store().dir().to_path_buf();
    let before = (*cal).clone();
    drop(pop);
    let again = pacha_engine::Engine::open(&dirpath).unwrap();
    assert_eq!(again.calibration().tail_checks, before.tail_checks);
}

#[test]
fn a_labelled_pool_grows_until_its_count_pins_the_decision_fmr_and_no_further() {
    use pacha_engine::fusion::DEFAULT_FPIR;
    let dir = tempfile::tempdir().unwrap();
    let pop = load(dir.path(), &config(6_000, 11), None);
    let e = &pop.engine;
    let snap = e.snapshot();
    let live = snap.live();
    let holding = |key: &str| {
        let m = snap
            .schema()
            .modality_list()
            .into_iter()
            .find(|m| m.key() == key)
            .unwrap();
        (0..snap.rows())
            .filter(|&r| snap.template(m, r).is_some())
            .count()
    };
    // A dedup at FPIR 1e-3 over these rows decides at FMR 1e-3 / live (about 1.5e-7): 500 rows (1.2e5 pairs)
    // count nothing there, so each labelled modality's pool doubles to the bound, and the notes say the
    // bound, not the store, is what stops it.
    e.calibrate(&CalibrateOptions {
        genuine: Some(&pop.truth),
        tail_rows: 500,
        tail_rows_max: 2_000,
        ..CalibrateOptions::default()
    })
    .unwrap();
    let cal = e.calibration();
    assert_eq!(cal.tail_checks.len(), 3);
    for c in &cal.tail_checks {
        assert_eq!(c.pool_cap, 2_000, "{}", c.modality);
        for (from, to) in [(500, 1_000), (1_000, 2_000)] {
            let grown = format!("{}: tail pool grown from {from} to {to} rows: ", c.modality);
            assert!(cal.source.contains(&grown), "{grown} not in {}", cal.source);
        }
    }
    let (fmr, notes) = e.resolution_notes(DEFAULT_FPIR);
    assert!((fmr - DEFAULT_FPIR / live as f64).abs() < 1e-15, "{fmr}");
    assert_eq!(notes.len(), 3, "{notes:?}");
    for n in &notes {
        assert!(
            n.ends_with(
                "a pool larger than its 2000 rows (tail_rows_max, --tail-rows-max) narrows it"
            ),
            "{n}"
        );
    }

    // A bound past the store: the pool grows to every row holding the modality, counted unweighted, and stops.
    e.calibrate(&CalibrateOptions {
        genuine: Some(&pop.truth),
        tail_rows: 3_000,
        tail_rows_max: 1_000_000,
        ..CalibrateOptions::default()
    })
    .unwrap();
    let cal = e.calibration();
    for c in &cal.tail_checks {
        let n = holding(&c.modality) as u64;
        assert!(cal.source.contains(&format!(
            "{}: tail pool grown from 3000 to 6000 rows",
            c.modality
        )));
        assert!(
            !cal.source
                .contains(&format!("{}: tail pool grown from 6000", c.modality))
        );
        assert_eq!(
            c.pairs + c.excluded_genuine,
            n * (n - 1) / 2,
            "{}: every pair counted",
            c.modality
        );
    }
    for n in e.resolution_notes(DEFAULT_FPIR).1 {
        assert!(
            n.ends_with("every pair of the store was counted: no pool can narrow it"),
            "{n}"
        );
    }

    // Without labels (the fit stops at 1e-6 whatever the pool) and with the bound at the pool, nothing grows.
    for (genuine, max) in [(None, 2_000), (Some(&pop.truth[..]), 500)] {
        e.calibrate(&CalibrateOptions {
            genuine,
            tail_rows: 500,
            tail_rows_max: max,
            ..CalibrateOptions::default()
        })
        .unwrap();
        let cal = e.calibration();
        assert!(!cal.source.contains("tail pool grown"), "{}", cal.source);
        assert!(cal.tail_checks.iter().all(|c| c.pool_cap == 500));
    }
}

#[test]
fn unlabelled_calibration_truncates_and_tail_rows_zero_keeps_the_gaussian() {
    let dir = tempfile::tempdir().unwrap();
    let pop = load(dir.path(), &config(6_000, 9), Some(&[Modality::Face]));
    let e = &pop.engine;
    e.calibrate(&CalibrateOptions {
        tail_rows: 6_000,
        ..CalibrateOptions::default()
    })
    .unwrap();
    let t = e.calibration().models[0].1.impostor_tail.unwrap();
    let v = t.truncated_at.expect("an unlabelled fit is truncated");
    assert!(v > t.u);
    e.calibrate(&CalibrateOptions {
        tail_rows: 0,
        ..CalibrateOptions::default()
    })
    .unwrap();
    let cal = e.calibration();
    assert_eq!(cal.models[0].1.impostor_tail, None);
    assert!(cal.tail_checks.is_empty());
}

#[test]
fn fused_count_finds_every_pair_a_brute_force_fusion_finds() {
    let dir = tempfile::tempdir().unwrap();
    let pop = load(dir.path(), &config(3_000, 13), None);
    let e = &pop.engine;
    e.calibrate(&CalibrateOptions {
        genuine: Some(&pop.truth),
        tail_rows: 3_000,
        ..CalibrateOptions::default()
    })
    .unwrap();
    let snap = e.snapshot();
    let cal = e.calibration();
    let rows: Vec<usize> = (0..snap.rows()).collect();
    let truth = truth_rows(&snap, &pop.truth);
    let mut notes = Vec::new();
    let f = fused_count(&snap, &cal, &truth, rows.len(), &mut notes)
        .unwrap()
        .expect("a count");
    assert!(notes.is_empty(), "{notes:?}");
    let n = rows.len() as u64;
    assert_eq!(f.pairs, n * (n - 1) / 2 - truth.len() as u64);
    assert_eq!(
        f.point_rows,
        vec![rows.len(); 7],
        "no pass exceeds the budget"
    );
    // Brute force over every pair: the pigeonhole candidates must lose none at or above score 30.
    let mut scored = Vec::new();
    for a in 0..rows.len() {
        for b in a + 1..rows.len() {
            if truth.contains(&(a, b)) {
                continue;
            }
            let s = pacha_engine::matcher::compare_rows(&snap, &cal, a, b)
                .fused
                .score;
            if s >= FUSED_THRESHOLDS[0] {
                scored.push((a, b, s));
            }
        }
    }
    let brute_in = |rows: &HashSet<usize>| -> Vec<usize> {
        FUSED_THRESHOLDS
            .iter()
            .map(|t| {
                scored
                    .iter()
                    .filter(|(a, b, s)| s >= t && rows.contains(a) && rows.contains(b))
                    .count()
            })
            .collect()
    };
    let brute = brute_in(&rows.iter().copied().collect());
    let counted: Vec<usize> = f.points.iter().map(|p| p.false_matches).collect();
    assert_eq!(counted, brute);
    // The design effect is the brute-force events' own (the rows they share), and the interval is that of
    // the effective count, around the measurement.
    for (k, p) in f.points.iter().enumerate() {
        let Some(m) = p.measured_fmr else { continue };
        let events = scored
            .iter()
            .filter(|(_, _, s)| *s >= FUSED_THRESHOLDS[k])
            .map(|&(a, b, _)| (a as u64, b as u64));
        let want = pacha_engine::tail::design_effect(f.pairs, events);
        assert_eq!(p.design_effect, Some(want), "score {}", p.threshold);
        let (lo, hi) = p.measured_ci.unwrap();
        assert!(
            lo <= m && m <= hi,
            "score {}: {m} outside [{lo}, {hi}]",
            p.threshold
        );
    }
    // A candidate budget the low scores exceed: they are counted on nested sub-pools (the pool's seeded
    // order, fewer rows), and every point still equals the brute-force count over its own rows.
    let mut notes = Vec::new();
    let budgeted = fused_count_within(&snap, &cal, &truth, rows.len(), 2e5, &mut notes)
        .unwrap()
        .expect("a count");
    let rows_at = &budgeted.point_rows;
    assert!(
        rows_at[0] < rows.len() && rows_at[6] == rows.len(),
        "{rows_at:?}"
    );
    assert!(rows_at.windows(2).all(|w| w[0] <= w[1]), "{rows_at:?}");
    assert!(notes.iter().any(|n| n.contains("counted on")), "{notes:?}");
    for (k, p) in budgeted.points.iter().enumerate() {
        let sub: HashSet<usize> = tail_pool(&snap, FUSED_POOL_SEED, rows_at[k], false)
            .into_iter()
            .collect();
        assert_eq!(p.false_matches, brute_in(&sub)[k], "score {}", p.threshold);
        let n = rows_at[k] as u64;
        let labelled = truth
            .iter()
            .filter(|(a, b)| sub.contains(a) && sub.contains(b))
            .count() as u64;
        assert_eq!(p.impostor_samples as u64, n * (n - 1) / 2 - labelled);
    }
    // The prediction, pair by pair: each pair's fused distribution (shared modalities at the lower quality)
    // at the lowest score it can attain at or above each threshold, over every pair of the pool.
    let mut keys: HashMap<pacha_engine::fusion::FusedKey, u64> = HashMap::new();
    for a in 0..rows.len() {
        for b in a + 1..rows.len() {
            let shared: Vec<(usize, Option<f32>)> = cal
                .models
                .iter()
                .enumerate()
                .filter(|(_, (m, _))| {
                    snap.template(*m, a).is_some() && snap.template(*m, b).is_some()
                })
                .map(|(i, (m, _))| (i, Some(snap.quality(*m, a).min(snap.quality(*m, b)))))
                .collect();
            *keys.entry(cal.fused_key(&shared)).or_default() += 1;
        }
    }
    assert!(keys.len() > 1, "bands give pairs different distributions");
    for p in &f.points {
        let want = keys
            .iter()
            .map(|(k, &c)| c as f64 * cal.attainable_fmr(*k, p.threshold))
            .sum::<f64>()
            / (n * (n - 1) / 2) as f64;
        assert!(
            (p.predicted_fmr / want - 1.0).abs() < 1e-9,
            "score {}: {} vs {want}",
            p.threshold,
            p.predicted_fmr
        );
        assert!(p.predicted_fmr <= pacha_engine::fusion::fmr_from_score(p.threshold));
    }
    assert!(
        brute[0] > 100,
        "the check needs events to compare: {brute:?}"
    );
}

#[test]
fn quality_bands_split_the_tail_where_quality_moves_it_and_not_elsewhere() {
    use pacha_datasets::generate::Generator;
    use pacha_engine::Engine;
    use pacha_engine::store::Schema;
    let dir = tempfile::tempdir().unwrap();
    let pop = load(dir.path(), &config(12_000, 17), Some(&[Modality::Face]));
    let e = &pop.engine;
    e.calibrate(&CalibrateOptions {
        tail_rows: 8_000,
        ..CalibrateOptions::default()
    })
    .unwrap();
    let cal = e.calibration();
    let bands = cal
        .bands(0)
        .expect("the generator's qualities move the face tail");
    assert_eq!(bands.models.len(), 3);
    assert_eq!(bands.edges.len(), 2);
    assert!(bands.edges[0] < bands.edges[1]);
    // Equal shares of pairs per band, by construction of the edges (sampled: within a few per cent).
    for s in &bands.share {
        assert!((s - 1.0 / 3.0).abs() < 0.05, "{:?}", bands.share);
    }
    let check = &cal.tail_checks[0];
    assert_eq!(check.bands.len(), 3);
    let at = |rows: &[pacha_engine::tail::TailCheckRow], level: f64| {
        rows.iter().find(|r| r.level == level).and_then(|r| r.ratio)
    };
    // Against its pairs, the pooled model is optimistic for the top band (two good captures reach high
    // cosines more often) and pessimistic for the bottom one; each band's own model follows its count.
    let top = &check.bands[2];
    let bottom = &check.bands[0];
    assert!(at(&top.pooled, 1e-4).unwrap() > 1.5, "{top:?}");
    assert!(at(&bottom.pooled, 1e-4).unwrap() < 0.67, "{bottom:?}");
    for b in &check.bands {
        for r in b.model.iter().filter(|r| r.events >= 500) {
            let q = r.ratio.unwrap();
            assert!(
                (0.75..1.33).contains(&q),
                "band [{}, {}) at {}: {q}",
                b.lo,
                b.hi,
                r.level
            );
        }
    }
    // A pair's score is its band's: the same cosine scores higher between poor captures.
    let lo = cal.fuse_q(&[(0, 0.45, Some(0.0))]);
    let hi = cal.fuse_q(&[(0, 0.45, Some(1.0))]);
    assert!(lo.score > hi.score + 3.0, "{lo:?} vs {hi:?}");
    // Bands off: pooled models only.
    e.calibrate(&CalibrateOptions {
        tail_rows: 8_000,
        quality_bands: 0,
        ..CalibrateOptions::default()
    })
    .unwrap();
    assert!(!e.calibration().has_bands());

    // A store whose qualities are all 1 (e.g. ingested without a subjects file) gets no bands, and says why.
    let dir2 = tempfile::tempdir().unwrap();
    let g = Generator::new(config(6_000, 19)).unwrap();
    let schema = Schema::of(
        g.modalities()
            .into_iter()
            .filter(|(m, _)| *m == Modality::Face),
    );
    let flat = Engine::create(dir2.path(), schema).unwrap();
    for mut b in g.batches(4096) {
        b.records
            .blocks
            .retain(|blk| blk.modality == Modality::Face);
        let keep: Vec<bool> = b.records.blocks[0].present.clone();
        for blk in &mut b.records.blocks {
            blk.quality.iter_mut().for_each(|q| *q = 1.0);
        }
        if keep.iter().all(|&k| k) {
            flat.insert_records(&b.records).unwrap();
        } else {
            flat.insert_records(&pacha_tests::filter_rows(&b.records, &keep))
                .unwrap();
        }
    }
    flat.calibrate(&CalibrateOptions {
        tail_rows: 6_000,
        ..CalibrateOptions::default()
    })
    .unwrap();
    let cal = flat.calibration();
    assert!(!cal.has_bands());
    assert!(
        cal.source.contains("no quality bands"),
        "the notes say why: {}",
        cal.source
    );
}

/// Issue 17: on look-alike families the counted face tail is heavy (the families fill it: GPD ξ ≈ 1.6 on this
/// 30 000-row store). The face evidence is built on that counted density, so it never reaches the LLR cap where
/// the counted survival is still ≥ 1e-20, family pairs keep distinct evidence, no fused score holds a large
/// share of the pairs at or above 30, and the predicted fused FMR stays within [`FUSED_FACTOR`] of the count on
/// every pair of the store. (The 60-nat cap atom of BENCHMARKS.md, 22 k pairs on one fused value, needs the
/// 100 k store: at 30 000 rows the Gaussian fit through the 0.99/0.9999 quantiles is concave and the old
/// ratio stayed below the cap too; the unit test `evidence_on_a_heavy_counted_tail_…` covers the capped case.)
#[test]
fn lookalike_families_keep_distinct_fused_values_and_a_fused_fmr_that_follows_the_count() {
    use pacha_datasets::generate::Preset;
    use pacha_engine::engine::{count_pool_tail_pairs, tail_pool};
    use pacha_engine::fusion::LLR_CAP;
    let dir = tempfile::tempdir().unwrap();
    let cfg = pacha_datasets::generate::PopulationConfig {
        preset: Preset::LookalikeFamilies,
        ..config(30_000, 42)
    };
    let pop = load(dir.path(), &cfg, None);
    let e = &pop.engine;
    e.calibrate(&CalibrateOptions {
        genuine: Some(&pop.truth),
        ..CalibrateOptions::default()
    })
    .unwrap();
    let snap = e.snapshot();
    let cal = e.calibration();
    let face = cal.model(Modality::Face).unwrap();
    let tail = face.impostor_tail.expect("a counted face tail");
    assert!(
        tail.xi > 0.5,
        "the families make the face tail heavy: {tail:?}"
    );
    let truth = truth_rows(&snap, &pop.truth);
    // Every impostor pair of the whole store that can reach score 30 (pigeonhole candidates, as
    // `fused_count` finds them).
    let pool = tail_pool(&snap, 0xf05e, snap.rows(), false);
    assert_eq!(pool.len(), snap.rows());
    let mut candidates: HashSet<(usize, usize)> = HashSet::new();
    for ((m, _), c) in cal.models.iter().zip(cal.candidate_cosines(30.0)) {
        if let Some(c) = c {
            let pairs = count_pool_tail_pairs(&snap, *m, &pool, f64::from(c)).unwrap();
            candidates.extend(pairs.unwrap());
        }
    }
    candidates.retain(|p| !truth.contains(p));
    let comparisons: Vec<_> = candidates
        .iter()
        .map(|&(a, b)| pacha_engine::matcher::compare_rows(&snap, &cal, a, b))
        .collect();
    // The face pairs the old evidence put at the cap, and what the new evidence makes of them.
    let face_cos: Vec<f64> = comparisons
        .iter()
        .flat_map(|c| &c.modalities)
        .filter(|s| s.modality == Modality::Face)
        .map(|s| f64::from(s.cosine))
        .collect();
    // The face evidence of the family pairs: below the cap wherever the counted survival is ≥ 1e-20, and
    // distinct (cosines that differ get different evidence).
    let high: Vec<f64> = face_cos.iter().copied().filter(|&s| s >= 0.5).collect();
    let capped = face_cos
        .iter()
        .filter(|&&s| face.impostor_sf(s) >= 1e-20 && face.llr(s) >= LLR_CAP)
        .count();
    let distinct_cos: HashSet<u64> = high.iter().map(|s| s.to_bits()).collect();
    let distinct_llr: HashSet<u64> = high.iter().map(|&s| face.llr(s).to_bits()).collect();
    eprintln!(
        "face pairs >= 0.5: {} ({} distinct cosines, {} distinct evidence values), capped: {capped}",
        high.len(),
        distinct_cos.len(),
        distinct_llr.len()
    );
    // Fused: no score holds a large share of the pairs at or above 30 (scores are read off a 0.02-nat grid,
    // so pairs within one grid step share a score).
    let mut values: HashMap<u64, usize> = HashMap::new();
    for c in comparisons.iter().filter(|c| c.fused.score >= 30.0) {
        *values.entry(c.fused.score.to_bits()).or_default() += 1;
    }
    let events: usize = values.values().sum();
    let largest = values.values().copied().max().unwrap_or(0);
    eprintln!(
        "pairs >= 30: {events}, distinct fused scores: {}, largest tie: {largest}",
        values.len()
    );
    // The fused FMR predicted at each score against the count on every pair of the store.
    let mut notes = Vec::new();
    let f = fused_count(&snap, &cal, &truth, snap.rows(), &mut notes)
        .unwrap()
        .expect("a count");
    let mut ratios = Vec::new();
    for p in &f.points {
        let q = p.measured_fmr.map(|m| m / p.predicted_fmr);
        eprintln!(
            "score {}: {} events, measured / predicted {q:?}",
            p.threshold, p.false_matches
        );
        if p.false_matches >= 50 {
            ratios.push((p.threshold, q.unwrap()));
        }
    }
    assert!(high.len() >= 1_000, "{}", high.len());
    assert_eq!(capped, 0);
    assert!(distinct_llr.len() * 10 >= distinct_cos.len() * 9);
    assert!(events >= 100, "{events}");
    assert!(
        largest * 50 < events,
        "one score holds {largest} of {events}"
    );
    assert!(ratios.len() >= 2, "{:?}", f.points);
    for (t, q) in ratios {
        assert!(
            (1.0 / FUSED_FACTOR..FUSED_FACTOR).contains(&q),
            "score {t}: {q}"
        );
    }
}

#[test]
fn dependence_check_sees_modalities_that_move_together_and_not_independent_ones() {
    // Coupled: each finger-2 template leans on its own record's face (its first 256 components), so the
    // same impostor pair scores high in both; the generator draws the two independently.
    let couple = |b: &mut pacha_datasets::RecordBatch| {
        let face = b
            .blocks
            .iter()
            .position(|k| k.modality == Modality::Face)
            .unwrap();
        let finger = b
            .blocks
            .iter()
            .position(|k| k.modality == Modality::Finger(2))
            .unwrap();
        let dim = b.blocks[finger].dim;
        for i in 0..b.len() {
            if !(b.blocks[face].present[i] && b.blocks[finger].present[i]) {
                continue;
            }
            let f: Vec<f32> = b.blocks[face].row(i)[..dim].to_vec();
            let fn_ = f.iter().map(|x| x * x).sum::<f32>().sqrt();
            let row = &mut b.blocks[finger].data[i * dim..(i + 1) * dim];
            for (x, y) in row.iter_mut().zip(&f) {
                *x = 0.4 * *x + 0.6 * y / fn_;
            }
            let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x /= n);
        }
    };
    for coupled in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let pop = if coupled {
            load_edited(dir.path(), &config(6_000, 21), None, &couple)
        } else {
            load(dir.path(), &config(6_000, 21), None)
        };
        let e = &pop.engine;
        e.calibrate(&CalibrateOptions {
            genuine: Some(&pop.truth),
            tail_rows: 3_000,
            ..CalibrateOptions::default()
        })
        .unwrap();
        let snap = e.snapshot();
        let cal = e.calibration();
        let truth = truth_rows(&snap, &pop.truth);
        let d = modality_dependence(&snap, &cal, &truth, snap.rows()).unwrap();
        // Pairs of the three modalities and all three, at two levels.
        assert_eq!(d.len(), 2 * 4, "{d:?}");
        let pair = d
            .iter()
            .find(|c| c.level == 1e-2 && c.modalities == ["face", "finger2"])
            .expect("face + finger2 at 1e-2");
        // The marginals are the counted pairs at the model's cosines: near the level.
        for &m in &pair.marginal {
            let share = m as f64 / pair.pairs as f64;
            assert!((0.3e-2..3e-2).contains(&share), "{share}");
        }
        let ratio = pair.ratio.expect("events expected");
        let (lo, hi) = pair.ratio_ci.unwrap();
        eprintln!(
            "coupled {coupled}: {} together vs {:.0} expected, ratio {ratio:.2} [{lo:.2}, {hi:.2}]",
            pair.joint, pair.expected
        );
        assert!(pair.expected > 500.0, "{}", pair.expected);
        if coupled {
            assert!(lo > 3.0, "coupled modalities: {ratio} [{lo}, {hi}]");
        } else {
            assert!(
                (0.8..1.25).contains(&ratio),
                "independent modalities: {ratio}"
            );
            let fingers = d
                .iter()
                .find(|c| c.level == 1e-2 && c.modalities == ["finger2", "finger7"])
                .unwrap();
            assert!((0.8..1.25).contains(&fingers.ratio.unwrap()), "{fingers:?}");
        }
    }
}

/// The factor within which the look-alike store's measured fused FMR must follow the prediction (where at
/// least 50 false matches were counted): the 1.5×. Measured 1.02, 1.01, 0.99, 1.00 at scores 30–60
/// (81 115 … 447 events) once the face tail reads the count itself down to 1 000 pairs (`tail::TopPiece`).
/// With a single GPD over the family bump (ξ ≈ 1.6) the face model was 0.09× the count at 1e-5 in sample,
/// and the fused ratios read 1.53 and 1.64 at 30 and 40 (0.18 at 30 before the prediction took the floor
/// atom's jump into account, `Calibration::attainable_fmr`).
const FUSED_FACTOR: f64 = 1.5;

/// The truth pairs as store row pairs `(smaller, larger)`.
fn truth_rows(
    snap: &pacha_engine::store::Snapshot,
    truth: &[(String, String)],
) -> HashSet<(usize, usize)> {
    truth
        .iter()
        .map(|(a, b)| {
            let (x, y) = (snap.row_of(a).unwrap(), snap.row_of(b).unwrap());
            (x.min(y), x.max(y))
        })
        .collect()
}
