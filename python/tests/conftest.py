"""Shared fixtures of the Python test suite: the `pacha` CLI binary, generated populations, CLI runs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

import pacha

REPO = Path(__file__).resolve().parents[2]


def _cannot_run(why: str) -> None:
    """A test that cannot run fails under CI=true (as the Rust suite's `cannot_run`), else it is skipped."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"cannot run under CI=true: {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def pacha_bin() -> str:
    """The `pacha` CLI binary: $PACHA_BIN, else the workspace's debug build."""
    p = os.environ.get("PACHA_BIN") or str(REPO / "target" / "debug" / "pacha")
    if not Path(p).is_file():
        _cannot_run(f"no pacha CLI binary at {p} (build it with `cargo build -p pacha-cli` or set PACHA_BIN)")
    return p


def run_cli(pacha_bin: str, *args: str, expect: int = 0) -> Dict:
    """Runs `pacha --json --quiet ARGS`, checks its exit code, returns its JSON output (or {})."""
    r = subprocess.run([pacha_bin, "--json", "--quiet", *args], capture_output=True, text=True)
    assert r.returncode == expect, f"pacha {' '.join(args)} exited {r.returncode}, expected {expect}:\n{r.stderr}"
    out = r.stdout.strip().splitlines()
    return json.loads(out[-1]) if out else {}


def read_subjects(path: Path) -> Tuple[List[str], Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """A generated subjects.csv: IDs, presence and quality per modality key."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    ids = [r[0] for r in body]
    present: Dict[str, np.ndarray] = {}
    quality: Dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        if name.endswith("_present"):
            key = name[: -len("_present")]
            present[key] = np.array([r[j] == "1" for r in body], dtype=bool)
        elif name.endswith("_quality"):
            key = name[: -len("_quality")]
            quality[key] = np.array([float(r[j]) for r in body], dtype=np.float32)
    return ids, present, quality


class Population:
    """A generated population on disk and its arrays."""

    def __init__(self, root: Path, manifest: Dict) -> None:
        self.root = root
        self.manifest = manifest
        self.ids, self.present, self.quality = read_subjects(root / "subjects.csv")
        self.face = np.load(root / "face.npy") if (root / "face.npy").exists() else None
        self.fingers = {
            int(p.stem[len("finger"):]): np.load(p) for p in sorted(root.glob("finger*.npy"))
        }
        self.truth = root / "truth.csv"

    def cli_files(self) -> List[str]:
        """The `pacha ingest` flags of this population."""
        args = []
        if self.face is not None:
            args += ["--face", str(self.root / "face.npy")]
        for p in self.fingers:
            args += ["--finger", f"{p}={self.root / f'finger{p}.npy'}"]
        return args + ["--subjects", str(self.root / "subjects.csv")]

    def ingest_kwargs(self) -> Dict:
        """The `Store.ingest` keyword arguments of this population."""
        kw: Dict = {"face": self.face, "finger": dict(self.fingers), "present": {}, "quality": {}}
        for key in self.present:
            kw["present"][key] = self.present[key]
            kw["quality"][key] = self.quality[key]
        return kw

    def schema(self) -> Dict:
        """`Store.create` keyword arguments."""
        return {
            "face_dim": None if self.face is None else self.face.shape[1],
            "fingers": {p: a.shape[1] for p, a in self.fingers.items()},
        }


@pytest.fixture(scope="session")
def small_pop(tmp_path_factory: pytest.TempPathFactory) -> Population:
    """3 000 enrolments, face 64-d + fingers 2 and 7 at 32-d, 2 % planted duplicates (exact-mode size)."""
    root = tmp_path_factory.mktemp("small_pop")
    m = pacha.generate(root, 3000, seed=7, face_dim=64, fingers={2: 32, 7: 32}, duplicate_rate=0.02)
    return Population(root, m)


@pytest.fixture(scope="session")
def index_pop(tmp_path_factory: pytest.TempPathFactory) -> Population:
    """8 000 face-only enrolments at 64-d (above the 5 000-row exact cut-off: index mode, audited)."""
    root = tmp_path_factory.mktemp("index_pop")
    m = pacha.generate(root, 8000, seed=11, face_dim=64, fingers={}, duplicate_rate=0.01)
    return Population(root, m)
