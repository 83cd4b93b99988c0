//! Criterion bench of the engine's hot paths on a generated population: fusion of per-modality cosines,
//! exact rescoring + fusion of one pair, derivation of candidate cosines, and whole-store dedup runs with
//! exact GEMM candidates and with the IVF index.
//!
//! `PACHA_BENCH_DEDUP_ROWS` sets the dedup population (default 5 000: both modes run in about a second).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pacha_datasets::generate::{Generator, PopulationConfig};
use pacha_engine::candidates::CandidateMode;
use pacha_engine::dedup::DedupOptions;
use pacha_engine::engine::CalibrateOptions;
use pacha_engine::fusion::{Calibration, threshold_for_fpir};
use pacha_engine::matcher::fused_rows;
use pacha_engine::store::Schema;
use pacha_engine::{Engine, Modality};
use std::hint::black_box;

fn population(rows: u64) -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().unwrap();
    let g = Generator::new(PopulationConfig {
        records: rows,
        seed: 17,
        ..PopulationConfig::default()
    })
    .unwrap();
    let schema = Schema::of(g.modalities());
    let engine = Engine::create(dir.path(), schema).unwrap();
    for b in g.batches(4096) {
        engine.insert_records(&b.records).unwrap();
    }
    engine
        .calibrate(&CalibrateOptions {
            impostor_pairs: 200_000,
            ..CalibrateOptions::default()
        })
        .unwrap();
    (dir, engine)
}

fn fusion(c: &mut Criterion) {
    let cal = Calibration::defaults(&[Modality::Face, Modality::Finger(2), Modality::Finger(7)]);
    let _ = cal.fuse(&[(0, 0.5), (1, 0.4), (2, 0.3)]); // build the cached distributions once
    let mut g = c.benchmark_group("fusion");
    g.throughput(Throughput::Elements(1));
    g.bench_function("fuse 3 modalities", |b| {
        b.iter(|| black_box(cal.fuse(black_box(&[(0, 0.52), (1, 0.31), (2, 0.44)]))))
    });
    let thr = threshold_for_fpir(1e-3, 1_000_000).unwrap();
    g.bench_function("candidate cosines (3 modalities)", |b| {
        b.iter(|| black_box(cal.candidate_cosines(thr)))
    });
    g.finish();
}

fn rescoring(c: &mut Criterion) {
    let (_dir, engine) = population(20_000);
    let snap = engine.snapshot();
    let cal = engine.calibration();
    let mut g = c.benchmark_group("rescore");
    g.throughput(Throughput::Elements(1));
    let mut x = 1u64;
    g.bench_function("fused_rows random pair (face 512 + 2 fingers 256)", |b| {
        b.iter(|| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let (a, bb) = ((x >> 33) as usize % 20_000, (x >> 13) as usize % 20_000);
            black_box(fused_rows(&snap, &cal, a, bb))
        })
    });
    g.finish();
}

fn dedup(c: &mut Criterion) {
    let rows: u64 = std::env::var("PACHA_BENCH_DEDUP_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let (_dir, engine) = population(rows);
    engine.build_index(&Default::default(), None).unwrap();
    let mut g = c.benchmark_group("dedup");
    g.sample_size(10);
    g.throughput(Throughput::Elements(rows));
    for (name, mode) in [
        ("exact", CandidateMode::Exact),
        ("index", CandidateMode::Index),
    ] {
        let opts = DedupOptions {
            mode,
            ..DedupOptions::default()
        };
        g.bench_function(format!("{name} {rows} records"), |b| {
            b.iter(|| black_box(engine.dedup(&opts, None, None).unwrap().summary.hits))
        });
    }
    g.finish();
}

criterion_group!(benches, fusion, rescoring, dedup);
criterion_main!(benches);
