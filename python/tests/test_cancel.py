"""Ctrl-C cancels a dedup cleanly: KeyboardInterrupt is raised, the engine stops early, the store is intact."""

from __future__ import annotations

import _thread
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import pacha


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 000 random 128-d faces: an exact dedup in 64-row blocks takes long enough to interrupt (20 000 rows
    took 0.44 s on an idle machine, under the 0.5 s the test needs)."""
    path = tmp_path_factory.mktemp("cancel") / "reg"
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40_000, 128)).astype(np.float32)
    with pacha.Store.create(path, face_dim=128) as s:
        s.ingest([f"P{i}" for i in range(len(x))], face=x)
    return path


def exact_run(s: pacha.Store, **kw):
    return s.dedup(mode="exact", block_rows=64, **kw)


def test_ctrl_c_cancels_dedup(big_store: Path) -> None:
    with pacha.Store.open(big_store, read_only=True) as s:
        t0 = time.monotonic()
        full = exact_run(s)
        full_secs = time.monotonic() - t0
        assert full_secs > 0.5, f"the full run took {full_secs:.2f} s: too short to test cancellation"
        reports = []

        def progress(stage: str, done: int, total: int) -> None:
            # The first report comes while the run is going: simulate Ctrl-C (SIGINT's Python-level effect).
            reports.append((done, total))
            if len(reports) == 1:
                _thread.interrupt_main()

        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            exact_run(s, progress=progress)
        cancelled_secs = time.monotonic() - t0
        assert reports[0][0] < reports[0][1]
        # It stopped between blocks, well before the run would have finished.
        assert cancelled_secs < 0.8 * full_secs, (cancelled_secs, full_secs)
        # The handle still works and gives the same answer as before.
        again = exact_run(s)
        assert list(again.hits["subject_a"]) == list(full.hits["subject_a"])
        assert np.array_equal(again.hits["score"], full.hits["score"])
    assert pacha.check(big_store)["ok"]


def test_signal_from_a_timer_thread_cancels(big_store: Path) -> None:
    with pacha.Store.open(big_store, read_only=True) as s:
        timer = threading.Timer(0.3, _thread.interrupt_main)
        t0 = time.monotonic()
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                exact_run(s)
        finally:
            timer.cancel()
        assert time.monotonic() - t0 < 5
        assert len(exact_run(s).hits["score"]) >= 0


def test_exception_in_progress_callback_cancels_and_propagates(big_store: Path) -> None:
    class Stop(Exception):
        pass

    def progress(stage: str, done: int, total: int) -> None:
        raise Stop("enough")

    with pacha.Store.open(big_store, read_only=True) as s:
        with pytest.raises(Stop, match="enough"):
            exact_run(s, progress=progress)
    assert pacha.check(big_store)["ok"]


def test_other_threads_run_while_dedup_releases_the_gil(big_store: Path) -> None:
    ticks = []
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.01)

    th = threading.Thread(target=ticker)
    with pacha.Store.open(big_store, read_only=True) as s:
        th.start()
        t0 = time.monotonic()
        exact_run(s)
        t1 = time.monotonic()
        stop.set()
        th.join()
    during = [t for t in ticks if t0 < t < t1]
    # A thread that needs the GIL kept ticking through the run (one tick per 10 ms sleep, allow heavy load).
    assert len(during) >= max(3, int((t1 - t0) / 0.01 * 0.2)), (len(during), t1 - t0)
