"""The DNF-aware attack: its answer features, its detector, and both signals against a toy early-exit API."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from fortress.attacks import ExitAware
from fortress.attacks.exit_aware import ExitDetector, answer_shape
from fortress.defenses import Undefended
from fortress.defenses.base import Defense, DefenseOutput
from fortress.errors import ConfigError
from fortress.models import StagedBackbone, create_model
from fortress.oracle import LocalOracle


class ToyEarlyExit(Defense):
    """Two exits. Rough queries (mean horizontal pixel change > 0.195: all uniform noise, about half of a
    fresh DFME generator's images) leave at exit 0 with a confident answer whose other classes share the
    rest evenly; the others reach the final exit (the victim's softmax at temperature 1/``sharpness``),
    which takes ``delay_s`` longer to answer."""

    name = "toy-early-exit"

    def __init__(self, victim: StagedBackbone, delay_s: float = 0.0, sharpness: float = 60.0) -> None:
        super().__init__(victim)
        self.delay_s = delay_s
        self.sharpness = sharpness

    @property
    def num_exits(self) -> int:
        return 2

    @torch.no_grad()
    def _respond(self, x: Tensor) -> DefenseOutput:
        logits = self.sharpness * self.victim(x)
        early = (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3)) > 0.195
        k = logits.shape[1]
        head = torch.full_like(logits, 0.04 / (k - 1)).scatter(1, logits.argmax(1, keepdim=True), 0.96)
        probs = torch.where(early.unsqueeze(1), head, torch.softmax(logits, dim=1))
        if self.delay_s and not bool(early.all()):
            time.sleep(self.delay_s)
        return DefenseOutput(probs=probs, exits=(~early).long())


@pytest.fixture(scope="module")
def victim() -> StagedBackbone:
    torch.manual_seed(0)
    return create_model("lenet5").eval()


def test_answer_shape_ignores_the_confidence() -> None:
    """Raising the top logit changes the confidence, not the shape of the rest of the row."""
    logits = torch.randn(5, 10)
    sharper = logits.clone()
    top = logits.argmax(1)
    sharper[torch.arange(5), top] += 4.0
    a, b = answer_shape(torch.softmax(logits, 1)), answer_shape(torch.softmax(sharper, 1))
    assert torch.allclose(a, b, atol=1e-4)
    assert a.shape == (5, 19)


def test_exit_detector_scores_zero_before_it_is_fitted() -> None:
    det = ExitDetector()
    assert det.score(np.ones((3, 2))).tolist() == [0.0, 0.0, 0.0] and not det.ready


def run_against_toy(victim: StagedBackbone, **settings: Any) -> tuple[ExitAware, Any, list[tuple[Tensor, Tensor]]]:
    seen: list[tuple[Tensor, Tensor]] = []

    def observe(_: Tensor, out: DefenseOutput) -> None:
        assert out.exits is not None
        seen.append((out.probs.clone(), out.exits.clone()))

    defense = ToyEarlyExit(victim, delay_s=settings.pop("delay_s", 0.0), sharpness=settings.pop("sharpness", 60.0))
    oracle = LocalOracle(defense, observer=observe)
    base = {"batch_size": 32, "grad_m": 1, "d_iter": 2, "nz": 16, "ngf": 4, "calib_queries": 64, "min_examples": 8}
    attack = ExitAware(oracle, **{**base, **settings})
    result = attack.run(create_model("lenet5-half"))
    assert result.queries_used == oracle.queries_used <= attack.budget
    return attack, result, seen


def test_the_confidence_detector_tells_exit_0_answers_from_final_ones(victim: StagedBackbone) -> None:
    attack, result, seen = run_against_toy(victim, budget=64 + 32 * 4 * 6, refit_every=1)
    assert result.extras["calibration_queries"] == 64 and result.extras["detector_refits"] >= 1
    probs = torch.cat([p for p, _ in seen])
    exits = torch.cat([e for _, e in seen])
    confident = probs.amax(1) >= min(attack.thresholds)
    score = attack.exit0_score(probs)
    early, final = confident & (exits == 0), confident & (exits == 1)
    assert early.sum() > 10 and final.sum() > 10, "the toy run needs confident answers from both exits"
    assert float((score[early] >= 0.5).float().mean()) > 0.9
    assert float((score[final] < 0.5).float().mean()) > 0.9
    assert torch.equal(score[~confident], torch.zeros(int((~confident).sum())))  # the threshold rule


def test_the_timing_detector_reads_response_times(victim: StagedBackbone) -> None:
    """Final-exit answers take 3 ms longer: single-image timing alone tells them apart."""
    attack, result, _ = run_against_toy(
        victim, budget=64 + 32 * 4 * 2, signal="timing", timing_batch=1, delay_s=0.003, push_weight=0.0
    )
    assert result.extras["detector_refits"] >= 1
    fast, slow = torch.full((20,), 0.0005, dtype=torch.float64), torch.full((20,), 0.0035, dtype=torch.float64)
    confident = torch.full((20, 10), 0.04 / 9).index_fill(1, torch.tensor([0]), 0.96)
    assert float(attack.exit0_score(confident, fast).mean()) > 0.5
    assert float(attack.exit0_score(confident, slow).mean()) < 0.5


def test_exit_aware_checks_its_settings(victim: StagedBackbone) -> None:
    oracle = LocalOracle(Undefended(victim))
    with pytest.raises(ConfigError, match="calib_queries"):
        ExitAware(oracle, budget=600, batch_size=64, calib_queries=512)
    with pytest.raises(ConfigError, match="thresholds"):
        ExitAware(oracle, budget=100_000, thresholds=[1.5])
