"""Output-perturbation baselines: batched fast paths equal naive per-sample references, plus properties.

The references follow the original implementations step by step: one sample at a time, the
surrogate's Jacobian by one autograd call per class, every candidate vertex scored in a Python loop,
GRAD²'s greedy mass walk per row.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from fortress.defenses import (
    DEFENSES,
    MAD,
    DefenderData,
    Defense,
    Grad2,
    MADArgmax,
    RandP,
    ReverseSigmoid,
    load_defense,
)
from fortress.defenses._perturb import SurrogateFitConfig, finish, l1_ball_project
from fortress.defenses.grad2 import grad2_coefficients, redirect
from fortress.defenses.mad import mad_target
from fortress.errors import ConfigError, InvalidInput
from fortress.models import create_model
from fortress.models.staged import StagedBackbone

torch.set_num_threads(1)


def _net(seed: int, sharp: float = 8.0, num_classes: int = 10) -> StagedBackbone:
    """A random LeNet-5 whose last layer is scaled up so its outputs are peaked like a trained victim's."""
    torch.manual_seed(seed)
    net = create_model("lenet5", num_classes=num_classes)
    last = [m for m in net.classifier.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(sharp)
        last.bias.mul_(sharp)
    return net.eval()


@pytest.fixture(scope="module")
def victim() -> StagedBackbone:
    return _net(0)


@pytest.fixture(scope="module")
def surrogate() -> StagedBackbone:
    return _net(1, sharp=3.0)


@pytest.fixture(scope="module")
def x() -> Tensor:
    return torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------- naive references (original style)


def _objective(g: Tensor, y_tilde: Tensor, y: Tensor) -> float:
    u = g.T @ y_tilde
    v = g.T @ y
    return float(((u / u.norm()) - (v / v.norm())).norm() ** 2)


def _ref_mad(
    victim: nn.Module, surrogate: StagedBackbone, x: Tensor, eps: float, oracle: str, max_iters: int
) -> Tensor:
    sur = copy.deepcopy(surrogate).double()
    for q in sur.parameters():
        q.requires_grad_(True)
    weight = list(sur.parameters())[-2]  # the last linear layer's weight, as the original code takes it
    rows = []
    for i in range(x.shape[0]):
        with torch.no_grad():
            y = torch.softmax(victim(x[i : i + 1]), dim=1)[0]
        nll = -torch.log_softmax(sur(x[i : i + 1].double()), dim=1)[0]
        k_cls = nll.shape[0]
        g = torch.stack(
            [torch.autograd.grad(nll[k], weight, retain_graph=True)[0].flatten() for k in range(k_cls)]
        ).detach()
        y64 = y.double()
        top = int(y.argmax())
        best, best_val = None, -1.0
        if oracle == "extreme":
            for k in range(k_cls):
                cand = torch.zeros(k_cls, dtype=torch.float64)
                cand[k] = 1.0
                val = _objective(g, cand, y64)
                if val > best_val:
                    best, best_val = cand, val
        elif k_cls <= 10:
            for bits in itertools.product([0, 1], repeat=k_cls):
                if bits[top] == 0:
                    continue
                cand = torch.tensor(bits, dtype=torch.float64)
                cand[top] += 1e-5
                cand = cand / cand.sum()
                val = _objective(g, cand, y64)
                if val > best_val:
                    best, best_val = cand, val
        else:
            y_lift = (y64 + 1e-8) / (y64 + 1e-8).sum()
            fixed, n_iter = [top], 0
            while n_iter < max_iters:
                rest = sorted(set(range(k_cls)) - set(fixed))
                if not rest:
                    break
                vals = []
                cands = []
                for k in rest:
                    cand = torch.zeros(k_cls, dtype=torch.float64)
                    cand[fixed] = 1.0
                    cand[k] = 1.0
                    cand[top] += 1e-5
                    cands.append(cand / cand.sum())
                    vals.append(_objective(g, cands[-1], y_lift))
                j = max(range(len(vals)), key=lambda t: (vals[t], -t))
                if vals[j] > best_val:
                    best, best_val = cands[j], vals[j]
                fixed.append(rest[j])
                n_iter += len(rest)
        assert best is not None
        y_star = best.to(y.dtype)
        alpha = min(max(eps / (float((y - y_star).abs().sum()) + 1e-7), 0.0), 1.0)
        rows.append((1 - alpha) * y + alpha * y_star)
    with torch.no_grad():
        y_all = torch.softmax(victim(x), dim=1)
    return finish(y_all, torch.stack(rows)).probs


def _ref_grad2(victim: nn.Module, surrogate: StagedBackbone, x: Tensor, eps: float, target: str) -> Tensor:
    sur = copy.deepcopy(surrogate)
    params = list(sur.parameters())
    for q in params:
        q.requires_grad_(True)
    with torch.no_grad():
        y_all = torch.softmax(victim(x), dim=1)
    k_cls = y_all.shape[1]

    def per_class_grads(i: int) -> Tensor:
        logp = torch.log_softmax(sur(x[i : i + 1]), dim=1)[0]
        return torch.stack(
            [
                torch.cat([g.flatten() for g in torch.autograd.grad(logp[k], params, retain_graph=True)])
                for k in range(k_cls)
            ]
        )

    grads = [per_class_grads(i) for i in range(x.shape[0])]
    if target == "all-ones":
        t = -torch.ones(grads[0].shape[1])
    else:
        t = sum(y_all[i] @ grads[i] for i in range(x.shape[0])) / x.shape[0]
    rows = []
    for i in range(x.shape[0]):
        c = grads[i] @ t
        order = torch.argsort(c).tolist()
        y = y_all[i].clone()
        m = min(1 - float(y[order[0]]), eps / 2)
        need = m
        for j in reversed(order[1:]):
            take = min(float(y[j]), need)
            y[j] -= take
            need -= take
            if need <= 0:
                break
        y[order[0]] += m
        rows.append(y)
    return finish(y_all, torch.stack(rows)).probs


# ---------------------------------------------------------------- equivalence with the references


@pytest.mark.parametrize("cls", [MAD, MADArgmax])
@pytest.mark.parametrize("eps", [0.3, 1.0])
def test_mad_matches_per_sample_autograd_reference(cls, eps, victim, surrogate, x) -> None:
    fast = cls(victim, epsilon=eps, surrogate=copy.deepcopy(surrogate)).respond(x).probs
    ref = _ref_mad(victim, surrogate, x, eps, cls.oracle, 1024)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("max_candidates", [25, 1024])
def test_mad_argmax_greedy_matches_reference_for_many_classes(max_candidates) -> None:
    victim, surrogate = _net(4, num_classes=13), _net(5, sharp=3.0, num_classes=13)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    d = MADArgmax(victim, surrogate=copy.deepcopy(surrogate), max_candidates=max_candidates)
    out = d.respond(x)
    ref = _ref_mad(victim, surrogate, x, 1.0, "argmax", max_candidates)
    torch.testing.assert_close(out.probs, ref, atol=1e-5, rtol=0)
    assert not bool(out.top1_changed.any())


def test_mad_closed_form_cancels_features() -> None:
    """The K-dim objective picks the same vertex as the D-dim one for arbitrary p, y (fact sheet §3.7)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(50, 10, generator=gen), dim=1)
    y = torch.softmax(3 * torch.randn(50, 10, generator=gen), dim=1)
    h = torch.rand(50, 7, generator=gen, dtype=torch.float64) + 0.1
    eye = torch.eye(10, dtype=torch.float64)
    for i in range(50):
        g = torch.stack([torch.outer(p[i].double() - eye[k], h[i]).flatten() for k in range(10)])
        vals = [_objective(g, eye[k], y[i].double()) for k in range(10)]
        assert int(mad_target(p[i : i + 1], y[i : i + 1], "extreme").argmax()) == max(
            range(10), key=lambda k: (vals[k], -k)
        )


@pytest.mark.parametrize("target", ["all-ones", "min-ip"])
@pytest.mark.parametrize("eps", [0.4, 1.0])
def test_grad2_matches_per_sample_autograd_reference(target, eps, victim, surrogate, x) -> None:
    fast = Grad2(victim, epsilon=eps, target=target, surrogate=copy.deepcopy(surrogate)).respond(x).probs
    ref = _ref_grad2(victim, surrogate, x, eps, target)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


def test_grad2_jvp_equals_double_backprop(victim, surrogate, x) -> None:
    """Mazeika et al. get C by back-propagating ⟨Gᵀỹ, t'⟩ into ỹ; the JVP gives B·C."""
    with torch.no_grad():
        y = torch.softmax(victim(x), dim=1)
    sur = copy.deepcopy(surrogate)
    params = list(sur.parameters())
    y_t = y.clone().requires_grad_(True)
    loss = (y_t * torch.log_softmax(sur(x), dim=1)).sum(dim=1).mean()
    gty = torch.autograd.grad(loss, params, create_graph=True)
    obj = sum((-g).sum() for g in gty)
    (coef_ref,) = torch.autograd.grad(obj, y_t)
    coef = grad2_coefficients(surrogate, x, y, "all-ones")
    torch.testing.assert_close(coef / x.shape[0], coef_ref, atol=1e-5, rtol=1e-4)


def test_redirect_is_the_lp_optimum_on_small_cases() -> None:
    """Greedy GRAD² solution never loses to random feasible points of the LP."""
    gen = torch.Generator().manual_seed(1)
    y = torch.softmax(2 * torch.randn(20, 5, generator=gen), dim=1)
    c = torch.randn(20, 5, generator=gen)
    sol = redirect(y, c, 0.6)
    assert bool(((sol - y).abs().sum(1) <= 0.6 + 1e-6).all())
    best = (sol * c).sum(1)
    for _ in range(300):  # random feasible points: steps from y towards random simplex points
        q = torch.distributions.Dirichlet(torch.full((5,), 0.3)).sample((20,))
        t = (0.6 / (q - y).abs().sum(1, keepdim=True)).clamp(max=1.0)
        cand = y + t * (q - y)
        assert bool(((cand * c).sum(1) >= best - 1e-6).all())


def test_randp_random_class_matches_loop_reference(victim, x) -> None:
    out = RandP(victim, epsilon=0.8, seed=5).respond(x)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        y = torch.softmax(victim(x), dim=1)
    draws = torch.randint(0, 9, (x.shape[0],), generator=gen).tolist()
    rows = []
    for i in range(x.shape[0]):
        others = [k for k in range(10) if k != int(y[i].argmax())]
        row = 0.6 * y[i].clone()
        row[others[draws[i]]] += 0.4
        rows.append(row)
    torch.testing.assert_close(out.probs, finish(y, torch.stack(rows)).probs, atol=1e-6, rtol=0)
    assert out.l1 is not None
    receiver_mass = torch.stack([y[i, others_i] for i, others_i in enumerate(_receivers(y, draws))])
    torch.testing.assert_close(out.l1, 0.8 * (1 - receiver_mass), atol=1e-5, rtol=0)  # ‖ŷ − y‖₁ = ε(1 − y_r)
    # at ε = 1 the receiving class holds at least one half: top-1 always moves
    full = RandP(victim, epsilon=1.0).respond(x).top1_changed
    assert full is not None and bool(full.all())


def _receivers(y: Tensor, draws: list[int]) -> list[int]:
    return [[k for k in range(y.shape[1]) if k != int(y[i].argmax())][d] for i, d in enumerate(draws)]


def test_l1_projection_matches_bisection() -> None:
    gen = torch.Generator().manual_seed(2)
    v = (
        torch.randn(40, 7, generator=gen, dtype=torch.float64)
        * torch.rand(40, 1, generator=gen, dtype=torch.float64)
        * 2
    )
    z = 1.0
    out = l1_ball_project(v, z)
    for i in range(40):
        a = v[i].abs()
        if float(a.sum()) <= z:
            torch.testing.assert_close(out[i], v[i])
            continue
        lo, hi = 0.0, float(a.max())
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if float((a - mid).clamp_min(0).sum()) > z else (lo, mid)
        torch.testing.assert_close(out[i], torch.sign(v[i]) * (a - lo).clamp_min(0), atol=1e-9, rtol=0)


def test_reverse_sigmoid_matches_elementwise_formula(victim, x) -> None:
    import math

    out = ReverseSigmoid(victim, beta=0.3, gamma=0.5).respond(x).probs
    with torch.no_grad():
        y = torch.softmax(victim(x), dim=1).double()
    rows = []
    for i in range(y.shape[0]):
        vals = []
        for v in y[i].tolist():
            s = 1 / (1 + math.exp(-0.5 * math.log(v / (1 - v))))
            vals.append(max(v - 0.3 * (s - 0.5), 0.0))
        rows.append([t / sum(vals) for t in vals])
    torch.testing.assert_close(
        out.double(), finish(y, torch.tensor(rows, dtype=torch.float64)).probs, atol=1e-5, rtol=0
    )


# ---------------------------------------------------------------- properties shared by every defense


def _all(victim: StagedBackbone, surrogate: StagedBackbone) -> list[Defense]:
    return [
        RandP(victim, seed=1),
        RandP(victim, mode="logit-noise", seed=1),
        RandP(victim, mode="logit-noise", noise="gaussian", seed=1),
        MAD(victim, surrogate=surrogate),
        MADArgmax(victim, surrogate=surrogate),
        Grad2(victim, surrogate=surrogate),
        Grad2(victim, target="min-ip", surrogate=surrogate),
        ReverseSigmoid(victim),
        ReverseSigmoid(victim, beta=3.0),
    ]


def test_outputs_are_valid_rows_with_honest_l1_and_top1(victim, surrogate) -> None:
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        y = torch.softmax(victim(x), dim=1)
    for d in _all(victim, surrogate):
        out = d.respond(x)
        p = out.probs
        assert p.shape == (64, 10) and bool(torch.isfinite(p).all()) and float(p.min()) > 0, d.name
        torch.testing.assert_close(p.sum(1), torch.ones(64), atol=1e-5, rtol=0)
        assert out.l1 is not None and out.top1_changed is not None
        torch.testing.assert_close(out.l1, (p - y).abs().sum(1), atol=1e-6, rtol=0)
        assert torch.equal(out.top1_changed, p.argmax(1) != y.argmax(1)), d.name
        if not isinstance(d, ReverseSigmoid):  # RandP's logit mode: ℓ1 ≤ (ε/2)/(1 − ε/4) < ε
            assert float(out.l1.max()) <= 1.0 + 1e-4, d.name


@pytest.mark.parametrize("eps", [0.0, 0.25, 1.0, 2.0])
def test_output_budget_is_respected_and_used(eps, victim, surrogate) -> None:
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(10))
    for d in (
        RandP(victim, epsilon=eps),
        MAD(victim, epsilon=eps, surrogate=surrogate),
        Grad2(victim, epsilon=eps, surrogate=surrogate),
    ):
        l1 = d.respond(x).l1
        assert l1 is not None
        assert float(l1.max()) <= eps + 1e-4, d.name
    # MAD spends min(ε, ‖y − y*‖₁): the whole budget whenever the vertex is farther than ε.
    out = MAD(victim, epsilon=0.25, surrogate=surrogate).respond(x)
    assert out.l1 is not None and float(out.l1.min()) > 0.25 - 1e-4


def test_mad_argmax_and_reverse_sigmoid_keep_top1(victim, surrogate) -> None:
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(11))
    for d in (MADArgmax(victim, surrogate=surrogate), ReverseSigmoid(victim)):
        out = d.respond(x)
        assert out.top1_changed is not None and not bool(out.top1_changed.any()), d.name


def test_saturated_victim_gives_finite_positive_rows() -> None:
    victim = _net(7, sharp=1e4)  # softmax underflows to exact zeros
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        assert float(torch.softmax(victim(x), 1).min()) == 0.0
    for d in _all(victim, _net(8)):
        p = d(x)
        assert bool(torch.isfinite(p).all()) and float(p.min()) > 0, d.name


def test_seeded_and_deterministic(victim, surrogate, x) -> None:
    for a, b in zip(_all(victim, surrogate), _all(victim, surrogate), strict=True):
        first = a(x)
        torch.testing.assert_close(first, b(x), atol=0, rtol=0)
        if isinstance(a, RandP):
            assert not torch.equal(first, a(x))  # fresh noise per call ...
            a.reset_rng()
            torch.testing.assert_close(a(x), first, atol=0, rtol=0)  # ... from a rewindable generator
        else:
            torch.testing.assert_close(a(x), first, atol=0, rtol=0)
    # the default surrogate is seeded: same seed, same answers; another seed, another surrogate
    torch.testing.assert_close(MAD(victim, seed=3)(x), MAD(victim, seed=3)(x), atol=0, rtol=0)
    s3, s4 = MAD(victim, seed=3).surrogate, MAD(victim, seed=4).surrogate
    assert not torch.equal(next(s3.parameters()), next(s4.parameters()))


def test_save_load_roundtrip_through_registry(tmp_path: Path, victim, surrogate, x) -> None:
    for i, d in enumerate(_all(victim, surrogate)):
        if isinstance(d, RandP):
            d.reset_rng()
        expected = d(x)
        target = d.save(tmp_path / f"d{i}")
        loaded = load_defense(target)
        assert type(loaded) is type(d) and loaded.hparams() == d.hparams()
        torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)
    assert {"randp", "mad", "mad-argmax", "grad2", "reverse-sigmoid"} <= set(DEFENSES.names())


def test_grad2_fit_distils_the_surrogate(victim) -> None:
    d = Grad2(victim, seed=0)
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(13))
    before = [q.clone() for q in d.surrogate.parameters()]
    labels = torch.zeros(64, dtype=torch.int64)  # distillation uses the victim's answers, not labels
    losses = d.fit(DefenderData(x, labels, x, labels, 10), SurrogateFitConfig(epochs=2, batch_size=32)).loss
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert d.hparams()["surrogate_epochs"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, d.surrogate.parameters(), strict=True))
    assert not any(q.requires_grad for q in d.surrogate.parameters())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda v: RandP(v, epsilon=2.5), "epsilon"),
        (lambda v: RandP(v, epsilon=-0.1), "epsilon"),
        (lambda v: RandP(v, mode="gauss"), "mode"),
        (lambda v: RandP(v, mode="logit-noise", noise="laplace"), "noise"),
        (lambda v: MAD(v, epsilon=float("nan")), "epsilon"),
        (lambda v: MADArgmax(v, max_candidates=0), "max_candidates"),
        (lambda v: Grad2(v, target="watermark"), "target"),
        (lambda v: Grad2(v, surrogate=create_model("lenet5", num_classes=7)), "classes"),
        (lambda v: ReverseSigmoid(v, beta=0), "beta"),
        (lambda v: ReverseSigmoid(v, gamma=float("inf")), "gamma"),
    ],
)
def test_bad_hyper_parameters_raise_config_error(make, match, victim) -> None:
    with pytest.raises(ConfigError, match=match):
        make(victim)


def test_bad_images_raise_invalid_input(victim, surrogate) -> None:
    for d in _all(victim, surrogate)[:6:2]:
        with pytest.raises(InvalidInput):
            d(torch.rand(2, 3, 28, 28))


@pytest.mark.parametrize("target", ["all-ones", "min-ip"])
def test_grad2_answers_with_autograd_disabled(target, victim, surrogate, x) -> None:
    """The server answers under ``torch.inference_mode``; the JVP and the clean gradient still work there."""
    d = Grad2(victim, target=target, surrogate=surrogate)
    expected = d(x)
    with torch.no_grad():
        torch.testing.assert_close(d(x), expected, atol=0, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(d(x), expected, atol=0, rtol=0)
