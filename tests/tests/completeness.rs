//! The completeness contract, end to end: on populations the candidate path was not tuned on, an index-mode
//! dedup (whole store and a daily batch) and an indexed identify report what an exact search reports, and
//! every index-mode run carries an audit that agrees with the truth. A checkpoint never serves another
//! store's or another calibration's tiles.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pacha_datasets::generate::{PopulationConfig, Preset};
use pacha_engine::Modality;
use pacha_engine::candidates::CandidateMode;
use pacha_engine::dedup::{DedupOptions, DedupResult, DedupScope};
use pacha_engine::engine::{CalibrateOptions, IdentifyOptions};
use pacha_engine::identify::BatchScan;
use pacha_engine::store::Template;
use pacha_tests::{load, load_first, ordered};
use std::collections::HashSet;

fn hits(r: &DedupResult) -> HashSet<(String, String)> {
    r.hits().map(|p| ordered(&p.a, &p.b)).collect()
}

/// The subject IDs an identify answered, best first.
fn ids(r: &pacha_engine::engine::IdentifyResult) -> Vec<String> {
    r.candidates.iter().map(|c| c.subject_id.clone()).collect()
}

fn reported(r: &DedupResult) -> HashSet<(String, String)> {
    r.pairs.iter().map(|p| ordered(&p.a, &p.b)).collect()
}

/// Report floor of the population tests: FMR 1e-5, well below the threshold (≈ 73 at 20 k rows), so that
/// populations whose duplicates score under the threshold on one modality still give many pairs (the
/// power-law population, whose impostor cosines spread widest, uses 40).
const FLOOR: f64 = 50.0;

fn cfg(preset: Preset, records: u64) -> PopulationConfig {
    PopulationConfig {
        records,
        seed: 7,
        preset,
        face_dim: if preset.has_face() { 512 } else { 0 },
        fingers: if preset == Preset::FingersOnly {
            vec![(2, 256), (7, 256)]
        } else {
            PopulationConfig::default().fingers
        },
        ..PopulationConfig::default()
    }
}

/// Candidate rows of `probe` per modality by the identify path in force, against an exact scan of every
/// indexed row at the probe's candidate cosine of the default threshold (the budgets over the modalities the
/// probe has).
fn candidates_vs_exact(e: &pacha_engine::Engine, probe: &[Template]) -> Vec<(Vec<u32>, Vec<u32>)> {
    let snap = e.snapshot();
    let ann = e.index().expect("an index");
    let cal = e.calibration();
    let threshold = pacha_engine::fusion::threshold_for_fpir(1e-3, snap.live()).unwrap();
    let p = pacha_engine::matcher::Probe::new("probe", probe, snap.schema()).unwrap();
    let cosines = pacha_engine::engine::probe_candidate_cosines(&snap, &cal, &p, threshold);
    let mut out = Vec::new();
    for (mi, spec) in snap.schema().modalities.iter().enumerate() {
        let (Some(q), Some(c), Some(view)) = (
            p.templates[mi].as_ref(),
            cosines[mi],
            snap.f32_rows(spec.modality),
        ) else {
            continue;
        };
        let impostor = cal
            .model(spec.modality)
            .map(|m| (m.impostor.mean, m.impostor.sd));
        let mut got: Vec<u32> = ann
            .search(&snap, mi, q, c, impostor)
            .unwrap()
            .into_iter()
            .map(|x| x.0)
            .collect();
        got.sort_unstable();
        let want: Vec<u32> = (0..ann.rows())
            .filter(|&r| {
                snap.is_present(spec.modality, r) && pacha_index::dot_f32(q, view.row(r)) >= c
            })
            .map(|r| r as u32)
            .collect();
        out.push((got, want));
    }
    out
}

/// Every identify path on the same probes: the sketch and exact paths return, per modality, exactly the
/// indexed rows an exact scan finds at the candidate cosine, and every path (the IVF rule, whose reach is
/// empirical, included) gives the gallery scan's answers. Returns the boundary rows compared.
fn identify_paths_match_exact(
    e: &pacha_engine::Engine,
    probes: &[Vec<Template>],
    want: &[Vec<String>],
    expect_sketch: bool,
) -> usize {
    use pacha_engine::idpath::ForcedPath;
    let ann = e.index().expect("an index");
    let mut boundary = 0;
    for path in [
        Some(ForcedPath::Sketch),
        Some(ForcedPath::Exact),
        Some(ForcedPath::Ivf),
        None,
    ] {
        ann.force_identify_path(path);
        for (probe, want) in probes.iter().zip(want) {
            let got = e.identify(probe, &IdentifyOptions::default()).unwrap();
            let ids: Vec<String> = got
                .candidates
                .iter()
                .map(|c| c.subject_id.clone())
                .collect();
            assert_eq!(&ids, want, "identify by {path:?}");
            if matches!(path, Some(ForcedPath::Sketch | ForcedPath::Exact)) {
                for (got, exact) in candidates_vs_exact(e, probe) {
                    assert_eq!(got, exact, "candidates by {path:?}");
                    boundary += exact.len();
                }
            }
        }
        let plans = ann.identify_plans();
        assert!(!plans.is_empty());
        for plan in &plans {
            let name = plan.path.name();
            match path {
                Some(ForcedPath::Sketch) if expect_sketch => {
                    assert_eq!(name, "sketch", "{plan:?}");
                    let drop = plan.drop_bound.unwrap();
                    assert!(drop > 0.0 && drop <= 2e-6, "{plan:?}");
                }
                Some(ForcedPath::Sketch) => {
                    assert!(!plan.sketches && name != "sketch", "{plan:?}");
                }
                Some(ForcedPath::Exact) => assert_eq!(name, "exact", "{plan:?}"),
                Some(ForcedPath::Ivf) => assert_eq!(name, "ivf", "{plan:?}"),
                None => {
                    assert_eq!(plan.sketches, expect_sketch, "{plan:?}");
                    // The cheapest prediction was chosen.
                    let best = plan
                        .predicted_ms
                        .iter()
                        .min_by(|a, b| a.1.total_cmp(&b.1))
                        .unwrap();
                    assert_eq!(best.0, name, "{plan:?}");
                }
            }
        }
    }
    ann.force_identify_path(None);
    boundary
}

/// Index-mode dedup vs exact dedup on one population, both reporting down to [`FLOOR`]: recall vs exact
/// ≥ 0.999 of all pairs at or above the floor (planted or not), every hit at the threshold found, and the
/// audit's sample agrees.
fn index_matches_exact(preset: Preset, records: u64, floor: f64) {
    let dir = tempfile::tempdir().unwrap();
    let keep: &[Modality] = if preset.has_face() {
        &[Modality::Face]
    } else {
        &[Modality::Finger(2), Modality::Finger(7)]
    };
    let pop = load(dir.path(), &cfg(preset, records), Some(keep));
    let e = &pop.engine;
    e.calibrate(&CalibrateOptions::default()).unwrap();
    e.build_index(&Default::default(), None).unwrap();
    let run = |mode| {
        e.dedup(
            &DedupOptions {
                mode,
                report_floor: Some(floor),
                ..DedupOptions::default()
            },
            None,
            None,
        )
        .unwrap()
    };
    let (exact, index) = (run(CandidateMode::Exact), run(CandidateMode::Index));
    assert!(
        hits(&exact).is_subset(&hits(&index)),
        "{preset:?}: a hit was missed"
    );
    let (he, hi) = (reported(&exact), reported(&index));
    assert!(
        he.len() >= 20,
        "{preset:?}: only {} pairs reach the floor",
        he.len()
    );
    let found = he.intersection(&hi).count();
    let recall = found as f64 / he.len().max(1) as f64;
    assert!(
        recall >= 0.999,
        "{preset:?}: index run found {found} of the {} pairs exact search reports ({recall:.5}); plans {:?}",
        he.len(),
        index.summary.plans
    );
    // Every index hit is a true hit (exact scores: the index path only decides what is compared).
    assert!(
        hi.is_subset(&he),
        "{preset:?}: index reported a pair exact search does not"
    );
    let audit = index
        .summary
        .audit
        .as_ref()
        .expect("index runs carry an audit");
    assert_eq!(
        audit.contract.found, audit.contract.pairs,
        "{preset:?}: audit saw misses though exact search found none: {audit:?}"
    );
    let below = audit
        .below_threshold
        .expect("the floor is below the threshold");
    assert_eq!(below.found, below.pairs, "{preset:?}: {audit:?}");
    assert_eq!(
        audit.boundary_pooled.found, audit.boundary_pooled.pairs,
        "{preset:?}: {audit:?}"
    );
    assert!(audit.sampled_probes > 0 && !index.summary.plans.is_empty());
    assert!(
        exact.summary.audit.is_none(),
        "exact runs are complete by construction"
    );
}

#[test]
fn isotropic_mates_index_matches_exact() {
    index_matches_exact(Preset::IsotropicMates, 20_000, FLOOR);
}

#[test]
fn lookalike_families_index_matches_exact() {
    index_matches_exact(Preset::LookalikeFamilies, 20_000, FLOOR);
}

#[test]
fn heavy_tail_index_matches_exact() {
    index_matches_exact(Preset::HeavyTail, 20_000, FLOOR);
}

#[test]
fn power_law_index_matches_exact() {
    index_matches_exact(Preset::PowerLaw, 20_000, 40.0);
}

#[test]
fn skewed_clusters_index_matches_exact() {
    index_matches_exact(Preset::SkewedClusters, 20_000, FLOOR);
}

#[test]
fn fingers_only_index_matches_exact() {
    index_matches_exact(Preset::FingersOnly, 20_000, FLOOR);
}

#[test]
fn structured_face_index_matches_exact() {
    index_matches_exact(Preset::Structured, 30_000, FLOOR);
}

/// A face-only population of `preset` loaded into `dir`, calibrated from the store and indexed.
fn indexed_face(dir: &std::path::Path, preset: Preset, records: u64) -> pacha_tests::Loaded {
    let pop = load(dir, &cfg(preset, records), Some(&[Modality::Face]));
    pop.engine.calibrate(&CalibrateOptions::default()).unwrap();
    pop.engine.build_index(&Default::default(), None).unwrap();
    pop
}

/// One face modality with quality bands: the sketched joins (brute-force and partition, forced) cut and rescore
/// each pair at its own band's cosine, name those cosines in the summary (the run's candidate cosine is at most
/// the lowest of them), and report exactly the pairs an exact run reports.
#[test]
fn a_banded_face_is_joined_at_each_pairs_band_cosine() {
    let dir = tempfile::tempdir().unwrap();
    let pop = indexed_face(dir.path(), Preset::Structured, 30_000);
    let e = &pop.engine;
    let run = |mode, force_path: Option<&str>| {
        e.dedup(
            &DedupOptions {
                mode,
                report_floor: Some(FLOOR),
                force_path: force_path.map(str::to_string),
                ..DedupOptions::default()
            },
            None,
            None,
        )
        .unwrap()
    };
    let exact = run(CandidateMode::Exact, None);
    assert!(exact.summary.band_cosines.is_empty());
    assert!(reported(&exact).len() >= 20);
    for path in ["brute", "ivf"] {
        let r = run(CandidateMode::Index, Some(path));
        let s = &r.summary;
        assert_eq!(s.band_cosines.len(), 1, "{path}: {:?}", s.band_cosines);
        let (m, bands) = &s.band_cosines[0];
        assert_eq!(m, "face");
        let lowest = bands.iter().copied().fold(f32::INFINITY, f32::min);
        let highest = bands.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert!(
            bands.len() >= 2 && highest > lowest + 0.01,
            "{path}: {bands:?}"
        );
        let run_cos = s.candidate_cosines[0].1.unwrap();
        assert!(run_cos <= lowest + 1e-6, "{path}: {run_cos} vs {bands:?}");
        assert_eq!(reported(&r), reported(&exact), "{path}");
        let audit = s.audit.as_ref().unwrap();
        assert!(audit.passed, "{path}: {audit:?}");
        assert_eq!(audit.boundary_pooled.found, audit.boundary_pooled.pairs);
    }
}

/// Low candidate cosines (isotropic embeddings, mates at ≈ 0.7, threshold cosine ≈ 0.25): neither sketches
/// nor a partition separate the pairs, and the planner picks the exact i8 join (i8 scan, error-bound filter,
/// f32 rescoring) wherever a SIMD kernel runs; with the portable kernel (`PACHA_SIMD=scalar`) it is forced.
/// Either way the run reports exactly the pairs, and so the hits, of an exact f32 GEMM run.
#[test]
fn exact_i8_join_reports_what_exact_search_reports() {
    let dir = tempfile::tempdir().unwrap();
    let pop = load(
        dir.path(),
        &cfg(Preset::IsotropicMates, 12_000),
        Some(&[Modality::Face]),
    );
    let e = &pop.engine;
    e.calibrate(&CalibrateOptions::default()).unwrap();
    e.build_index(&Default::default(), None).unwrap();
    let simd = pacha_index::exact_i8::I8Kernel::detect() != pacha_index::exact_i8::I8Kernel::Scalar;
    let run = |mode, force: Option<&str>| {
        e.dedup(
            &DedupOptions {
                mode,
                report_floor: Some(FLOOR),
                force_path: force.map(str::to_string),
                ..DedupOptions::default()
            },
            None,
            None,
        )
        .unwrap()
    };
    let exact = run(CandidateMode::Exact, None);
    let index = run(
        CandidateMode::Index,
        if simd { None } else { Some("exact-i8") },
    );
    let plans = &index.summary.plans;
    assert!(
        !plans.is_empty() && plans.iter().all(|p| p.path == "exact-i8"),
        "planned {plans:?}"
    );
    assert!(
        plans[0]
            .predicted_seconds
            .iter()
            .any(|(p, s)| p == "exact-i8" && *s > 0.0)
    );
    assert!(hits(&exact).len() >= 20, "{} hits", hits(&exact).len());
    assert_eq!(hits(&index), hits(&exact), "hits: i8 join vs exact");
    assert_eq!(reported(&index), reported(&exact), "pairs to the floor");
    let (_, st) = &index.summary.join_stats[0];
    // Every pair (earlier row, live probe row) scanned once: a probe row p meets rows 0..p.
    let snap = e.snapshot();
    let want: u64 = (0..snap.rows())
        .filter(|&r| snap.is_present(Modality::Face, r) && !snap.is_deleted(r))
        .map(|r| r as u64)
        .sum();
    assert_eq!(st.products, want, "every pair scanned once");
    assert!(
        st.exact_reads < st.products / 1000 && st.exact_reads >= st.above,
        "the filter rejects nearly every product: {st:?}"
    );
    let audit = index
        .summary
        .audit
        .as_ref()
        .expect("index runs are audited");
    assert!(audit.passed, "{audit:?}");
    assert!(
        audit.evidence.contains("by construction"),
        "{}",
        audit.evidence
    );
    // The CLI's path names: an unknown one is refused, and "exact" stays the f32 GEMM join.
    let bad = e.dedup(
        &DedupOptions {
            mode: CandidateMode::Index,
            force_path: Some("exact-f16".into()),
            ..DedupOptions::default()
        },
        None,
        None,
    );
    assert!(bad.is_err());
    let gemm = run(CandidateMode::Index, Some("exact"));
    assert!(gemm.summary.plans.iter().all(|p| p.path == "exact"));
    assert_eq!(gemm.summary.join_stats[0].1.products, 0);
    assert_eq!(reported(&gemm), reported(&exact));
}

/// The registry's daily batch: rows newer than the index, deduplicated against the indexed store and each
/// other, find what exact search finds; and an indexed identify returns what an exact scan returns.
#[test]
fn daily_batch_and_identify_with_an_index_match_exact() {
    let dir = tempfile::tempdir().unwrap();
    let c = PopulationConfig {
        duplicate_rate: 0.03,
        ..cfg(Preset::Structured, 24_000)
    };
    let (pop, g) = load_first(dir.path(), &c, 20_000);
    let e = &pop.engine;
    e.calibrate(&CalibrateOptions::default()).unwrap();
    e.build_index(&Default::default(), None).unwrap();
    e.insert_records(&g.generate(20_000, 4_000).records)
        .unwrap();
    let run = |mode| {
        e.dedup(
            &DedupOptions {
                mode,
                scope: DedupScope::RowsFrom(20_000),
                ..DedupOptions::default()
            },
            None,
            None,
        )
        .unwrap()
    };
    let (exact, index) = (run(CandidateMode::Exact), run(CandidateMode::Index));
    let (he, hi) = (hits(&exact), hits(&index));
    assert!(
        he.len() > 50,
        "the batch should hold duplicates: {}",
        he.len()
    );
    assert_eq!(hi, he, "daily batch: index vs exact");
    assert!(
        index
            .summary
            .audit
            .as_ref()
            .is_some_and(|a| a.contract.found == a.contract.pairs)
    );

    // Identify: probes are the batch's own templates; the indexed search vs an exact scan of every subject.
    let snap = e.snapshot();
    let all: Vec<String> = (0..snap.rows())
        .map(|r| snap.subject_id(r).to_string())
        .collect();
    let mut compared = 0;
    let mut probes = Vec::new();
    let mut exact_hits = 0u64;
    let mut indexed_answers = Vec::new();
    let mut exact_ids = Vec::new();
    for r in (20_000..24_000).step_by(40) {
        let probe: Vec<Template> = snap
            .schema()
            .modalities
            .iter()
            .filter_map(|s| {
                snap.template(s.modality, r).map(|v| Template {
                    modality: s.modality,
                    vector: v.to_vec(),
                    quality: 0.9,
                })
            })
            .collect();
        let indexed = e.identify(&probe, &IdentifyOptions::default()).unwrap();
        let exact = e
            .identify(
                &probe,
                &IdentifyOptions {
                    gallery: Some(&all),
                    ..IdentifyOptions::default()
                },
            )
            .unwrap();
        assert_eq!(ids(&indexed), ids(&exact), "identify of row {r}");
        exact_ids.push(ids(&exact));
        exact_hits += exact
            .candidates
            .iter()
            .filter(|c| c.comparison.fused.score >= exact.threshold)
            .count() as u64;
        indexed_answers.push(indexed);
        probes.push(probe);
        compared += 1;
    }
    assert_eq!(compared, 100);

    // Probes with the face only: their pairs share the face alone, so they are searched at the cosine where
    // the face alone reaches the threshold (far above the share the three-modality split leaves it), and
    // answered as the gallery scan answers; their audited batch proves it against exact search.
    let cal = e.calibration();
    let threshold = pacha_engine::fusion::threshold_for_fpir(1e-3, snap.live()).unwrap();
    let split = cal.candidate_cosines(threshold);
    let face_mi = snap
        .schema()
        .modalities
        .iter()
        .position(|s| s.modality == Modality::Face)
        .unwrap();
    let mut face_probes = Vec::new();
    let mut face_ids = Vec::new();
    for probe in &probes {
        let fp: Vec<Template> = probe
            .iter()
            .filter(|t| t.modality == Modality::Face)
            .cloned()
            .collect();
        if fp.is_empty() {
            continue;
        }
        let p = pacha_engine::matcher::Probe::new("face probe", &fp, snap.schema()).unwrap();
        let cos = pacha_engine::engine::probe_candidate_cosines(&snap, &cal, &p, threshold);
        let (own, shared) = (cos[face_mi].unwrap(), split[face_mi].unwrap());
        assert!(
            own > shared + 0.05,
            "face-only cosine {own} vs split {shared}"
        );
        assert!(
            cos.iter()
                .enumerate()
                .all(|(mi, c)| mi == face_mi || c.is_none())
        );
        let indexed = e.identify(&fp, &IdentifyOptions::default()).unwrap();
        let exact = e
            .identify(
                &fp,
                &IdentifyOptions {
                    gallery: Some(&all),
                    ..IdentifyOptions::default()
                },
            )
            .unwrap();
        assert_eq!(ids(&indexed), ids(&exact), "face-only identify");
        face_ids.push(ids(&exact));
        face_probes.push(fp);
    }
    assert!(face_probes.len() >= 90, "{} face probes", face_probes.len());
    let per_probe = IdentifyOptions {
        batch_scan: BatchScan::PerProbe,
        ..IdentifyOptions::default()
    };
    let fb = e
        .identify_batch(
            &face_probes,
            &per_probe,
            &pacha_engine::audit::AuditOptions {
                probes: face_probes.len(),
                ..Default::default()
            },
        )
        .unwrap();
    let fa = fb.audit.expect("an indexed batch is audited");
    assert!(fa.passed, "{fa:?}");
    assert_eq!(fa.contract.found, fa.contract.pairs, "{fa:?}");
    assert_eq!(fa.boundary_pooled.found, fa.boundary_pooled.pairs, "{fa:?}");
    assert!(fa.contract.pairs > 0, "{fa:?}");
    // Indexed rows at a face-only probe's cosine are the batch's duplicates in the indexed rows: few, but
    // each compared by two paths.
    let face_boundary = identify_paths_match_exact(e, &face_probes, &face_ids, true);
    assert!(face_boundary > 0, "{face_boundary} face boundary rows");

    // The same probes as one audited batch (every probe audited): the same answers, and an audit whose
    // exact oracle counts what the gallery scans above found.
    let audited_batch = || {
        e.identify_batch(
            &probes,
            &per_probe,
            &pacha_engine::audit::AuditOptions {
                probes: 100,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let batch = audited_batch();
    assert_eq!(batch.results, indexed_answers);
    let audit = batch.audit.expect("an indexed batch is audited");
    assert_eq!(audit.sampled_probes, 100);
    assert_eq!(audit.contract.pairs, exact_hits, "{audit:?}");
    assert_eq!(audit.contract.found, audit.contract.pairs, "{audit:?}");
    assert!(audit.boundary_pooled.pairs >= audit.contract.pairs);
    assert_eq!(audit.boundary_pooled.found, audit.boundary_pooled.pairs);

    // The same probes, and the face-only ones, in one batch answered by joint scans (one per group of
    // probes holding the same modalities, every enrolment through their i8 codes): the gallery scan's
    // answers, and an audit that checks each sampled probe's joint boundary against exact search.
    let mixed: Vec<Vec<Template>> = probes.iter().chain(&face_probes).cloned().collect();
    let want: Vec<Vec<String>> = exact_ids.iter().chain(&face_ids).cloned().collect();
    let jb = e
        .identify_batch(
            &mixed,
            &IdentifyOptions {
                batch_scan: BatchScan::Joint,
                ..IdentifyOptions::default()
            },
            &pacha_engine::audit::AuditOptions {
                probes: mixed.len(),
                ..Default::default()
            },
        )
        .unwrap();
    for (i, (r, w)) in jb.results.iter().zip(&want).enumerate() {
        assert_eq!(&ids(r), w, "joint-scanned probe {i}");
    }
    let scans = &jb.latency.joint_scans;
    assert!(
        scans
            .iter()
            .any(|j| j.key == "joint(face)" && j.probes == face_probes.len()),
        "{scans:?}"
    );
    assert_eq!(
        scans.iter().map(|j| j.probes).sum::<usize>(),
        mixed.len(),
        "{scans:?}"
    );
    // The scan keeps a small share of the pairs (the rest never reach the exact comparison).
    for j in scans {
        assert!(j.kept > 0 && j.kept * 50 < j.pairs, "{j:?}");
    }
    let ja = jb.audit.expect("a joint batch is audited");
    assert!(
        ja.passed && ja.evidence.starts_with("complete by construction"),
        "{ja:?}"
    );
    assert_eq!(ja.contract.found, ja.contract.pairs, "{ja:?}");
    assert!(ja.contract.pairs >= exact_hits, "{ja:?}");
    let joint_boundary: u64 = ja
        .boundary
        .iter()
        .filter(|(k, _)| k.starts_with("joint("))
        .filter_map(|(_, f)| f.as_ref())
        .map(|f| {
            assert_eq!(f.found, f.pairs, "{ja:?}");
            f.pairs
        })
        .sum();
    assert!(joint_boundary >= ja.contract.pairs, "{ja:?}");
    assert!(ja.paths.iter().all(|p| p.1 == "joint"), "{ja:?}");
    // Auto takes the joint scan only where it predicts it cheaper, and answers the same either way.
    let auto = e
        .identify_batch(&mixed, &IdentifyOptions::default(), &Default::default())
        .unwrap();
    for (i, (r, w)) in auto.results.iter().zip(&want).enumerate() {
        assert_eq!(&ids(r), w, "auto batch, probe {i}");
    }
    for j in &auto.latency.joint_scans {
        assert!(
            j.predicted_ms_one_by_one
                .is_some_and(|one| j.predicted_ms_per_probe < one),
            "{j:?}"
        );
    }
    // A named gallery is compared exhaustively: complete by construction, no sample needed.
    let gallery = e
        .identify_batch(
            &probes[..3],
            &IdentifyOptions {
                gallery: Some(&all),
                ..IdentifyOptions::default()
            },
            &pacha_engine::audit::AuditOptions::default(),
        )
        .unwrap();
    let ga = gallery.audit.unwrap();
    assert!(ga.passed && ga.evidence.starts_with("complete by construction"));

    // Each identify path against the exact scan, on the same probes.
    let boundary = identify_paths_match_exact(e, &probes, &exact_ids, true);
    // Indexed rows at the candidate cosine of the batch's probes (duplicates, look-alikes), by two paths.
    assert!(boundary >= 20, "{boundary} boundary rows compared");
    // A forced sketch path is audited as such: complete up to the binomial drop bound, not by construction.
    e.index()
        .unwrap()
        .force_identify_path(Some(pacha_engine::idpath::ForcedPath::Sketch));
    let sk = audited_batch();
    e.index().unwrap().force_identify_path(None);
    let sa = sk.audit.unwrap();
    assert!(
        sa.paths.iter().all(|p| p.1 == "sketch") && !sa.paths.is_empty(),
        "{sa:?}"
    );
    assert!(
        sa.evidence.starts_with("complete up to the sketch filter") && sa.passed,
        "{sa:?}"
    );
    // At most 1e-6 per stage and modality.
    assert!(
        sa.lower_bound < 1.0 && sa.lower_bound >= 1.0 - 2e-6 * sa.paths.len() as f64,
        "{sa:?}"
    );

    {
        // An index without saved sketches (as saved before sketch files existed): a reader of it has no
        // sketches, so the sketch path is not offered, and identify still answers as the exact scan does.
        let idx = dir.path().join("engine").join("index");
        let meta = idx.join("index.json");
        let bytes = std::fs::read(&meta).unwrap();
        let body = pacha_engine::derived::unseal("index", &bytes).unwrap();
        let mut json: serde_json::Value = serde_json::from_slice(body).unwrap();
        json["sketches"] = serde_json::json!([]);
        let body = serde_json::to_vec_pretty(&json).unwrap();
        std::fs::write(&meta, pacha_engine::derived::seal("index", &body)).unwrap();
        for f in std::fs::read_dir(&idx).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|x| x == "sketch") {
                std::fs::remove_file(f).unwrap();
            }
        }
        let reader = pacha_engine::Engine::open_read_only(dir.path()).unwrap();
        assert!(reader.index().is_some_and(|a| !a.has_saved_sketches(0)));
        identify_paths_match_exact(&reader, &probes, &exact_ids, false);
    }
}

/// A checkpoint made on one store, or under another calibration, is never reused.
#[test]
fn checkpoints_are_keyed_by_store_and_calibration_identity() {
    let (da, db, ck) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let a = load(da.path(), &cfg(Preset::Structured, 8_000), None);
    let b = load(
        db.path(),
        &PopulationConfig {
            seed: 99,
            ..cfg(Preset::Structured, 8_000)
        },
        None,
    );
    let opts = DedupOptions {
        mode: CandidateMode::Exact,
        block_rows: 2_000,
        checkpoint_dir: Some(ck.path().to_path_buf()),
        ..DedupOptions::default()
    };
    let ra = a.engine.dedup(&opts, None, None).unwrap();
    assert_eq!(ra.summary.tiles_resumed, 0);
    // The same store resumes every tile.
    let again = a.engine.dedup(&opts, None, None).unwrap();
    assert_eq!(again.summary.tiles_resumed, 4);
    assert_eq!(again.pairs, ra.pairs);
    // Another store with the same shape (same generation, commit count and rows): nothing is reused.
    let rb = b.engine.dedup(&opts, None, None).unwrap();
    assert_eq!(rb.summary.tiles_resumed, 0);
    let fresh_b = b
        .engine
        .dedup(
            &DedupOptions {
                checkpoint_dir: None,
                ..opts.clone()
            },
            None,
            None,
        )
        .unwrap();
    assert_eq!(rb.pairs, fresh_b.pairs);
    // A new calibration of store A: nothing is reused either.
    a.engine
        .calibrate(&CalibrateOptions {
            seed: 4242,
            impostor_pairs: 200_000,
            ..CalibrateOptions::default()
        })
        .unwrap();
    let recal = a.engine.dedup(&opts, None, None).unwrap();
    assert_eq!(recal.summary.tiles_resumed, 0);
}

/// The fused-score bound the joins drop pairs with keeps every pair whose exact fused score reaches the
/// floor (with the joined modality's cosine known and without), and rejects most pairs that do not: on a
/// face + two fingers store with some fingers missing, at three floors.
#[test]
fn the_fused_bound_keeps_every_pair_that_reaches_the_floor() {
    use pacha_engine::fusedbound::FusedBound;
    use pacha_engine::matcher::fused_rows;
    use pacha_index::kernels::dot_f32;
    let dir = tempfile::tempdir().unwrap();
    let l = face_and_two_fingers(dir.path(), 1200);
    let e = &l.engine;
    e.calibrate(&CalibrateOptions::default()).unwrap();
    let snap = e.snapshot();
    let cal = e.calibration();
    for floor in [20.0, 40.0, 60.0] {
        let bound = FusedBound::new(&snap, &cal, floor, &|_| None).expect("few fused keys");
        let (mut reach, mut kept, mut rejected) = (0, 0, 0);
        for b in 0..snap.rows() {
            for a in 0..b {
                let face = snap
                    .template(Modality::Face, a)
                    .zip(snap.template(Modality::Face, b))
                    .map(|(x, y)| (0, dot_f32(x, y)));
                let may = bound.may_reach(a, b, face);
                if fused_rows(&snap, &cal, a, b).score >= floor {
                    reach += 1;
                    assert!(may, "pair ({a}, {b}) reaches {floor} but was rejected");
                    assert!(
                        bound.may_reach(a, b, None),
                        "pair ({a}, {b}), no known cosine"
                    );
                }
                if may {
                    kept += 1;
                } else {
                    rejected += 1;
                }
            }
        }
        assert!(
            reach > 0,
            "floor {floor}: no pair reaches it; the test shows nothing"
        );
        assert!(
            rejected > 50 * kept,
            "floor {floor}: kept {kept}, rejected {rejected} ({reach} reach it)"
        );
    }
}

/// Where the pilot's screen (its first rows, a sample of their pairs) already shows the partition losing by
/// a wide margin (isotropic mates: an exact join wins by far), the pilot stops there: the plan names the
/// screen's rows, keeps no partition rule and prices the partition at least that margin above the path it
/// chose. Forcing the partition runs the whole pilot, which works the rule out from every pilot pair and
/// agrees that the partition loses (the screen's verdict confirmed, not assumed), and the forced run
/// reports the same pairs.
#[test]
fn a_partition_that_loses_on_a_sample_of_the_pilot_is_not_worked_out() {
    let dir = tempfile::tempdir().unwrap();
    let pop = indexed_face(dir.path(), Preset::IsotropicMates, 20_000);
    let e = &pop.engine;
    let run = |force: Option<&str>| {
        e.dedup(
            &DedupOptions {
                mode: CandidateMode::Index,
                report_floor: Some(FLOOR),
                force_path: force.map(str::to_string),
                ..DedupOptions::default()
            },
            None,
            None,
        )
        .unwrap()
    };
    let ivf_secs = |r: &DedupResult| {
        r.summary.plans[0]
            .predicted_seconds
            .iter()
            .find(|p| p.0 == "ivf")
            .map(|p| p.1)
            .expect("the partition is priced")
    };
    // The best prediction without the partition.
    let best_other = |r: &DedupResult| {
        r.summary.plans[0]
            .predicted_seconds
            .iter()
            .filter(|p| p.0 != "ivf")
            .map(|p| p.1)
            .fold(f64::INFINITY, f64::min)
    };
    let (auto, forced) = (run(None), run(Some("ivf")));
    let plan = &auto.summary.plans[0];
    assert_ne!(plan.path, "ivf", "{plan:?}");
    assert!(plan.ivf_rule.is_none(), "{plan:?}");
    assert_eq!(plan.pilot_rows, pacha_engine::policy::PILOT_SCREEN_ROWS);
    assert!(
        ivf_secs(&auto) >= pacha_engine::policy::PILOT_SCREEN_MARGIN * best_other(&auto),
        "{plan:?}"
    );
    let fp = &forced.summary.plans[0];
    assert_eq!(fp.path, "ivf");
    assert!(fp.ivf_rule.is_some(), "{fp:?}");
    assert_eq!(fp.pilot_rows, pacha_engine::policy::PILOT_ROWS);
    assert!(
        ivf_secs(&forced) >= best_other(&forced),
        "the whole pilot prices the partition at {} s, below the {} s of the path the screen kept",
        ivf_secs(&forced),
        best_other(&forced)
    );
    assert_eq!(reported(&auto), reported(&forced));
}

/// A calibration under which no pair can reach the threshold — the face model `pacha calibrate` fitted from
/// the 100 k look-alike families store without labels (`tests/fixtures/lookalike_face_calibration.json`: a
/// GPD tail with ξ 1.65 truncated at 0.708 over a sampled body; at FMR 1e-8 no face cosine is evidence
/// enough) — gives a run that searches nothing, and its audit says so instead of claiming the modality was
/// searched.
#[test]
fn a_calibration_no_pair_can_pass_is_named_in_the_audit() {
    use pacha_engine::dedup::DedupContext;
    use pacha_engine::fusion::Calibration;
    let dir = tempfile::tempdir().unwrap();
    let pop = load(
        dir.path(),
        &cfg(Preset::Structured, 6_000),
        Some(&[Modality::Face]),
    );
    let snap = pop.engine.snapshot();
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/lookalike_face_calibration.json"
    );
    let cal: Calibration =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let ctx = DedupContext {
        snapshot: &snap,
        calibration: &cal,
        ann: None,
        progress: None,
        cancel: None,
    };
    let r = pacha_engine::dedup::run(
        &ctx,
        &DedupOptions {
            mode: CandidateMode::Index,
            target_fpir: 1e-5,
            ..DedupOptions::default()
        },
    )
    .unwrap();
    assert!(
        r.summary.candidate_cosines.iter().all(|c| c.1.is_none()),
        "{:?} at threshold {}",
        r.summary.candidate_cosines,
        r.summary.threshold
    );
    assert!(r.pairs.is_empty() && r.summary.plans.is_empty());
    let audit = r.summary.audit.as_ref().expect("index runs carry an audit");
    assert!(
        audit.evidence.contains("no pair can reach the floor"),
        "{}",
        audit.evidence
    );
}

/// A structured face + 2 fingers store (10 % duplicates) where every fifth record lacks finger 7: pairs
/// share two or three modalities.
fn face_and_two_fingers(dir: &std::path::Path, records: u64) -> pacha_tests::Loaded {
    let mut c = cfg(Preset::Structured, records);
    c.duplicate_rate = 0.1;
    pacha_tests::load_edited(dir, &c, None, &|b| {
        for blk in b
            .blocks
            .iter_mut()
            .filter(|blk| blk.modality == Modality::Finger(7))
        {
            for (i, p) in blk.present.iter_mut().enumerate() {
                if i % 5 == 0 {
                    *p = false;
                }
            }
        }
    })
}

/// [`face_and_two_fingers`], calibrated, with a few records deleted.
fn three_modalities(dir: &std::path::Path, records: u64) -> pacha_tests::Loaded {
    let l = face_and_two_fingers(dir, records);
    l.engine.calibrate(&CalibrateOptions::default()).unwrap();
    // Deleted rows take part in no pair.
    for r in [3, records as usize / 2, records as usize - 7] {
        let id = l.engine.snapshot().subject_id(r).to_string();
        assert!(l.engine.delete(&id).unwrap());
    }
    l
}

/// The joint test is valid: every pair of the store whose exact fused score reaches the floor passes it
/// (the pieces lie above each modality's evidence, the needed sums below every band combination's), and it
/// is tight (on this small store's odd calibration — impostor means near −0.4, evidence flat at its floor
/// up to cosine 0 — where bounds made of lines through the whole range passed 88 % of all pairs).
#[test]
fn the_joint_test_passes_every_pair_that_reaches_the_floor() {
    use pacha_engine::joint::JointPlan;
    use pacha_engine::matcher::fused_rows;
    let dir = tempfile::tempdir().unwrap();
    let l = three_modalities(dir.path(), 1200);
    let e = &l.engine;
    let snap = e.snapshot();
    let cal = e.calibration();
    for floor in [20.0, 40.0, 60.0, 80.0] {
        let run = pacha_engine::policy::RunIndex {
            modalities: Vec::new(),
        };
        let plan = JointPlan::new(&snap, &cal, floor, &run, true)
            .unwrap()
            .expect("forced");
        assert_eq!(plan.members.len(), 3);
        let (mut reach, mut pass, mut fail) = (0, 0, 0);
        for b in (0..snap.rows()).filter(|&r| !snap.is_deleted(r)) {
            for a in (0..b).filter(|&r| !snap.is_deleted(r)) {
                let passes = plan.exact_passes(&snap, a, b);
                if fused_rows(&snap, &cal, a, b).score >= floor {
                    reach += 1;
                    assert!(
                        passes,
                        "pair ({a}, {b}) reaches {floor} but fails the joint test"
                    );
                }
                if passes {
                    pass += 1;
                } else {
                    fail += 1;
                }
            }
        }
        assert!(reach > 0, "floor {floor}: no pair reaches it");
        // Tight: at most about twice the pairs that reach the floor pass (at floor 20, 1 % of all pairs
        // reach it; above, a few hundred of 700 000).
        assert!(
            pass <= 2 * reach + 100,
            "floor {floor}: {pass} pass, {fail} fail ({reach} reach it)"
        );
    }
}

/// The joint scan (forced, and chosen by default where every modality plans the exact i8 join) reports
/// what exact search reports, scans every pair once in every member, keeps few, and its audit names the
/// joint boundary and finds all of it.
#[test]
fn the_joint_scan_reports_what_exact_search_reports() {
    let dir = tempfile::tempdir().unwrap();
    let l = three_modalities(dir.path(), 4000);
    let e = &l.engine;
    let run = |mode, force: Option<&str>, scope| {
        e.dedup(
            &DedupOptions {
                mode,
                report_floor: Some(FLOOR),
                force_path: force.map(str::to_string),
                scope,
                ..DedupOptions::default()
            },
            None,
            None,
        )
        .unwrap()
    };
    let snap = e.snapshot();
    for scope in [DedupScope::WholeStore, DedupScope::RowsFrom(3000)] {
        let exact = run(CandidateMode::Exact, None, scope.clone());
        let joint = run(CandidateMode::Index, Some("joint"), scope.clone());
        assert!(hits(&exact).len() >= 10, "{} hits", hits(&exact).len());
        assert_eq!(hits(&joint), hits(&exact), "hits: joint vs exact");
        assert_eq!(reported(&joint), reported(&exact), "pairs to the floor");
        let info = joint.summary.joint.as_ref().expect("the joint path ran");
        assert_eq!(info.members, ["face", "finger2", "finger7"]);
        let (key, st) = joint.summary.join_stats.last().unwrap();
        assert_eq!(key, &info.key);
        let first = match scope {
            DedupScope::RowsFrom(r) => r,
            _ => 0,
        };
        // Every live probe row meets every earlier row once per member (deleted ones only fail the test).
        let want: u64 = (first..snap.rows())
            .filter(|&r| !snap.is_deleted(r))
            .map(|r| r as u64)
            .sum();
        assert_eq!(st.products, 3 * want, "every pair scanned once per member");
        assert!(st.above * 50 < want, "kept {} of {want}", st.above);
        assert_eq!(joint.summary.candidate_pairs, st.above);
        let audit = joint.summary.audit.as_ref().expect("audited");
        assert!(
            audit.passed && audit.evidence.contains("joint"),
            "{audit:?}"
        );
        let (k, b) = audit.boundary.last().unwrap();
        let b = b.expect("the joint boundary is searched");
        assert!(
            k == &info.key && b.pairs > 0 && b.found == b.pairs,
            "{audit:?}"
        );
        assert!(audit.boundary[..3].iter().all(|(_, f)| f.is_none()));
    }
    // Asked for per-modality i8 joins, the run has no joint path and the same pairs.
    let per = run(
        CandidateMode::Index,
        Some("exact-i8"),
        DedupScope::WholeStore,
    );
    assert!(per.summary.joint.is_none());
    assert_eq!(
        reported(&per),
        reported(&run(CandidateMode::Exact, None, DedupScope::WholeStore))
    );
    // The joint path needs index mode.
    assert!(
        e.dedup(
            &DedupOptions {
                mode: CandidateMode::Exact,
                force_path: Some("joint".into()),
                ..DedupOptions::default()
            },
            None,
            None,
        )
        .is_err()
    );
}
