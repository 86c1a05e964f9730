"""Exit heads (plain and VIB), the early-exit network and its exit criterion."""

from __future__ import annotations

from fortress.exits.heads import ExitHead, HeadOutput, gaussian_kl
from fortress.exits.network import PAPER_THRESHOLDS, AllExits, EarlyExitNet, default_thresholds, select_exits

__all__ = [
    "PAPER_THRESHOLDS",
    "AllExits",
    "EarlyExitNet",
    "ExitHead",
    "HeadOutput",
    "default_thresholds",
    "gaussian_kl",
    "select_exits",
]
