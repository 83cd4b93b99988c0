#!/usr/bin/env bash
# CI bench gates (issue 18): a quick profile of the criterion suites and a seeded scale-bench run, compared with
# bench/baseline.json by the `gate` binary (bench/src/bin/gate.rs). Exact gates on the scale run's work
# counters, ratio gates on speeds measured in the same run, absolute times recorded only. Prints the comparison
# table, appends one line to bench/history.jsonl, and exits non-zero naming every failed figure.
#
#   bench/ci.sh                     # run the gates (as .ci/run does)
#   bench/ci.sh --update-baseline   # run, then write the run's gated figures to bench/baseline.json
#
# Artefacts: target/ci-bench/ (criterion's output, the scale-bench JSON and logs, figures.json, table.txt).
# Environment: CI_BENCH_OUT (artefact dir), CI_BENCH_NO_HISTORY=1 (do not append to the history).
set -uo pipefail
cd "$(dirname "$0")/.."

update=""
for arg in "$@"; do
  case "$arg" in
    --update-baseline) update="--update-baseline" ;;
    *) echo "bench/ci.sh: unknown argument $arg (only --update-baseline)" >&2; exit 2 ;;
  esac
done

out="${CI_BENCH_OUT:-target/ci-bench}"
rm -rf "$out"
mkdir -p "$out"
# A fresh criterion directory per run: figures can only come from this run, never from a stale earlier one.
# An absolute CI_BENCH_OUT stays absolute (prefixing $PWD put its criterion output inside the checkout).
case "$out" in
  /*) export CRITERION_HOME="$out/criterion" ;;
  *) export CRITERION_HOME="$PWD/$out/criterion" ;;
esac
export CARGO_TERM_COLOR=never
t0=$(date +%s)
failed=()

step() { # step NAME COMMAND...: runs it, logs to $out/NAME.log (and the terminal), records a failure
  local name=$1; shift
  local s; s=$(date +%s)
  echo "-- bench gate step: $name"
  if ! "$@" 2>&1 | tee "$out/$name.log"; then
    echo "-- bench gate step $name FAILED" >&2
    failed+=(--failed "$name")
  fi
  echo "-- $name: $(( $(date +%s) - s )) s"
}

# Build everything first (timed apart from the runs): the same command as .ci/run's "bench compile" stage, so in
# CI it has nothing left to do (`-p pacha-bench` alone could unify features differently and rebuild). It also
# builds the package's binaries (`scale`, `gate`) in the bench profile, into target/release: no second
# (`--release`) build of the workspace.
step build cargo bench --workspace --no-run
t_build=$(date +%s)

# Each run selects its bench with `--workspace --bench NAME`, not `-p pacha-bench`: the build above unified the
# dependencies' features over the whole workspace, and `-p` unifies them over pacha-bench alone, so every step
# recompiled pacha-bench (15–20 s each) instead of running what was built.
quick=(--warm-up-time 0.5 --measurement-time 2 --sample-size 10 --noplot)
step kernels  cargo bench --workspace --bench kernels -- "${quick[@]}" '^(dot_512/f32|dot_512/f32_scalar|stream/sum_1GiB)$'
step ivf      env PACHA_BENCH_IVF_N=10000 cargo bench --workspace --bench ivf -- "${quick[@]}" \
                '^(sketch_filter_512bit/packed|sketch_filter_512bit/packed_portable|ivf_self_join_10000/.*)$'
step exact    cargo bench --workspace --bench exact -- "${quick[@]}" '^exact_4096x512x4096/(faer_gemm_raw|threshold_join)$'
step engine   cargo bench --workspace --bench engine -- "${quick[@]}" '^dedup/'
step store    env PACHA_BENCH_STORE_ROWS=50000 cargo bench --workspace --bench store -- "${quick[@]}" \
                '^store_(ingest/records_|read/open_|read/template_random)'

# Seeded scale run: the default flow (auto mode, complete cuts, audit), 100 k face-only enrolments generated
# straight into a temporary store; its JSON line goes to a file, progress to the log. The candidate path is fixed
# to the brute-force sketch join: the planner costs the exact i8 join per SIMD kernel (VNNI 2.3 ns, AVX2 6.1 ns
# per product), so at this run's candidate cosine it picks exact-i8 on an AVX-512 VNNI machine and the sketch
# join on an AVX2 one, and the gate's exact work counters would then depend on the machine. The planner's
# choice itself is covered by tests (completeness.rs).
scale_run() {
  target/release/scale --records 100000 --direct --seed 42 --exact-sample 2000 --force-path brute \
    >"$out/scale-face100k.json"
}
step scale scale_run

history=()
[ -n "${CI_BENCH_NO_HISTORY:-}" ] && history=(--no-history)
t_runs=$(date +%s)
echo "-- bench gates: build $(( t_build - t0 )) s, runs $(( t_runs - t_build )) s"
target/release/gate --criterion "$CRITERION_HOME" --scale "face100k=$out/scale-face100k.json" \
  --out "$out" "${failed[@]}" "${history[@]}" $update
rc=$?
echo "-- bench gates: $(( $(date +%s) - t0 )) s in all (exit $rc)"
exit $rc
