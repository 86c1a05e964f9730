"""Tests of the oracle (query counting, hard budget, output modes, query log, chunking) and of the
tensor contract every entry point enforces."""

from __future__ import annotations

import json
from functools import lru_cache

import pytest
import torch
from torch import Tensor

from fortress.data import mnist_splits
from fortress.defenses import DNF, Defense, DefenseOutput, Undefended
from fortress.errors import BudgetExceeded, ConfigError, InvalidInput
from fortress.models import StagedBackbone, create_model
from fortress.oracle import LocalOracle, OutputMode, QueryLog, apply_output_mode
from fortress.tensors import PROB_EPS, RANGE_TOL, check_images, check_probs, to_positive_probs
from helpers import sharpen_heads


def lenet(seed: int = 0) -> StagedBackbone:
    torch.manual_seed(seed)
    return create_model("lenet5").eval()


@lru_cache(maxsize=1)
def digits() -> Tensor:
    return mnist_splits().test.x


def images(n: int, seed: int = 0) -> Tensor:
    """Half real digits, half uniform noise."""
    x = digits()[:n].clone()
    x[n // 2 :] = torch.rand(n - n // 2, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    return x


class CountingDefense(Undefended):
    """The undefended victim, recording every batch its ``_respond`` answers."""

    name = "counting"

    def __init__(self, victim: StagedBackbone) -> None:
        super().__init__(victim)
        self.calls: list[int] = []

    def _respond(self, x: Tensor) -> DefenseOutput:
        self.calls.append(int(x.shape[0]))
        return super()._respond(x)


def scrambled_dnf(seed: int = 0) -> DNF:
    """A DNF on a random LeNet-5 whose heads are scaled so that queries leave at every exit."""
    victim = lenet(seed)
    torch.manual_seed(seed + 100)
    return sharpen_heads(DNF(victim, head_kind="vib", thresholds=[0.5, 0.7, 0.9]))


# --------------------------------------------------------------------------------------------------
# Counting and the hard budget


def test_counting_is_exact_over_many_batch_sizes() -> None:
    defense = CountingDefense(lenet())
    oracle = LocalOracle(defense, budget=None)
    sizes = [1, 2, 3, 5, 8, 13, 31, 64, 100, 7]
    for i, n in enumerate(sizes):
        out = oracle.query(images(n, seed=i))
        assert out.shape == (n, 10)
        assert oracle.queries_used == sum(sizes[: i + 1])
    assert oracle.log.queries == sum(sizes)
    assert oracle.log.batches == len(sizes)
    assert oracle.budget_left is None
    assert defense.calls == sizes


def test_budget_is_hard_and_refused_batches_cost_nothing() -> None:
    defense = CountingDefense(lenet())
    oracle = LocalOracle(defense, budget=10)
    assert oracle.budget_left == 10
    oracle.query(images(4))
    assert oracle.budget_left == 6
    with pytest.raises(BudgetExceeded) as err:
        oracle.query(images(7))
    assert (err.value.requested, err.value.used, err.value.budget) == (7, 4, 10)
    assert "nothing was charged" in str(err.value)
    assert defense.calls == [4]  # the refused batch never reached the defense
    assert oracle.queries_used == 4
    assert oracle.log.batches == 1
    assert oracle.log.refused == 1
    # exactly reaching the budget is allowed
    oracle.query(images(6))
    assert oracle.budget_left == 0
    assert oracle.queries_used == 10
    for n in (1, 5):
        with pytest.raises(BudgetExceeded):
            oracle.query(images(n))
    assert oracle.log.refused == 3
    assert defense.calls == [4, 6]
    assert oracle.queries_used == 10


def test_zero_budget_refuses_everything() -> None:
    defense = CountingDefense(lenet())
    oracle = LocalOracle(defense, budget=0)
    with pytest.raises(BudgetExceeded):
        oracle.query(images(1))
    assert defense.calls == []
    assert oracle.log.as_dict()["queries"] == 0


def test_one_batch_equal_to_the_budget_is_allowed() -> None:
    oracle = LocalOracle(Undefended(lenet()), budget=32)
    oracle.query(images(32))
    assert oracle.budget_left == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"budget": -1}, "budget"), ({"top_k": 0}, "top_k"), ({"chunk_size": 0}, "chunk_size")],
)
def test_bad_oracle_arguments_raise_config_error(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LocalOracle(Undefended(lenet()), **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Output modes


@pytest.fixture(scope="module")
def soft_reference() -> tuple[Undefended, Tensor, Tensor]:
    defense = Undefended(lenet(1))
    x = images(64, seed=5)
    return defense, x, defense.respond(x).probs


def test_soft_rows_are_strictly_positive_and_sum_to_one(
    soft_reference: tuple[Undefended, Tensor, Tensor],
) -> None:
    defense, x, probs = soft_reference
    out = LocalOracle(defense, output_mode="soft").query(x)
    assert bool((out > 0).all())
    assert torch.allclose(out.sum(1), torch.ones(len(x)), atol=1e-6)
    assert torch.allclose(out, probs, atol=1e-6)
    # even rows with exact zeros come out strictly positive
    hard = torch.zeros(3, 10)
    hard[:, 2] = 1.0
    soft = apply_output_mode(hard, OutputMode.SOFT)
    assert bool((soft > 0).all())
    assert torch.equal(soft.argmax(1), hard.argmax(1))


def test_hard_rows_are_one_hot_of_the_soft_argmax(soft_reference: tuple[Undefended, Tensor, Tensor]) -> None:
    defense, x, probs = soft_reference
    out = LocalOracle(defense, output_mode=OutputMode.HARD).query(x)
    assert torch.equal(out, torch.nn.functional.one_hot(probs.argmax(1), 10).to(out.dtype))
    assert out.dtype == torch.float32
    assert bool((out.sum(1) == 1).all())


@pytest.mark.parametrize("k", [1, 2, 3, 9, 10, 15])
def test_topk_keeps_k_entries_renormalised(soft_reference: tuple[Undefended, Tensor, Tensor], k: int) -> None:
    defense, x, probs = soft_reference
    out = LocalOracle(defense, output_mode="topk", top_k=k).query(x)
    kk = min(k, 10)
    assert bool(((out > 0).sum(1) == kk).all())
    assert torch.allclose(out.sum(1), torch.ones(len(x)), atol=1e-6)
    vals, idx = probs.topk(kk, dim=1)
    assert torch.equal((out > 0), torch.zeros_like(out, dtype=torch.bool).scatter_(1, idx, True))
    expected = torch.zeros_like(probs).scatter_(1, idx, vals / vals.sum(1, keepdim=True))
    assert torch.allclose(out, expected, atol=1e-6)
    if k == 1:
        assert torch.equal(out, LocalOracle(defense, output_mode="hard").query(x))


def test_unknown_output_mode_lists_the_valid_modes() -> None:
    with pytest.raises(ConfigError) as err:
        LocalOracle(Undefended(lenet()), output_mode="logits")
    msg = str(err.value)
    assert "'logits'" in msg
    assert all(m in msg for m in ("soft", "hard", "topk"))


# --------------------------------------------------------------------------------------------------
# Input validation (the tensor contract) through the oracle and through defense.respond

GOOD = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _with(value: float, where: tuple[int, ...] = (1, 0, 3, 5)) -> Tensor:
    x = GOOD.clone()
    x[where] = value
    return x


BAD_INPUTS: list[tuple[str, object, list[str]]] = [
    ("wrong image shape", torch.rand(4, 1, 32, 32), ["(1, 32, 32)", "expected (1, 28, 28)"]),
    ("wrong channels", torch.rand(4, 3, 28, 28), ["(3, 28, 28)", "(1, 28, 28)"]),
    ("float64", GOOD.double(), ["torch.float64", "float32"]),
    ("uint8", (GOOD * 255).to(torch.uint8), ["torch.uint8", "float32"]),
    ("3-d tensor", GOOD[0], ["(1, 28, 28)", "4-d"]),
    ("5-d tensor", GOOD.unsqueeze(0), ["(1, 4, 1, 28, 28)", "4-d"]),
    ("NaN", _with(float("nan")), ["1 NaN", "finite"]),
    ("Inf", _with(float("inf")), ["1 NaN or infinite", "finite"]),
    ("-Inf", _with(float("-inf")), ["NaN or infinite", "finite"]),
    ("above 1", _with(1.5), ["1.5", "expected [0, 1]"]),
    ("0-255 scale", GOOD * 255, ["expected [0, 1]", "255"]),
    ("below 0", _with(-0.25), ["-0.25", "expected [0, 1]"]),
    ("empty batch", torch.rand(0, 1, 28, 28), ["empty batch", "(0, 1, 28, 28)", "at least one"]),
    ("list", GOOD.tolist(), ["list", "torch.Tensor"]),
    ("numpy", GOOD.numpy(), ["ndarray", "torch.Tensor"]),
    ("None", None, ["NoneType", "torch.Tensor"]),
]


@pytest.mark.parametrize(("what", "x", "needles"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_oracle_rejects_bad_input_and_charges_nothing(what: str, x: object, needles: list[str]) -> None:
    defense = CountingDefense(lenet())
    oracle = LocalOracle(defense, budget=100)
    with pytest.raises(InvalidInput) as err:
        oracle.query(x)  # type: ignore[arg-type]
    msg = str(err.value)
    assert all(n in msg for n in needles), (what, msg)
    assert defense.calls == []
    assert oracle.queries_used == 0
    assert oracle.log.batches == 0
    assert oracle.log.refused == 0
    assert oracle.budget_left == 100


@pytest.mark.parametrize(("what", "x", "needles"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("kind", ["undefended", "dnf"])
def test_defense_respond_rejects_bad_input(what: str, x: object, needles: list[str], kind: str) -> None:
    defense: Defense = CountingDefense(lenet()) if kind == "undefended" else scrambled_dnf()
    with pytest.raises(InvalidInput) as err:
        defense.respond(x)  # type: ignore[arg-type]
    assert all(n in str(err.value) for n in needles), (what, str(err.value))
    if isinstance(defense, CountingDefense):
        assert defense.calls == []
    with pytest.raises(InvalidInput):
        defense(x)  # type: ignore[arg-type]


def test_values_within_the_range_tolerance_are_accepted() -> None:
    x = GOOD.clone()
    x[0, 0, 0, 0] = 1.0 + RANGE_TOL / 2
    x[0, 0, 0, 1] = -RANGE_TOL / 2
    assert check_images(x, (1, 28, 28)) is x
    out = LocalOracle(Undefended(lenet())).query(x)
    assert out.shape == (4, 10)
    with pytest.raises(InvalidInput):
        check_images(_with(1.0 + 10 * RANGE_TOL), (1, 28, 28))


def test_check_images_names_the_batch() -> None:
    with pytest.raises(InvalidInput, match=r"^query images"):
        LocalOracle(Undefended(lenet())).query(GOOD.double())
    with pytest.raises(InvalidInput, match=r"^pool images"):
        check_images(GOOD.double(), name="pool images")
    assert check_images(torch.rand(2, 3, 5, 7)).shape == (2, 3, 5, 7)  # any image shape without `shape`


def test_invalid_input_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="float32"):
        check_images(GOOD.double())


# --------------------------------------------------------------------------------------------------
# The query log


def test_dnf_exit_histogram_matches_respond() -> None:
    dnf = scrambled_dnf()
    oracle = LocalOracle(dnf, chunk_size=50)
    batches = [images(120, seed=1), images(33, seed=2), images(1, seed=3)]
    expected = torch.zeros(dnf.num_exits, dtype=torch.long)
    for x in batches:
        oracle.query(x)
        out = dnf.respond(x)
        assert out.exits is not None
        expected += torch.bincount(out.exits, minlength=dnf.num_exits)
    assert oracle.log.exit_counts == expected.tolist()
    assert sum(oracle.log.exit_counts) == oracle.log.queries == 154
    assert sum(c > 0 for c in oracle.log.exit_counts) >= 3  # not vacuous
    assert oracle.log.exit_hist == pytest.approx([c / 154 for c in expected.tolist()])
    assert sum(oracle.log.exit_hist) == pytest.approx(1.0)


def test_log_timing_and_summary() -> None:
    oracle = LocalOracle(scrambled_dnf())
    assert oracle.log.s_per_1k is None
    assert oracle.log.exit_hist == []
    oracle.query(images(40))
    oracle.query(images(10))
    log = oracle.log
    assert log.time_s > 0
    assert log.s_per_1k == pytest.approx(1000.0 * log.time_s / 50)
    d = log.as_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["queries"] == 50
    assert d["batches"] == 2
    assert d["refused"] == 0
    assert d["exit_counts"] == log.exit_counts
    assert d["mean_l1"] is None  # DNF does not report an ℓ1 distance
    assert d["top1_changed"] == 0


def test_undefended_log_reports_zero_perturbation() -> None:
    oracle = LocalOracle(Undefended(lenet()))
    oracle.query(images(20))
    d = oracle.log.as_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["exit_counts"] == []
    assert d["exit_hist"] == []
    assert d["mean_l1"] == 0.0
    assert d["top1_changed"] == 0
    assert oracle.log.l1_count == 20


def test_empty_query_log() -> None:
    log = QueryLog()
    assert log.exit_hist == []
    assert log.mean_l1 is None
    assert log.s_per_1k is None
    assert json.loads(json.dumps(log.as_dict())) == log.as_dict()


@pytest.mark.parametrize("mode", ["soft", "hard", "topk"])
@pytest.mark.parametrize("chunk", [1, 7, 50])
def test_chunking_gives_the_same_answers(mode: str, chunk: int) -> None:
    dnf = scrambled_dnf(seed=2)
    x = images(60, seed=4)
    whole = LocalOracle(dnf, output_mode=mode, top_k=3)
    counting = _ChunkSpy(dnf)
    chunked = LocalOracle(counting, output_mode=mode, top_k=3, chunk_size=chunk)
    a, b = whole.query(x), chunked.query(x)
    assert torch.allclose(a, b, atol=1e-5)
    if mode != "soft":
        assert torch.equal(a > 0, b > 0)
    assert whole.log.exit_counts == chunked.log.exit_counts
    assert chunked.log.queries == 60
    assert chunked.log.batches == 1
    assert max(counting.calls) <= chunk
    assert sum(counting.calls) == 60


class _ChunkSpy(Defense):
    """Forwards to another defense, recording the batch sizes it sees."""

    name = "spy"

    def __init__(self, inner: Defense) -> None:
        super().__init__(inner.victim)
        self.inner = inner
        self.calls: list[int] = []

    @property
    def num_exits(self) -> int | None:
        return self.inner.num_exits

    def _respond(self, x: Tensor) -> DefenseOutput:
        self.calls.append(int(x.shape[0]))
        return self.inner.respond(x)


# --------------------------------------------------------------------------------------------------
# tensors.check_probs and to_positive_probs


def test_check_probs_accepts_probability_rows() -> None:
    p = torch.softmax(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), 1)
    assert check_probs(p) is p
    one_hot = torch.eye(4)
    assert check_probs(one_hot) is one_hot  # zeros are allowed
    slightly_off = p * (1 + 5e-5)
    assert check_probs(slightly_off) is slightly_off  # within the default atol of 1e-4
    with pytest.raises(InvalidInput, match="sum to 1"):
        check_probs(slightly_off, atol=1e-6)


@pytest.mark.parametrize(
    ("p", "match"),
    [
        (torch.full((4,), 0.25), "2-d"),
        (torch.full((2, 2, 2), 0.5), "2-d"),
        (torch.tensor([[0.5, float("nan")]]), "NaN"),
        (torch.tensor([[0.5, float("inf")]]), "infinite"),
        (torch.tensor([[1.5, -0.5]]), "negative"),
        (torch.tensor([[0.3, 0.3]]), "sum to 1"),
        (torch.tensor([[0.5, 0.5], [0.9, 0.3]]), "sum to 1"),
    ],
)
def test_check_probs_rejects(p: Tensor, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        check_probs(p, name="answers")
    with pytest.raises(InvalidInput, match=r"^answers"):
        check_probs(p, name="answers")


def test_to_positive_probs() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(50, 10, generator=gen) * 5, 1)
    p[:10] = torch.nn.functional.one_hot(torch.arange(10), 10).float()  # rows with exact zeros
    q = to_positive_probs(p)
    assert bool((q > 0).all())
    assert bool((q >= PROB_EPS / (1 + 10 * PROB_EPS)).all())
    assert torch.allclose(q.sum(1), torch.ones(50), atol=1e-6)
    assert torch.equal(q.argmax(1), p.argmax(1))
    assert torch.allclose(q, p, atol=1e-6)
    assert check_probs(q) is q
    # rows already above the floor are (nearly) unchanged, and it is idempotent
    big = torch.full((3, 4), 0.25)
    torch.testing.assert_close(to_positive_probs(big), big)
    torch.testing.assert_close(to_positive_probs(q), q)
    # a custom floor
    r = to_positive_probs(torch.tensor([[1.0, 0.0]]), eps=0.1)
    torch.testing.assert_close(r, torch.tensor([[1 / 1.1, 0.1 / 1.1]]))


def test_bad_inputs_table_is_not_stale() -> None:
    # the valid base batch passes, so each bad case differs from it only by its own defect
    assert check_images(GOOD, (1, 28, 28)) is GOOD
