"""pacha: the Python API of a biometric deduplication engine.

Templates go in as numpy arrays (float32 or float16, any memory layout), results come out as numpy columns
that pandas and pyarrow take as they are::

    import numpy as np, pacha

    s = pacha.Store.create("reg", face_dim=512, fingers={2: 256})
    s.ingest(ids, face=X, finger={2: F2})          # validated first, then committed durably
    s.build_index()
    s.calibrate()
    run = s.dedup(target_fpir=1e-3)                 # Ctrl-C cancels cleanly
    run.hits["score"], run.to_pandas(), run.summary["audit"]

Errors are Python exceptions carrying the engine's message: ``ValueError`` for bad input (naming the row and
subject), ``OSError`` (and its subclasses) for I/O and damaged store files, :class:`PachaError` for other
engine failures, :class:`CompletenessError` when a run's completeness audit does not prove its recall (the
CLI's exit code 3; the run's results travel with the exception), ``KeyboardInterrupt`` for a cancelled call.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _pacha
from ._pacha import PachaError

__all__ = [
    "Store",
    "DedupResult",
    "IdentifyResult",
    "PachaError",
    "CompletenessError",
    "generate",
    "read_truth",
    "check",
    "__version__",
]

__version__: str = _pacha.__version__

#: A modality: ``"face"``, ``"finger2"``, or a finger position (ISO/IEC 19794, 1..10) such as ``2``.
ModalityKey = Union[str, int]
#: A progress request: ``False`` (none), ``True`` (tqdm bars if tqdm is installed, else lines on stderr), or
#: a callable ``f(stage: str, done: int, total: int)``.
Progress = Union[bool, Callable[[str, int, int], Any], None]
PathLike = Union[str, "os.PathLike[str]"]


class CompletenessError(PachaError):
    """The completeness audit did not prove ``min_recall`` (the CLI exits 3 in this case).

    The run was completed all the same: ``.result`` holds it (a :class:`DedupResult` or
    :class:`IdentifyResult`), and ``.result.audit`` says why recall was not proven.
    """

    def __init__(self, message: str, result: Any) -> None:
        super().__init__(message)
        #: The finished run whose audit failed.
        self.result = result


def _key(k: ModalityKey) -> str:
    """Normalises a modality key: ``2`` and ``"2"`` become ``"finger2"``."""
    if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
        return f"finger{int(k)}"
    if isinstance(k, str):
        return f"finger{k}" if k.isdigit() else k
    raise TypeError(f"modality key {k!r}: expected 'face', 'fingerN' or a finger position N")


def _ids(ids: Union[Sequence[str], np.ndarray]) -> List[str]:
    """Subject IDs from a list/tuple of str or a numpy str/object array; anything else is refused."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise ValueError(f"ids: expected a 1-D array, got shape {ids.shape}")
        if ids.dtype.kind == "U":
            return ids.tolist()
        if ids.dtype.kind != "O" and ids.dtype.kind != "T":
            raise ValueError(f"ids: dtype {ids.dtype} is not accepted: subject IDs are strings")
        ids = ids.tolist()
    elif isinstance(ids, (str, bytes)):
        raise ValueError("ids: expected a sequence of subject IDs, got a single string")
    out = list(ids)
    for i, v in enumerate(out):
        if not isinstance(v, str):
            raise ValueError(f"ids: row {i} is {type(v).__name__} {v!r}, not a str")
    return out


def _matrix(x: Any) -> Any:
    """Lists become float32 arrays; numpy arrays pass as they are (the core checks dtype and shape)."""
    if isinstance(x, np.ndarray):
        return x
    return np.asarray(x, dtype=np.float32)


def _blocks(
    face: Any,
    finger: Optional[Mapping[ModalityKey, Any]],
) -> List[Tuple[str, Any]]:
    out: List[Tuple[str, Any]] = []
    if face is not None:
        out.append(("face", _matrix(face)))
    for k, v in (finger or {}).items():
        key = _key(k)
        if not key.startswith("finger"):
            raise ValueError(f"finger: key {k!r} is not a finger position")
        out.append((key, _matrix(v)))
    return out


def _columns(
    spec: Optional[Mapping[ModalityKey, Any]], name: str, dtype: Any, keys: Iterable[str]
) -> Dict[str, np.ndarray]:
    out: Dict[str, np.ndarray] = {}
    wanted = set(keys)
    for k, v in (spec or {}).items():
        key = _key(k)
        if key not in wanted:
            raise ValueError(f"{name}[{k!r}]: no {key} templates were given")
        a = np.asarray(v)
        if name == "present" and a.dtype != np.bool_:
            raise ValueError(f"present[{k!r}]: dtype {a.dtype} is not accepted: presence is a bool array")
        if a.ndim != 1:
            raise ValueError(f"{name}[{k!r}]: expected a 1-D array, got shape {a.shape}")
        out[key] = np.ascontiguousarray(a, dtype=dtype)
    return out


class _Reporter:
    """Turns the core's ``(stage, done, total)`` callbacks into tqdm bars, stderr lines or a user callable."""

    def __init__(self, progress: Progress, desc: str) -> None:
        self.callback: Optional[Callable[[str, int, int], Any]] = None
        self._bars: Dict[str, Any] = {}
        self._last = 0.0
        if progress is None or progress is False:
            return
        if callable(progress):
            self.callback = progress
            return
        try:
            from tqdm.auto import tqdm  # type: ignore[import-not-found]
        except ImportError:
            tqdm = None

        def plain(stage: str, done: int, total: int) -> None:
            now = time.monotonic()
            if now - self._last >= 1.0 or (total and done >= total):
                self._last = now
                print(f"{desc} {stage}: {done}/{total}", file=sys.stderr, flush=True)

        def bars(stage: str, done: int, total: int) -> None:
            bar = self._bars.get(stage)
            if bar is None:
                self.close()  # the previous stage is over
                bar = self._bars[stage] = tqdm(total=total or None, desc=f"{desc} {stage}", initial=done)
            if total and bar.total != total:
                bar.total = total
            bar.n = done
            bar.refresh()

        self.callback = bars if tqdm is not None else plain

    def close(self) -> None:
        for b in self._bars.values():
            b.close()
        self._bars.clear()

    def __enter__(self) -> Optional[Callable[[str, int, int], Any]]:
        return self.callback

    def __exit__(self, *exc: Any) -> None:
        self.close()


class DedupResult:
    """A finished dedup run.

    ``hits`` holds every reported pair (down to the run's report floor, ``is_hit`` marks those at or above the
    threshold) as a dict of numpy columns — the columns of the CLI's ``hits.csv`` plus ``row_a``/``row_b``;
    ``clusters`` the duplicate groups (``clusters.csv``); ``summary`` the run's summary (``summary.json``),
    including its completeness ``audit``.
    """

    def __init__(self, core: Any) -> None:
        self._core = core
        self._hits: Optional[Dict[str, np.ndarray]] = None
        self._clusters: Optional[Dict[str, np.ndarray]] = None
        self._summary: Optional[Dict[str, Any]] = None

    @property
    def threshold(self) -> float:
        """Decision threshold on the calibrated score scale (``-10·log10 FMR``)."""
        return float(self._core.threshold)

    @property
    def proven(self) -> bool:
        """Whether the completeness audit proved ``min_recall`` (always true for exact runs, which have none)."""
        return bool(self._core.proven)

    @property
    def hits(self) -> Dict[str, np.ndarray]:
        """Every reported pair as numpy columns: ``subject_a``, ``subject_b`` (object arrays of str),
        ``row_a``, ``row_b`` (uint32), ``score``, ``llr``, ``fmr`` (float64), ``<modality>_cosine`` (float32,
        NaN where the pair does not share the modality), ``is_hit`` (bool)."""
        if self._hits is None:
            raw = self._core.hits()
            self._hits = {
                k: (np.array(v, dtype=object) if isinstance(v, list) else v) for k, v in raw.items()
            }
        return self._hits

    @property
    def clusters(self) -> Dict[str, np.ndarray]:
        """The duplicate groups: ``cluster`` (int64 group number) and ``subject_id`` (object array of str)."""
        if self._clusters is None:
            raw = self._core.clusters()
            self._clusters = {
                k: (np.array(v, dtype=object) if isinstance(v, list) else v) for k, v in raw.items()
            }
        return self._clusters

    @property
    def summary(self) -> Dict[str, Any]:
        """The run's summary as the CLI writes it in ``summary.json`` (counts, plans, timings, ``audit``)."""
        if self._summary is None:
            self._summary = json.loads(self._core.summary_json())
        return self._summary

    @property
    def audit(self) -> Optional[Dict[str, Any]]:
        """The completeness audit (``None`` for exact runs, complete by construction)."""
        return self.summary.get("audit")

    @property
    def hit_count(self) -> int:
        """Pairs at or above the threshold."""
        return int(self.summary["hits"])

    def __len__(self) -> int:
        """Reported pairs (hits and pairs between the floor and the threshold)."""
        return len(self._core)

    def __repr__(self) -> str:
        return (
            f"<pacha.DedupResult {self.hit_count} hits, {len(self)} pairs, threshold {self.threshold:.1f}, "
            f"{'proven' if self.proven else 'NOT proven'}>"
        )

    def write(self, directory: PathLike) -> Dict[str, Any]:
        """Writes the CLI's run directory (``hits.csv``, ``hits.jsonl``, ``clusters.csv``, ``summary.json``,
        ``manifest.json``), which ``pacha eval`` and :meth:`Store.evaluate` read; returns the manifest."""
        return json.loads(self._core.write(os.fspath(directory)))

    def _table(self, what: str) -> Dict[str, np.ndarray]:
        if what == "hits":
            return self.hits
        if what == "clusters":
            return self.clusters
        raise ValueError(f"what={what!r}: expected 'hits' or 'clusters'")

    def to_pandas(self, what: str = "hits") -> Any:
        """The hits (or ``what="clusters"``) as a pandas DataFrame (needs pandas)."""
        import pandas as pd  # type: ignore[import-not-found]

        return pd.DataFrame(self._table(what))

    def to_arrow(self, what: str = "hits") -> Any:
        """The hits (or ``what="clusters"``) as a pyarrow Table (needs pyarrow): numeric columns are not
        copied, a cosine the pair does not share (NaN in :attr:`hits`) is null."""
        import pyarrow as pa  # type: ignore[import-not-found]

        return _arrow_table(pa, self._table(what))

    def write_parquet(self, path: PathLike, what: str = "hits") -> None:
        """Writes the hits (or ``what="clusters"``) as a Parquet file with pyarrow."""
        import pyarrow.parquet as pq  # type: ignore[import-not-found]

        pq.write_table(self.to_arrow(what), os.fspath(path))


def _arrow_table(pa: Any, cols: Dict[str, np.ndarray]) -> Any:
    """A pyarrow Table of numpy columns: str object arrays become ``string``, NaN cosines (modality not
    shared) become nulls, numeric columns are wrapped without a copy."""
    out = {}
    for k, v in cols.items():
        if v.dtype == object:
            out[k] = pa.array(v.tolist(), pa.string())
        elif k.endswith("_cosine"):
            out[k] = pa.array(v, from_pandas=True)
        else:
            out[k] = pa.array(v)
    return pa.table(out)


class IdentifyResult:
    """Answers of an identify batch: ``candidates[i]`` holds probe ``i``'s candidates (best first) as numpy
    columns ``subject_id``, ``score``, ``llr``, ``fmr``, ``<modality>_cosine``."""

    def __init__(self, answers: List[Dict[str, Any]], audit_json: Optional[str],
                 latency_json: Optional[str] = None) -> None:
        self.candidates: List[Dict[str, np.ndarray]] = []
        #: Decision threshold used (the same for every probe of the batch).
        self.threshold: float = float("nan")
        #: Enrolments compared exactly, per probe.
        self.compared: List[int] = []
        for a in answers:
            self.threshold = float(a.pop("threshold"))
            self.compared.append(int(a.pop("compared")))
            a["subject_id"] = np.array(a["subject_id"], dtype=object)
            self.candidates.append(a)
        #: The batch's completeness audit (``None`` when turned off).
        self.audit: Optional[Dict[str, Any]] = json.loads(audit_json) if audit_json else None
        #: Per-probe search time of the batch (milliseconds): ``probes``, ``mean_ms``, ``p50_ms``, ``p90_ms``,
        #: ``p99_ms``, ``max_ms`` and ``first_ms`` (the first probe, which may have planned the search), and
        #: ``joint_scans``: one dict per joint scan (``key``, ``probes``, ``seconds``, ``pairs``, ``kept``,
        #: predicted costs, ``reused_rows``: stored rows an earlier batch of this ``Store`` left prepared for
        #: the scan; a set of modalities is prepared on its second scan and kept, so later batches, a lone
        #: probe included, skip that work); a probe a scan answered is charged its share of the scan plus its
        #: rescoring.
        self.latency: Dict[str, Any] = json.loads(latency_json) if latency_json else {}

    @property
    def proven(self) -> bool:
        """Whether the audit proved ``min_recall`` (true without an audit)."""
        return self.audit is None or bool(self.audit["passed"])

    def __len__(self) -> int:
        return len(self.candidates)

    def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
        return self.candidates[i]

    def __repr__(self) -> str:
        n = sum(len(c["subject_id"]) for c in self.candidates)
        return f"<pacha.IdentifyResult {len(self)} probes, {n} candidates, threshold {self.threshold:.1f}>"

    def columns(self) -> Dict[str, np.ndarray]:
        """All candidates as flat columns with ``probe`` (probe number) and ``rank`` (0 = best)."""
        if not self.candidates:
            return {"probe": np.zeros(0, np.int64), "rank": np.zeros(0, np.int64)}
        keys = list(self.candidates[0].keys())
        out: Dict[str, np.ndarray] = {
            "probe": np.concatenate([np.full(len(c["subject_id"]), i, np.int64)
                                     for i, c in enumerate(self.candidates)]),
            "rank": np.concatenate([np.arange(len(c["subject_id"]), dtype=np.int64)
                                    for c in self.candidates]),
        }
        for k in keys:
            out[k] = np.concatenate([c[k] for c in self.candidates])
        return out

    def to_pandas(self) -> Any:
        """All candidates as one pandas DataFrame (see :meth:`columns`)."""
        import pandas as pd  # type: ignore[import-not-found]

        return pd.DataFrame(self.columns())

    def to_arrow(self) -> Any:
        """All candidates as one pyarrow Table (see :meth:`columns`)."""
        import pyarrow as pa  # type: ignore[import-not-found]

        return _arrow_table(pa, self.columns())


class Store:
    """A pacha store (registry): a directory of memory-mapped templates with its index and calibration.

    Open it with :meth:`Store.create` or :meth:`Store.open`; use it as a context manager (or call
    :meth:`close`) to release the writer lock. A writer excludes other writers (``BlockingIOError``); readers
    (``read_only=True``) take no lock and see the snapshot of the commit they opened.
    """

    def __init__(self, core: Any) -> None:
        """Use :meth:`Store.create` or :meth:`Store.open`."""
        self._core = core

    @classmethod
    def create(
        cls,
        path: PathLike,
        face_dim: Optional[int] = None,
        fingers: Optional[Mapping[ModalityKey, int]] = None,
    ) -> "Store":
        """Creates a store in ``path`` (a missing or empty directory) with a face of ``face_dim`` and fingers
        ``{position: dim}``, e.g. ``Store.create("reg", face_dim=512, fingers={2: 256, 7: 256})``."""
        mods: List[Tuple[str, int]] = []
        if face_dim:
            mods.append(("face", int(face_dim)))
        for k, d in (fingers or {}).items():
            mods.append((_key(k), int(d)))
        if not mods:
            raise ValueError("no modality: give face_dim and/or fingers")
        return cls(_pacha.Engine.create(os.fspath(path), mods))

    @classmethod
    def open(cls, path: PathLike, read_only: bool = False) -> "Store":
        """Opens an existing store: as its single writer, or ``read_only`` (no lock, nothing written; dedup,
        identify, verify, evaluate and info work, writes raise ``PermissionError``)."""
        return cls(_pacha.Engine.open(os.fspath(path), bool(read_only)))

    # -- state -------------------------------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The store directory."""
        return os.fspath(self._core.path)

    @property
    def read_only(self) -> bool:
        """Whether the store was opened read-only."""
        return bool(self._core.read_only)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return bool(self._core.closed)

    def close(self) -> None:
        """Releases the store and its writer lock; later calls raise ``ValueError``."""
        self._core.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        """Live enrolments."""
        return int(self._core.live())

    def __repr__(self) -> str:
        if self.closed:
            return f"<pacha.Store {self.path!r} closed>"
        mode = "read-only" if self.read_only else "writer"
        return f"<pacha.Store {self.path!r} {mode}, {len(self)} live enrolments>"

    @property
    def rows(self) -> int:
        """Committed rows, deleted ones included."""
        return int(self._core.rows())

    @property
    def schema(self) -> Dict[str, int]:
        """Modality key → dimension, in schema order."""
        return {self._mkey(m["modality"]): int(m["dim"]) for m in self.info()["schema"]["modalities"]}

    @staticmethod
    def _mkey(m: Any) -> str:
        if m == "Face" or m == "face":
            return "face"
        if isinstance(m, dict) and "Finger" in m:
            return f"finger{m['Finger']}"
        return str(m)

    def info(self) -> Dict[str, Any]:
        """What ``pacha info`` shows: schema, rows, live count, generation, index and calibration state, SIMD
        level."""
        return json.loads(self._core.info())

    def subject_ids(self) -> np.ndarray:
        """The subject ID of every committed row, in row order (deleted rows included, see :meth:`deleted`)."""
        return np.array(self._core.subject_ids(), dtype=object)

    def deleted(self) -> np.ndarray:
        """Whether each committed row is deleted (bool array)."""
        return self._core.deleted()

    def templates(self, modality: ModalityKey) -> Tuple[np.ndarray, np.ndarray]:
        """The stored templates of ``modality`` for every committed row (L2-normalised float32, zeros where
        absent) and their quality (``-1`` where absent)."""
        return self._core.templates(_key(modality))

    def check(self) -> Dict[str, Any]:
        """Verifies every file of the store directory (``pacha check``): ``{"ok", "problems", ...}``."""
        return json.loads(self._core.check())

    # -- writing -----------------------------------------------------------------------------------------

    def ingest(
        self,
        ids: Union[Sequence[str], np.ndarray],
        face: Any = None,
        finger: Optional[Mapping[ModalityKey, Any]] = None,
        present: Optional[Mapping[ModalityKey, Any]] = None,
        quality: Optional[Mapping[ModalityKey, Any]] = None,
        batch_size: int = 10_000,
        progress: Progress = False,
    ) -> Dict[str, Any]:
        """Enrols ``len(ids)`` people: row ``i`` of every array belongs to ``ids[i]``.

        ``face`` is an ``(n, face_dim)`` array, ``finger`` maps finger positions to ``(n, dim)`` arrays; both
        float32 or float16 (float64 and integers are refused: pass ``X.astype(np.float32)``), in any memory
        layout (C, Fortran, strided views are copied row by row). ``present`` maps a modality to a bool array
        (absent rows are ignored); without it an all-zero row is absent. ``quality`` maps a modality to
        per-row qualities in [0, 1] (default 1.0). As ``pacha ingest``: every record is validated before the
        first commit (a bad one raises ``ValueError`` naming its row and subject, nothing is written), then
        batches of ``batch_size`` are committed durably; re-ingesting identical enrolments is a no-op.
        Returns ``{"records", "inserted", "unchanged", "batches"}``.
        """
        ids = _ids(ids)
        blocks = _blocks(face, finger)
        keys = [k for k, _ in blocks]
        pres = _columns(present, "present", np.bool_, keys)
        qual = _columns(quality, "quality", np.float32, keys)
        args = [(k, a, pres.get(k), qual.get(k)) for k, a in blocks]
        with _Reporter(progress, "ingest") as cb:
            report = json.loads(self._core.ingest(ids, args, int(batch_size), cb))
        report.pop("created", None)
        return report

    def build_index(self, progress: Progress = False) -> None:
        """Builds (or rebuilds, whatever its state) the candidate index over every committed row."""
        with _Reporter(progress, "index") as cb:
            self._core.build_index(cb)

    def calibrate(
        self,
        truth: Union[None, PathLike, Sequence[Tuple[str, str]]] = None,
        impostor_pairs: int = 1_000_000,
        seed: int = 0x5EED,
        *,
        tail_rows: int = 60_000,
        quality_bands: int = 3,
        tail_pool: str = "hubs",
        tail_rows_max: int = 320_000,
    ) -> Dict[str, Any]:
        """Fits the score models from the store (impostor pairs sampled from it; genuine models from labelled
        ``truth`` pairs — a list of ``(subject_a, subject_b)`` or a truth CSV path — when given) and saves
        them: every pair of ``tail_rows`` rows is counted for the impostor tails, and pairs are scored per
        quality band (``quality_bands``; 0 or 1: pooled) where qualities vary and move the tail (the CLI's
        ``pacha calibrate`` options; ``tail_pool`` is ``"hubs"``, the counted rows drawn by hubness and
        each pair weighted, or ``"uniform"``, as ``--tail-pool``). With ``truth``, a modality whose count does not
        pin measured ÷ predicted FMR within 1.5× at the FMR a dedup at FPIR 1e-3 decides at has its pool doubled
        and counted again, up to ``tail_rows_max`` rows. Returns ``{"source", "models", "tail_checks",
        "quality_bands", "decision_fmr", "resolution_notes"}``: each note names a modality whose model the
        count still cannot pin there, and what could."""
        pairs = _truth(truth) if truth is not None else None
        return json.loads(
            self._core.calibrate(
                pairs,
                int(impostor_pairs),
                int(seed),
                int(tail_rows),
                int(quality_bands),
                str(tail_pool),
                int(tail_rows_max),
            )
        )

    def delete(self, ids: Union[str, Sequence[str], np.ndarray]) -> int:
        """Deletes enrolments in one commit; an ID that is not enrolled raises ``ValueError`` and nothing is
        deleted. Returns the number of distinct IDs deleted."""
        if isinstance(ids, str):
            ids = [ids]
        return int(self._core.delete(_ids(ids)))

    # -- matching ----------------------------------------------------------------------------------------

    def dedup(
        self,
        target_fpir: float = 1e-3,
        *,
        from_row: Optional[int] = None,
        mode: str = "auto",
        block_rows: Optional[int] = None,
        floor: Optional[float] = None,
        checkpoint: Optional[PathLike] = None,
        sketch: bool = True,
        genuine_miss: float = 0.0,
        audit_probes: int = 1000,
        audit_seed: Optional[int] = None,
        min_recall: float = 0.999,
        strict: bool = True,
        progress: Progress = False,
        force_path: Optional[str] = None,
    ) -> DedupResult:
        """Deduplicates the store (``pacha dedup`` with the same options and defaults).

        ``from_row`` deduplicates rows ``from_row..`` against everything (a daily batch); ``mode`` is
        ``"auto"``, ``"exact"`` or ``"index"``; ``floor`` reports pairs down to that score; ``checkpoint``
        makes the run resumable. The GIL is released; Ctrl-C (``KeyboardInterrupt``) cancels between blocks
        and leaves the store untouched (dedup never writes into it). When the completeness audit's 95 % lower
        bound is below ``min_recall``, ``strict=True`` raises :class:`CompletenessError` (its ``.result`` is
        the run), ``strict=False`` returns the run with ``proven == False``. ``force_path`` (``"ivf"``,
        ``"brute"``, ``"exact"``, ``"exact-i8"``) overrides the planner's candidate path (the CLI's
        ``--force-path``), e.g. to reproduce a run made on a machine of another SIMD level.
        """
        with _Reporter(progress, "dedup") as cb:
            core = self._core.dedup(
                float(target_fpir),
                None if from_row is None else int(from_row),
                str(mode),
                None if block_rows is None else int(block_rows),
                None if floor is None else float(floor),
                None if checkpoint is None else os.fspath(checkpoint),
                bool(sketch),
                float(genuine_miss),
                int(audit_probes),
                None if audit_seed is None else int(audit_seed),
                float(min_recall),
                cb,
                None if force_path is None else str(force_path),
            )
        result = DedupResult(core)
        if strict and not result.proven:
            a = result.audit or {}
            raise CompletenessError(
                f"completeness not proven: recall lower bound {a.get('lower_bound', float('nan')):.5f} < "
                f"min_recall {a.get('min_recall', min_recall)} ({a.get('evidence', '')}); the run is in .result",
                result,
            )
        return result

    def identify(
        self,
        face: Any = None,
        finger: Optional[Mapping[ModalityKey, Any]] = None,
        *,
        max_results: int = 10,
        target_fpir: float = 1e-3,
        gallery: Optional[Sequence[str]] = None,
        min_score: Optional[float] = None,
        audit_probes: int = 200,
        audit_seed: Optional[int] = None,
        min_recall: float = 0.999,
        strict: bool = True,
        batch_scan: str = "auto",
    ) -> IdentifyResult:
        """1:N identification of probes (``pacha identify``): row ``i`` of ``face`` and of every ``finger``
        array is probe ``i`` (a 1-D array is one probe; an all-zero row is an absent template).

        Returns an :class:`IdentifyResult` with each probe's candidates at or above the threshold (or
        ``min_score``), best first, at most ``max_results``; ``gallery`` restricts the search to those
        subjects. The batch is audited like the CLI's (``strict`` as for :meth:`dedup`). ``batch_scan``
        (``"auto"``, ``"joint"``, ``"per-probe"``) is the CLI's ``--batch-scan``: probes holding the same
        modalities answered by one joint i8 scan of every enrolment, or each searched on its own.
        """
        blocks = []
        for k, a in _blocks(face, finger):
            if isinstance(a, np.ndarray) and a.ndim == 1:
                a = a.reshape(1, -1)
            blocks.append((k, a))
        if not blocks:
            raise ValueError("no probe templates: give face=... and/or finger={position: array}")
        answers, audit, latency = self._core.identify(
            blocks,
            int(max_results),
            float(target_fpir),
            None if gallery is None else _ids(gallery),
            None if min_score is None else float(min_score),
            int(audit_probes),
            None if audit_seed is None else int(audit_seed),
            float(min_recall),
            str(batch_scan),
        )
        result = IdentifyResult(answers, audit, latency)
        if strict and not result.proven:
            a = result.audit or {}
            raise CompletenessError(
                f"completeness not proven: recall lower bound {a.get('lower_bound', float('nan')):.5f} < "
                f"min_recall {a.get('min_recall', min_recall)} ({a.get('evidence', '')}); the answers are in "
                ".result",
                result,
            )
        return result

    def verify(self, a: str, b: str, threshold: float = 50.0) -> Dict[str, Any]:
        """1:1 verification of two enrolled subjects: ``{"is_match", "score", "threshold", "comparison"}``
        (``threshold`` is a calibrated score; 50 means FMR 1e-5)."""
        r = json.loads(self._core.verify(str(a), str(b), float(threshold)))
        r["score"] = r["comparison"]["fused"]["score"]
        return r

    def evaluate(
        self,
        run: Union[DedupResult, PathLike],
        truth: Union[PathLike, Sequence[Tuple[str, str]]],
        impostor_pairs: int = 200_000,
    ) -> Dict[str, Any]:
        """Evaluates a run (a :class:`DedupResult` or a run directory) against ground-truth duplicate pairs
        (``pacha eval``): recall, precision, FNIR at FPIR, DET, histograms, the run's audit."""
        target = run._core if isinstance(run, DedupResult) else os.fspath(run)
        return json.loads(self._core.evaluate(target, _truth(truth), int(impostor_pairs)))


def _truth(truth: Union[PathLike, Sequence[Tuple[str, str]]]) -> List[Tuple[str, str]]:
    if isinstance(truth, (str, os.PathLike)):
        return read_truth(truth)
    out = []
    for i, p in enumerate(truth):
        a, b = p
        if not isinstance(a, str) or not isinstance(b, str):
            raise ValueError(f"truth: pair {i} is {p!r}, not two subject IDs")
        out.append((a, b))
    return out


def generate(
    out: PathLike,
    records: int = 100_000,
    *,
    seed: int = 42,
    preset: str = "structured",
    face_dim: Optional[int] = None,
    fingers: Optional[Mapping[int, int]] = None,
    duplicate_rate: float = 0.01,
    progress: Progress = False,
) -> Dict[str, Any]:
    """Generates a synthetic population with planted duplicates (``pacha generate``): writes ``face.npy``,
    ``finger<N>.npy``, ``subjects.csv``, ``truth.csv`` and ``population.json`` into ``out``; returns the
    manifest. ``fingers`` defaults to ``{2: 256, 7: 256}`` and ``face_dim`` to the preset's (512; 0 = no face).
    """
    fl = [(int(p), int(d)) for p, d in (fingers if fingers is not None else {2: 256, 7: 256}).items()]
    with _Reporter(progress, "generate") as cb:
        return json.loads(
            _pacha.generate(os.fspath(out), int(records), int(seed), str(preset),
                            None if face_dim is None else int(face_dim), fl, float(duplicate_rate), cb)
        )


def read_truth(path: PathLike) -> List[Tuple[str, str]]:
    """Reads a truth CSV (``subject_a,subject_b`` columns) into a list of pairs."""
    return [tuple(p) for p in _pacha.read_truth(os.fspath(path))]  # type: ignore[misc]


def check(path: PathLike) -> Dict[str, Any]:
    """Verifies every file of a store directory (``pacha check``) without opening it for use."""
    return json.loads(_pacha.check(os.fspath(path)))
