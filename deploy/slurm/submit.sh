#!/usr/bin/env bash
# Submits a tiled pacha dedup to Slurm: an array of N tile tasks and a merge job that runs after all of them
# succeeded. Prints "ARRAY_JOB_ID MERGE_JOB_ID".
#
#   deploy/slurm/submit.sh STORE RUN_DIR N [pacha dedup flags...]
#
# STORE must be readable at the same path on every node; RUN_DIR must be on a filesystem every node and
# the merge job share. Tiles land in RUN_DIR/tiles/I, the merged run in RUN_DIR/merged. Extra sbatch
# options (partition, account, time limit) go in SBATCH_* environment variables, e.g.
# SBATCH_PARTITION=batch SBATCH_TIMELIMIT=2:00:00; PACHA_CPUS sets each tile's CPUs (default 1).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 STORE RUN_DIR N [pacha dedup flags...]" >&2
  exit 2
fi
store=$(realpath "$1"); run=$(realpath -m "$2"); n=$3; shift 3
case "$n" in ''|*[!0-9]*) echo "N must be a positive integer, not '$n'" >&2; exit 2 ;; esac
[ "$n" -ge 1 ] || { echo "N must be at least 1" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
pacha=${PACHA:-$(command -v pacha || true)}
[ -x "$pacha" ] || { echo "set PACHA to the pacha binary (not found on PATH)" >&2; exit 2; }
mkdir -p "$run/tiles" "$run/logs"
export PACHA="$pacha" PACHA_STORE="$store" PACHA_RUN="$run" PACHA_TILES="$n" PACHA_DEDUP_ARGS="$*"
array=$(sbatch --parsable --array="0-$((n - 1))" --cpus-per-task="${PACHA_CPUS:-1}" --chdir="$run/logs" \
  --export=ALL "$here/tiles.sbatch")
array=${array%%;*}
merge=$(sbatch --parsable --dependency="afterok:$array" --kill-on-invalid-dep=yes --chdir="$run/logs" \
  --export=ALL "$here/merge.sbatch")
merge=${merge%%;*}
echo "$array $merge"
