"""identify, verify, delete, read-only opens and locks, the completeness exception, progress reporting."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

import pacha
from conftest import Population, run_cli


@pytest.fixture()
def store(small_pop: Population, tmp_path: Path) -> Path:
    path = tmp_path / "reg"
    with pacha.Store.create(path, **small_pop.schema()) as s:
        s.ingest(small_pop.ids, **small_pop.ingest_kwargs())
        s.calibrate(truth=small_pop.truth)
    return path


def test_identify_returns_the_enrolled_subject_and_equals_cli(store: Path, small_pop: Population, pacha_bin: str, tmp_path: Path) -> None:
    rows = [0, 5, 77, 1234]
    face = small_pop.face[rows]
    f2 = small_pop.fingers[2][rows]
    with pacha.Store.open(store, read_only=True) as s:
        r = s.identify(face=face, finger={2: f2}, max_results=5)
        single = s.identify(face=small_pop.face[5])  # a 1-D array is one probe
    assert len(r) == 4 and r.proven
    lat = r.latency
    assert lat["probes"] == 4 and single.latency["probes"] == 1
    assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert lat["first_ms"] <= lat["max_ms"]
    for k, row in enumerate(rows):
        c = r[k]
        assert c["subject_id"][0] == small_pop.ids[row]
        assert c["score"][0] >= r.threshold
        assert np.all(np.diff(c["score"]) <= 0)
        assert c["score"].dtype == np.float64 and c["face_cosine"].dtype == np.float32
        assert np.isnan(c["finger7_cosine"]).all()  # the probe has no finger 7
    assert single[0]["subject_id"][0] == small_pop.ids[5]
    flat = r.columns()
    assert len(flat["probe"]) == sum(len(c["subject_id"]) for c in r.candidates)
    assert r.audit is not None and r.audit["probes"] == 4
    # The CLI on the same probes and store.
    np.save(tmp_path / "pf.npy", face)
    np.save(tmp_path / "p2.npy", f2)
    cli = run_cli(pacha_bin, "identify", "--store", str(store), "--face", str(tmp_path / "pf.npy"),
                  "--finger", f"2={tmp_path / 'p2.npy'}", "--max-results", "5")
    for k, p in enumerate(cli["probes"]):
        cands = p["result"]["candidates"]
        assert [c["subject_id"] for c in cands] == list(r[k]["subject_id"])
        assert [c["comparison"]["fused"]["score"] for c in cands] == list(r[k]["score"])
    # One joint scan of the batch answers as the per-probe search does; it shows in the latency.
    with pacha.Store.open(store, read_only=True) as s:
        joint = s.identify(face=face, finger={2: f2}, max_results=5, batch_scan="joint")
        one = s.identify(face=face, finger={2: f2}, max_results=5, batch_scan="per-probe")
        with pytest.raises(ValueError, match="batch_scan"):
            s.identify(face=face, batch_scan="sometimes")
        # The second scan prepares the stored rows and the Store keeps them: the third reuses every row.
        later = [s.identify(face=face, finger={2: f2}, max_results=5, batch_scan="joint") for _ in range(2)]
        rows = s.info()["rows"]
    assert [list(c["subject_id"]) for c in joint.candidates] == [list(c["subject_id"]) for c in one.candidates]
    assert joint.latency["joint_scans"][0]["probes"] == 4 and not one.latency["joint_scans"]
    assert joint.latency["joint_scans"][0]["reused_rows"] == 0
    assert later[0].latency["joint_scans"][0]["reused_rows"] == 0
    assert later[1].latency["joint_scans"][0]["reused_rows"] == rows
    assert [list(c["subject_id"]) for c in later[1].candidates] == [list(c["subject_id"]) for c in one.candidates]
    assert joint.proven
    # A gallery restricts the search.
    with pacha.Store.open(store, read_only=True) as s:
        g = s.identify(face=face[:1], gallery=[small_pop.ids[1], small_pop.ids[2]], min_score=-1e9)
        assert set(g[0]["subject_id"]) <= {small_pop.ids[1], small_pop.ids[2]}
        with pytest.raises(ValueError, match="probe 0: face template contains NaN"):
            s.identify(face=np.full((1, 64), np.nan, np.float32))
        with pytest.raises(ValueError, match="not enrolled"):
            s.identify(face=face[:1], gallery=["nobody"])


def test_verify_equals_cli(store: Path, small_pop: Population, pacha_bin: str) -> None:
    a, b = pacha.read_truth(small_pop.truth)[0]
    with pacha.Store.open(store, read_only=True) as s:
        v = s.verify(a, b)
        other = s.verify(small_pop.ids[0], small_pop.ids[1])
        with pytest.raises(ValueError, match='subject "nobody" is not enrolled'):
            s.verify(a, "nobody")
    cli = run_cli(pacha_bin, "verify", "--store", str(store), a, b)["result"]
    assert v["score"] == cli["comparison"]["fused"]["score"] and v["is_match"] == cli["is_match"]
    assert v["threshold"] == 50.0
    assert other["score"] < v["score"]


def test_delete_is_all_or_nothing(store: Path, small_pop: Population) -> None:
    victim, keep = small_pop.ids[5], small_pop.ids[6]
    with pacha.Store.open(store) as s:
        n = len(s)
        with pytest.raises(ValueError, match='"nobody" is not enrolled'):
            s.delete([victim, "nobody"])
        assert len(s) == n
        assert s.delete(victim) == 1
        assert len(s) == n - 1 and s.rows == n
        assert s.deleted()[5] and not s.deleted()[6]
        r = s.identify(face=small_pop.face[5:7], max_results=3, min_score=-1e9)
        assert victim not in list(r[0]["subject_id"])
        assert r[1]["subject_id"][0] == keep
        with pytest.raises(ValueError, match="not enrolled"):
            s.verify(victim, keep)


def test_read_only_and_writer_lock(store: Path, small_pop: Population, pacha_bin: str) -> None:
    ro = pacha.Store.open(store, read_only=True)
    assert ro.read_only
    with pytest.raises(PermissionError, match=r"open read-only: reopen it for writing to ingest"):
        ro.ingest(["new"], face=small_pop.face[:1])
    with pytest.raises(PermissionError, match="read-only"):
        ro.build_index()
    with pytest.raises(PermissionError, match="read-only"):
        ro.delete(small_pop.ids[0])
    w = pacha.Store.open(store)
    # A second writer (here a CLI writer) is refused while this one holds the lock; readers are not.
    r = subprocess.run([pacha_bin, "delete", "--store", str(store), small_pop.ids[0]], capture_output=True, text=True)
    assert r.returncode == 2 and "locked by another writer" in r.stderr
    with pytest.raises(BlockingIOError, match="locked by another writer"):
        pacha.Store.open(store)
    assert len(ro.dedup()) > 0
    w.close()
    assert w.closed
    with pytest.raises(ValueError, match="is closed"):
        len(w)
    with pacha.Store.open(store) as again:  # the lock went with close()
        assert not again.read_only
    ro.close()
    info = pacha.check(store)
    assert info["ok"] and info["problems"] == []


def test_incomplete_audit_raises_completeness_error_like_cli_exit_3(index_pop: Population, pacha_bin: str, tmp_path: Path) -> None:
    store = tmp_path / "reg"
    with pacha.Store.create(store, **index_pop.schema()) as s:
        s.ingest(index_pop.ids, **index_pop.ingest_kwargs())
        s.build_index()
        s.calibrate()
    # min_recall 1.0 cannot be proven by a finite sample on a sampled candidate path (the brute-force sketch
    # join's drop bound is probabilistic): the CLI exits 3, Python raises. The path is forced because the
    # planner may pick an exact path (complete by construction, provable at 1.0) on machines with a fast i8 kernel.
    r = subprocess.run([pacha_bin, "dedup", "--store", str(store), "--out", str(tmp_path / "cli"), "--mode", "index",
                        "--min-recall", "1", "--force-path", "brute"], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    with pacha.Store.open(store, read_only=True) as s:
        with pytest.raises(pacha.CompletenessError, match="completeness not proven") as ei:
            s.dedup(mode="index", min_recall=1.0, force_path="brute")
        run = ei.value.result
        assert isinstance(run, pacha.DedupResult) and not run.proven
        assert run.audit is not None and not run.audit["passed"]
        assert isinstance(ei.value, pacha.PachaError)
        lax = s.dedup(mode="index", min_recall=1.0, strict=False, force_path="brute")
        assert not lax.proven and len(lax) == len(run)
        ok = s.dedup(mode="index")
        assert ok.proven
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())["summary"]["audit"]
    assert cli["passed"] is False and cli["lower_bound"] == run.audit["lower_bound"]
    # An identify batch that cannot prove its --min-recall: CLI exit 3, Python raises. Searched one by one
    # (auto would take the joint scan, complete by construction, for so few probes on a fresh store), each
    # probe's path is picked by a fixed per-query cost model (deterministic on this seeded store): here the
    # sketch scan, whose lower bound is 1 minus the binomial drop bound (about 1 - 2e-6), so a min_recall of
    # 1 cannot be proven.
    np.save(tmp_path / "p.npy", index_pop.face[:3])
    r = subprocess.run([pacha_bin, "identify", "--store", str(store), "--face", str(tmp_path / "p.npy"),
                        "--min-recall", "1", "--batch-scan", "per-probe"], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    with pacha.Store.open(store, read_only=True) as s:
        with pytest.raises(pacha.CompletenessError) as ei:
            s.identify(face=index_pop.face[:3], min_recall=1.0, batch_scan="per-probe")
        ans = ei.value.result
        assert isinstance(ans, pacha.IdentifyResult) and not ans.proven
        assert [c["subject_id"][0] for c in ans.candidates] == index_pop.ids[:3]
        # At the default 0.999 the same batch is proven (the sketch scan's bound), in both front ends.
        assert s.identify(face=index_pop.face[:3], batch_scan="per-probe").proven
        lax = s.identify(face=index_pop.face[:3], strict=False, min_recall=1.0, batch_scan="per-probe")
        assert not lax.proven and lax.audit["lower_bound"] == ans.audit["lower_bound"]
        # The joint scan of the same batch is complete by construction: proven even at min_recall 1.
        joint = s.identify(face=index_pop.face[:3], min_recall=1.0, batch_scan="joint")
        assert joint.proven and joint.latency["joint_scans"]
        assert [c["subject_id"][0] for c in joint.candidates] == index_pop.ids[:3]


def test_progress_callback_and_tqdm(small_pop: Population, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    seen = []
    with pacha.Store.create(tmp_path / "reg", **small_pop.schema()) as s:
        s.ingest(small_pop.ids, **small_pop.ingest_kwargs(), batch_size=500,
                 progress=lambda stage, done, total: seen.append((stage, done, total)))
        assert {st for st, _, _ in seen} <= {"validate", "ingest"}
        assert ("ingest", 3000, 3000) in seen  # the last report always arrives
        s.build_index(progress=True)  # tqdm is installed in the test venv: bars on stderr
        s.dedup(mode="exact", progress=False)
    err = capsys.readouterr().err
    assert "index" in err


def test_calibrate_draws_the_tail_pool_by_hubness_or_uniformly(store: Path, small_pop: Population) -> None:
    with pacha.Store.open(store) as s:
        # 2 000 of the 3 000 rows: the hub-stratified pool weighs its pairs, the uniform one does not.
        hubs = s.calibrate(truth=small_pop.truth, tail_rows=2000, tail_rows_max=2000)
        assert {c["pool_kind"] for c in hubs["tail_checks"]} == {"Hubs"}
        for c in hubs["tail_checks"]:
            for row in c["model"]:
                if row["measured"] is not None:
                    assert row["design_effect"] >= 1.0
                    lo, hi = row["ci"]
                    assert lo <= row["measured"] <= hi
        uniform = s.calibrate(truth=small_pop.truth, tail_rows=2000, tail_pool="uniform", tail_rows_max=0)
        assert {c["pool_kind"] for c in uniform["tail_checks"]} == {"Uniform"}
        with pytest.raises(ValueError, match="tail_pool"):
            s.calibrate(truth=small_pop.truth, tail_pool="everything")


def test_a_tail_pool_grows_and_the_notes_say_what_it_could_not_pin(store: Path, small_pop: Population) -> None:
    with pacha.Store.open(store) as s:
        live = s.info()["live"]
        # 500 rows hold too few exceedances for a tail fit: each modality's pool doubles to the bound, where
        # the fit holds but its count cannot reach the FMR a dedup of these rows decides at (1e-3 / live).
        cal = s.calibrate(truth=small_pop.truth, tail_rows=500, tail_rows_max=1000)
        assert cal["decision_fmr"] == pytest.approx(1e-3 / live)
        assert len(cal["tail_checks"]) == 3
        for c in cal["tail_checks"]:
            assert c["pool_cap"] == 1000
            assert f"{c['modality']}: tail pool grown from 500 to 1000 rows: calibration failed" in cal["source"]
        assert len(cal["resolution_notes"]) == 3, cal["resolution_notes"]
        for n in cal["resolution_notes"]:
            assert n.endswith("a pool larger than its 1000 rows (tail_rows_max, --tail-rows-max) narrows it"), n
        # A bound past the store: the labelled pools grow to every row, and the notes say no pool can narrow it.
        cal = s.calibrate(truth=small_pop.truth, tail_rows=1000, tail_rows_max=100_000)
        for c in cal["tail_checks"]:
            assert f"{c['modality']}: tail pool grown from 2000 to 4000 rows" in cal["source"]
        assert all(n.endswith("no pool can narrow it") for n in cal["resolution_notes"]), cal["resolution_notes"]
        # Without labels a fitted tail stops at 1e-6 whatever the pool: it does not grow, and the notes say why.
        cal = s.calibrate(tail_rows=1000, tail_rows_max=100_000)
        assert "tail pool grown" not in cal["source"]
        assert all(c["pool_cap"] == 1000 for c in cal["tail_checks"])
        assert len(cal["resolution_notes"]) == 3
        assert all("--truth counts deeper" in n for n in cal["resolution_notes"]), cal["resolution_notes"]
