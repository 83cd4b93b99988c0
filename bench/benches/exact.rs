//! Criterion bench: exact blocked search vs faer's own GEMM rate on 4096×512×4096, in FLOP/s
//! (criterion's "elem/s" here are FLOPs: 2·m·n·d per product); and the i8 threshold join
//! (`pacha_index::exact_i8`) against the f32 join on the same rows, in pair products per second; the joint
//! scan of three modalities (`pacha_index::joint`, face 512 + two 256-d fingers) in its self (dedup) and
//! cross (identify batch) forms, in pairs per second.
#![allow(missing_docs, clippy::unwrap_used, clippy::print_stderr)]
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use pacha_index::exact_i8::{I8Kernel, QuantRows, join_with_kernel};
use pacha_index::quant::{l1_bounds, quantize_rows};
use pacha_index::{RowsF32, self_join, threshold_join, top_k};

const N: usize = 4096;
const D: usize = 512;

fn unit_rows(n: usize, seed: u64) -> Vec<f32> {
    unit_rows_d(n, D, seed)
}

fn unit_rows_d(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut v = vec![0.0f32; n * d];
    for r in v.chunks_exact_mut(d) {
        for x in r.iter_mut() {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            *x = ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
        }
        let n = r.iter().map(|x| x * x).sum::<f32>().sqrt();
        r.iter_mut().for_each(|x| *x /= n);
    }
    v
}

fn bench(c: &mut Criterion) {
    let a = unit_rows(N, 1);
    let b = unit_rows(N, 2);
    let flops = (2 * N * N * D) as u64;
    let mut g = c.benchmark_group("exact_4096x512x4096");
    g.sample_size(10);
    g.throughput(Throughput::Elements(flops));
    let mut out = vec![0.0f32; N * N];
    g.bench_function("faer_gemm_raw", |x| {
        x.iter(|| {
            let am = MatRef::from_row_major_slice(&a, N, D);
            let bm = MatRef::from_row_major_slice(&b, N, D);
            let cm = MatMut::from_row_major_slice_mut(&mut out, N, N);
            matmul(
                cm,
                Accum::Replace,
                am,
                bm.transpose(),
                1.0f32,
                Par::rayon(0),
            );
            black_box(out[7])
        })
    });
    let (pa, pb) = (
        RowsF32::dense(&a, D).unwrap(),
        RowsF32::dense(&b, D).unwrap(),
    );
    let t = 0.3; // random unit 512-d vectors: |cos| > 0.3 is a ~6σ event, so (almost) no pairs
    g.bench_function("threshold_join", |x| {
        x.iter(|| threshold_join(pa, pb, t, None, None).unwrap().len())
    });
    // The self-join computes only the upper triangle: its throughput counts the n(n−1)/2 useful dots.
    g.throughput(Throughput::Elements((N * (N - 1) / 2 * 2 * D) as u64));
    g.bench_function("self_join", |x| {
        x.iter(|| self_join(pa, t, None).unwrap().len())
    });
    g.throughput(Throughput::Elements(flops));
    g.bench_function("top_k_10", |x| {
        x.iter(|| top_k(pa, pb, 10, None).unwrap().len())
    });
    g.finish();
}

/// The i8 join vs the f32 GEMM join: 4096 × 4096 pair products of 512-d rows (random unit rows at
/// threshold 0.3: the filter rejects nearly every pair, so this is the scan's rate), per kernel.
fn bench_i8(c: &mut Criterion) {
    let a = unit_rows(N, 1);
    let b = unit_rows(N, 2);
    let (pa, pb) = (
        RowsF32::dense(&a, D).unwrap(),
        RowsF32::dense(&b, D).unwrap(),
    );
    let (qa, qb) = (quantize_rows(pa), quantize_rows(pb));
    let (la, lb) = (l1_bounds(qa.view()), l1_bounds(qb.view()));
    let probe = QuantRows::new(pa, qa.view(), &la).unwrap();
    let base = QuantRows::new(pb, qb.view(), &lb).unwrap();
    let t = 0.3;
    let mut g = c.benchmark_group("join_products_4096x512x4096");
    g.sample_size(10);
    g.throughput(Throughput::Elements((N * N) as u64));
    g.bench_function("f32_gemm_join", |x| {
        x.iter(|| threshold_join(pa, pb, t, None, None).unwrap().len())
    });
    for k in [
        I8Kernel::Amx,
        I8Kernel::Vnni,
        I8Kernel::Avx2,
        I8Kernel::Scalar,
    ] {
        if !k.available() {
            eprintln!("i8 kernel {} not available on this CPU: skipped", k.name());
            continue;
        }
        g.bench_function(format!("i8_join_{}", k.name()), |x| {
            x.iter(|| {
                join_with_kernel(k, probe, base, None, t, None, None, None)
                    .unwrap()
                    .0
                    .len()
            })
        });
    }
    g.finish();
}

/// The joint scan of face 512 + two 256-d fingers (1 024 i8 MACs per pair) over 4 096 random unit rows with
/// every member present, at a test that keeps (almost) no pair: the self-join's triangle (the dedup form) and
/// 512 probe rows against all 4 096 (the identify-batch form), per kernel, in pairs per second.
fn bench_joint(c: &mut Criterion) {
    use pacha_index::joint::{JOINT_LINES, JointCross, JointJoin, JointLine, JointTest, MAX_JOINT};
    let dims = [512usize, 256, 256];
    let f32s: Vec<Vec<f32>> = dims
        .iter()
        .enumerate()
        .map(|(k, &d)| unit_rows_d(N, d, 11 + k as u64))
        .collect();
    let quant: Vec<_> = f32s
        .iter()
        .zip(dims)
        .map(|(v, d)| quantize_rows(RowsF32::dense(v, d).unwrap()))
        .collect();
    let l1: Vec<Vec<f32>> = quant.iter().map(|q| l1_bounds(q.view())).collect();
    let members = || -> Vec<QuantRows<'_>> {
        (0..dims.len())
            .map(|k| {
                QuantRows::new(
                    RowsF32::dense(&f32s[k], dims[k]).unwrap(),
                    quant[k].view(),
                    &l1[k],
                )
                .unwrap()
            })
            .collect()
    };
    // An evidence bound shaped like a calibrated modality's: flat, then rising through the tail (each piece
    // starts where the previous one ends).
    let piece = |from: f32, slope: f32, intercept: f32| JointLine {
        from,
        slope,
        intercept,
    };
    let lines: [JointLine; JOINT_LINES] = [
        piece(f32::NEG_INFINITY, 0.0, -8.0),
        piece(0.1, 10.0, -9.0),
        piece(0.2, 30.0, -13.0),
        piece(0.4, 60.0, -25.0),
    ];
    let mut needed = [f32::INFINITY; 1 << MAX_JOINT];
    needed[1..8].iter_mut().for_each(|n| *n = 5.0);
    let test = JointTest {
        lines: vec![lines; 3],
        needed,
    };
    let presence = vec![7u8; N];
    let probes = 512;
    let mut g = c.benchmark_group("joint_3_members_4096");
    g.sample_size(10);
    for k in [
        I8Kernel::Amx,
        I8Kernel::Vnni,
        I8Kernel::Avx2,
        I8Kernel::Scalar,
    ] {
        if !k.available() {
            eprintln!("i8 kernel {} not available on this CPU: skipped", k.name());
            continue;
        }
        let join = JointJoin::new(members(), &presence, &test).unwrap();
        g.throughput(Throughput::Elements((N * (N - 1) / 2) as u64));
        g.bench_function(format!("self_{}", k.name()), |x| {
            x.iter(|| join.probe_join_with_kernel(k, 0..N).unwrap().0.len())
        });
        let sliced: Vec<QuantRows<'_>> =
            members().iter().map(|m| m.slice_rows(0, probes)).collect();
        let cross =
            JointCross::new(sliced, &presence[..probes], members(), &presence, &test).unwrap();
        g.throughput(Throughput::Elements((probes * N) as u64));
        g.bench_function(format!("cross_512_{}", k.name()), |x| {
            x.iter(|| cross.join_with_kernel(k).unwrap().0.len())
        });
    }
    g.finish();
}

criterion_group!(benches, bench, bench_i8, bench_joint);
criterion_main!(benches);
