"""Tests of ResNet-14-S, the four-stage residual victim: staging, cost per stage and early exits."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from fortress.errors import ConfigError
from fortress.exits.heads import ExitHead
from fortress.exits.network import EarlyExitNet
from fortress.models import StagedBackbone, create_model, load_model, save_model
from fortress.models.resnet import BasicBlock
from fortress.models.resnet_s import RESNET_S_BLOCKS, RESNET_S_PLANES

SHAPES = [(1, 28), (3, 28), (1, 32), (3, 32)]


def resnet_s(channels: int, size: int, seed: int = 0, num_classes: int = 10) -> StagedBackbone:
    """A random-init ResNet-14-S in eval mode with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = create_model("resnet14-s", num_classes=num_classes, in_channels=channels, image_size=size)
    model.train()
    with torch.no_grad():  # move the running statistics away from their defaults
        model(torch.rand(16, channels, size, size, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def stage_flops(model: StagedBackbone) -> list[int]:
    """FLOPs of one image through each stage (the classifier counted with the last stage)."""
    h = model.preprocess(torch.rand(1, *model.input_shape))
    flops: list[int] = []
    with torch.no_grad():
        for stage in model.stages:
            with FlopCounterMode(display=False) as counter:
                h = stage(h)
            flops.append(int(counter.get_total_flops()))
        with FlopCounterMode(display=False) as counter:
            model.classifier(h)
    flops[-1] += int(counter.get_total_flops())
    return flops


@pytest.mark.parametrize(("channels", "size"), SHAPES)
def test_stages_for_each_input_shape(channels: int, size: int) -> None:
    model = resnet_s(channels, size, num_classes=7)
    assert model.num_stages == 4
    assert model.stage_channels == list(RESNET_S_PLANES) == [32, 64, 128, 256]
    half, quarter, eighth = (size + 1) // 2, (size + 3) // 4, (size + 7) // 8
    assert model.stage_shapes == [
        (32, half, half),
        (64, quarter, quarter),
        (128, eighth, eighth),
        (256, eighth, eighth),
    ]
    x = torch.rand(3, channels, size, size)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
        assert torch.equal(model.classifier(feats[-1]), logits)
    assert [tuple(f.shape[1:]) for f in feats] == model.stage_shapes
    assert logits.shape == (3, 7)
    assert model.arch == "resnet14-s"
    assert model.arch_params == {"num_classes": 7, "in_channels": channels, "image_size": size}


def test_blocks_widths_and_parameters() -> None:
    model = create_model("resnet14-s")
    blocks = [sum(isinstance(m, BasicBlock) for m in stage.modules()) for stage in model.stages]
    assert blocks == list(RESNET_S_BLOCKS) == [1, 1, 2, 2]
    convs3 = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs3) + len(linears) == 14  # the 14 of ResNet-14 (1×1 projections not counted)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())  # CIFAR-style: no max-pool
    stem = convs3[0]
    assert (stem.in_channels, stem.out_channels, stem.stride) == (1, 32, (2, 2))
    assert 2_690_000 < sum(p.numel() for p in model.parameters()) < 2_720_000


@pytest.mark.parametrize(("channels", "size"), SHAPES)
def test_later_stages_carry_most_of_the_flops(channels: int, size: int) -> None:
    flops = stage_flops(resnet_s(channels, size))
    total = sum(flops)
    cumulative = [sum(flops[: k + 1]) / total for k in range(4)]
    assert cumulative[1] < 0.2  # an answer at exit 0 or 1 costs under a fifth of the full path
    assert cumulative[2] < 0.35
    assert flops[3] / total > 0.6
    assert max(flops[:3]) < flops[3]


def test_staging_is_exact_after_a_save_load_roundtrip(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    model = resnet_s(1, 28)
    loaded = load_model(save_model(model, tmp_path / "r"))
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.stage_shapes == model.stage_shapes


@pytest.mark.parametrize("bad", [{"image_size": 4}, {"in_channels": 0}, {"num_classes": 1}])
def test_bad_arguments(bad: dict[str, int]) -> None:
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=key):
        create_model("resnet14-s", **bad)


# --------------------------------------------------------------------------------------------------
# Early exits over the residual victim


def mixed_batch(n: int, channels: int, size: int, gen: torch.Generator) -> Tensor:
    """Uniform noise, constant images and smooth blobs in random proportions."""
    kind = torch.randint(0, 3, (n,), generator=gen)
    noise = torch.rand(n, channels, size, size, generator=gen)
    const = torch.rand(n, channels, 1, 1, generator=gen).expand(n, channels, size, size)
    coarse = torch.rand(n, channels, 4, 4, generator=gen)
    smooth = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    x = torch.where((kind == 0)[:, None, None, None], noise, smooth)
    x = torch.where((kind == 1)[:, None, None, None], const, x)
    return x.contiguous()


def exit_net(channels: int, size: int, head_kind: str) -> EarlyExitNet:
    """An early-exit net over a random ResNet-14-S whose heads answer with spread-out confidences.

    Each head's first layer is scaled so that its logits have a standard deviation of about 3 on
    the test inputs (random heads on pooled features are otherwise all unsure).
    """
    net = EarlyExitNet(resnet_s(channels, size, seed=3), head_kind=head_kind, seed=0)  # type: ignore[arg-type]
    x = mixed_batch(128, channels, size, torch.Generator().manual_seed(99))
    with torch.no_grad():
        spread = net.forward_all(x).logits[:-1].std(dim=(1, 2))
        for head, sd in zip(net.heads, spread.tolist(), strict=True):
            assert isinstance(head, ExitHead)
            head.encoder.weight.mul_(3.0 / sd)
            head.encoder.bias.mul_(3.0 / sd)
    return net.eval()


@pytest.mark.parametrize(("channels", "size", "head_kind"), [(1, 28, "vib"), (3, 32, "plain"), (1, 32, "plain")])
def test_dynamic_exits_equal_the_full_path(channels: int, size: int, head_kind: str) -> None:
    net = exit_net(channels, size, head_kind)
    assert net.num_exits == 5  # a head after each of the four stages, then the final classifier
    seen = torch.zeros(net.num_exits, dtype=torch.long)
    for case in range(16):
        gen = torch.Generator().manual_seed(100 + case)
        n = int(torch.randint(1, 97, (1,), generator=gen))
        thr = (torch.rand(4, generator=gen) * 0.9 + 0.35).tolist()  # above 1: the head is off
        net.set_thresholds(thr)
        x = mixed_batch(n, channels, size, gen)
        with torch.no_grad():
            ls, es = net.forward_static(x)
            ld, ed = net.forward_dynamic(x)
        assert torch.equal(ed, es), f"case {case}: thresholds {thr}"
        assert torch.allclose(ld, ls, atol=1e-5), f"case {case}: max diff {float((ld - ls).abs().max())}"
        seen += torch.bincount(ed, minlength=net.num_exits)
    assert bool((seen > 0).all()), f"exits used {seen.tolist()}"  # every exit was taken by some row


def test_disabled_heads_give_the_plain_victim() -> None:
    net = exit_net(1, 28, "vib")
    net.set_thresholds([1.01] * 4)
    x = mixed_batch(32, 1, 28, torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits, exits = net.forward_dynamic(x)
        assert bool((exits == 4).all())
        assert torch.allclose(logits, net.backbone(x), atol=1e-5)


def test_dnf_attaches_a_head_after_every_stage() -> None:
    from fortress.defenses import DNF

    dnf = DNF(resnet_s(1, 28), dataset="cifar10", seed=0)
    # stage 0's 32×14×14 map is pooled (as paper Table 5 pools ResNet features), the smaller ones flattened
    assert [h.in_features for h in dnf.net.heads] == [32, 64 * 7 * 7, 128 * 4 * 4, 256 * 4 * 4]
    assert dnf.net.thresholds.tolist() == pytest.approx([0.90, 0.92, 0.94, 0.96])  # the paper's four heads
    with torch.no_grad():
        probs = dnf(mixed_batch(8, 1, 28, torch.Generator().manual_seed(0)))
    assert probs.shape == (8, 10)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(8))
