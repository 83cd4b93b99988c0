//! Generator tests: statistics in the documented ranges, determinism across thread counts, ground truth.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // test helpers unwrap; the stats test prints its figures

use pacha_datasets::*;
use std::collections::HashSet;

fn small_cfg(records: u64, seed: u64) -> PopulationConfig {
    PopulationConfig {
        records,
        seed,
        duplicate_rate: 0.03,
        impostor_pairs: 50_000,
        ..PopulationConfig::default()
    }
}

fn check(name: &str, value: f64, lo: f64, hi: f64) {
    assert!(
        (lo..=hi).contains(&value),
        "{name} = {value:.4} not in [{lo}, {hi}]"
    );
}

#[test]
fn population_statistics_in_documented_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(20_000, 7);
    let mut calls = 0;
    let summary = write_population(&cfg, dir.path(), &mut |_, _| calls += 1).unwrap();
    assert!(calls >= 2);
    for s in &summary.manifest.stats {
        println!(
            "{:8} genuine n={:6} mean={:.3} sd={:.3} p01={:.3} p99={:.3} | impostor n={:6} mean={:.4} sd={:.4} p01={:.3} p99={:.3}",
            s.modality,
            s.genuine.count,
            s.genuine.mean,
            s.genuine.sd,
            s.genuine.p01,
            s.genuine.p99,
            s.impostor.count,
            s.impostor.mean,
            s.impostor.sd,
            s.impostor.p01,
            s.impostor.p99
        );
    }
    println!("records/s (dev profile): {:.0}", summary.records_per_sec);
    for s in &summary.manifest.stats {
        assert!(
            s.genuine.count >= 400,
            "{}: too few genuine pairs {}",
            s.modality,
            s.genuine.count
        );
        assert!(
            s.impostor.count >= 40_000,
            "{}: too few impostor pairs {}",
            s.modality,
            s.impostor.count
        );
        if s.modality == "face" {
            check("face genuine mean", s.genuine.mean, 0.60, 0.70);
            check("face genuine sd", s.genuine.sd, 0.07, 0.13);
            check("face impostor mean", s.impostor.mean, 0.0, 0.05);
            check("face impostor sd", s.impostor.sd, 0.06, 0.10);
        } else {
            check("finger genuine mean", s.genuine.mean, 0.45, 0.60);
            check("finger genuine sd", s.genuine.sd, 0.11, 0.16);
            check("finger impostor mean", s.impostor.mean, -0.02, 0.02);
            check("finger impostor sd", s.impostor.sd, 0.06, 0.09);
        }
        // Heavier upper tail than a normal with the same sd, and genuine well separated from impostors.
        assert!(
            s.genuine.p01 > s.impostor.p99 - 0.2,
            "{}: genuine p01 below impostor p99 by too much",
            s.modality
        );
    }
}

fn files_of(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn same_seed_gives_identical_files_with_one_and_two_threads() {
    let cfg = PopulationConfig {
        records: 9_000,
        seed: 11,
        impostor_pairs: 5_000,
        ..PopulationConfig::default()
    };
    let mut outputs = Vec::new();
    for threads in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| write_population(&cfg, dir.path(), &mut |_, _| {}))
            .unwrap();
        outputs.push(files_of(dir.path()));
    }
    let names: Vec<&str> = outputs[0].iter().map(|f| f.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "clusters.csv",
            "face.npy",
            "finger2.npy",
            "finger7.npy",
            "population.json",
            "subjects.csv",
            "truth.csv"
        ]
    );
    for (a, b) in outputs[0].iter().zip(&outputs[1]) {
        assert_eq!(a.0, b.0);
        assert!(a.1 == b.1, "{} differs between 1 and 2 threads", a.0);
    }
    // A different seed gives different vectors.
    let dir = tempfile::tempdir().unwrap();
    write_population(
        &PopulationConfig { seed: 12, ..cfg },
        dir.path(),
        &mut |_, _| {},
    )
    .unwrap();
    let other = files_of(dir.path());
    assert!(other[1].1 != outputs[0][1].1);
}

#[test]
fn batches_do_not_depend_on_batch_size() {
    let g = Generator::new(PopulationConfig {
        records: 1_000,
        seed: 3,
        ..PopulationConfig::default()
    })
    .unwrap();
    let concat = |bs: usize| {
        let mut ids = Vec::new();
        let mut face = Vec::new();
        let mut persons = Vec::new();
        for b in g.batches(bs) {
            assert!(b.records.len() <= bs);
            ids.extend(b.records.ids.clone());
            face.extend_from_slice(&b.records.block(Modality::Face).unwrap().data);
            persons.extend(b.persons);
        }
        (ids, face, persons)
    };
    let a = concat(7);
    let b = concat(1000);
    assert_eq!(a.0.len(), 1000);
    assert_eq!(a, b);
    assert_eq!(a.0[123], "P000000123");
}

#[test]
fn ground_truth_matches_the_generated_persons() {
    let cfg = PopulationConfig {
        records: 5_000,
        seed: 5,
        duplicate_rate: 0.05,
        chain_share: 0.3,
        impostor_pairs: 2_000,
        ..PopulationConfig::default()
    };
    let g = Generator::new(cfg.clone()).unwrap();
    assert_eq!(g.duplicate_records(), 250);
    assert_eq!(g.persons(), 5_000 - 250);
    let persons: Vec<u64> = g.batches(512).flat_map(|b| b.persons).collect();
    // Persons are numbered by first appearance: the first record of person p comes before person p+1's.
    let mut next_new = 0u64;
    let mut seen = HashSet::new();
    for &p in &persons {
        if seen.insert(p) {
            assert_eq!(p, next_new);
            next_new += 1;
        }
    }
    assert_eq!(next_new, g.persons());
    // Truth pairs are exactly the pairs of records sharing a person.
    let mut by_person: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for (r, &p) in persons.iter().enumerate() {
        by_person.entry(p).or_default().push(r as u64);
    }
    let mut expected = Vec::new();
    for (p, recs) in &by_person {
        for i in 0..recs.len() {
            for j in i + 1..recs.len() {
                expected.push(TruthPair {
                    a: recs[i],
                    b: recs[j],
                    person: *p,
                });
            }
        }
    }
    expected.sort();
    let truth = g.truth_pairs();
    assert_eq!(truth, expected);
    let chains = by_person.values().filter(|v| v.len() == 3).count();
    let pairs = by_person.values().filter(|v| v.len() == 2).count();
    assert!(by_person.values().all(|v| v.len() <= 3));
    assert_eq!(pairs + 2 * chains, 250);
    assert!(
        chains > 20,
        "expected chains with chain_share 0.3, got {chains}"
    );

    // The files agree with the generator, and the readers round-trip them.
    let dir = tempfile::tempdir().unwrap();
    let summary = write_population(&cfg, dir.path(), &mut |_, _| {}).unwrap();
    assert_eq!(summary.manifest.truth_pairs, truth.len() as u64);
    let read = read_truth(dir.path().join("truth.csv")).unwrap();
    let want: Vec<(String, String)> = truth
        .iter()
        .map(|t| (g.subject_id(t.a), g.subject_id(t.b)))
        .collect();
    assert_eq!(read, want);
    let clusters = read_clusters(dir.path().join("clusters.csv")).unwrap();
    assert_eq!(clusters.len(), pairs + chains);
    for (p, ids) in &clusters {
        let recs = &by_person[&p.parse::<u64>().unwrap()];
        let want: Vec<String> = recs.iter().map(|&r| g.subject_id(r)).collect();
        assert_eq!(ids, &want);
    }
    let manifest = PopulationManifest::read(dir.path()).unwrap();
    // serde_json float parsing may differ from the written value in the last ulp: compare the rest exactly.
    assert_eq!(manifest.config, summary.manifest.config);
    assert_eq!(
        (manifest.records, manifest.persons, manifest.clusters),
        (5_000, 4_750, (pairs + chains) as u64)
    );
    assert_eq!(manifest.files, summary.manifest.files);
    for (a, b) in manifest.stats.iter().zip(&summary.manifest.stats) {
        assert_eq!(
            (&a.modality, a.genuine.count, a.impostor.count),
            (&b.modality, b.genuine.count, b.impostor.count)
        );
        assert!(
            (a.genuine.mean - b.genuine.mean).abs() < 1e-12
                && (a.impostor.p99 - b.impostor.p99).abs() < 1e-12
        );
    }

    // Subjects presence matches the zero rows of the vector files, and present rows are unit vectors.
    let subjects = read_subjects(dir.path().join("subjects.csv")).unwrap();
    assert_eq!(subjects.len(), 5_000);
    for (m, _) in g.modalities() {
        let npy = NpyMatrix::open(dir.path().join(format!("{}.npy", m.key()))).unwrap();
        assert_eq!(npy.rows(), 5_000);
        let mut data = Vec::new();
        npy.read_rows(0, 5_000, &mut data).unwrap();
        let col = subjects.modality(m).unwrap();
        let present = col.present.as_ref().unwrap();
        for (i, row) in data.chunks_exact(npy.dim()).enumerate() {
            let n2: f32 = row.iter().map(|x| x * x).sum();
            if present[i] {
                assert!((n2 - 1.0).abs() < 1e-4, "{m} row {i} norm² {n2}");
            } else {
                assert_eq!(n2, 0.0);
            }
        }
        let missing = present.iter().filter(|p| !**p).count();
        let (lo, hi) = if m == Modality::Face {
            (5, 60)
        } else {
            (50, 160)
        };
        assert!(
            (lo..=hi).contains(&missing),
            "{m}: {missing} missing templates"
        );
    }
}

#[test]
fn isotropic_preset_plants_mates_at_the_configured_cosine() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = PopulationConfig {
        records: 6_000,
        seed: 9,
        preset: Preset::Isotropic,
        duplicate_rate: 0.05,
        isotropic_genuine_cosine: 0.7,
        impostor_pairs: 20_000,
        ..PopulationConfig::default()
    };
    let s = write_population(&cfg, dir.path(), &mut |_, _| {}).unwrap();
    for st in &s.manifest.stats {
        check("isotropic genuine mean", st.genuine.mean, 0.67, 0.73);
        assert!(
            st.genuine.sd < 0.04,
            "{}: genuine sd {}",
            st.modality,
            st.genuine.sd
        );
        check("isotropic impostor mean", st.impostor.mean, -0.005, 0.005);
        let iso_sd = 1.0 / (st.dim as f64).sqrt();
        check(
            "isotropic impostor sd",
            st.impostor.sd,
            0.9 * iso_sd,
            1.1 * iso_sd,
        );
    }
}

#[test]
fn bad_configs_are_rejected() {
    let base = PopulationConfig::default();
    for cfg in [
        PopulationConfig {
            duplicate_rate: 0.7,
            ..base.clone()
        },
        PopulationConfig {
            fingers: vec![(11, 256)],
            ..base.clone()
        },
        PopulationConfig {
            fingers: vec![(2, 256), (2, 128)],
            ..base.clone()
        },
        PopulationConfig {
            face_dim: 0,
            fingers: vec![],
            ..base.clone()
        },
        PopulationConfig {
            finger_missing_rate: -0.1,
            ..base.clone()
        },
        PopulationConfig {
            face: ModalityModel {
                rank: 0,
                ..ModalityModel::face()
            },
            ..base.clone()
        },
        PopulationConfig {
            face: ModalityModel {
                noise_max: f64::NAN,
                ..ModalityModel::face()
            },
            ..base.clone()
        },
    ] {
        assert!(matches!(Generator::new(cfg), Err(DatasetError::Config(_))));
    }
    // Tiny populations work, including one record and a high duplicate rate.
    for records in [0, 1, 2, 5] {
        let g = Generator::new(PopulationConfig {
            records,
            duplicate_rate: 0.5,
            ..base.clone()
        })
        .unwrap();
        let n: usize = g.batches(3).map(|b| b.records.len()).sum();
        assert_eq!(n as u64, records);
        assert_eq!(g.persons() + g.duplicate_records(), records);
    }
    // The config round-trips through JSON, and partial JSON takes defaults.
    let json = serde_json::to_string(&base).unwrap();
    assert_eq!(
        serde_json::from_str::<PopulationConfig>(&json).unwrap(),
        base
    );
    let partial: PopulationConfig =
        serde_json::from_str(r#"{"records": 5, "preset": "Isotropic"}"#).unwrap();
    assert_eq!(partial.records, 5);
    assert_eq!(partial.preset, Preset::Isotropic);
    assert_eq!(partial.face_dim, 512);
}
