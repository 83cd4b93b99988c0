//! Criterion bench: the dedup candidate join. Sign-sketch filtering of 512-bit sketches (the dispatched
//! `filter_packed` and each packed kernel: AVX-512 VPOPCNTDQ, AVX2, portable), sketching rows, and the IVF self-join over a generated structured
//! population with f32 GEMM products vs sketch-filtered products (`PACHA_BENCH_IVF_N` rows, default 20 000).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pacha_datasets::Modality;
use pacha_datasets::generate::{Generator, PopulationConfig};
use pacha_index::RowsF32;
use pacha_index::ivf::{Ivf, IvfParams};
use pacha_index::sketch::{
    FILTER_CLASSES, PackedBlock, Sketcher, StagedCut, filter_packed, filter_packed_classed_variant,
    filter_packed_variant,
};

fn population(n: usize) -> Vec<f32> {
    let g = Generator::new(PopulationConfig {
        records: n as u64,
        fingers: Vec::new(),
        ..PopulationConfig::default()
    })
    .unwrap();
    let batch = g.generate(0, n);
    let b = batch
        .records
        .blocks
        .into_iter()
        .find(|b| b.modality == Modality::Face)
        .unwrap();
    b.data
}

fn filter(c: &mut Criterion) {
    let (d, n) = (512usize, 1024usize);
    let rows = population(n + 1);
    let base = RowsF32::dense(&rows, d).unwrap();
    let sk = Sketcher::new(d, 512, 1)
        .unwrap()
        .sketch_rows(base, &|_| true)
        .unwrap();
    let q = sk.row(0).to_vec();
    let mut g = c.benchmark_group("sketch_filter_512bit");
    g.throughput(Throughput::Elements(n as u64));
    let mut out = Vec::new();
    let mut packed = PackedBlock::default();
    packed.clear(q.len());
    for r in 1..=n {
        packed.push(sk.row(r));
    }
    g.bench_function("packed", |x| {
        x.iter(|| {
            out.clear();
            filter_packed(black_box(&q), black_box(&packed), 200, &mut out);
            out.len()
        })
    });
    for v in ["avx512", "avx2", "portable"] {
        g.bench_function(format!("packed_{v}"), |x| {
            x.iter(|| {
                out.clear();
                filter_packed_variant(v, black_box(&q), black_box(&packed), 200, &mut out);
                out.len()
            })
        });
    }
    g.finish();

    // Many queries against the block at a cut a few per cent of products pass (the dedup join's first stage
    // at a low candidate cosine passes 3–7 %): the kept members' output is where a per-group branch
    // mispredicts; one query at cut 200 (above) keeps almost none.
    let queries = 256;
    let rows = population(n + queries);
    let base = RowsF32::dense(&rows, d).unwrap();
    let sk = Sketcher::new(d, 512, 1)
        .unwrap()
        .sketch_rows(base, &|_| true)
        .unwrap();
    let mut packed = PackedBlock::default();
    packed.clear(q.len());
    // The same block with three classes, as a band join packs its member tile (every class cut equal here,
    // so both filters keep the same members).
    let mut classed = PackedBlock::default();
    classed.clear(q.len());
    for r in queries..queries + n {
        packed.push(sk.row(r));
        classed.push_classed(sk.row(r), (r % 3) as u8);
    }
    let mut dist: Vec<u32> = (0..queries)
        .flat_map(|a| {
            let sk = &sk;
            (queries..queries + n).map(move |b| pacha_index::sketch::hamming(sk.row(a), sk.row(b)))
        })
        .collect();
    dist.sort_unstable();
    // 5 % (a low cosine), 1 % and 0.05 % (a join where almost nothing passes: whole chunks are skipped).
    for (name, share) in [("pass5", 20), ("pass1", 100), ("pass005", 2000)] {
        let cut = dist[dist.len() / share];
        let mut g = c.benchmark_group(format!("sketch_filter_512bit_{name}"));
        g.throughput(Throughput::Elements((n * queries) as u64));
        for v in ["avx512", "avx2"] {
            g.bench_function(format!("packed_{v}"), |x| {
                x.iter(|| {
                    let mut kept = 0;
                    for a in 0..queries {
                        out.clear();
                        filter_packed_variant(v, black_box(sk.row(a)), &packed, cut, &mut out);
                        kept += out.len();
                    }
                    kept
                })
            });
            g.bench_function(format!("classed_{v}"), |x| {
                x.iter(|| {
                    let mut kept = 0;
                    for a in 0..queries {
                        out.clear();
                        let table = [cut; FILTER_CLASSES];
                        filter_packed_classed_variant(
                            v,
                            black_box(sk.row(a)),
                            &classed,
                            &table,
                            &mut out,
                        );
                        kept += out.len();
                    }
                    kept
                })
            });
        }
        g.finish();
    }

    let mut g = c.benchmark_group("sketch_rows_512d_512bit");
    g.sample_size(10);
    let rows = population(8192);
    let base = RowsF32::dense(&rows, d).unwrap();
    let sketcher = Sketcher::new(d, 512, 1).unwrap();
    g.throughput(Throughput::Elements(8192));
    g.bench_function("8192_rows", |x| {
        x.iter(|| sketcher.sketch_rows(black_box(base), &|_| true).unwrap())
    });
    g.finish();
}

fn join(c: &mut Criterion) {
    let n: usize = std::env::var("PACHA_BENCH_IVF_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let d = 512;
    let rows = population(n);
    let base = RowsF32::dense(&rows, d).unwrap();
    let ivf = Ivf::build(base, &|_| true, &IvfParams::default()).unwrap();
    let sk = Sketcher::new(d, 512, 1)
        .unwrap()
        .sketch_rows(base, &|_| true)
        .unwrap();
    let mut g = c.benchmark_group(format!("ivf_self_join_{n}"));
    g.sample_size(10);
    g.throughput(Throughput::Elements(ivf.candidate_products()));
    let t = 0.55f32;
    g.bench_function("gemm", |x| {
        x.iter(|| ivf.self_join_rows(base, 0..n, t).unwrap().len())
    });
    g.bench_function("sketch_cut_200", |x| {
        x.iter(|| {
            ivf.self_join_rows_sketched(base, &sk, 0..n, t, StagedCut::single(200))
                .unwrap()
                .len()
        })
    });
    g.finish();
}

criterion_group!(benches, filter, join);
criterion_main!(benches);
