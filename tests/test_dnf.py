"""Tests of DNF: losses (Eq. 6–8), training (Alg. 1) with checkpoint/resume, the defense and its
artifacts, the DCGAN generator and the OOD sources."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from fortress.data import MnistSplits, mnist_splits
from fortress.defenses import DNF, DefenderData, Undefended, load_defense
from fortress.defenses.dnf import (
    DCGANGenerator,
    DNFLossWeights,
    DNFTrainConfig,
    GeneratorOOD,
    MixtureOOD,
    NoiseOOD,
    PoolOOD,
    StepInfo,
    entropy,
    id_loss,
    ood_loss,
    train_dcgan,
    train_dnf,
)
from fortress.defenses.dnf.losses import pseudo_labels
from fortress.defenses.dnf.training import CKPT_STATE
from fortress.errors import ArtifactError, ConfigError
from fortress.exits.heads import HeadOutput, gaussian_kl
from fortress.exits.network import AllExits, EarlyExitNet
from fortress.models import StagedBackbone, create_model, save_model, train_classifier
from fortress.models.io import load_state, read_json, save_state
from helpers import sharpen_heads


@lru_cache(maxsize=1)
def splits() -> MnistSplits:
    return mnist_splits()


def lenet(seed: int = 0) -> StagedBackbone:
    torch.manual_seed(seed)
    return create_model("lenet5").eval()


def head_state(net: EarlyExitNet) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in net.heads.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Losses (Eq. 6, 7, 8)

E, B, K = 3, 6, 4  # 2 heads + the final exit


def hand_exits(seed: int = 0, *, requires_grad: bool = False) -> AllExits:
    """An ``AllExits`` with known random logits; the two heads are VIB heads (mu, logvar)."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(E, B, K, generator=gen, dtype=torch.float64) * 2).requires_grad_(requires_grad)
    heads = []
    for i in range(E - 1):
        mu = torch.randn(B, K, generator=gen, dtype=torch.float64).requires_grad_(requires_grad)
        logvar = (torch.randn(B, K, generator=gen, dtype=torch.float64) * 0.5).requires_grad_(requires_grad)
        heads.append(HeadOutput(logits[i], mu, logvar))
    return AllExits(logits, tuple(heads))


def labels(seed: int = 1) -> Tensor:
    return torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(seed))


W0 = DNFLossWeights(alpha=0.0, tau=1.0, kl_weight=0.0)


def test_entropy_is_shannon_entropy_of_the_softmax() -> None:
    logits = torch.randn(20, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = torch.softmax(logits, 1)
    torch.testing.assert_close(entropy(logits), -(p * p.log()).sum(1))
    assert float(entropy(torch.zeros(1, 7))[0]) == pytest.approx(math.log(7))
    assert float(entropy(torch.tensor([[100.0, 0.0, 0.0]]))[0]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("i", range(E))
def test_id_entropy_sign_is_minus_early_plus_final(i: int) -> None:
    out, y = hand_exits(), labels()
    sign = 1.0 if i == E - 1 else -1.0
    h = entropy(out.logits[i]).mean()
    t0 = id_loss(out, y, W0, [i])
    t1 = id_loss(out, y, dataclasses.replace(W0, alpha=0.7), [i])
    torch.testing.assert_close(t0.entropy, sign * h)
    torch.testing.assert_close(t1.total - t0.total, 0.7 * sign * h)


@pytest.mark.parametrize("i", range(E))
def test_ood_entropy_sign_is_the_reverse(i: int) -> None:
    out, y = hand_exits(), labels()
    sign = -1.0 if i == E - 1 else 1.0  # J(i) = -K(i)
    h = entropy(out.logits[i]).mean()
    t0 = ood_loss(out, y, W0, [i])
    t1 = ood_loss(out, y, dataclasses.replace(W0, alpha=0.3), [i])
    torch.testing.assert_close(t0.entropy, sign * h)
    torch.testing.assert_close(t1.total - t0.total, 0.3 * sign * h)


@pytest.mark.parametrize("exits", [[0], [2], [0, 2], [0, 1, 2]])
def test_id_ce_term_is_cross_entropy_averaged_over_the_exits(exits: list[int]) -> None:
    out, y = hand_exits(), labels()
    t = id_loss(out, y, DNFLossWeights(), exits)
    expected = sum(F.cross_entropy(out.logits[i], y) for i in exits) / len(exits)
    torch.testing.assert_close(t.ce, expected)
    # with α = 0 and no KL weight the loss is the cross-entropy alone
    torch.testing.assert_close(id_loss(out, y, W0, exits).total, expected)


def test_id_kl_term_uses_the_heads_gaussians() -> None:
    out, y = hand_exits(), labels()
    exits = [0, 1, 2]
    t = id_loss(out, y, DNFLossWeights(alpha=0.0, kl_weight=0.5), exits)
    kls = [gaussian_kl(h.mu, h.logvar).mean() for h in out.heads if h.mu is not None and h.logvar is not None]
    expected_kl = sum(kls) / len(exits)  # the final exit has no latent
    torch.testing.assert_close(t.kl, expected_kl)
    torch.testing.assert_close(t.total, t.ce + 0.5 * t.kl)


def test_ood_likelihood_term_is_the_mean_log_probability_of_the_pseudo_labels() -> None:
    out, y = hand_exits(), labels()
    logq = [F.log_softmax(out.logits[i], 1).gather(1, y.view(-1, 1)).mean() for i in (0, 1)]
    # default: exit 0 defines the pseudo-labels and is not pushed away from them
    t = ood_loss(out, y, W0, [0, 1])
    torch.testing.assert_close(t.ce, logq[1] / 2)
    torch.testing.assert_close(t.total, t.ce)  # minimising it lowers q(ŷ|x)
    t_all = ood_loss(out, y, dataclasses.replace(W0, ood_likelihood_at_first=True), [0, 1])
    torch.testing.assert_close(t_all.ce, sum(logq) / 2)


def test_ood_total_composition() -> None:
    out, y = hand_exits(), labels()
    w = DNFLossWeights(alpha=0.2, kl_weight=0.4, ood_kl_cap=1e9)
    t = ood_loss(out, y, w, [0, 1, 2])
    torch.testing.assert_close(t.total, t.ce - 0.4 * t.kl + 0.2 * t.entropy)
    kls = [gaussian_kl(h.mu, h.logvar).mean() for h in out.heads if h.mu is not None and h.logvar is not None]
    torch.testing.assert_close(t.kl, sum(kls) / 3)


def test_ood_likelihood_clamps_at_the_floor_with_no_gradient_past_it() -> None:
    floor = 1e-4
    logits = torch.zeros(1, 4, K, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    logits[0, :2, 0] = -40.0  # rows 0, 1: q(ŷ) ≈ e^-40, far below the floor
    logits[0, 2:, 0] = 1.0  # rows 2, 3: within the bound
    logits.requires_grad_(True)
    out = AllExits(logits, ())
    t = ood_loss(out, y, DNFLossWeights(alpha=0.0, ood_prob_floor=floor, ood_likelihood_at_first=True), [0])
    logq = F.log_softmax(logits[0].detach(), 1)[:, 0]
    expected = (math.log(floor) * 2 + float(logq[2]) + float(logq[3])) / 4
    assert float(t.ce.detach()) == pytest.approx(expected)
    (grad,) = torch.autograd.grad(t.total, logits)
    assert bool((grad[0, :2] == 0).all())
    assert bool((grad[0, 2:].abs().sum(1) > 0).all())
    # the whole term never goes below log(floor)
    logits2 = torch.full((1, 4, K), 0.0, dtype=torch.float64)
    logits2[0, :, 0] = -100.0
    t2 = ood_loss(
        AllExits(logits2, ()), y, DNFLossWeights(ood_prob_floor=floor, alpha=0.0, ood_likelihood_at_first=True), [0]
    )
    assert float(t2.ce) == pytest.approx(math.log(floor))


def test_ood_kl_is_capped_with_no_gradient_past_the_cap() -> None:
    cap = 20.0
    logits = torch.zeros(2, 4, K, dtype=torch.float64)
    mu = torch.zeros(4, K, dtype=torch.float64)
    mu[:2] = 10.0  # KL = 0.5·K·100 = 200 nats > cap
    mu[2:] = 0.5  # KL = 0.5·K·0.25 = 0.5 nats < cap
    mu.requires_grad_(True)
    logvar = torch.zeros(4, K, dtype=torch.float64)
    out = AllExits(logits, (HeadOutput(logits[0], mu, logvar),))
    w = DNFLossWeights(alpha=0.0, kl_weight=1.0, ood_kl_cap=cap)
    t = ood_loss(out, torch.zeros(4, dtype=torch.long), w, [0])
    raw = gaussian_kl(mu.detach(), logvar)
    assert float(t.kl.detach()) == pytest.approx(float(raw.clamp_max(cap).mean()))
    (grad,) = torch.autograd.grad(t.total, mu)
    assert bool((grad[:2] == 0).all())
    assert bool((grad[2:].abs().sum(1) > 0).all())
    # the KL term pushes away from the prior: the gradient of the loss w.r.t. mu points towards 0
    assert bool((grad[2:] * mu.detach()[2:] < 0).all())


def test_pseudo_labels_are_exit_zero_top1_without_gradient() -> None:
    out = hand_exits(requires_grad=True)
    y = pseudo_labels(out)
    assert torch.equal(y, out.logits[0].argmax(1))
    assert not y.requires_grad


# --------------------------------------------------------------------------------------------------
# Gradients flow to exactly the trainable parameters


@pytest.mark.parametrize(("kind", "train_final"), [("vib", False), ("plain", False), ("vib", True), ("plain", True)])
def test_every_trainable_parameter_gets_a_gradient(kind: str, train_final: bool) -> None:
    # plain heads as in Table 6 (one linear layer); VIB heads with a latent and a decoder (Table 5 shape)
    hidden = 8 if kind == "vib" else None
    net = EarlyExitNet(lenet(0), head_kind=kind, hidden=hidden, train_final_exit=train_final)  # type: ignore[arg-type]
    net.train()
    gen = torch.Generator().manual_seed(0)
    x_id = splits().train.x[:16]
    y_id = splits().train.y[:16]
    x_ood = torch.rand(16, 1, 28, 28, generator=gen)
    out = net.forward_all(torch.cat([x_id, x_ood]), sample=True, generator=gen)
    out_id = AllExits(
        out.logits[:, :16], tuple(HeadOutput(h.logits[:16], _s(h.mu, 0), _s(h.logvar, 0)) for h in out.heads)
    )
    out_ood = AllExits(
        out.logits[:, 16:], tuple(HeadOutput(h.logits[16:], _s(h.mu, 1), _s(h.logvar, 1)) for h in out.heads)
    )
    exits = list(range(net.num_exits if train_final else net.num_exits - 1))
    w = DNFLossWeights()
    loss = id_loss(out_id, y_id, w, exits).total + w.tau * ood_loss(out_ood, pseudo_labels(out_ood), w, exits).total
    loss.backward()
    trainable = net.trainable_parameters()
    assert trainable
    for name, p in net.named_parameters():
        if any(p is q for q in trainable):
            assert p.grad is not None, name
            assert float(p.grad.abs().sum()) > 0, name
            if name.startswith("heads.") and name.endswith("encoder.weight"):  # every unit is reached
                assert bool((p.grad.abs().sum(1) > 0).all()), name
        else:
            assert p.grad is None, name
    assert all(p.grad is None for p in net.backbone.parameters())


def _s(t: Tensor | None, half: int) -> Tensor | None:
    if t is None:
        return None
    return t[:16] if half == 0 else t[16:]


# --------------------------------------------------------------------------------------------------
# Training (Alg. 1)


@pytest.fixture(scope="module")
def trained_victim() -> StagedBackbone:
    victim = lenet(0)
    s = splits().train
    train_classifier(victim, s.x[:1000], s.y[:1000], epochs=2, batch_size=64, seed=0)
    return victim.eval()


def exit0_fraction(net: EarlyExitNet, x: Tensor) -> float:
    with torch.no_grad():
        _, exits = net.forward_dynamic(x)
    return float((exits == 0).float().mean())


EPOCHS = 4


def test_train_dnf_lowers_the_loss_and_sends_noise_to_exit_zero(trained_victim: StagedBackbone) -> None:
    torch.manual_seed(1)
    net = EarlyExitNet(trained_victim, head_kind="vib", dataset="mnist").eval()
    s = splits()
    ood = NoiseOOD((1, 28, 28))
    noise = ood.sample(256, torch.Generator().manual_seed(12345))  # not the training draws
    before_noise, before_id = exit0_fraction(net, noise), exit0_fraction(net, s.test.x[:300])
    victim_before = {k: v.clone() for k, v in trained_victim.state_dict().items()}
    steps: list[StepInfo] = []
    cfg = DNFTrainConfig(epochs=EPOCHS, batch_size=32, ood_batch_size=64)
    report = train_dnf(
        net, s.train.x[:1000], s.train.y[:1000], ood, config=cfg, val=(s.val.x, s.val.y), on_step=steps.append
    )
    after_noise, after_id = exit0_fraction(net, noise), exit0_fraction(net, s.test.x[:300])
    assert report.epochs_done == EPOCHS
    assert len(report.loss) == len(report.val_acc) == len(report.val_exit_hist) == len(report.ood_exit_hist) == EPOCHS
    assert report.loss[-1] < report.loss[0]
    assert after_noise >= before_noise + 0.3, (before_noise, after_noise)
    assert after_id < after_noise, (after_id, after_noise)  # ID digits do not leave early like noise
    assert before_id == 0.0 or after_id <= before_id + 0.2
    assert all(sum(h) == pytest.approx(1.0) for h in report.val_exit_hist + report.ood_exit_hist)
    # progress callbacks: one per step, numbered within each epoch
    assert len(steps) == EPOCHS * 32
    assert [(st.epoch, st.step) for st in steps[:2]] == [(0, 0), (0, 1)]
    assert all(st.steps_per_epoch == 32 for st in steps)
    assert not net.training
    for k, v in trained_victim.state_dict().items():  # the frozen victim is never modified
        assert torch.equal(v, victim_before[k]), k


# --- checkpoint / resume ---------------------------------------------------------------------------

CKPT_N = 256


def ckpt_config(optimizer: str = "sgd", **kw: Any) -> DNFTrainConfig:
    return DNFTrainConfig(
        epochs=3,
        batch_size=64,
        ood_batch_size=32,
        optimizer=optimizer,
        lr=1e-2,
        seed=3,
        **kw,  # type: ignore[arg-type]
    )


class Interrupt:
    """``on_step`` that raises KeyboardInterrupt at the first step of epoch ``epoch`` (0-based)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, info: StepInfo) -> None:
        if info.epoch == self.epoch:
            raise KeyboardInterrupt


class Snapshots:
    """``on_step`` recording the head weights at the end of every epoch."""

    def __init__(self, net: EarlyExitNet) -> None:
        self.net = net
        self.by_epoch: dict[int, dict[str, Tensor]] = {}

    def __call__(self, info: StepInfo) -> None:
        if info.step == info.steps_per_epoch - 1:
            self.by_epoch[info.epoch + 1] = head_state(self.net)


@lru_cache(maxsize=1)
def ckpt_victim() -> StagedBackbone:
    return lenet(5)


def ckpt_net(init: dict[str, Tensor] | None = None) -> EarlyExitNet:
    torch.manual_seed(11)
    net = EarlyExitNet(ckpt_victim(), head_kind="vib")
    if init is not None:
        net.heads.load_state_dict(init)
    return net


def ckpt_train(net: EarlyExitNet, cfg: DNFTrainConfig, **kw: Any) -> Any:
    s = splits().train
    return train_dnf(net, s.x[:CKPT_N], s.y[:CKPT_N], NoiseOOD((1, 28, 28)), config=cfg, **kw)


HISTORY = ("epochs_done", "loss", "id_loss", "ood_loss", "val_acc", "val_exit_hist", "ood_exit_hist")


@lru_cache(maxsize=2)
def straight_run(
    optimizer: str,
) -> tuple[dict[str, Tensor], dict[str, Tensor], Any, dict[int, dict[str, Tensor]]]:
    """Initial heads, final heads, report and per-epoch snapshots of an uninterrupted 3-epoch run."""
    net = ckpt_net()
    init = head_state(net)
    snaps = Snapshots(net)
    report = ckpt_train(net, ckpt_config(optimizer), on_step=snaps)
    return init, head_state(net), report, snaps.by_epoch


def assert_same_heads(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k


def only_checkpoint_files(directory: Path) -> list[str]:
    names = sorted(p.name for p in directory.iterdir())
    assert all(n.endswith((".safetensors", ".json")) for n in names), names
    return names


@pytest.mark.parametrize(("optimizer", "interrupt_epoch"), [("sgd", 1), ("sgd", 2), ("adam", 2)])
def test_interrupted_training_resumes_exactly(tmp_path: Path, optimizer: str, interrupt_epoch: int) -> None:
    init, final, report, snaps = straight_run(optimizer)
    cfg = ckpt_config(optimizer)
    net = ckpt_net(init)
    with pytest.raises(KeyboardInterrupt):
        ckpt_train(net, cfg, checkpoint_dir=tmp_path, on_step=Interrupt(interrupt_epoch))
    # the checkpoint of the last finished epoch is intact: only safetensors + JSON, consistent pair
    names = only_checkpoint_files(tmp_path)
    assert names == [f"dnf-checkpoint-e{interrupt_epoch:04d}.safetensors", CKPT_STATE]
    meta = read_json(tmp_path / CKPT_STATE)
    assert meta["report"]["epochs_done"] == interrupt_epoch
    saved = load_state(tmp_path / meta["weights"])
    assert_same_heads(
        {k[len("heads.") :]: v for k, v in saved.items() if k.startswith("heads.")}, snaps[interrupt_epoch]
    )
    # a fresh network resumes and ends where the uninterrupted run ended
    fresh = ckpt_net(init)
    resumed = ckpt_train(fresh, cfg, checkpoint_dir=tmp_path)
    assert resumed.resumed_from == interrupt_epoch
    assert_same_heads(head_state(fresh), final)
    for field in HISTORY:
        assert getattr(resumed, field) == getattr(report, field), field
    names = only_checkpoint_files(tmp_path)
    assert names == ["dnf-checkpoint-e0003.safetensors", CKPT_STATE]


@pytest.fixture
def one_epoch_checkpoint(tmp_path: Path) -> Path:
    net = ckpt_net()
    with pytest.raises(KeyboardInterrupt):
        ckpt_train(net, ckpt_config(), checkpoint_dir=tmp_path / "ckpt", on_step=Interrupt(1))
    return tmp_path / "ckpt"


def test_resume_with_a_different_config_is_refused(one_epoch_checkpoint: Path, tmp_path: Path) -> None:
    other = dataclasses.replace(ckpt_config(), lr=5e-3)
    with pytest.raises(ArtifactError, match="different DNF configuration"):
        ckpt_train(ckpt_net(), other, checkpoint_dir=one_epoch_checkpoint)
    with pytest.raises(ArtifactError):
        ckpt_train(ckpt_net(), dataclasses.replace(ckpt_config(), epochs=5), checkpoint_dir=one_epoch_checkpoint)
    # resume=False starts over instead
    copy = tmp_path / "copy"
    shutil.copytree(one_epoch_checkpoint, copy)
    report = ckpt_train(ckpt_net(), dataclasses.replace(other, epochs=1), checkpoint_dir=copy, resume=False)
    assert report.resumed_from == 0
    assert report.epochs_done == 1


def _corrupt_weights(d: Path) -> None:
    w = d / str(read_json(d / CKPT_STATE)["weights"])
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])


def _garbage_weights(d: Path) -> None:
    (d / str(read_json(d / CKPT_STATE)["weights"])).write_bytes(b"\x00not a safetensors file" * 10)


def _missing_weights(d: Path) -> None:
    (d / str(read_json(d / CKPT_STATE)["weights"])).unlink()


def _corrupt_json(d: Path) -> None:
    text = (d / CKPT_STATE).read_text()
    (d / CKPT_STATE).write_text(text[: len(text) // 2])


def _wrong_shapes(d: Path) -> None:
    w = d / str(read_json(d / CKPT_STATE)["weights"])
    tensors = load_state(w)
    tensors["heads.0.encoder.weight"] = torch.zeros(3, 3)
    save_state(tensors, w)


def _nan_weights(d: Path) -> None:
    w = d / str(read_json(d / CKPT_STATE)["weights"])
    tensors = load_state(w)
    tensors["heads.1.encoder.bias"] = torch.full_like(tensors["heads.1.encoder.bias"], float("nan"))
    save_file(tensors, str(w))  # save_state refuses non-finite tensors; write the damage directly


@pytest.mark.parametrize(
    "damage",
    [_corrupt_weights, _garbage_weights, _missing_weights, _corrupt_json, _wrong_shapes, _nan_weights],
)
def test_corrupt_checkpoint_raises_artifact_error(one_epoch_checkpoint: Path, damage: Any) -> None:
    damage(one_epoch_checkpoint)
    with pytest.raises(ArtifactError):
        ckpt_train(ckpt_net(), ckpt_config(), checkpoint_dir=one_epoch_checkpoint)


def test_current_pseudo_labels_mode_runs(tmp_path: Path) -> None:
    cfg = dataclasses.replace(ckpt_config(), epochs=1, ood_labels="current")
    report = ckpt_train(ckpt_net(), cfg)
    assert report.epochs_done == 1
    assert all(math.isfinite(v) for v in report.loss)


# --------------------------------------------------------------------------------------------------
# DNFTrainConfig


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"epochs": -1},
        {"lr": 0.0},
        {"lr": -1e-3},
        {"optimizer": "rmsprop"},
        {"ood_labels": "first"},
        {"batch_size": 0},
        {"ood_batch_size": 0},
        {"weights": DNFLossWeights(alpha=-0.1)},
        {"weights": DNFLossWeights(tau=-1.0)},
        {"weights": DNFLossWeights(ood_prob_floor=0.0)},
        {"weights": DNFLossWeights(ood_prob_floor=1.0)},
        {"weights": DNFLossWeights(ood_kl_cap=0.0)},
    ],
)
def test_bad_train_config_raises_config_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        DNFTrainConfig(**kwargs)


def test_default_train_config_is_the_paper_and_json_ready() -> None:
    cfg = DNFTrainConfig()
    # the paper's epochs and optimiser; lr 0.01 instead of App. D's 0.001 (docs/dnf.md, item 5)
    assert (cfg.epochs, cfg.optimizer, cfg.lr) == (10, "sgd", 1e-2)
    assert (cfg.weights.alpha, cfg.weights.tau, cfg.weights.kl_weight) == (0.1, 1.0, 1.0)
    assert json.loads(json.dumps(cfg.as_dict()))["weights"]["alpha"] == 0.1


# --------------------------------------------------------------------------------------------------
# The defense


def scrambled_dnf(kind: str = "vib", seed: int = 0, **kw: Any) -> DNF:
    """A DNF on a random LeNet-5 whose heads are scaled so queries leave at every exit."""
    victim = lenet(seed)
    torch.manual_seed(seed + 100)
    return sharpen_heads(DNF(victim, head_kind=kind, thresholds=[0.5, 0.7, 0.9], **kw))  # type: ignore[arg-type]


def query_batch(n: int = 200, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = splits().test.x[:n].clone()
    x[n // 2 :] = torch.rand(n - n // 2, 1, 28, 28, generator=gen)
    return x


@pytest.mark.parametrize("kind", ["vib", "plain"])
def test_respond_returns_probability_rows_and_exits(kind: str) -> None:
    dnf = scrambled_dnf(kind)
    x = query_batch()
    out = dnf.respond(x)
    assert out.probs.shape == (x.shape[0], 10)
    assert out.probs.dtype == torch.float32
    assert bool((out.probs >= 0).all())
    assert torch.allclose(out.probs.sum(1), torch.ones(x.shape[0]), atol=1e-5)
    assert out.exits is not None
    assert out.exits.dtype == torch.int64
    assert out.exits.shape == (x.shape[0],)
    assert int(out.exits.min()) >= 0
    assert int(out.exits.max()) <= dnf.num_exits - 1
    assert len(set(out.exits.tolist())) >= 3  # not vacuous: several exits are used
    # the answer is the softmax of the exit's own logits
    with torch.no_grad():
        logits, exits = dnf.net.forward_static(x)
    assert torch.equal(exits, out.exits)
    assert torch.allclose(out.probs, torch.softmax(logits, 1), atol=1e-5)
    assert torch.equal(dnf(x), out.probs)


def test_dnf_rejects_unknown_compute_mode() -> None:
    with pytest.raises(ConfigError, match="compute"):
        DNF(lenet(), compute="lazy")  # type: ignore[arg-type]


def test_dnf_thresholds_roundtrip_and_validation() -> None:
    dnf = scrambled_dnf()
    assert dnf.thresholds == pytest.approx([0.5, 0.7, 0.9])
    dnf.set_thresholds([1.5, 1.5, 1.5])
    out = dnf.respond(query_batch(20))
    assert out.exits is not None
    assert bool((out.exits == 3).all())
    with pytest.raises(ConfigError):
        dnf.set_thresholds([0.5])


@pytest.fixture(scope="module")
def fitted_dnf() -> DNF:
    """A DNF fitted for one short epoch (so its training config is saved), heads then scrambled."""
    dnf = DNF(lenet(7), head_kind="vib", dataset="mnist")
    s, v = splits().train, splits().val
    dnf.fit(
        DefenderData(s.x[:128], s.targets[:128], v.x, v.targets, 10),
        DNFTrainConfig(epochs=1, batch_size=64, ood_batch_size=32),
        ood=NoiseOOD((1, 28, 28)),
    )
    sharpen_heads(dnf)
    dnf.set_thresholds([0.5, 0.7, 0.9])
    return dnf


def test_dnf_save_load_roundtrip(fitted_dnf: DNF, tmp_path: Path) -> None:
    x = query_batch()
    ref = fitted_dnf.respond(x)
    assert fitted_dnf.save(tmp_path / "dnf") == tmp_path / "dnf"
    files = sorted(p.relative_to(tmp_path / "dnf").as_posix() for p in (tmp_path / "dnf").rglob("*") if p.is_file())
    assert files == ["defense.json", "dnf.safetensors", "victim/model.json", "victim/model.safetensors"]
    loaded = load_defense(tmp_path / "dnf")
    assert isinstance(loaded, DNF)
    out = loaded.respond(x)
    assert torch.equal(out.probs, ref.probs)
    assert out.exits is not None
    assert ref.exits is not None
    assert torch.equal(out.exits, ref.exits)
    assert loaded.thresholds == pytest.approx(fitted_dnf.thresholds)
    assert loaded.hparams() == json.loads(json.dumps(fitted_dnf.hparams()))
    assert loaded.hparams()["ood"] == {"kind": "noise", "kinds": ["uniform", "gaussian", "smooth"]}
    assert loaded.hparams()["train"]["epochs"] == 1


def test_full_compute_answers_like_dynamic(fitted_dnf: DNF, tmp_path: Path) -> None:
    fitted_dnf.save(tmp_path / "dnf")
    x = query_batch(150, seed=3)
    dyn = load_defense(tmp_path / "dnf")
    full = load_defense(tmp_path / "dnf", compute="full")
    assert isinstance(full, DNF)
    assert full.compute == "full"
    a, b = dyn.respond(x), full.respond(x)
    assert a.exits is not None
    assert b.exits is not None
    assert torch.equal(a.exits, b.exits)
    assert torch.allclose(a.probs, b.probs, atol=1e-5)


def _drop_heads(d: Path) -> None:
    (d / "dnf.safetensors").unlink()


def _bad_json(d: Path) -> None:
    (d / "defense.json").write_text('{"defense": "dnf", "params": {')


def _other_heads(d: Path) -> None:
    plain = DNF(lenet(7), head_kind="plain")  # encoder widths M instead of 2M
    plain.save(d.parent / "plain")
    shutil.copy(d.parent / "plain" / "dnf.safetensors", d / "dnf.safetensors")


def _truncated_heads(d: Path) -> None:
    data = (d / "dnf.safetensors").read_bytes()
    (d / "dnf.safetensors").write_bytes(data[:100])


def _unknown_param(d: Path) -> None:
    meta = json.loads((d / "defense.json").read_text())
    meta["params"]["heads_please"] = 3
    (d / "defense.json").write_text(json.dumps(meta))


def _wrong_defense(d: Path) -> None:
    meta = json.loads((d / "defense.json").read_text())
    meta["defense"] = "undefended"
    (d / "defense.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError):
        DNF.load(d)


@pytest.mark.parametrize("damage", [_drop_heads, _bad_json, _other_heads, _truncated_heads, _unknown_param])
def test_damaged_dnf_artifacts_raise_artifact_error(fitted_dnf: DNF, tmp_path: Path, damage: Any) -> None:
    d = fitted_dnf.save(tmp_path / "dnf")
    damage(d)
    with pytest.raises(ArtifactError):
        load_defense(d)


def test_dnf_load_refuses_another_defenses_directory(fitted_dnf: DNF, tmp_path: Path) -> None:
    _wrong_defense(fitted_dnf.save(tmp_path / "dnf"))


def test_undefended_roundtrip_and_plain_model_directory(tmp_path: Path) -> None:
    victim = lenet(3)
    und = Undefended(victim)
    x = query_batch(50)
    ref = und.respond(x)
    loaded = load_defense(und.save(tmp_path / "und"))
    assert isinstance(loaded, Undefended)
    assert torch.equal(loaded.respond(x).probs, ref.probs)
    assert torch.allclose(ref.probs, torch.softmax(victim(x), 1).detach())
    # a directory holding just a saved model loads as the undefended victim
    plain = load_defense(save_model(victim, tmp_path / "model"))
    assert isinstance(plain, Undefended)
    assert torch.equal(plain.respond(x).probs, ref.probs)


# --------------------------------------------------------------------------------------------------
# DCGAN generator and OOD sources


def test_train_dcgan_runs_and_the_generator_emits_images() -> None:
    images = torch.rand(128, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    g, report = train_dcgan(images, epochs=1, batch_size=64, nz=8, ngf=8, seed=0)
    assert len(report.g_loss) == len(report.d_loss) == 1
    assert all(math.isfinite(v) for v in report.g_loss + report.d_loss)
    assert report.wall_s > 0
    assert not g.training
    x = g.sample(10, torch.Generator().manual_seed(1))
    assert x.shape == (10, 1, 8, 8)
    assert float(x.min()) >= 0.0
    assert float(x.max()) <= 1.0
    g2, _ = train_dcgan(images, epochs=1, batch_size=64, nz=8, ngf=8, seed=0)
    assert torch.equal(g2.sample(10, torch.Generator().manual_seed(1)), x)  # seeded: reproducible


@pytest.mark.parametrize("shape", [(1, 10, 10), (1, 28, 32), (3, 4, 4)])
def test_dcgan_rejects_bad_image_shapes(shape: tuple[int, int, int]) -> None:
    with pytest.raises(ConfigError):
        DCGANGenerator(shape)


def test_train_dcgan_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        train_dcgan(torch.rand(8, 1, 8, 8), epochs=0)
    with pytest.raises(ConfigError):
        train_dcgan(torch.rand(8, 1, 8, 8), batch_size=1)


def check_source(src: Any, shape: tuple[int, int, int]) -> Tensor:
    """Shape, range, determinism under a seeded generator and a JSON description."""
    a = src.sample(37, torch.Generator().manual_seed(5))
    b = src.sample(37, torch.Generator().manual_seed(5))
    c = src.sample(37, torch.Generator().manual_seed(6))
    assert a.shape == (37, *shape)
    assert a.dtype == torch.float32
    assert float(a.min()) >= 0.0
    assert float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    desc = src.describe()
    assert json.loads(json.dumps(desc)) == desc
    assert "kind" in desc
    return a


def test_generator_ood() -> None:
    torch.manual_seed(0)
    g = DCGANGenerator((1, 28, 28), nz=8, ngf=8)
    g.train()
    src = GeneratorOOD(g, proxy="patches")
    assert not g.training  # sampled in eval mode: rows do not depend on the rest of the batch
    check_source(src, (1, 28, 28))
    few = src.sample(4, torch.Generator().manual_seed(9))
    many = src.sample(12, torch.Generator().manual_seed(9))
    assert torch.allclose(few, many[:4], atol=1e-6)
    assert src.describe() == {"kind": "dcgan", "proxy": "patches", "nz": 8}


def test_pool_ood() -> None:
    pool = splits().attacker.x
    src = PoolOOD(pool, name="attacker")
    x = check_source(src, (1, 28, 28))
    flat = pool.flatten(1)
    assert all(bool((flat == row).all(1).any()) for row in x.flatten(1))  # every sample is a pool image
    assert src.describe() == {"kind": "proxy", "name": "attacker", "size": pool.shape[0]}
    with pytest.raises(ConfigError):
        PoolOOD(torch.rand(0, 1, 28, 28))
    with pytest.raises(ConfigError):
        PoolOOD(torch.rand(5, 28, 28))


def _roughness(x: Tensor) -> float:
    return float((x[..., 1:] - x[..., :-1]).abs().mean())


def test_noise_ood() -> None:
    check_source(NoiseOOD((1, 28, 28)), (1, 28, 28))
    check_source(NoiseOOD((3, 16, 16)), (3, 16, 16))
    gen = torch.Generator().manual_seed(0)
    smooth = NoiseOOD((1, 28, 28), kinds=["smooth"]).sample(64, gen)
    uniform = NoiseOOD((1, 28, 28), kinds=["uniform"]).sample(64, gen)
    gaussian = NoiseOOD((1, 28, 28), kinds=["gaussian"]).sample(64, gen)
    assert _roughness(smooth) < 0.5 * _roughness(uniform)
    assert abs(float(uniform.mean()) - 0.5) < 0.02
    assert float(gaussian.std()) < float(uniform.std())  # N(0.5, 0.25²) clamped vs U(0, 1)
    for bad in (["plasma"], []):
        with pytest.raises(ConfigError):
            NoiseOOD((1, 28, 28), kinds=bad)


def constant_pools(k: int) -> list[PoolOOD]:
    """``k`` sources; source ``j`` yields images filled with ``j / 10``, so rows reveal their source."""
    return [PoolOOD(torch.full((3, 1, 4, 4), j / 10), name=f"c{j}") for j in range(k)]


def source_counts(x: Tensor, k: int) -> list[int]:
    return torch.bincount((x[:, 0, 0, 0] * 10).round().long(), minlength=k).tolist()


@pytest.mark.parametrize(
    "weights", [None, [1.0, 1.0], [3.0, 1.0], [0.3, 0.3, 0.3, 0.1], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 2.0]]
)
def test_mixture_ood_proportions(weights: list[float] | None) -> None:
    k = 3 if weights is None else len(weights)
    mix = MixtureOOD(constant_pools(k), weights)
    w = [1.0 / k] * k if weights is None else [v / sum(weights) for v in weights]
    assert mix.weights == pytest.approx(w)
    for n in (1, 2, 3, 5, 7, 64, 129):
        counts = source_counts(mix.sample(n, torch.Generator().manual_seed(n)), k)
        assert sum(counts) == n
        for j in range(k):
            assert abs(counts[j] - n * w[j]) < 1.0, (n, counts, w)
            if w[j] == 0:
                assert counts[j] == 0


def test_mixture_ood_shapes_determinism_and_description() -> None:
    mix = MixtureOOD([NoiseOOD((1, 28, 28)), PoolOOD(splits().attacker.x, name="attacker")], [2.0, 1.0])
    check_source(mix, (1, 28, 28))
    desc = mix.describe()
    assert desc["kind"] == "mixture"
    assert desc["weights"] == pytest.approx([2 / 3, 1 / 3])
    assert [s["kind"] for s in desc["sources"]] == ["noise", "proxy"]
    # the rows are shuffled: sources are not in blocks
    counts = constant_pools(2)
    x = MixtureOOD(counts).sample(64, torch.Generator().manual_seed(0))[:, 0, 0, 0]
    assert 0 < round(float(x[:32].sum() * 10)) < 32


@pytest.mark.parametrize(
    "weights", [[1.0], [1.0, 1.0, 1.0], [-1.0, 2.0], [0.0, 0.0], [float("nan"), 1.0], [float("inf"), 1.0]]
)
def test_mixture_ood_rejects_bad_weights(weights: list[float]) -> None:
    with pytest.raises(ConfigError):
        MixtureOOD(constant_pools(2), weights)


def test_mixture_ood_needs_a_source() -> None:
    with pytest.raises(ConfigError):
        MixtureOOD([])


@pytest.mark.parametrize("i", range(E))
def test_id_confident_from_makes_id_confident_from_that_exit_on(i: int) -> None:
    out, y = hand_exits(), labels()
    w = dataclasses.replace(W0, id_confident_from=1)
    sign = 1.0 if i >= 1 else -1.0  # exit 0 stays uncertain on ID data
    torch.testing.assert_close(id_loss(out, y, w, [i]).entropy, sign * entropy(out.mean_logits[i]).mean())
    torch.testing.assert_close(ood_loss(out, y, w, [i]).total, ood_loss(out, y, W0, [i]).total)  # OOD unchanged


def test_distillation_pulls_intermediate_exits_to_the_final_answers() -> None:
    out, y = hand_exits(), labels()
    w = dataclasses.replace(W0, id_confident_from=1, distill=0.5)
    base = id_loss(out, y, dataclasses.replace(w, distill=0.0), [0, 1, 2])
    target = torch.softmax(out.mean_logits[2], 1)
    kl = F.kl_div(F.log_softmax(out.mean_logits[1], 1), target, reduction="batchmean")  # exit 1 only
    torch.testing.assert_close(id_loss(out, y, w, [0, 1, 2]).total - base.total, 0.5 * kl / 3)
    with pytest.raises(ConfigError, match="id_confident_from >= 1"):
        DNFTrainConfig(weights=dataclasses.replace(W0, id_confident_from=0))


def test_id_kl_until_drops_the_id_kl_from_that_exit_on() -> None:
    out, y = hand_exits(), labels()
    w = DNFLossWeights(alpha=0.0, kl_weight=1.0)
    full = id_loss(out, y, w, [0, 1])
    cut = id_loss(out, y, dataclasses.replace(w, id_kl_until=1), [0, 1])
    torch.testing.assert_close(cut.kl, gaussian_kl(out.heads[0].mu, out.heads[0].logvar).mean() / 2)
    torch.testing.assert_close(full.total - cut.total, gaussian_kl(out.heads[1].mu, out.heads[1].logvar).mean() / 2)
