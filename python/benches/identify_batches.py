"""Identify latency of a long-lived Store (the library's use): batches of several sizes answered one after
another by the same open store, so that the joint scan's prepared stored rows (kept from a member set's second
scan on) are reused. Prints, per batch, its wall time, p50 per probe and each joint scan's probes, seconds and
`reused_rows`.

Probes: `bench/identify_probes.py` run beside a `pacha generate` population (p_face.npy, p_finger2.npy,
p_finger7.npy); only probes holding all three templates are used.

    python identify_batches.py STORE PROBE_DIR            # batches of 10, 1 and 100 probes
    python identify_batches.py STORE PROBE_DIR lone-face N  # N lone face-only probes, one after another
"""
import sys
import time

import numpy as np

import pacha


def main() -> None:
    store, d = sys.argv[1], sys.argv[2]
    face, f2, f7 = (np.load(f"{d}/p_{n}.npy") for n in ("face", "finger2", "finger7"))
    full = np.flatnonzero((np.abs(face).sum(1) > 0) & (np.abs(f2).sum(1) > 0) & (np.abs(f7).sum(1) > 0))
    s = pacha.Store.open(store, read_only=True)
    if len(sys.argv) > 4 and sys.argv[3] == "lone-face":
        lone_face(s, face, int(sys.argv[4]))
        return
    plan = [(10, "joint", 4), (1, "joint", 4), (1, "per-probe", 3), (100, "joint", 3), (10, "auto", 2), (1, "auto", 2)]
    for n, scan, reps in plan:
        for k in range(reps):
            rows = full[k * n:(k + 1) * n] if n < 100 else full[100 + k * n:100 + (k + 1) * n]
            t = time.perf_counter()
            r = s.identify(face=face[rows], finger={2: f2[rows], 7: f7[rows]}, audit_probes=0, batch_scan=scan)
            wall = time.perf_counter() - t
            scans = [(j["probes"], round(j["seconds"], 3), j["reused_rows"]) for j in r.latency["joint_scans"]]
            print(f"{n:4d} {scan:9s} #{k} wall {wall:.3f} s  p50 {r.latency['p50_ms']:.2f} ms  scans {scans}",
                  flush=True)


def lone_face(s: "pacha.Store", face: np.ndarray, n: int) -> None:
    """Lone face-only probes one after another: which search answers each (joint scan or one by one) and
    its wall time (Python call included), printed where the choice changes and every 40 probes."""
    rows = np.flatnonzero(np.abs(face).sum(1) > 0)[:n]
    t0, prev = time.perf_counter(), None
    for k, r in enumerate(rows):
        t = time.perf_counter()
        res = s.identify(face=face[r], audit_probes=0)
        ms = (time.perf_counter() - t) * 1e3
        js = res.latency["joint_scans"]
        kind = "joint" if js else "one-by-one"
        if kind != prev or k < 3 or k % 40 == 0:
            print(f"probe {k:4d} {kind:10s} {ms:8.1f} ms  reused rows {js[0]['reused_rows'] if js else '-'}",
                  flush=True)
        prev = kind
    print(f"{len(rows)} probes in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
