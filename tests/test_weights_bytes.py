"""Saved weights are byte-identical for equal tensors and metadata (file hashes can be compared)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from fortress.models.io import canonical_safetensors, load_state, save_state

_META = {"format": "fortress", "arch": "lenet5", "note": "x", "zeta": "1", "alpha": "2"}
_SCRIPT = """
import hashlib, sys, torch
from fortress.models.io import canonical_safetensors
t = {"w": torch.arange(12, dtype=torch.float32).view(3, 4), "b": torch.arange(3)}
meta = {"format": "fortress", "arch": "lenet5", "note": "x", "zeta": "1", "alpha": "2"}
print(hashlib.sha256(canonical_safetensors(t, meta)).hexdigest())
"""


def _tensors() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(12, dtype=torch.float32).view(3, 4), "b": torch.arange(3)}


def test_equal_tensors_and_metadata_give_equal_bytes_every_time() -> None:
    digests = {hashlib.sha256(canonical_safetensors(_tensors(), _META)).hexdigest() for _ in range(30)}
    assert len(digests) == 1


def test_equal_bytes_across_processes_and_hash_seeds() -> None:
    here = hashlib.sha256(canonical_safetensors(_tensors(), _META)).hexdigest()
    for seed in ("0", "1", "77"):
        out = subprocess.run(
            [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": seed}
        )
        assert out.stdout.strip() == here


def test_saved_file_loads_with_its_tensors_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_state(_tensors(), path, _META)
    loaded = load_state(path)
    assert set(loaded) == {"w", "b"} and torch.equal(loaded["w"], _tensors()["w"])
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata() == _META
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed, not left behind
