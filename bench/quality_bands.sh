#!/bin/bash
# Calibrates STORE (ingested from POP and indexed first if missing) with --quality-bands 3 and 0, runs a dedup
# and an eval of each: the figures of BENCHMARKS.md "Quality bands". Needs a release pacha (PACHA=path).
# usage: bench/quality_bands.sh POP STORE [face-only]   (face-only: POP must hold a face for every row)
set -e
B=${PACHA:-target/release/pacha}; P=$1; S=$2
if [ ! -d $S ]; then
  if [ "$3" = face-only ]; then
    $B ingest --store $S --face $P/face.npy --subjects $P/subjects.csv -q
  else
    $B ingest --store $S --face $P/face.npy --finger 2=$P/finger2.npy --finger 7=$P/finger7.npy --subjects $P/subjects.csv -q
  fi
  $B index --store $S -q
fi
for qb in 3 0; do
  /usr/bin/time -f "%e s" $B calibrate --store $S --quality-bands $qb --json > $S.cal-$qb.json 2> $S.cal-$qb.err
  rm -rf $S.run-$qb
  /usr/bin/time -f "%e s" $B dedup --store $S --out $S.run-$qb --json > $S.dedup-$qb.json 2> $S.dedup-$qb.err
  $B eval --store $S --run $S.run-$qb --truth $P/truth.csv --json > $S.eval-$qb.json 2> $S.eval-$qb.err
  echo "qb=$qb done $(date +%T)"
done
