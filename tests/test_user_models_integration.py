"""Real torchvision and timm networks staged by module names: the staged network computes the user's forward
pass exactly, survives save/load through its factory path, and DNF's dynamic compute answers as the full one.

Outside the default run (``-m integration``), in an environment with torchvision and timm, e.g.
``pip install torch torchvision timm`` next to fortress; skipped with the reason where they do not import.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch

from fortress.exits import EarlyExitNet
from fortress.models import Staging, build_model, load_model, save_model

pytestmark = pytest.mark.integration

# (factory path, factory arguments, stage names, classifier): torchvision's and timm's own layouts
NETWORKS: dict[str, tuple[str, dict[str, Any], tuple[str, ...], str]] = {
    "torchvision-resnet18": (
        "torchvision.models:resnet18",
        {"num_classes": 10},
        ("layer1", "layer2", "layer3", "layer4"),
        "fc",
    ),
    "timm-resnet18": (
        "timm:create_model",
        {"model_name": "resnet18", "num_classes": 10},
        ("layer1", "layer2", "layer3", "layer4"),
        "fc",
    ),
    "timm-mobilenetv3-small": (
        "timm:create_model",
        {"model_name": "mobilenetv3_small_100", "num_classes": 10},
        ("blocks.1", "blocks.3", "blocks.5"),
        "classifier",
    ),
}


def _needs(module: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # a missing package or a build that does not load against this torch
        pytest.skip(f"{module} does not import here ({type(exc).__name__}: {exc}); run in an environment with it")


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_a_real_network_staged_by_names_is_exact_and_dynamic_equals_full(name: str, tmp_path: Path) -> None:
    path, params, stages, classifier = NETWORKS[name]
    _needs("torchvision" if path.startswith("torchvision") else "timm")
    torch.manual_seed(0)
    staging = Staging(stages, classifier)
    staged = build_model(path, params, input_shape=(3, 32, 32), num_classes=10, staging=staging).eval()
    net = staged.source_network
    assert net is not None
    x = torch.rand(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(staged(x), net.eval()(x))
    assert staged.num_stages == len(stages)

    save_model(staged, tmp_path / "m")
    again = load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(x), staged(x))

    ee = EarlyExitNet(again, head_kind="plain").eval()
    with torch.no_grad():
        conf = torch.softmax(ee.forward_all(x).mean_logits[:-1], dim=2).amax(dim=2)
        ee.set_thresholds([float(c.quantile(0.7)) for c in conf])  # rows leave at several exits
        ld, ed = ee.forward_dynamic(x)
        ls, es = ee.forward_static(x)
    taken = torch.bincount(ed, minlength=ee.num_exits).tolist()
    diff = float((ld - ls).abs().max())
    print(f"{name}: stages {staged.stage_shapes}, exits taken {taken}, max |dynamic - full| {diff:.3g}")
    assert torch.equal(ed, es)
    assert torch.allclose(ld, ls, atol=1e-5), diff
    assert sum(1 for t in taken if t) >= 2  # not vacuous: more than one exit answers
