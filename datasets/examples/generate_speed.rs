//! Measure generator throughput: `cargo run --release -p pacha-datasets --example generate_speed -- [records] [out_dir]`.
//! Without `out_dir` only generates (in batches of 4096); with it, runs `write_population` there.

#![allow(clippy::print_stdout, clippy::unwrap_used)] // a measuring tool: prints its figures

use pacha_datasets::{Generator, PopulationConfig, write_population};
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let records: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let cfg = PopulationConfig {
        records,
        ..PopulationConfig::default()
    };
    let threads = rayon::current_num_threads();
    match args.next() {
        None => {
            let g = Generator::new(cfg).unwrap();
            let t = Instant::now();
            let mut n = 0usize;
            for b in g.batches(4096) {
                n += b.records.len();
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                "generate only: {n} records in {s:.2} s = {:.0} records/s ({threads} threads)",
                n as f64 / s
            );
        }
        Some(dir) => {
            let summary = write_population(&cfg, &dir, &mut |_, _| {}).unwrap();
            println!(
                "write_population: {records} records in {:.2} s = {:.0} records/s ({threads} threads)",
                summary.elapsed_secs, summary.records_per_sec
            );
            for s in &summary.manifest.stats {
                println!(
                    "{:8} genuine n={} mean={:.3} sd={:.3} p01={:.3} | impostor n={} mean={:.4} sd={:.4} p99={:.3}",
                    s.modality,
                    s.genuine.count,
                    s.genuine.mean,
                    s.genuine.sd,
                    s.genuine.p01,
                    s.impostor.count,
                    s.impostor.mean,
                    s.impostor.sd,
                    s.impostor.p99
                );
            }
        }
    }
}
