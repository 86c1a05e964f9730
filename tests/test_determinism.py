"""Same seed, same result in any process: every seeded procedure, in two fresh interpreters.

``seeded_runs.py`` runs victim training, DCGAN and DNF training, the SMAC3 threshold search, MeCo
and adaptive-misinformation training, every registered attack (and Knockoff's adaptive strategy)
against a DNF, and one benchmark-grid cell, at toy size, and prints a digest of each one's weights,
records and trials. The two interpreters differ in ``PYTHONHASHSEED`` (0 and 1: seeds under which
SMAC3's hash-ordered local search once suggested different thresholds) and must agree exactly.
Both run with one torch thread: a different intra-op thread count changes the order of float
reductions, so bit-identical results also need the same thread count (recorded by the grid runner).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fortress

HERE = Path(__file__).parent


def test_every_seeded_procedure_gives_identical_results_across_interpreters(tmp_path: Path) -> None:
    src = str(Path(fortress.__file__).resolve().parents[1])
    procs = {}
    for hash_seed in ("0", "1"):
        env = {
            **os.environ,
            "PYTHONHASHSEED": hash_seed,
            "PYTHONPATH": os.pathsep.join([src, str(HERE)]),
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, str(HERE / "seeded_runs.py"), str(tmp_path / f"hash{hash_seed}")]
        procs[hash_seed] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    digests = {}
    for hash_seed, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        digests[hash_seed] = json.loads(out)
    a, b = digests["0"], digests["1"]
    assert len(a) >= 14 and a.keys() == b.keys()
    differ = [name for name in a if a[name] != b[name]]
    assert not differ, f"results depend on the process (PYTHONHASHSEED 0 vs 1): {differ}"
