//! Criterion bench: dot-product kernels (f32, f16, i8 at 512-d and 256-d) in ns per pair and GB/s, the
//! streaming rescoring kernel over a large base, and single-thread streaming-read bandwidth (sum of 1 GiB)
//! so the kernels' effective GB/s can be compared to memory bandwidth.
#![allow(missing_docs, clippy::unwrap_used, clippy::print_stderr)]
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pacha_index::half::f16;
use pacha_index::kernels::{self, scalar};
use pacha_index::{RowsF32, dot_f16, dot_f32, dot_i8, dot_many};

fn vecs(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

fn pairs(c: &mut Criterion) {
    eprintln!("kernel level: {}", kernels::simd_level());
    for dim in [512usize, 256] {
        let (a, b) = (vecs(dim, 1), vecs(dim, 7));
        let ah: Vec<f16> = a.iter().map(|&x| f16::from_f32(x)).collect();
        let bh: Vec<f16> = b.iter().map(|&x| f16::from_f32(x)).collect();
        let ai: Vec<i8> = a.iter().map(|&x| (x * 127.0) as i8).collect();
        let bi: Vec<i8> = b.iter().map(|&x| (x * 127.0) as i8).collect();
        let mut g = c.benchmark_group(format!("dot_{dim}"));
        g.throughput(Throughput::Bytes((2 * dim * 4) as u64));
        g.bench_function("f32", |x| x.iter(|| dot_f32(black_box(&a), black_box(&b))));
        g.bench_function("f32_scalar", |x| {
            x.iter(|| scalar::dot_f32(black_box(&a), black_box(&b)))
        });
        g.throughput(Throughput::Bytes((2 * dim * 2) as u64));
        g.bench_function("f16", |x| {
            x.iter(|| dot_f16(black_box(&ah), black_box(&bh)))
        });
        g.throughput(Throughput::Bytes((2 * dim) as u64));
        g.bench_function("i8", |x| x.iter(|| dot_i8(black_box(&ai), black_box(&bi))));
        g.finish();
    }
}

fn streaming(c: &mut Criterion) {
    // 1 GiB of f32, read once per iteration by one thread.
    let n = (1usize << 30) / 4;
    let buf: Vec<f32> = (0..n).map(|i| (i & 1023) as f32).collect();
    let mut g = c.benchmark_group("stream");
    g.sample_size(10);
    g.throughput(Throughput::Bytes((n * 4) as u64));
    g.bench_function("sum_1GiB", |x| {
        x.iter(|| {
            let mut acc = [0.0f32; 16];
            for ch in black_box(&buf).chunks_exact(16) {
                for l in 0..16 {
                    acc[l] += ch[l];
                }
            }
            acc.iter().sum::<f32>()
        })
    });
    // Rescoring kernel streaming over a 256 MiB base (131 072 rows of 512-d): memory-bound dot products.
    let dim = 512;
    let rows = (256usize << 20) / (dim * 4);
    let base_data = &buf[..rows * dim];
    let base = RowsF32::dense(base_data, dim).unwrap();
    let q = vecs(dim, 3);
    let ids: Vec<u32> = (0..rows as u32).collect();
    let mut out = vec![0.0f32; rows];
    g.throughput(Throughput::Bytes((rows * dim * 4) as u64));
    g.bench_function("dot_many_f32_512_256MiB", |x| {
        x.iter(|| dot_many(black_box(&q), base, &ids, &mut out).unwrap())
    });
    g.finish();
}

criterion_group!(benches, pairs, streaming);
criterion_main!(benches);
