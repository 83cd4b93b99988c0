#!/usr/bin/env bash
# Every test population at N rows (default 100 000), one after another: generate, ingest, index, calibrate,
# dedup with the contract's defaults; one scale-bench JSON line per population in OUT (default ./pop-runs).
# Read "index + dedup", the plan, the audit and planted recall off each JSON (BENCHMARKS.md, seventh session).
# usage: bench/populations.sh [N] [OUT]   (needs target/release/scale: cargo build --release -p pacha-bench --bin scale)
set -euo pipefail
n=${1:-100000}; out=${2:-pop-runs}
mkdir -p "$out"
for p in isotropic-mates structured heavy-tail skewed-clusters power-law lookalike-families fingers-only; do
  echo "== $p $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  target/release/scale --records "$n" --preset "$p" --direct --exact-sample 0 > "$out/$p.json" 2> "$out/$p.err"
done
