#!/usr/bin/env bash
# Runs every fuzz target for SECONDS seconds each (default 60) with AFL++ (cargo-afl), one after another,
# from the committed seed corpora in corpus/<target>/, and prints execs, paths, crashes and hangs per target.
# Exits 1 if any target found a crash (its inputs are in out/<target>/default/crashes/).
# Usage: fuzz/run.sh [SECONDS] [TARGET...]   (FUZZ_READERS_ONLY=1: npy, fvecs, subjects, built without the engine)
# Needs cargo-afl: `cargo install cargo-afl --locked` (builds AFL++ from the crate; no system packages).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
shift || true
targets=("$@")
features=()
if [ "${FUZZ_READERS_ONLY:-0}" = 1 ]; then
  # The reader targets alone, built without the engine (CI's short run: a much smaller instrumented build).
  features=(--no-default-features)
  [ ${#targets[@]} -eq 0 ] && targets=(npy fvecs subjects)
fi
if [ ${#targets[@]} -eq 0 ]; then
  targets=(npy fvecs subjects ivf store derived tiles hnsw)
fi
cargo afl build --release --quiet "${features[@]}"
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_QUIET=1 AFL_NO_AFFINITY=1
# The targets print nothing on success; keep AFL's own log per target.
mkdir -p out
failed=0
printf '%-9s %8s %12s %9s %8s %7s %6s\n' target seconds execs execs/s corpus crashes hangs
for t in "${targets[@]}"; do
  rm -rf "out/$t"
  cargo afl fuzz -i "corpus/$t" -o "out/$t" -V "$secs" -t 2000 "target/release/$t" >"out/$t.log" 2>&1 || {
    echo "afl-fuzz failed on $t; its log:"; tail -30 "out/$t.log"; failed=1; continue; }
  s="out/$t/default/fuzzer_stats"
  get() { awk -F: -v k="$1" '{gsub(/ /,"",$1); gsub(/ /,"",$2)} $1==k {print $2}' "$s"; }
  crashes=$(get saved_crashes); hangs=$(get saved_hangs)
  printf '%-9s %8s %12s %9s %8s %7s %6s\n' "$t" "$(get run_time)" "$(get execs_done)" "$(get execs_per_sec)" \
    "$(get corpus_count)" "$crashes" "$hangs"
  if [ "${crashes:-0}" != 0 ]; then
    failed=1
    echo "  crash inputs: out/$t/default/crashes/"
  fi
done
exit $failed
