//! Criterion bench: HNSW (hnsw_rs behind `pacha_index::HnswIndex`) at 100 k × 512-d, structured population.
//!
//! The build, save and load are timed once (a single measured run each, printed), then criterion measures
//! search with exact rescoring, single-query latency and a parallel batch (both threads). Recall@10 against
//! the exact oracle is printed. `PACHA_BENCH_ROWS` changes the size; `PACHA_BENCH_COMPARE=1` also builds the
//! f32 graph for the f32-vs-i8 comparison.
#![allow(missing_docs, clippy::unwrap_used, clippy::print_stderr)]
use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pacha_index::ann::{AnnBuild, AnnIndex};
use pacha_index::{
    GraphPrecision, HnswIndex, HnswParams, Neighbour, RowsF32, search_rescored, top_k,
};
use rayon::prelude::*;

const DIM: usize = 512;
const RANK: usize = 32;
const K: usize = 10;
const K_PRIME: usize = 50;
const EF: usize = 100;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn gauss(&mut self) -> f32 {
        let u1 = ((self.next() >> 11) as f64 / (1u64 << 53) as f64).max(1e-300);
        let u2 = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
}

/// Subjects `normalise(B·z + n)` (rank-32 part with 70 % of the energy), and probes
/// `normalise(subject + noise)` at cosine ≈ 0.7 to a random subject.
fn population(n: usize, probes: usize) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng(7);
    let basis: Vec<f32> = (0..RANK * DIM)
        .map(|_| rng.gauss() / (DIM as f32).sqrt())
        .collect();
    let z_sd = (0.7f32 / RANK as f32).sqrt();
    let noise = (0.3f32 / DIM as f32).sqrt();
    let mut data = vec![0.0f32; n * DIM];
    for row in data.chunks_exact_mut(DIM) {
        for r in 0..RANK {
            let z = rng.gauss() * z_sd;
            for (x, b) in row.iter_mut().zip(&basis[r * DIM..(r + 1) * DIM]) {
                *x += z * b;
            }
        }
        row.iter_mut().for_each(|x| *x += rng.gauss() * noise);
        normalise(row);
    }
    let sigma = (1.0f32 / 0.49 - 1.0).sqrt() / (DIM as f32).sqrt();
    let mut q = vec![0.0f32; probes * DIM];
    for row in q.chunks_exact_mut(DIM) {
        let s = (rng.next() % n as u64) as usize;
        for (j, x) in row.iter_mut().enumerate() {
            *x = data[s * DIM + j] + rng.gauss() * sigma;
        }
        normalise(row);
    }
    (data, q)
}

fn recall(
    idx: &HnswIndex,
    base: RowsF32<'_>,
    queries: RowsF32<'_>,
    truth: &[Vec<Neighbour>],
) -> f64 {
    let hits: usize = (0..queries.rows())
        .into_par_iter()
        .map(|qi| {
            let res = search_rescored(idx, queries.row(qi), base, K, K_PRIME, EF, None).unwrap();
            res.iter()
                .filter(|n| truth[qi].iter().any(|t| t.id == n.id))
                .count()
        })
        .sum();
    hits as f64 / (K * truth.len()) as f64
}

fn bench(c: &mut Criterion) {
    let n: usize = std::env::var("PACHA_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let (data, qdata) = population(n, 500);
    let base = RowsF32::dense(&data, DIM).unwrap();
    let queries = RowsF32::dense(&qdata, DIM).unwrap();
    let t = Instant::now();
    let truth = top_k(queries, base, K, None).unwrap();
    eprintln!(
        "exact oracle: {} queries × {n} rows in {:.2?}",
        queries.rows(),
        t.elapsed()
    );

    let mut precisions = vec![GraphPrecision::I8];
    if std::env::var("PACHA_BENCH_COMPARE").is_ok() {
        precisions.push(GraphPrecision::F32);
    }
    let mut kept = None;
    for prec in precisions {
        let params = HnswParams {
            m: 16,
            ef_construction: 100,
            precision: prec,
            parallel: true,
        };
        let t = Instant::now();
        let idx = HnswIndex::build(base, &params).unwrap();
        let build = t.elapsed();
        let r = recall(&idx, base, queries, &truth);
        let dir = tempfile::tempdir().unwrap();
        let t = Instant::now();
        idx.save(dir.path()).unwrap();
        let save = t.elapsed();
        let bytes: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        let t = Instant::now();
        let loaded = HnswIndex::load(dir.path()).unwrap();
        let load = t.elapsed();
        assert_eq!(loaded.len(), n);
        eprintln!(
            "{prec:?} graph, {n} × {DIM}: build {build:.2?} ({:.0} inserts/s, {} threads), recall@10 {r:.4} \
             (k'={K_PRIME}, ef={EF}), save {save:.2?}, load {load:.2?} (load/rebuild = {:.3}), dump {:.1} MB",
            n as f64 / build.as_secs_f64(),
            rayon::current_num_threads(),
            load.as_secs_f64() / build.as_secs_f64(),
            bytes as f64 / 1e6,
        );
        if prec == GraphPrecision::I8 {
            kept = Some(loaded);
        }
    }
    let Some(idx) = kept else { return };

    let mut g = c.benchmark_group(format!("hnsw_{n}x{DIM}"));
    g.throughput(Throughput::Elements(1));
    let mut qi = 0;
    g.bench_function("search_rescored_1thread", |x| {
        x.iter(|| {
            qi = (qi + 1) % queries.rows();
            search_rescored(&idx, black_box(queries.row(qi)), base, K, K_PRIME, EF, None).unwrap()
        })
    });
    g.throughput(Throughput::Elements(queries.rows() as u64));
    g.sample_size(10);
    g.bench_function("search_rescored_batch_all_threads", |x| {
        x.iter(|| {
            (0..queries.rows())
                .into_par_iter()
                .map(|q| {
                    search_rescored(&idx, queries.row(q), base, K, K_PRIME, EF, None)
                        .unwrap()
                        .len()
                })
                .sum::<usize>()
        })
    });
    let few = pacha_index::Bitset::from_ids((0..n as u32).filter(|i| i % 50 == 0)); // 2 % deleted
    let many = pacha_index::Bitset::from_ids((0..n as u32).filter(|i| i % 4 == 0)); // 25 % deleted
    for (name, del) in [("deleted_2pct", &few), ("deleted_25pct", &many)] {
        g.bench_function(format!("search_rescored_batch_{name}"), |x| {
            x.iter(|| {
                (0..queries.rows())
                    .into_par_iter()
                    .map(|q| {
                        search_rescored(&idx, queries.row(q), base, K, K_PRIME, EF, Some(del))
                            .unwrap()
                            .len()
                    })
                    .sum::<usize>()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
