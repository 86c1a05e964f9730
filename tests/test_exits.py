"""Tests of exit heads and the early-exit network (DNF paper §4, Eq. 5, Alg. 2, App. D/E, Table 6).

Property cases are drawn from seeded generators (thresholds, batch sizes and batch compositions),
so every run checks the same cases and no test depends on global random state.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from fortress.data import mnist_splits
from fortress.errors import ConfigError
from fortress.exits.heads import ExitHead, gaussian_kl
from fortress.exits.network import PAPER_THRESHOLDS, EarlyExitNet, default_thresholds, select_exits
from fortress.models import StagedBackbone, create_model, from_sequential

HEAD_SCALE = 20.0  # makes random heads confident on some rows and unsure on others
CASES_PER_CONFIG = 25


# --------------------------------------------------------------------------------------------------
# Builders


@lru_cache(maxsize=1)
def digits() -> Tensor:
    """The embedded MNIST test digits ``(1000, 1, 28, 28)``."""
    return mnist_splits().test.x


def lenet(seed: int = 0) -> StagedBackbone:
    """A random-init LeNet-5 (training is not the point here)."""
    torch.manual_seed(seed)
    return create_model("lenet5").eval()


def byo_model(seed: int = 0) -> StagedBackbone:
    """A bring-your-own ``nn.Sequential`` with BatchNorm, staged with :func:`from_sequential`."""
    torch.manual_seed(seed)
    seq = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 7 * 7, 10),
    )
    bn = seq[1]
    assert isinstance(bn, nn.BatchNorm2d)
    with torch.no_grad():  # non-trivial running statistics, so eval-mode BN is not the identity
        bn.running_mean.copy_(torch.randn(4) * 0.3)
        bn.running_var.copy_(torch.rand(4) + 0.5)
    return from_sequential(seq, (1, 28, 28), 10, cut_after=[2, 4], mean=(0.5,), std=(0.5,)).eval()


def scramble_heads(net: EarlyExitNet, scale: float = HEAD_SCALE) -> EarlyExitNet:
    """Scale every head's first layer so confidences spread over (0.1, 1]."""
    with torch.no_grad():
        for head in net.heads:
            assert isinstance(head, ExitHead)
            head.encoder.weight.mul_(scale)
    return net.eval()


CONFIGS: dict[str, Callable[[], EarlyExitNet]] = {
    "lenet-vib": lambda: scramble_heads(EarlyExitNet(lenet(0), head_kind="vib")),
    "lenet-plain": lambda: scramble_heads(EarlyExitNet(lenet(1), head_kind="plain")),
    "lenet-vib-heads-0-2": lambda: scramble_heads(EarlyExitNet(lenet(2), head_kind="vib", exit_after=[0, 2])),
    "lenet-plain-heads-0-1": lambda: scramble_heads(EarlyExitNet(lenet(3), head_kind="plain", exit_after=[0, 1])),
    "byo-vib-hidden": lambda: scramble_heads(EarlyExitNet(byo_model(4), head_kind="vib", hidden=8), 5.0),
    "byo-plain": lambda: scramble_heads(EarlyExitNet(byo_model(5), head_kind="plain"), 5.0),
}


def make_batch(n: int, gen: torch.Generator) -> Tensor:
    """``n`` images mixing real digits, uniform noise and constant images in random proportions."""
    w = torch.rand(3, generator=gen) ** 2 + 1e-3
    kind = torch.multinomial(w / w.sum(), n, replacement=True, generator=gen)
    pool = digits()
    x = pool[torch.randint(0, pool.shape[0], (n,), generator=gen)].clone()
    noise = torch.rand(n, 1, 28, 28, generator=gen)
    const = torch.rand(n, 1, 1, 1, generator=gen).expand(n, 1, 28, 28)
    x[kind == 1] = noise[kind == 1]
    x[kind == 2] = const[kind == 2]
    return x.contiguous()


def draw_case(case: int, num_heads: int) -> tuple[int, list[float], int]:
    """Batch size, thresholds in [0, 1.2] and a batch seed for property case ``case``.

    The first cases are edge cases: batch size 1 and 300, thresholds all 0, all exactly 1, all 1.2.
    """
    gen = torch.Generator().manual_seed(1000 + case)
    n = int(torch.randint(1, 301, (1,), generator=gen))
    thr = [round(float(v), 4) for v in torch.rand(num_heads, generator=gen) * 1.2]
    edge: dict[int, tuple[int | None, list[float] | None]] = {
        0: (1, None),
        1: (300, None),
        2: (None, [0.0] * num_heads),
        3: (None, [1.0] * num_heads),
        4: (None, [1.2] * num_heads),
        5: (None, [0.3, 0.6, 0.9, 0.99][:num_heads]),
    }
    if case in edge:
        en, et = edge[case]
        n = en if en is not None else n
        thr = et if et is not None else thr
    return n, thr, 2000 + case


# --------------------------------------------------------------------------------------------------
# forward_dynamic ≡ forward_static


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_dynamic_equals_static_for_random_thresholds_and_batches(config: str) -> None:
    net = CONFIGS[config]()
    seen_exits = torch.zeros(net.num_exits, dtype=torch.long)
    for case in range(CASES_PER_CONFIG):
        n, thr, seed = draw_case(case, len(net.heads))
        net.set_thresholds(thr)
        x = make_batch(n, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ls, es = net.forward_static(x)
            ld, ed = net.forward_dynamic(x)
        where = f"{config} case {case}: n={n}, thresholds={thr}"
        assert ld.shape == ls.shape == (n, net.num_classes), where
        assert ed.dtype == es.dtype == torch.long, where
        assert torch.equal(ed, es), f"{where}: exits differ at rows {torch.nonzero(ed != es).flatten().tolist()}"
        assert torch.allclose(ld, ls, atol=1e-5), f"{where}: max diff {float((ld - ls).abs().max())}"
        seen_exits += torch.bincount(ed, minlength=net.num_exits)
    # the cases are not vacuous: every exit (each head and the final one) was taken by some row
    assert bool((seen_exits > 0).all()), f"{config}: exits used {seen_exits.tolist()}"


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_thresholds_above_one_give_the_plain_backbone(config: str) -> None:
    net = CONFIGS[config]()
    net.set_thresholds([1.01] * len(net.heads))
    x = make_batch(64, torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits, exits = net.forward_dynamic(x)
        plain = net.backbone(x)
    assert bool((exits == net.num_exits - 1).all())
    assert torch.allclose(logits, plain, atol=1e-5)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_zero_thresholds_exit_everything_at_head_zero(config: str) -> None:
    net = CONFIGS[config]()
    net.set_thresholds([0.0] * len(net.heads))
    x = make_batch(50, torch.Generator().manual_seed(8))
    with torch.no_grad():
        logits, exits = net.forward_dynamic(x)
        h = net.backbone.preprocess(x)
        for stage in net.backbone.stages[: net.exit_after[0] + 1]:
            h = stage(h)
        head0 = net.heads[0](h).logits
        all0 = net.forward_all(x).logits[0]
    assert bool((exits == 0).all())
    assert torch.allclose(logits, head0, atol=1e-6)
    assert torch.allclose(logits, all0, atol=1e-6)


def test_forward_is_the_dynamic_logits() -> None:
    net = CONFIGS["lenet-vib"]()
    net.set_thresholds([0.5, 0.7, 0.9])
    x = make_batch(40, torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(net(x), net.forward_dynamic(x)[0])


# --------------------------------------------------------------------------------------------------
# select_exits


def logits_with_conf(conf: list[list[float]], k: int = 4) -> Tensor:
    """``(E, B, k)`` logits whose softmax maximum is exactly ``conf[e][b]`` (up to float rounding)."""
    e, b = len(conf), len(conf[0])
    out = torch.empty(e, b, k, dtype=torch.float64)
    for i in range(e):
        for j in range(b):
            c = conf[i][j]
            rest = (1.0 - c) / (k - 1)
            out[i, j] = torch.log(torch.tensor([c] + [rest] * (k - 1), dtype=torch.float64))
    return out


def test_select_exits_takes_the_first_passing_head() -> None:
    # 3 heads + final; columns are rows of the batch
    conf = [
        [0.90, 0.10, 0.95, 0.30, 0.30],
        [0.99, 0.80, 0.10, 0.30, 0.99],
        [0.99, 0.99, 0.99, 0.30, 0.10],
        [0.50, 0.50, 0.50, 0.50, 0.50],  # final exit: its confidence never matters
    ]
    thr = torch.tensor([0.92, 0.94, 0.96], dtype=torch.float64)
    exits = select_exits(logits_with_conf(conf), thr)
    assert exits.dtype == torch.long
    assert exits.tolist() == [1, 2, 0, 3, 1]


def test_select_exits_ties_at_the_threshold_pass() -> None:
    # one-hot-ish logits give an exactly representable confidence: softmax([0, 0]) = 0.5
    logits = torch.zeros(3, 2, 2)
    logits[1, 1] = torch.tensor([5.0, 0.0])
    conf0 = float(torch.softmax(logits[0, 0], 0).max())
    assert conf0 == 0.5
    assert select_exits(logits, torch.tensor([0.5, 0.5])).tolist() == [0, 0]  # ≥, not >
    nxt = math.nextafter(0.5, 1.0)
    assert select_exits(logits, torch.tensor([nxt, nxt], dtype=torch.float64)).tolist() == [2, 1]


def test_select_exits_with_no_heads_passing_goes_to_final() -> None:
    logits = torch.randn(4, 10, 5, generator=torch.Generator().manual_seed(0))
    assert select_exits(logits, torch.full((3,), 1.5)).tolist() == [3] * 10
    assert select_exits(logits, torch.zeros(3)).tolist() == [0] * 10


def test_select_exits_matches_a_per_row_loop() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 200, 6, generator=gen) * 3
    thr = torch.rand(4, generator=gen)
    conf = torch.softmax(logits, 2).amax(2)
    expected = []
    for b in range(200):
        first = next((i for i in range(4) if conf[i, b] >= thr[i]), 4)
        expected.append(first)
    assert select_exits(logits, thr).tolist() == expected


# --------------------------------------------------------------------------------------------------
# forward_dynamic skips work


class RowCounter:
    """Forward pre-hooks recording how many rows each module was called with."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.rows: dict[str, list[int]] = {k: [] for k in modules}
        self.inputs: dict[str, list[Tensor]] = {k: [] for k in modules}
        self.handles = [m.register_forward_pre_hook(self._hook(k)) for k, m in modules.items()]

    def _hook(self, key: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            self.rows[key].append(int(args[0].shape[0]))
            self.inputs[key].append(args[0].detach().clone())

        return hook

    def total(self, key: str) -> int:
        return sum(self.rows[key])

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def counted(net: EarlyExitNet) -> RowCounter:
    mods: dict[str, nn.Module] = {f"stage{k}": s for k, s in enumerate(net.backbone.stages)}
    mods["final"] = net.final_head
    return RowCounter(mods)


def test_dynamic_skips_every_later_stage_when_all_exit_at_head_zero() -> None:
    net = CONFIGS["lenet-plain"]()
    net.set_thresholds([0.0, 0.0, 0.0])
    x = make_batch(32, torch.Generator().manual_seed(10))
    counter = counted(net)
    try:
        with torch.no_grad():
            _, exits = net.forward_dynamic(x)
    finally:
        counter.close()
    assert bool((exits == 0).all())
    assert counter.rows["stage0"] == [32]
    assert counter.total("stage1") == counter.total("stage2") == 0
    assert counter.rows["final"] == []  # the final classifier is not called at all


def test_dynamic_runs_later_stages_only_on_remaining_rows() -> None:
    net = CONFIGS["lenet-vib"]()
    x = make_batch(40, torch.Generator().manual_seed(11))
    with torch.no_grad():
        conf0 = torch.softmax(net.forward_all(x).logits[0], 1).amax(1)
    thr = float(conf0.sort().values[20])  # rows at or above the median confidence exit at head 0
    net.set_thresholds([thr, 1.5, 1.5])
    counter = counted(net)
    try:
        with torch.no_grad():
            _, exits = net.forward_dynamic(x)
            stage0_out = net.backbone.stages[0](net.backbone.preprocess(x))
    finally:
        counter.close()
    assert int((exits == 0).sum()) == 20
    remaining = torch.nonzero(exits != 0).flatten()
    assert counter.rows["stage0"] == [40, 40]  # one call in forward_dynamic, one above
    assert counter.rows["stage1"] == [20]
    assert counter.rows["stage2"] == [20]
    assert counter.rows["final"] == [20]
    # stage 1 saw exactly the stage-0 features of the rows that did not exit
    assert torch.allclose(counter.inputs["stage1"][0], stage0_out[remaining], atol=1e-6)


def test_full_path_runs_every_stage_on_every_row() -> None:
    net = CONFIGS["lenet-vib"]()
    net.set_thresholds([0.0, 0.0, 0.0])
    counter = counted(net)
    try:
        with torch.no_grad():
            net.forward_static(make_batch(16, torch.Generator().manual_seed(12)))
    finally:
        counter.close()
    assert all(counter.rows[k] == [16] for k in ("stage0", "stage1", "stage2", "final"))


# --------------------------------------------------------------------------------------------------
# Heads


@pytest.mark.parametrize("hidden", [None, 16])
def test_vib_head_without_sampling_is_deterministic_and_uses_the_mean(hidden: int | None) -> None:
    torch.manual_seed(0)
    head = ExitHead((6, 14, 14), 10, kind="vib", hidden=hidden).eval()
    h = torch.rand(5, 6, 14, 14, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = head(h), head(h, sample=False)
        assert a.mu is not None
        assert a.logvar is not None
        assert torch.equal(a.logits, b.logits)
        assert torch.equal(a.logits, head.decoder(a.mu))
        mu_direct, logvar_direct = head.encoder(h.flatten(1)).chunk(2, dim=1)
    assert torch.equal(a.mu, mu_direct)
    assert torch.equal(a.logvar, logvar_direct.clamp(-10.0, 10.0))
    assert a.mu.shape == (5, head.latent_dim)
    assert head.latent_dim == (10 if hidden is None else hidden)


@pytest.mark.parametrize("hidden", [None, 16])
def test_vib_head_sampling_is_reproducible_and_differs_from_the_mean(hidden: int | None) -> None:
    torch.manual_seed(0)
    head = ExitHead((16, 5, 5), 10, kind="vib", hidden=hidden)
    h = torch.rand(6, 16, 5, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        s1 = head(h, sample=True, generator=torch.Generator().manual_seed(42)).logits
        s2 = head(h, sample=True, generator=torch.Generator().manual_seed(42)).logits
        s3 = head(h, sample=True, generator=torch.Generator().manual_seed(43)).logits
        mean = head(h).logits
    assert torch.equal(s1, s2)
    assert not torch.allclose(s1, s3)
    assert not torch.allclose(s1, mean)


def test_vib_sample_has_the_latent_variance() -> None:
    torch.manual_seed(0)
    head = ExitHead((8,), 3, kind="vib")
    h = torch.rand(1, 8).expand(20000, 8)
    with torch.no_grad():
        out = head(h, sample=True, generator=torch.Generator().manual_seed(0))
    assert out.mu is not None
    assert out.logvar is not None
    std = (0.5 * out.logvar[0]).exp()
    torch.testing.assert_close(out.logits.mean(0), out.mu[0], atol=4 * float(std.max()) / 100, rtol=0)
    torch.testing.assert_close(out.logits.std(0), std, rtol=0.05, atol=0)


def test_plain_head_ignores_sampling() -> None:
    torch.manual_seed(0)
    head = ExitHead((120, 1, 1), 10, kind="plain", hidden=32)
    h = torch.rand(4, 120, 1, 1)
    with torch.no_grad():
        a = head(h)
        b = head(h, sample=True, generator=torch.Generator().manual_seed(0))
    assert a.mu is None
    assert a.logvar is None
    assert torch.equal(a.logits, b.logits)


@pytest.mark.parametrize(
    ("mu", "logvar", "expected"),
    [
        ([0.0], [0.0], 0.0),
        ([1.0], [0.0], 0.5),
        ([0.0], [math.log(2.0)], 0.5 * (2.0 - 1.0 - math.log(2.0))),
        ([2.0, -1.0], [0.0, -1.0], 0.5 * (4.0 + 1.0 + (math.exp(-1.0) - 1.0 + 1.0))),
        ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], 0.0),
    ],
)
def test_gaussian_kl_closed_form(mu: list[float], logvar: list[float], expected: float) -> None:
    kl = gaussian_kl(torch.tensor([mu], dtype=torch.float64), torch.tensor([logvar], dtype=torch.float64))
    assert kl.shape == (1,)
    assert float(kl[0]) == pytest.approx(expected, abs=1e-12)


def test_gaussian_kl_equals_torch_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(50, 7, generator=gen, dtype=torch.float64) * 2
    logvar = torch.randn(50, 7, generator=gen, dtype=torch.float64)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).sum(1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), expected)
    assert bool((gaussian_kl(mu, logvar) >= 0).all())


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_lenet5_head_parameter_counts_match_paper_table6() -> None:
    plain = EarlyExitNet(lenet(), head_kind="plain")
    per_head = [count_params(h) for h in plain.heads]
    assert per_head == [11770, 4010, 1210]
    assert sum(per_head) == 16990
    vib = EarlyExitNet(lenet(), head_kind="vib")
    for hp, hv in zip(plain.heads, vib.heads, strict=True):
        assert isinstance(hp, ExitHead)
        assert isinstance(hv, ExitHead)
        assert hv.encoder.out_features == 2 * hp.encoder.out_features == 2 * 10
        assert hv.encoder.in_features == hp.encoder.in_features
    assert [h.in_features for h in vib.heads] == [1176, 400, 120]  # type: ignore[union-attr]
    assert count_params(vib.heads) == 2 * 16990


def test_head_pooling_and_hidden_widths() -> None:
    big = ExitHead((64, 32, 32), 10, kind="plain")  # 65536 features > auto-flatten limit
    assert big.pool == "avg"
    assert big.in_features == 64
    small = ExitHead((16, 5, 5), 10, kind="plain")
    assert small.pool == "flatten"
    assert small.in_features == 400
    vib = ExitHead((16, 5, 5), 10, kind="vib", hidden=100)  # Table 5 shape: Linear(F, 100) -> Linear(100, M)
    assert vib.encoder.out_features == 200
    assert isinstance(vib.decoder, nn.Linear)
    assert vib.decoder.out_features == 10
    assert big(torch.rand(2, 64, 32, 32)).logits.shape == (2, 10)


@pytest.mark.parametrize(
    "kwargs", [{"kind": "gaussian"}, {"pool": "max"}, {"hidden": 0}, {"pool": "avg", "feature_shape": (120,)}]
)
def test_bad_head_arguments_raise_config_error(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"feature_shape": (6, 14, 14), "num_classes": 10, **kwargs}
    shape = args.pop("feature_shape")
    with pytest.raises(ConfigError):
        ExitHead(shape, args.pop("num_classes"), **args)


# --------------------------------------------------------------------------------------------------
# Frozen backbone, modes, configuration


def bn_buffers(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k or "num_batches_tracked" in k}


def test_backbone_is_frozen_and_only_heads_are_trainable() -> None:
    net = EarlyExitNet(lenet(), head_kind="vib")
    assert all(not p.requires_grad for p in net.backbone.parameters())
    assert all(p.requires_grad for p in net.heads.parameters())
    assert {id(p) for p in net.trainable_parameters()} == {id(p) for p in net.heads.parameters()}
    assert net.final_head is net.backbone.classifier


def test_trainable_final_exit_is_a_copy() -> None:
    victim = lenet()
    before = {k: v.clone() for k, v in victim.state_dict().items()}
    net = EarlyExitNet(victim, head_kind="plain", train_final_exit=True)
    assert net.final_head is not victim.classifier
    assert all(p.requires_grad for p in net.final_head.parameters())
    assert all(not p.requires_grad for p in victim.parameters())
    trainable = {id(p) for p in net.trainable_parameters()}
    assert {id(p) for p in net.final_head.parameters()} <= trainable
    with torch.no_grad():
        for p in net.final_head.parameters():
            p.add_(1.0)
    for k, v in victim.state_dict().items():
        assert torch.equal(v, before[k]), k  # the victim's own classifier is untouched


@pytest.mark.parametrize("build", ["byo", "resnet18-8x"])
def test_train_mode_keeps_the_backbone_in_eval(build: str) -> None:
    if build == "byo":
        backbone, x = byo_model(0), torch.rand(8, 1, 28, 28)
    else:
        torch.manual_seed(0)
        backbone = create_model("resnet18-8x", image_size=8, num_classes=10, in_channels=3)
        x = torch.rand(8, 3, 8, 8)
    net = EarlyExitNet(backbone, head_kind="vib", train_final_exit=True)
    before = bn_buffers(net.backbone)
    assert before, "the backbone must have BatchNorm buffers for this test to mean anything"
    ret = net.train()
    assert ret is net
    assert net.training
    assert all(h.training for h in net.heads)
    assert net.final_head.training
    assert not any(m.training for m in net.backbone.modules())
    with torch.no_grad():
        net.forward_all(x, sample=True, generator=torch.Generator().manual_seed(0))
    after = bn_buffers(net.backbone)
    assert all(torch.equal(before[k], after[k]) for k in before)
    net.eval()
    assert not net.training
    assert not any(h.training for h in net.heads)


def test_set_thresholds_validates() -> None:
    net = EarlyExitNet(lenet(), head_kind="plain")
    net.set_thresholds([0.1, 0.2, 1.5])
    assert net.thresholds.tolist() == pytest.approx([0.1, 0.2, 1.5])
    for bad in ([0.9, 0.9], [0.9, 0.9, 0.9, 0.9], [0.9, float("nan"), 0.9], [0.9, -0.1, 0.9]):
        with pytest.raises(ConfigError, match="threshold"):
            net.set_thresholds(bad)
    assert net.thresholds.tolist() == pytest.approx([0.1, 0.2, 1.5])  # unchanged by refused updates
    with pytest.raises(ConfigError):
        EarlyExitNet(lenet(), thresholds=[0.9])


@pytest.mark.parametrize("exit_after", [[], [2, 0], [0, 0], [-1], [3], [0, 1, 2, 3]])
def test_bad_exit_after_raises_config_error(exit_after: list[int]) -> None:
    with pytest.raises(ConfigError, match="exit_after"):
        EarlyExitNet(lenet(), exit_after=exit_after)


def test_bad_hidden_list_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="hidden"):
        EarlyExitNet(lenet(), hidden=[8, 8])


def test_per_head_hidden_widths() -> None:
    net = EarlyExitNet(lenet(), head_kind="plain", hidden=[None, 32, 16])
    assert [h.hidden for h in net.heads] == [None, 32, 16]  # type: ignore[union-attr]
    assert net.num_exits == 4


def test_default_thresholds() -> None:
    assert default_thresholds(3, "mnist") == (0.92, 0.94, 0.96)
    assert default_thresholds(4, "cifar10") == (0.90, 0.92, 0.94, 0.96)
    assert default_thresholds(4, "cifar100") == PAPER_THRESHOLDS["cifar100"]
    assert default_thresholds(3) == (0.92, 0.94, 0.96)
    generic = default_thresholds(6)
    assert len(generic) == 6
    assert generic[0] == pytest.approx(0.90)
    assert all(b > a for a, b in itertools.pairwise(generic))
    assert all(t <= 0.99 for t in default_thresholds(10))
    assert EarlyExitNet(lenet(), dataset="mnist").thresholds.tolist() == pytest.approx([0.92, 0.94, 0.96])
