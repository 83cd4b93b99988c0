"""Parquet interop of the `pacha` CLI with pyarrow.

A table written by pyarrow with its defaults (snappy compression, `fixed_size_list<float>` and
`list<halffloat>` columns, nulls for absent templates) is ingested with `pacha ingest --parquet`, deduplicated
with `--format both`, and the hits/clusters Parquet tables read back with pyarrow equal the CSVs. Bad schemas
are refused with exit code 2 and the column named. Needs `PACHA_BIN` (the built `pacha` binary).
"""

import csv
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

PACHA = os.environ.get("PACHA_BIN", "")

pytestmark = pytest.mark.skipif(
    not PACHA and os.environ.get("CI") != "true",
    reason="PACHA_BIN is not set (the path of the built pacha binary)",
)

N, FACE_DIM, FINGER_DIM, DUPS = 600, 64, 32, 40


def pacha(*args):
    assert PACHA, "PACHA_BIN must name the built pacha binary under CI=true"
    return subprocess.run([PACHA, *map(str, args)], capture_output=True, text=True)


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def population(seed=3):
    """Rows N-DUPS.. re-enrol rows 0..DUPS with capture noise; some templates absent (null)."""
    rng = np.random.default_rng(seed)
    face = unit(rng, N, FACE_DIM)
    finger = unit(rng, N, FINGER_DIM)
    # Mates at cosine ~0.82 (face) and ~0.71 (finger), above the default genuine models' means.
    face[N - DUPS :] = face[:DUPS] + 0.7 * unit(rng, DUPS, FACE_DIM)
    finger[N - DUPS :] = finger[:DUPS] + 1.0 * unit(rng, DUPS, FINGER_DIM)
    ids = [f"P{i:05d}" for i in range(N)]
    face_rows = [None if i % 37 == 5 else face[i] for i in range(N)]
    finger_rows = [
        None if i % 23 == 7 and face_rows[i] is not None else finger[i].astype(np.float16)
        for i in range(N)
    ]
    return ids, face_rows, finger_rows


def face_array(rows, dim=FACE_DIM):
    return pa.array(
        [None if r is None else r.tolist() for r in rows], type=pa.list_(pa.float32(), dim)
    )


def finger_array(rows):
    return pa.array(
        [None if r is None else r for r in rows], type=pa.list_(pa.float16())
    )


def table(ids, face_rows, finger_rows, face_name="face"):
    return pa.table(
        {
            "subject_id": pa.array(ids, type=pa.string()),
            face_name: face_array(face_rows),
            "finger2": finger_array(finger_rows),
        }
    )


def read_csv(p):
    with open(p, newline="") as f:
        return list(csv.reader(f))


def test_pyarrow_table_ingests_and_parquet_hits_equal_the_csv(tmp_path: Path):
    ids, face_rows, finger_rows = population()
    t = table(ids, face_rows, finger_rows)
    assert t.schema.field("face").type == pa.list_(pa.float32(), FACE_DIM)
    assert t.schema.field("finger2").type == pa.list_(pa.float16())
    assert t.column("face").null_count > 0 and t.column("finger2").null_count > 0
    src = tmp_path / "pop.parquet"
    pq.write_table(t, src, row_group_size=128)  # default compression (snappy), several row groups
    assert pq.ParquetFile(src).metadata.num_row_groups > 1
    store, run = tmp_path / "store", tmp_path / "run"

    r = pacha("-q", "ingest", "--store", store, "--parquet", src, "--batch", "100")
    assert r.returncode == 0, r.stderr
    r = pacha("--json", "-q", "info", "--store", store)
    assert r.returncode == 0, r.stderr

    r = pacha("-q", "dedup", "--store", store, "--out", run, "--mode", "exact", "--format", "both")
    assert r.returncode == 0, r.stderr

    hits = pq.read_table(run / "hits.parquet")
    rows = read_csv(run / "hits.csv")
    assert hits.column_names == rows[0]
    assert hits.num_rows == len(rows) - 1
    assert hits.num_rows >= DUPS // 2, f"only {hits.num_rows} hits"
    assert hits.schema.field("subject_a").type == pa.string()
    assert hits.schema.field("score").type == pa.float64()
    assert hits.schema.field("is_hit").type == pa.bool_()
    found = set()
    for i, row in enumerate(hits.to_pylist()):
        c = dict(zip(rows[0], rows[i + 1]))
        assert row["subject_a"] == c["subject_a"] and row["subject_b"] == c["subject_b"]
        assert f"{row['score']:.3f}" == c["score"]
        assert f"{row['llr']:.4f}" == c["llr"]
        assert abs(row["fmr"] - float(c["fmr"])) <= 1e-9 * max(1.0, abs(row["fmr"]))
        for name in ("face_cosine", "finger2_cosine"):
            if row[name] is None:
                assert c[name] == ""
            else:
                assert abs(row[name] - float(c[name])) <= 5.1e-6
        assert str(row["is_hit"]).lower() == c["is_hit"]
        found.add((row["subject_a"], row["subject_b"]))
    planted = {(ids[i], ids[N - DUPS + i]) for i in range(DUPS)}
    assert len(planted & found) >= DUPS * 0.75, f"{len(planted & found)} of {DUPS} planted pairs found"

    clusters = pq.read_table(run / "clusters.parquet")
    assert clusters.schema.field("cluster").type == pa.uint64()
    crow = read_csv(run / "clusters.csv")
    assert clusters.column_names == crow[0]
    assert [[str(r["cluster"]), r["subject_id"]] for r in clusters.to_pylist()] == crow[1:]


def test_column_override_and_integer_ids(tmp_path: Path):
    ids, face_rows, finger_rows = population(seed=4)
    t = table(ids, face_rows, finger_rows, face_name="emb_face")
    t = t.set_column(0, "person", pa.array(range(1000, 1000 + N), type=pa.int64()))
    src = tmp_path / "t.parquet"
    pq.write_table(t, src, compression="zstd")
    store = tmp_path / "store"
    r = pacha("-q", "ingest", "--store", store, "--parquet", src)
    assert r.returncode == 2 and "subject_id" in r.stderr, r.stderr
    r = pacha(
        "--json", "-q", "ingest", "--store", store, "--parquet", src,
        "--id-column", "person", "--column", "face=emb_face",
    )
    assert r.returncode == 0, r.stderr
    r = pacha("-q", "verify", "--store", store, "1000", str(1000 + N - DUPS))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "case,column",
    [
        ("no_id", "subject_id"),
        ("face_not_list", "face"),
        ("face_list_of_int", "face"),
        ("finger_wrong_length", "finger2"),
        ("face_nan", "face"),
        ("duplicate_id", "subject_id"),
    ],
)
def test_bad_schemas_and_rows_are_refused_naming_the_column(tmp_path: Path, case, column):
    ids, face_rows, finger_rows = population(seed=5)
    t = table(ids, face_rows, finger_rows)
    if case == "no_id":
        t = t.drop(["subject_id"])
    elif case == "face_not_list":
        t = t.set_column(1, "face", pa.array(np.ones(N, np.float32)))
    elif case == "face_list_of_int":
        t = t.set_column(1, "face", pa.array([[1, 2, 3]] * N, type=pa.list_(pa.int32())))
    elif case == "finger_wrong_length":
        finger_rows[400] = finger_rows[400][:-1]
        t = table(ids, face_rows, finger_rows)
    elif case == "face_nan":
        face_rows[300] = face_rows[300].copy()
        face_rows[300][3] = np.nan
        t = table(ids, face_rows, finger_rows)
    elif case == "duplicate_id":
        ids[450] = ids[10]
        t = table(ids, face_rows, finger_rows)
    src = tmp_path / "bad.parquet"
    pq.write_table(t, src)
    store = tmp_path / "store"
    r = pacha("-q", "ingest", "--store", store, "--parquet", src)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert f'column "{column}"' in r.stderr, r.stderr
    assert "bad.parquet" in r.stderr, r.stderr
    assert not (store / "MANIFEST").exists(), "nothing may be committed"
