"""Round trips: numpy → store → dedup, compared with the CLI on the same data and on the same store."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

import pacha
from conftest import Population, run_cli


def same_content(a: pacha.Store, b: pacha.Store) -> None:
    """Two stores hold the same subjects, templates, qualities and tombstones, row by row."""
    assert a.schema == b.schema
    assert a.rows == b.rows and len(a) == len(b)
    assert list(a.subject_ids()) == list(b.subject_ids())
    assert np.array_equal(a.deleted(), b.deleted())
    for key in a.schema:
        ta, qa = a.templates(key)
        tb, qb = b.templates(key)
        assert np.array_equal(ta, tb), key
        assert np.array_equal(qa, qb), key


def test_python_ingest_equals_cli_ingest(small_pop: Population, pacha_bin: str, tmp_path: Path) -> None:
    run_cli(pacha_bin, "ingest", "--store", str(tmp_path / "cli"), *small_pop.cli_files())
    with pacha.Store.create(tmp_path / "py", **small_pop.schema()) as s:
        report = s.ingest(small_pop.ids, **small_pop.ingest_kwargs())
        assert report["records"] == 3000 and report["inserted"] == 3000 and report["unchanged"] == 0
        # Idempotent re-ingest, as the CLI's.
        again = s.ingest(small_pop.ids, **small_pop.ingest_kwargs())
        assert again["inserted"] == 0 and again["unchanged"] == 3000
    with pacha.Store.open(tmp_path / "cli", read_only=True) as c, pacha.Store.open(tmp_path / "py", read_only=True) as p:
        same_content(c, p)
        # Absent templates stay absent (the generator leaves some captures missing).
        _, q = p.templates("finger7")
        assert (q < 0).sum() == (~small_pop.present["finger7"]).sum() > 0


def read_hits_csv(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_dedup_equals_cli_on_same_store(small_pop: Population, pacha_bin: str, tmp_path: Path) -> None:
    store = tmp_path / "reg"
    with pacha.Store.create(store, **small_pop.schema()) as s:
        s.ingest(small_pop.ids, **small_pop.ingest_kwargs())
        s.build_index()
        cal = s.calibrate(truth=small_pop.truth)
        assert cal["source"].startswith("fitted")
    # The CLI reads the store the Python API wrote, and vice versa below.
    run_cli(pacha_bin, "dedup", "--store", str(store), "--out", str(tmp_path / "cli_run"))
    with pacha.Store.open(store, read_only=True) as s:
        run = s.dedup(target_fpir=1e-3)
        run.write(tmp_path / "py_run")
    assert run.proven and run.hit_count > 0
    cli_csv = (tmp_path / "cli_run" / "hits.csv").read_bytes()
    assert (tmp_path / "py_run" / "hits.csv").read_bytes() == cli_csv
    assert (tmp_path / "py_run" / "clusters.csv").read_bytes() == (tmp_path / "cli_run" / "clusters.csv").read_bytes()
    # The numpy columns say what hits.csv says.
    rows = read_hits_csv(tmp_path / "cli_run" / "hits.csv")
    h = run.hits
    assert len(rows) == len(run) == len(h["score"])
    assert [r["subject_a"] for r in rows] == list(h["subject_a"])
    assert [r["subject_b"] for r in rows] == list(h["subject_b"])
    assert [r["score"] for r in rows] == [f"{x:.3f}" for x in h["score"]]
    assert [r["is_hit"] == "true" for r in rows] == list(h["is_hit"])
    for key in ("face", "finger2", "finger7"):
        py = ["" if np.isnan(c) else f"{c:.5f}" for c in h[f"{key}_cosine"]]
        assert [r[f"{key}_cosine"] for r in rows] == py
    assert h["row_a"].dtype == np.uint32 and h["score"].dtype == np.float64
    ids = s_ids = list(small_pop.ids)
    assert all(s_ids[ra] == a for ra, a in zip(h["row_a"], h["subject_a"]))
    assert ids
    # The summary is the CLI's summary.json object, audit included (exact mode: none, complete by construction).
    import json

    cli_summary = json.loads((tmp_path / "cli_run" / "summary.json").read_text())["summary"]
    for k in ("records", "hits", "clusters", "threshold", "mode", "candidate_pairs", "reported_pairs"):
        assert run.summary[k] == cli_summary[k], k
    assert run.summary["mode"].lower() == "exact" and run.audit is None
    # Clusters: union of the hits.
    c = run.clusters
    assert c["cluster"].dtype == np.int64 and len(c["subject_id"]) == len(c["cluster"])
    assert int(c["cluster"].max()) + 1 == run.summary["clusters"]


def test_index_mode_dedup_equals_cli_with_audit(index_pop: Population, pacha_bin: str, tmp_path: Path) -> None:
    store = tmp_path / "reg"
    run_cli(pacha_bin, "ingest", "--store", str(store), *index_pop.cli_files())
    run_cli(pacha_bin, "index", "--store", str(store))
    run_cli(pacha_bin, "calibrate", "--store", str(store))
    run_cli(pacha_bin, "dedup", "--store", str(store), "--out", str(tmp_path / "cli_run"))
    with pacha.Store.open(store, read_only=True) as s:
        run = s.dedup()
        run.write(tmp_path / "py_run")
    assert run.summary["mode"].lower() != "exact"
    audit = run.audit
    assert audit is not None and audit["passed"] and run.proven
    assert (tmp_path / "py_run" / "hits.csv").read_bytes() == (tmp_path / "cli_run" / "hits.csv").read_bytes()
    import json

    cli = json.loads((tmp_path / "cli_run" / "summary.json").read_text())["summary"]
    assert run.summary["audit"]["contract"] == cli["audit"]["contract"]
    assert run.summary["audit"]["lower_bound"] == cli["audit"]["lower_bound"]


def test_from_row_batches_equal_cli(small_pop: Population, pacha_bin: str, tmp_path: Path) -> None:
    store = tmp_path / "reg"
    kw = small_pop.ingest_kwargs()
    first = 2000

    def part(sl: slice):
        return dict(
            face=kw["face"][sl],
            finger={p: a[sl] for p, a in kw["finger"].items()},
            present={k: v[sl] for k, v in kw["present"].items()},
            quality={k: v[sl] for k, v in kw["quality"].items()},
        )

    with pacha.Store.create(store, **small_pop.schema()) as s:
        s.ingest(small_pop.ids[:first], **part(slice(0, first)))
        s.build_index()
        s.calibrate()
        # The daily batch arrives after the index and calibration.
        r = s.ingest(small_pop.ids[first:], **part(slice(first, None)))
        assert r["inserted"] == 1000
        batch = s.dedup(from_row=first)
        whole = s.dedup()
    h = batch.hits
    assert len(batch) > 0
    assert np.all(np.maximum(h["row_a"], h["row_b"]) >= first)
    # Exactly the whole run's pairs that touch the batch.
    hw = whole.hits
    touching = {(a, b) for a, b, ra, rb in zip(hw["subject_a"], hw["subject_b"], hw["row_a"], hw["row_b"]) if max(ra, rb) >= first}
    assert set(zip(h["subject_a"], h["subject_b"])) == touching
    run_cli(pacha_bin, "dedup", "--store", str(store), "--out", str(tmp_path / "cli_batch"), "--from-row", str(first))
    batch.write(tmp_path / "py_batch")
    assert (tmp_path / "py_batch" / "hits.csv").read_bytes() == (tmp_path / "cli_batch" / "hits.csv").read_bytes()


def test_evaluation_on_generated_population(small_pop: Population, pacha_bin: str, tmp_path: Path) -> None:
    store = tmp_path / "reg"
    with pacha.Store.create(store, **small_pop.schema()) as s:
        s.ingest(small_pop.ids, **small_pop.ingest_kwargs())
        s.calibrate(truth=small_pop.truth)
        run = s.dedup()
        ev = s.evaluate(run, small_pop.truth, impostor_pairs=20_000)
        run.write(tmp_path / "run")
        ev_dir = s.evaluate(tmp_path / "run", pacha.read_truth(small_pop.truth), impostor_pairs=20_000)
    truth_pairs = len(pacha.read_truth(small_pop.truth))
    assert ev["truth_pairs"] == truth_pairs > 0
    assert ev["pair_recall"] > 0.9
    assert ev["true_hits"] + ev["false_hits"] == run.hit_count
    for k in ("pair_recall", "pair_precision", "true_hits", "false_hits", "threshold"):
        assert ev[k] == ev_dir[k], k
    cli = run_cli(pacha_bin, "eval", "--store", str(store), "--run", str(tmp_path / "run"),
                  "--truth", str(small_pop.truth), "--impostor-pairs", "20000")["eval"]
    for k in ("pair_recall", "pair_precision", "true_hits", "false_hits", "threshold"):
        assert ev[k] == cli[k], k


def test_results_to_pandas_arrow_parquet(small_pop: Population, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pd = pytest.importorskip("pandas")
    with pacha.Store.create(tmp_path / "reg", **small_pop.schema()) as s:
        s.ingest(small_pop.ids, **small_pop.ingest_kwargs())
        run = s.dedup()
    df = run.to_pandas()
    assert isinstance(df, pd.DataFrame) and len(df) == len(run)
    assert list(df["subject_a"]) == list(run.hits["subject_a"])
    t = run.to_arrow()
    assert t.num_rows == len(run) and t.schema.field("score").type == pa.float64()
    assert t.schema.field("subject_a").type == pa.string()
    run.write_parquet(tmp_path / "hits.parquet")
    back = pq.read_table(tmp_path / "hits.parquet")
    assert back.equals(t)
    # A modality the pair does not share: NaN in numpy, null in Arrow/Parquet (empty in hits.csv).
    f7 = run.hits["finger7_cosine"]
    assert np.isnan(f7).any()
    assert back.column("finger7_cosine").null_count == int(np.isnan(f7).sum())
    assert back.column("subject_b").to_pylist() == list(run.hits["subject_b"])
    run.write_parquet(tmp_path / "clusters.parquet", what="clusters")
    cl = pq.read_table(tmp_path / "clusters.parquet")
    assert cl.column("cluster").to_numpy().tolist() == run.clusters["cluster"].tolist()
    with pytest.raises(ValueError, match="what="):
        run.to_arrow("nope")
