"""Near-distribution OOD sources: transformed ID images, their config and recording."""

from __future__ import annotations

import pytest
import torch

from fortress.config import OODConfig
from fortress.defenses.dnf import build_ood
from fortress.errors import ConfigError
from fortress.generative.near_ood import NEAR_TRANSFORMS, NearIDOOD
from fortress.generative.ood import MixtureOOD, NoiseOOD


def _digits(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, 1, 28, 28)
    y = torch.arange(n) % 4
    for i in range(n):  # a bar per class at a different place: a class is where its ink is
        r = 4 + 5 * int(y[i])
        x[i, 0, r : r + 3, 6:22] = 0.8 + 0.2 * torch.rand(3, 16, generator=g)
    return x, y


@pytest.mark.parametrize("name", NEAR_TRANSFORMS)
def test_each_transform_keeps_the_shape_and_range_and_changes_the_image(name: str) -> None:
    x, y = _digits()
    src = NearIDOOD(x, y, transforms=[name])
    out = src.sample(64, torch.Generator().manual_seed(1))
    assert out.shape == (64, 1, 28, 28)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # no sampled image equals any ID image: the transform always acts
    dist = torch.cdist(out.flatten(1), x.flatten(1)).amin(dim=1)
    assert bool((dist > 0.5).all()), f"{name}: smallest distance to an ID image {float(dist.min()):.3f}"


def test_patch_shuffle_keeps_the_ink_and_mix_blends_two_classes() -> None:
    x, y = _digits()
    shuffled = NearIDOOD(x, y, transforms=["patch-shuffle"], grid=4).sample(32, torch.Generator().manual_seed(2))
    # 28 = 4 × 7: every pixel lies in a tile, so each image keeps exactly the ink of its source
    src_ink = {round(float(v), 3) for v in x.sum(dim=(1, 2, 3))}
    assert all(round(float(v), 3) in src_ink for v in shuffled.sum(dim=(1, 2, 3)))
    mixed = NearIDOOD(x, y, transforms=["mix"]).sample(32, torch.Generator().manual_seed(3))
    rows_with_ink = (mixed[:, 0].amax(dim=2) > 0.2).sum(dim=1)
    assert bool((rows_with_ink >= 6).all())  # two bars of 3 rows: two classes in one image


def test_same_seed_same_images_and_description_is_recorded() -> None:
    x, y = _digits()
    src = NearIDOOD(x, y)
    a = src.sample(50, torch.Generator().manual_seed(7))
    b = src.sample(50, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    d = src.describe()
    assert d["kind"] == "near" and d["transforms"] == list(NEAR_TRANSFORMS) and d["size"] == 40


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"transforms": ["swirl"]}, "swirl"),
        ({"transforms": []}, "near-ID transforms"),
        ({"grid": 1}, "grid must be in [2, 28], got 1"),
        ({"blur_sizes": (5, 3)}, "blur sizes"),
        ({"elastic_strength": 0.0}, "elastic strength must be > 0, got 0.0"),
    ],
)
def test_bad_near_settings_are_refused(kwargs: dict[str, object], needle: str) -> None:
    x, y = _digits()
    with pytest.raises(ConfigError) as err:
        NearIDOOD(x, y, **kwargs)  # type: ignore[arg-type]
    assert needle in str(err.value)


def test_config_mixes_near_with_noise_and_records_both() -> None:
    x, y = _digits()
    cfg = OODConfig(kind="near+noise", weights=(3.0, 1.0))
    src = build_ood(cfg, (1, 28, 28), id_data=(x, y))
    assert isinstance(src, MixtureOOD)
    d = src.describe()
    assert [s["kind"] for s in d["sources"]] == ["near", "noise"] and d["weights"] == [0.75, 0.25]
    assert src.sample(40, torch.Generator().manual_seed(0)).shape == (40, 1, 28, 28)
    assert isinstance(build_ood(OODConfig(kind="noise"), (1, 28, 28)), NoiseOOD)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"kind": "near+moon"}, "ood.kind must be one of"),
        ({"kind": "near+near"}, "each at most once"),
        ({"kind": "near+noise", "weights": (1.0,)}, "OOD weights must be 2 non-negative numbers"),
        ({"near_transforms": ("blur", "twist")}, "near_transforms must be among"),
    ],
)
def test_bad_ood_config_is_refused_with_the_value(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        OODConfig(**kwargs)  # type: ignore[arg-type]
    assert needle in str(err.value)


def test_near_without_id_images_is_refused_before_any_work() -> None:
    with pytest.raises(ConfigError, match="pass id_data"):
        build_ood(OODConfig(kind="near"), (1, 28, 28))
