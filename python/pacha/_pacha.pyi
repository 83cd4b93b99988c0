"""Type stubs of ``pacha._pacha``, the compiled core (PyO3). The public API is ``pacha`` (``__init__.py``)."""

from os import PathLike
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

_Path = Union[str, PathLike[str]]
_Progress = Optional[Callable[[str, int, int], Any]]
_Block = Tuple[str, Any, Optional[npt.NDArray[np.bool_]], Optional[npt.NDArray[np.float32]]]

class PachaError(RuntimeError):
    """An engine failure that is neither bad input nor an I/O error."""

class Engine:
    """An open store: the handle ``pacha.Store`` wraps."""

    @staticmethod
    def create(path: _Path, modalities: List[Tuple[str, int]]) -> Engine: ...
    @staticmethod
    def open(path: _Path, read_only: bool) -> Engine: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def path(self) -> str: ...
    @property
    def read_only(self) -> bool: ...
    def info(self) -> str: ...
    def live(self) -> int: ...
    def rows(self) -> int: ...
    def subject_ids(self) -> List[str]: ...
    def deleted(self) -> npt.NDArray[np.bool_]: ...
    def templates(self, key: str) -> Tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...
    def ingest(self, ids: List[str], blocks: List[_Block], batch: int, progress: _Progress = None) -> str: ...
    def build_index(self, progress: _Progress = None) -> None: ...
    def calibrate(
        self,
        truth: Optional[List[Tuple[str, str]]],
        impostor_pairs: int,
        seed: int,
        tail_rows: int,
        quality_bands: int,
        tail_pool: str,
        tail_rows_max: int,
    ) -> str: ...
    def dedup(
        self,
        target_fpir: float,
        from_row: Optional[int],
        mode: str,
        block_rows: Optional[int],
        floor: Optional[float],
        checkpoint: Optional[_Path],
        sketch: bool,
        genuine_miss: float,
        audit_probes: int,
        audit_seed: Optional[int],
        min_recall: float,
        progress: _Progress = None,
        force_path: Optional[str] = None,
    ) -> RunOutput: ...
    def identify(
        self,
        blocks: List[Tuple[str, Any]],
        max_results: int,
        target_fpir: float,
        gallery: Optional[List[str]],
        min_score: Optional[float],
        audit_probes: int,
        audit_seed: Optional[int],
        min_recall: float,
    ) -> Tuple[List[Dict[str, Any]], Optional[str], str]: ...
    def verify(self, a: str, b: str, threshold: float) -> str: ...
    def delete(self, ids: List[str]) -> int: ...
    def evaluate(self, run: Union[RunOutput, _Path], truth: List[Tuple[str, str]], impostor_pairs: int) -> str: ...
    def check(self) -> str: ...

class RunOutput:
    """A finished dedup run: ``pacha.DedupResult`` wraps it."""

    @property
    def threshold(self) -> float: ...
    @property
    def proven(self) -> bool: ...
    def hits(self) -> Dict[str, Any]: ...
    def clusters(self) -> Dict[str, Any]: ...
    def summary_json(self) -> str: ...
    def write(self, dir: _Path) -> str: ...
    def __len__(self) -> int: ...

def generate(
    out: _Path,
    records: int,
    seed: int,
    preset: str,
    face_dim: Optional[int],
    fingers: List[Tuple[int, int]],
    duplicate_rate: float,
    progress: _Progress = None,
) -> str: ...
def read_truth(path: _Path) -> List[Tuple[str, str]]: ...
def check(path: _Path) -> str: ...
