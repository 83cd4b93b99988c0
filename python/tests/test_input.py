"""numpy input: dtypes, memory layouts, and bad arrays refused with the row named and nothing committed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pacha
from conftest import run_cli


def data(n: int = 200, dim: int = 16, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    ids = [f"S{i:05d}" for i in range(n)]
    return ids, x


def templates_of(path: Path, key: str = "face"):
    with pacha.Store.open(path, read_only=True) as s:
        return list(s.subject_ids()), s.templates(key)[0]


def test_float16_equals_widened_float32_and_cli_f16_npy(tmp_path: Path, pacha_bin: str) -> None:
    ids, x = data()
    h = x.astype(np.float16)
    with pacha.Store.create(tmp_path / "f16", face_dim=16) as s:
        s.ingest(ids, face=h)
    with pacha.Store.create(tmp_path / "f32", face_dim=16) as s:
        s.ingest(np.array(ids), face=h.astype(np.float32))  # IDs as a numpy str array
    a, b = templates_of(tmp_path / "f16")[1], templates_of(tmp_path / "f32")[1]
    assert np.array_equal(a, b)
    # The CLI's float16 .npy ingest gives the same store content.
    np.save(tmp_path / "face16.npy", h)
    (tmp_path / "subjects.csv").write_text("subject_id\n" + "\n".join(ids) + "\n")
    run_cli(pacha_bin, "ingest", "--store", str(tmp_path / "cli"), "--face", str(tmp_path / "face16.npy"),
            "--subjects", str(tmp_path / "subjects.csv"))
    assert np.array_equal(templates_of(tmp_path / "cli")[1], a)


@pytest.mark.parametrize("layout", ["fortran", "strided", "reversed"])
def test_any_memory_layout_is_copied_row_by_row(tmp_path: Path, layout: str) -> None:
    ids, x = data()
    with pacha.Store.create(tmp_path / "c", face_dim=16) as s:
        s.ingest(ids, face=x)
    if layout == "fortran":
        y, yids = np.asfortranarray(x), ids
        assert not y.flags.c_contiguous
    elif layout == "strided":
        wide = np.zeros((x.shape[0] * 2, x.shape[1] * 3), np.float32)
        wide[::2, ::3] = x
        y, yids = wide[::2, ::3], ids
        assert not y.flags.c_contiguous and not y.flags.f_contiguous
    else:
        y, yids = x[::-1], ids[::-1]
    with pacha.Store.create(tmp_path / "y", face_dim=16) as s:
        s.ingest(yids, face=y)
    got_ids, got = templates_of(tmp_path / "y")
    want_ids, want = templates_of(tmp_path / "c")
    order = {sid: i for i, sid in enumerate(got_ids)}
    assert sorted(got_ids) == sorted(want_ids)
    assert np.array_equal(got[[order[i] for i in want_ids]], want)


def assert_nothing_committed(path: Path) -> None:
    with pacha.Store.open(path, read_only=True) as s:
        assert s.rows == 0 and len(s) == 0


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda x: x.astype(np.float64), r"dtype float64 is not accepted.*astype\(numpy.float32\)"),
        (lambda x: (x * 100).astype(np.int64), r"dtype int64 is not accepted"),
        (lambda x: np.hstack([x, x[:, :1]]), r"face: dimension 17 but the store's face dimension is 16"),
        (lambda x: x[:, :, None], r"expected a 2-D array"),
        (lambda x: x[:-1], r"199 rows but 200 subject IDs"),
    ],
    ids=["float64", "int64", "wrong-dim", "3-d", "row-count"],
)
def test_bad_arrays_are_refused(tmp_path: Path, make, pattern: str) -> None:
    ids, x = data()
    with pacha.Store.create(tmp_path / "s", face_dim=16) as s:
        with pytest.raises(ValueError, match=pattern):
            s.ingest(ids, face=make(x))
    assert_nothing_committed(tmp_path / "s")


def test_nan_names_the_row_and_commits_nothing(tmp_path: Path) -> None:
    ids, x = data(n=20_000)
    x[17_345, 3] = np.nan  # in the last of two batches: validation runs before the first commit
    with pacha.Store.create(tmp_path / "s", face_dim=16) as s:
        with pytest.raises(ValueError, match=r'row 17345 \(subject "S17345"\): face template contains NaN'):
            s.ingest(ids, face=x, batch_size=10_000)
    assert_nothing_committed(tmp_path / "s")
    x[17_345, 3] = np.inf
    with pacha.Store.create(tmp_path / "t", face_dim=16) as s:
        with pytest.raises(ValueError, match=r"row 17345 .*NaN or infinity"):
            s.ingest(ids, face=x)


def test_other_bad_records_name_the_row(tmp_path: Path) -> None:
    ids, x = data()
    with pacha.Store.create(tmp_path / "s", face_dim=16, fingers={2: 8}) as s:
        f2 = np.ones((200, 8), np.float32)
        dup = list(ids)
        dup[150] = ids[3]
        with pytest.raises(ValueError, match=r'subject "S00003" appears more than once: rows 3 and 150'):
            s.ingest(dup, face=x, finger={2: f2})
        q = np.full(200, 0.5, np.float32)
        q[42] = 1.5
        with pytest.raises(ValueError, match=r'row 42 \(subject "S00042"\).*quality 1.5 is outside \[0, 1\]'):
            s.ingest(ids, face=x, finger={2: f2}, quality={"face": q})
        none = x.copy()
        none[9] = 0
        f2b = f2.copy()
        f2b[9] = 0
        with pytest.raises(ValueError, match=r'row 9 \(subject "S00009"\): no template'):
            s.ingest(ids, face=none, finger={2: f2b})
        pres = np.ones(200, bool)
        with pytest.raises(ValueError, match=r"row 9 .*all zeros \(zero norm\) but marked present"):
            s.ingest(ids, face=none, finger={2: f2}, present={"face": pres})
        bad_id = list(ids)
        bad_id[77] = "bad\nid"
        with pytest.raises(ValueError, match=r"row 77 .*invalid subject ID"):
            s.ingest(bad_id, face=x, finger={2: f2})
        with pytest.raises(ValueError, match=r"row 5 is int"):
            s.ingest(ids[:5] + [5] + ids[6:], face=x)
        with pytest.raises(ValueError, match=r"present\['face'\]: dtype int64"):
            s.ingest(ids, face=x, present={"face": np.ones(200, np.int64)})
        with pytest.raises(ValueError, match=r"finger3: modality finger3 is not in the store's schema"):
            s.ingest(ids, face=x, finger={3: f2})
        assert s.rows == 0
        # A declared-absent row is absent even when it holds data; the rest go in.
        pres[9] = False
        r = s.ingest(ids, face=x, finger={2: f2}, present={"face": pres})
        assert r["inserted"] == 200
        _, q = s.templates("face")
        assert q[9] == -1 and (q >= 0).sum() == 199
        # A subject re-ingested with other templates is a conflict naming its row.
        y = x.copy()
        y[120] += 1
        with pytest.raises(ValueError, match=r'row 120 \(subject "S00120"\).*already enrolled with a different'):
            s.ingest(ids, face=y, finger={2: f2}, present={"face": pres})
        assert s.rows == 200


def test_create_open_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not hold a store"):
        pacha.Store.open(tmp_path / "missing")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        pacha.Store.create(tmp_path / "full", face_dim=4)
    with pytest.raises(ValueError, match="no modality"):
        pacha.Store.create(tmp_path / "none")
    with pytest.raises(ValueError, match="invalid schema"):
        pacha.Store.create(tmp_path / "big", face_dim=100_000)
