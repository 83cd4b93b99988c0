//! Criterion bench of the template store: ingest throughput, random row reads, open time.
//!
//! `PACHA_BENCH_STORE_ROWS` sets the size of the read/open store (default 200 000 face-512 records,
//! about 0.5 GB on disk); use 1000000 to measure opening a 1 M-record store.
#![allow(missing_docs, clippy::unwrap_used, clippy::print_stderr)]
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use pacha_engine::store::{ModalitySpec, Schema, Store};
use pacha_engine::{Modality, ModalityBlock, RecordBatch};
use std::hint::black_box;
use std::time::Instant;

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn block(modality: Modality, dim: usize, n: usize, seed: u64) -> ModalityBlock {
    let data = (0..(n * dim) as u64)
        .map(|k| (mix(seed ^ (k << 8)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        .collect();
    ModalityBlock {
        modality,
        dim,
        data,
        present: vec![true; n],
        quality: vec![0.8; n],
    }
}

fn ids(prefix: &str, start: usize, n: usize) -> Vec<String> {
    (start..start + n)
        .map(|i| format!("{prefix}{i:09}"))
        .collect()
}

fn ingest(c: &mut Criterion) {
    const N: usize = 1000;
    let tmp = tempfile::tempdir().unwrap();
    let schema = Schema::new(vec![
        ModalitySpec {
            modality: Modality::Face,
            dim: 512,
        },
        ModalitySpec {
            modality: Modality::Finger(2),
            dim: 256,
        },
        ModalitySpec {
            modality: Modality::Finger(7),
            dim: 256,
        },
    ])
    .unwrap();
    let store = Store::create(tmp.path(), schema).unwrap();
    let template = RecordBatch {
        ids: Vec::new(),
        blocks: vec![
            block(Modality::Face, 512, N, 1),
            block(Modality::Finger(2), 256, N, 2),
            block(Modality::Finger(7), 256, N, 3),
        ],
    };
    let mut next = 0usize;
    let mut fresh = || {
        let mut b = template.clone();
        b.ids = ids("ING", next, N);
        next += N;
        b
    };
    let mut g = c.benchmark_group("store_ingest");
    g.sample_size(10);
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("records_1k_batch_face512_2fingers256", |b| {
        b.iter_batched(
            &mut fresh,
            |batch| store.insert_batch(&batch).unwrap(),
            BatchSize::PerIteration,
        )
    });
    // The same work measured in input bytes (f32 templates: (512 + 2 * 256) * 4 bytes per record).
    g.throughput(Throughput::Bytes((N * (512 + 256 + 256) * 4) as u64));
    g.bench_function("bytes_1k_batch_face512_2fingers256", |b| {
        b.iter_batched(
            &mut fresh,
            |batch| store.insert_batch(&batch).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn reads(c: &mut Criterion) {
    let rows: usize = std::env::var("PACHA_BENCH_STORE_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let tmp = tempfile::tempdir().unwrap();
    let schema = Schema::new(vec![ModalitySpec {
        modality: Modality::Face,
        dim: 512,
    }])
    .unwrap();
    let t = Instant::now();
    {
        let store = Store::create(tmp.path(), schema).unwrap();
        const B: usize = 10_000;
        let mut blk = block(Modality::Face, 512, B, 7);
        for start in (0..rows).step_by(B) {
            let n = B.min(rows - start);
            // Vary the vectors cheaply between batches.
            blk.data[0] = start as f32 + 1.0;
            let mut b = RecordBatch {
                ids: ids("RD", start, n),
                blocks: vec![blk.clone()],
            };
            if n < B {
                let blk = &mut b.blocks[0];
                blk.data.truncate(n * 512);
                blk.present.truncate(n);
                blk.quality.truncate(n);
            }
            store.insert_batch(&b).unwrap();
        }
    }
    eprintln!(
        "store bench: built a {rows}-record face-512 store in {:.1?}",
        t.elapsed()
    );
    let mut g = c.benchmark_group("store_read");
    g.sample_size(10);
    g.bench_function(format!("open_{rows}_records"), |b| {
        b.iter(|| black_box(Store::open(tmp.path()).unwrap().snapshot().rows()))
    });
    let store = Store::open(tmp.path()).unwrap();
    let snap = store.snapshot();
    let mut x = 12345u64;
    let random_rows: Vec<usize> = (0..1 << 20)
        .map(|_| {
            x = mix(x);
            (x % rows as u64) as usize
        })
        .collect();
    let mut i = 0usize;
    g.sample_size(50);
    g.throughput(Throughput::Elements(1));
    g.bench_function(format!("template_random_face512_sum_{rows}_records"), |b| {
        b.iter(|| {
            i = (i + 1) & ((1 << 20) - 1);
            let t = snap.template(Modality::Face, random_rows[i]).unwrap();
            black_box(t.iter().sum::<f32>())
        })
    });
    let probe_ids: Vec<String> = random_rows[..4096]
        .iter()
        .map(|&r| format!("RD{r:09}"))
        .collect();
    let mut j = 0usize;
    g.bench_function(format!("row_of_random_{rows}_records"), |b| {
        b.iter(|| {
            j = (j + 1) & 4095;
            black_box(snap.row_of(&probe_ids[j]).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, ingest, reads);
criterion_main!(benches);
