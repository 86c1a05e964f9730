"""Tests of the baseline defenses MeCo, Adaptive Misinformation and the output filters (top-1,
rounding, top-k): the Defense contract, exact outputs, save/load, and the behaviour each is for."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from fortress.data import MnistSplits, mnist_splits
from fortress.data.embedded import noise_images
from fortress.defenses import (
    DEFENSES,
    AdaptiveMisinformation,
    DefenderData,
    Defense,
    MeCo,
    Rounding,
    Top1,
    TopK,
    load_defense,
)
from fortress.defenses.adaptive_misinfo import MisinformationFitConfig, misinformation_loss
from fortress.defenses.meco import CKPT_STATE, MeCoTrainConfig, PerturbationGenerator
from fortress.errors import ArtifactError, ConfigError
from fortress.models import StagedBackbone, create_model, train_classifier
from fortress.models.staged import from_sequential

TINY_MECO = MeCoTrainConfig(epochs=2, batch_size=128, ood_batch_size=64, dro_steps=1, seed=0)


@lru_cache(maxsize=1)
def splits() -> MnistSplits:
    return mnist_splits()


@lru_cache(maxsize=1)
def trained_victim() -> StagedBackbone:
    torch.manual_seed(0)
    net = create_model("lenet5")
    d = splits()
    train_classifier(net, d.train.x[:2000], d.train.targets[:2000], epochs=2, lr=5e-3, batch_size=64, seed=0)
    return net.eval()


def victim() -> StagedBackbone:
    """A fresh copy of the trained victim (defenses must never share mutable state across tests)."""
    net = create_model("lenet5")
    net.load_state_dict(trained_victim().state_dict())
    return net.eval()


def defender(n: int) -> DefenderData:
    """The first ``n`` training digits and the validation split."""
    d = splits()
    return DefenderData(d.train.x[:n], d.train.targets[:n], d.val.x, d.val.targets, 10)


@lru_cache(maxsize=1)
def trained_am() -> AdaptiveMisinformation:
    am = AdaptiveMisinformation(victim(), fpr=0.25, seed=0)  # a tiny victim: flag a quarter of ID
    am.fit(defender(1500), MisinformationFitConfig(epochs=2))
    return am


@lru_cache(maxsize=1)
def trained_meco() -> MeCo:
    meco = MeCo(victim(), seed=0)
    meco.fit(defender(1000), TINY_MECO)
    return meco


def queries() -> Tensor:
    """ID digits and noise images together."""
    return torch.cat(
        [splits().test.x[:48], noise_images(32, kind="uniform", seed=1).x, noise_images(16, kind="smooth", seed=1).x]
    )


def victim_probs(defense: Defense, x: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.softmax(defense.victim(x), dim=1)


FACTORIES: dict[str, Callable[[], Defense]] = {
    "top1": lambda: Top1(victim()),
    "rounding": lambda: Rounding(victim(), decimals=1),
    "topk": lambda: TopK(victim(), k=3),
    "am-untrained": lambda: AdaptiveMisinformation(victim(), tau=0.9, seed=1),
    "am": trained_am,
    "meco-untrained": lambda: MeCo(victim(), seed=1),
    "meco": trained_meco,
}


# ------------------------------------------------------------------------------------ contract


@pytest.mark.parametrize("key", list(FACTORIES))
def test_answers_are_probability_rows_with_exact_bookkeeping(key: str) -> None:
    defense = FACTORIES[key]()
    x = queries()
    out = defense.respond(x)
    p = out.probs
    assert p.shape == (x.shape[0], 10)
    assert bool(torch.isfinite(p).all()) and float(p.min()) >= 0
    torch.testing.assert_close(p.sum(dim=1), torch.ones(x.shape[0]), atol=1e-5, rtol=0)
    y = victim_probs(defense, x)
    assert out.l1 is not None and out.top1_changed is not None
    torch.testing.assert_close(out.l1, (p - y).abs().sum(dim=1), atol=1e-6, rtol=0)
    assert torch.equal(out.top1_changed, p.argmax(1) != y.argmax(1))


@pytest.mark.parametrize("key", ["top1", "rounding", "topk", "am", "meco"])
def test_save_load_round_trip_gives_identical_answers(key: str, tmp_path: Path) -> None:
    defense = FACTORIES[key]()
    if isinstance(defense, MeCo):
        defense.reset_rng()
    x = queries()
    before = defense.respond(x)
    defense.save(tmp_path / key)
    loaded = load_defense(tmp_path / key)
    assert type(loaded) is type(defense) and loaded.name == defense.name
    assert DEFENSES.get(defense.name) is type(defense)
    after = loaded.respond(x)
    assert torch.equal(before.probs, after.probs)
    assert before.l1 is not None and after.l1 is not None
    assert torch.equal(before.l1, after.l1)
    assert loaded.hparams() == defense.hparams()


def test_stochastic_meco_is_deterministic_under_its_seed() -> None:
    meco = trained_meco()
    x = noise_images(64, seed=2).x
    meco.reset_rng()
    a = meco(x)
    b = meco(x)  # fresh noise for every call ...
    meco.reset_rng()
    assert torch.equal(meco(x), a)  # ... replayed exactly from the seed
    assert not torch.equal(a, b)
    twin = MeCo(victim(), seed=meco.seed)
    twin.model.load_state_dict(meco.model.state_dict())
    twin.generator.load_state_dict(meco.generator.state_dict())
    assert torch.equal(twin(x), a)


def test_training_is_reproducible_under_a_seed() -> None:
    cfg = dataclasses.replace(TINY_MECO, epochs=1)
    states = []
    for _ in range(2):
        m = MeCo(victim(), seed=4)
        m.fit(defender(200), cfg)
        a = AdaptiveMisinformation(victim(), seed=4)
        a.fit(defender(200), MisinformationFitConfig(epochs=1))
        states.append((m.generator.state_dict(), m.model.state_dict(), a.misinfo.state_dict()))
    for s1, s2 in zip(states[0], states[1], strict=True):
        assert all(torch.equal(s1[k], s2[k]) for k in s1)


BAD: list[tuple[Callable[[], object], str]] = [
    (lambda: Rounding(victim(), decimals=-1), "-1"),
    (lambda: Rounding(victim(), decimals=9), "9"),
    (lambda: Rounding(victim(), decimals=1.5), "1.5"),  # type: ignore[arg-type]
    (lambda: TopK(victim(), k=0), "0"),
    (lambda: TopK(victim(), k=11), "11"),
    (lambda: TopK(victim(), k=True), "True"),
    (lambda: AdaptiveMisinformation(victim(), tau=1.5), "1.5"),
    (lambda: AdaptiveMisinformation(victim(), nu=0.0), "0.0"),
    (lambda: AdaptiveMisinformation(victim(), nu=float("inf")), "inf"),
    (lambda: AdaptiveMisinformation(victim(), fpr=1.0), "1.0"),
    (lambda: AdaptiveMisinformation(victim(), misinfo=create_model("lenet5", num_classes=7)), "7"),
    (lambda: MeCo(victim(), epsilon=-0.1), "-0.1"),
    (lambda: MeCo(victim(), width=0), "0"),
    (lambda: MeCoTrainConfig(epochs=0), "epochs=0"),
    (lambda: MeCoTrainConfig(lr=-1.0), "lr=-1.0"),
    (lambda: MeCoTrainConfig(w_defense=-2.0), "-2.0"),
    (lambda: MeCoTrainConfig(dro_steps=-1), "dro_steps=-1"),
]


@pytest.mark.parametrize(("make", "needle"), BAD)
def test_bad_hyper_parameters_raise_config_error_naming_the_value(make: Callable[[], object], needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        make()


# ------------------------------------------------------------------------------- output filters


class _Log(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.log(x.flatten(1).clamp_min(1e-12))


def rows_victim(k: int) -> StagedBackbone:
    """A 'victim' whose softmax on an image holding a probability row is that row."""
    return from_sequential(nn.Sequential(nn.Identity(), _Log()), (1, 1, k), k)


def as_images(rows: list[list[float]]) -> Tensor:
    t = torch.tensor(rows, dtype=torch.float32)
    return t.view(t.shape[0], 1, 1, -1)


HAND = [[0.62, 0.26, 0.12], [0.41, 0.44, 0.15], [0.4, 0.35, 0.25], [0.05, 0.15, 0.8]]


def test_top1_exact_outputs() -> None:
    out = Top1(rows_victim(3)).respond(as_images(HAND))
    expected = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    assert torch.equal(out.probs, expected)
    assert out.l1 is not None and out.top1_changed is not None
    torch.testing.assert_close(out.l1, torch.tensor([0.76, 1.12, 1.2, 0.4]), atol=1e-6, rtol=0)
    assert not bool(out.top1_changed.any())


def test_rounding_exact_outputs_renormalised_and_tie_flags() -> None:
    rows = [[0.62, 0.26, 0.12], [0.41, 0.44, 0.15], [0.38, 0.33, 0.29], [0.04, 0.17, 0.79]]
    out = Rounding(rows_victim(3), decimals=1).respond(as_images(rows))
    expected = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.4, 0.2], [0.4, 0.3, 0.3], [0.0, 0.2, 0.8]])
    torch.testing.assert_close(out.probs, expected, atol=1e-6, rtol=0)
    assert out.top1_changed is not None and out.l1 is not None
    # the tie rounding creates in row 1 (0.4, 0.4) moves top-1 from class 1 to class 0
    assert out.top1_changed.tolist() == [False, True, False, False]
    torch.testing.assert_close(out.l1[1], torch.tensor(0.10), atol=1e-6, rtol=0)


def test_rounding_to_zero_decimals_falls_back_to_the_top1_row() -> None:
    out = Rounding(rows_victim(3), decimals=0).respond(as_images([[0.4, 0.35, 0.25], [0.2, 0.7, 0.1]]))
    assert torch.equal(out.probs, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))


def test_rounding_renormalises_rows_that_do_not_sum_to_one() -> None:
    out = Rounding(rows_victim(3), decimals=1).respond(as_images([[0.34, 0.33, 0.33]]))
    torch.testing.assert_close(out.probs, torch.full((1, 3), 1 / 3), atol=1e-6, rtol=0)


def test_topk_exact_outputs() -> None:
    out = TopK(rows_victim(4), k=2).respond(as_images([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    expected = torch.tensor([[0.625, 0.375, 0, 0], [0, 0, 3 / 7, 4 / 7]])
    torch.testing.assert_close(out.probs, expected, atol=1e-6, rtol=0)
    assert out.l1 is not None
    torch.testing.assert_close(out.l1, torch.tensor([0.4, 0.6]), atol=1e-6, rtol=0)
    full = TopK(rows_victim(4), k=4).respond(as_images([[0.5, 0.3, 0.15, 0.05]]))
    torch.testing.assert_close(full.probs, torch.tensor([[0.5, 0.3, 0.15, 0.05]]), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- adaptive misinformation


def test_misinformation_loss_matches_the_naive_formula() -> None:
    torch.manual_seed(0)
    z = torch.randn(6, 5) * 4
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    naive = -torch.log(1 - torch.softmax(z, dim=1)[torch.arange(6), y]).mean()
    torch.testing.assert_close(misinformation_loss(z, y), naive, atol=1e-5, rtol=1e-5)


def test_am_calibration_hits_the_false_positive_rate() -> None:
    am = trained_am()
    frac = float((am.id_score(splits().val.x) < am.tau).float().mean())
    assert abs(frac - am.fpr) <= 1 / splits().val.x.shape[0] + 1e-9
    assert am.calibrated


def test_am_misinformation_model_avoids_the_true_class() -> None:
    d = splits()
    with torch.no_grad():
        wrong = trained_am().misinfo(d.test.x).argmax(1) != d.test.targets
    assert float(wrong.float().mean()) > 0.9


def test_am_answers_id_with_the_victim_and_ood_with_the_misinformation_model() -> None:
    am = trained_am()
    d = splits()
    x = torch.cat([d.test.x, noise_images(300, kind="smooth", seed=3).x, noise_images(300, seed=3).x])
    out = am.respond(x)
    s = am.id_score(x)
    y = victim_probs(am, x)
    with torch.no_grad():
        mis = torch.softmax(am.misinfo(x), dim=1)
    confident = s > am.tau + 0.02  # α < σ(−20) ≈ 2e-9
    doubtful = s < am.tau - 0.02
    is_noise = torch.arange(x.shape[0]) >= d.test.x.shape[0]
    assert int((confident & ~is_noise).sum()) > 500 and int((doubtful & is_noise).sum()) > 50
    torch.testing.assert_close(out.probs[confident], y[confident], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.probs[doubtful], mis[doubtful], atol=1e-6, rtol=0)
    # the misinformation answers mostly disagree with the victim; the ID answers never do
    assert out.top1_changed is not None
    assert float(out.top1_changed[doubtful & is_noise].float().mean()) > 0.5
    assert not bool(out.top1_changed[confident].any())


# ------------------------------------------------------------------------------------------ MeCo


def test_untrained_meco_generator_adds_nothing() -> None:
    gen = PerturbationGenerator(1, epsilon=0.3)
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(gen(x, torch.randn(4, 1, 28, 28)), torch.zeros_like(x))
    out = MeCo(victim(), seed=0).respond(queries())
    assert out.l1 is not None and float(out.l1.max()) < 1e-6


def test_meco_perturbation_respects_its_bound() -> None:
    meco = trained_meco()
    x = queries()
    with torch.no_grad():
        delta = meco.generator(x, torch.randn(x.shape[0], 1, 28, 28))
    assert float(delta.abs().max()) <= meco.epsilon + 1e-6
    assert float(delta.abs().max()) > 0  # training moved the generator off zero


def test_meco_training_misleads_ood_queries_and_keeps_id_accuracy() -> None:
    d = splits()
    meco = trained_meco()
    with torch.no_grad():
        victim_acc = float((meco.victim(d.test.x).argmax(1) == d.test.targets).float().mean())
    out_id = meco.respond(d.test.x)
    defended_acc = float((out_id.probs.argmax(1) == d.test.targets).float().mean())
    assert defended_acc >= victim_acc - 0.05
    ood = torch.cat([noise_images(200, seed=4).x, noise_images(200, kind="smooth", seed=4).x])
    out_ood = meco.respond(ood)
    assert out_ood.top1_changed is not None and out_id.top1_changed is not None
    ood_flip = float(out_ood.top1_changed.float().mean())
    id_flip = float(out_id.top1_changed.float().mean())
    assert ood_flip > 0.6 and ood_flip > id_flip + 0.5
    assert out_ood.l1 is not None and float(out_ood.l1.mean()) > 0.5
    report = meco.train_report
    assert report is not None and report.epochs_done == TINY_MECO.epochs
    ref = trained_victim().state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in meco.victim.state_dict().items())  # the victim is untouched


def test_meco_without_finetuning_trains_only_the_generator() -> None:
    meco = MeCo(victim(), seed=5)
    meco.fit(defender(128), dataclasses.replace(TINY_MECO, epochs=1, finetune_victim=False))
    ref = trained_victim().state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in meco.model.state_dict().items())
    assert float(meco.generator.conv2.weight.detach().abs().max()) > 0


def test_meco_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    data = defender(256)
    cfg = dataclasses.replace(TINY_MECO, epochs=2)
    straight = MeCo(victim(), seed=2)
    straight.fit(data, cfg)
    interrupted = MeCo(victim(), seed=2)

    class Stop(Exception):
        pass

    def stop_after_first(epoch: int, loss: float) -> None:
        if epoch == 0:
            raise Stop

    with pytest.raises(Stop):
        interrupted.fit(data, cfg, checkpoint_dir=tmp_path, on_epoch=stop_after_first)
    assert (tmp_path / CKPT_STATE).exists()
    with pytest.raises(ArtifactError, match="different MeCo configuration"):
        MeCo(victim(), seed=2).fit(data, dataclasses.replace(cfg, lr=0.5), checkpoint_dir=tmp_path)
    resumed = MeCo(victim(), seed=2)
    report = resumed.fit(data, cfg, checkpoint_dir=tmp_path)
    assert report.resumed_from == 1 and report.epochs_done == 2
    for a, b in ((straight.generator, resumed.generator), (straight.model, resumed.model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
