"""Identify latency of a long-lived Store (the library's use): batches of several sizes answered one after
another by the same open store, so that the joint scan's prepared stored rows (kept from a member set's second
scan on) are reused. Prints, per batch, its wall time, p50 per probe and each joint scan's probes, seconds and
`reused_rows`.

Probes: `bench/identify_probes.py` run beside a `pacha generate` population (p_face.npy, p_finger2.npy,
p_finger7.npy); only probes holding all three templates are used.

    python identify_batches.py STORE PROBE_DIR
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


if __name__ == "__main__":
    main()
