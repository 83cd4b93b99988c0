"""Python API vs CLI on the same data: ingest rate (numpy arrays vs the CLI's .npy ingest) and dedup time on
the same store. Prints one JSON line per measurement and a summary.

    python python/benches/compare_cli.py --pacha target/release/pacha --records 100000 --work /tmp/cmp

Runs alternate (CLI, Python, CLI, Python, ...) so that load from other processes hits both alike.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import pacha


def cli(pacha_bin: str, *args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([pacha_bin, "--quiet", *args], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pacha", required=True, help="the CLI binary (a release build)")
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--face-dim", type=int, default=512)
    ap.add_argument("--work", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    pop = work / "pop"
    if not (pop / "face.npy").exists():
        # Face only (the CLI's `generate` always adds fingers when none are named): the generator's own code.
        pacha.generate(pop, a.records, seed=42, face_dim=a.face_dim, fingers={})
    ids = np.loadtxt(pop / "subjects.csv", delimiter=",", skiprows=1, usecols=0, dtype=str)
    face = np.load(pop / "face.npy")
    n = len(ids)
    out = {"records": n, "face_dim": a.face_dim, "ingest_cli": [], "ingest_py": [], "dedup_cli": [], "dedup_py": [],
           "dedup_cli_engine": [], "dedup_py_engine": []}
    # Ingest: the CLI reads face.npy + subjects.csv; Python gets the arrays already in memory.
    for r in range(a.repeats):
        for which in ("cli", "py"):
            d = work / f"ingest_{which}"
            shutil.rmtree(d, ignore_errors=True)
            if which == "cli":
                secs = cli(a.pacha, "ingest", "--store", str(d), "--face", str(pop / "face.npy"),
                           "--subjects", str(pop / "subjects.csv"))
            else:
                t0 = time.perf_counter()
                with pacha.Store.create(d, face_dim=a.face_dim) as s:
                    s.ingest(ids, face=face)
                secs = time.perf_counter() - t0
            out[f"ingest_{which}"].append(n / secs)
            print(json.dumps({"ingest": which, "repeat": r, "seconds": secs, "records_per_s": n / secs}), flush=True)
    # Dedup on one store (built by the CLI: index + calibration), read-only from both.
    store = work / "ingest_cli"
    cli(a.pacha, "index", "--store", str(store))
    cli(a.pacha, "calibrate", "--store", str(store))
    ro = pacha.Store.open(store, read_only=True)
    for r in range(a.repeats):
        for which in ("cli", "py"):
            if which == "cli":
                run_dir = work / "run_cli"
                shutil.rmtree(run_dir, ignore_errors=True)
                secs = cli(a.pacha, "dedup", "--store", str(store), "--out", str(run_dir))
                eng = json.loads((run_dir / "summary.json").read_text())["summary"]["total_seconds"]
            else:
                t0 = time.perf_counter()
                res = ro.dedup()
                secs = time.perf_counter() - t0
                eng = res.summary["total_seconds"]
                hits = res.hit_count
            out[f"dedup_{which}"].append(secs)
            out[f"dedup_{which}_engine"].append(eng)
            print(json.dumps({"dedup": which, "repeat": r, "seconds": secs, "engine_seconds": eng}), flush=True)
    cli_hits = json.loads((work / "run_cli" / "summary.json").read_text())["summary"]["hits"]
    summary = {
        "records": n,
        "ingest_cli_median_rps": statistics.median(out["ingest_cli"]),
        "ingest_py_median_rps": statistics.median(out["ingest_py"]),
        "dedup_cli_median_s": statistics.median(out["dedup_cli"]),
        "dedup_py_median_s": statistics.median(out["dedup_py"]),
        "dedup_py_over_cli": statistics.median(out["dedup_py"]) / statistics.median(out["dedup_cli"]),
        "hits_cli": cli_hits,
        "hits_py": hits,
        "all": out,
    }
    print(json.dumps(summary), flush=True)
    sys.exit(0 if cli_hits == hits else 1)


if __name__ == "__main__":
    main()
