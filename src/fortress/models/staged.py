"""Staged backbones: a classifier cut into ordered stages so exits can attach after any of them.

A :class:`StagedBackbone` is ``normalise → stage 0 → … → stage S-1 → classifier``. Every stage's
per-sample output shape is known (measured once with a dry run), which is what exit heads need.
Built-in models are staged by hand; :func:`from_sequential` and :func:`from_stages` stage a user's
own model ("bring your own model").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fortress.data.spec import DataCard
from fortress.errors import ConfigError

__all__ = ["StagedBackbone", "from_sequential", "from_stages", "square_backbone"]


class StagedBackbone(nn.Module):
    """An image classifier as ordered stages plus a final classifier (DNF paper §4.1, Fig. 4).

    Args:
        stages: the feature stages, applied in order; exits may attach after any of them.
        classifier: maps the last stage's output to logits; it is the network's own (final) exit.
        input_shape: per-image input shape ``(C, H, W)``; inputs are float32 in [0, 1].
        num_classes: number of output classes.
        mean: per-channel normalisation mean applied inside the model (``None``: no normalisation).
        std: per-channel normalisation std.
        arch: registry name (or a user label) recorded in saved configs.
        arch_params: keyword arguments that rebuild the architecture from the registry.

    Shape:
        input ``(N, C, H, W)`` float32 in [0, 1]; output logits ``(N, num_classes)``.

    Example:
        >>> net = from_sequential(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), (1, 2, 2), 3)
        >>> net(torch.rand(5, 1, 2, 2)).shape
        torch.Size([5, 3])
    """

    mean: Tensor
    std: Tensor
    #: What the model was trained on (its data spec, classes, content hash), saved in ``model.json``;
    #: ``None`` for a model whose data is unknown.
    data_card: DataCard | None = None
    #: How a user's network was staged by module names (``stages``, ``classifier``, ``mean``, ``std``;
    #: :func:`fortress.models.by_names.stage_by_names`), saved in ``model.json``; ``None`` otherwise.
    staging: dict[str, Any] | None = None

    @property
    def source_network(self) -> nn.Module | None:
        """The user's network this one was staged from by module names (sharing its modules), else ``None``.

        Kept outside the module tree, so it neither adds parameters nor names to the state dict.
        """
        net = self.__dict__.get("_source_network")
        return net if isinstance(net, nn.Module) else None

    def __init__(
        self,
        stages: Sequence[nn.Module],
        classifier: nn.Module,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        arch: str = "custom",
        arch_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if len(stages) == 0:
            raise ConfigError("a staged backbone needs at least one stage, got 0")
        if len(input_shape) != 3 or any(int(d) <= 0 for d in input_shape):
            raise ConfigError(f"input_shape must be (C, H, W) with positive sizes, got {tuple(input_shape)}")
        if num_classes < 2:
            raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
        self.stages = nn.ModuleList(stages)
        self.classifier = classifier
        self.input_shape: tuple[int, int, int] = (
            int(input_shape[0]),
            int(input_shape[1]),
            int(input_shape[2]),
        )
        self.num_classes = int(num_classes)
        self.arch = arch
        self.arch_params: dict[str, Any] = dict(arch_params or {})
        c = self.input_shape[0]
        m = torch.zeros(c) if mean is None else torch.as_tensor(list(mean), dtype=torch.float32)
        s = torch.ones(c) if std is None else torch.as_tensor(list(std), dtype=torch.float32)
        if m.numel() != c or s.numel() != c or bool((s <= 0).any()):
            raise ConfigError(f"mean/std must have {c} entries with std > 0, got mean={mean}, std={std}")
        self.register_buffer("mean", m.view(1, c, 1, 1), persistent=False)
        self.register_buffer("std", s.view(1, c, 1, 1), persistent=False)
        self.stage_shapes: list[tuple[int, ...]] = self._probe_shapes()

    @torch.no_grad()
    def _probe_shapes(self) -> list[tuple[int, ...]]:
        was_training = self.training
        self.eval()
        try:
            h = self.preprocess(torch.zeros(1, *self.input_shape))
            shapes: list[tuple[int, ...]] = []
            for stage in self.stages:
                h = stage(h)
                shapes.append(tuple(h.shape[1:]))
            out = self.classifier(h)
        except RuntimeError as exc:
            raise ConfigError(f"the stages do not run on inputs of shape {self.input_shape}: {exc}") from exc
        finally:
            self.train(was_training)
        if tuple(out.shape) != (1, self.num_classes):
            raise ConfigError(f"the classifier outputs shape {tuple(out.shape[1:])}, expected ({self.num_classes},)")
        return shapes

    @property
    def num_stages(self) -> int:
        """Number of feature stages (exits can attach after stage ``0 … num_stages-1``)."""
        return len(self.stages)

    @property
    def stage_channels(self) -> list[int]:
        """Channels (or features) each stage outputs."""
        return [s[0] for s in self.stage_shapes]

    def preprocess(self, x: Tensor) -> Tensor:
        """Normalise [0, 1] images with the model's own mean and std."""
        return (x - self.mean) / self.std

    def features(self, x: Tensor) -> list[Tensor]:
        """Outputs of every stage for images ``x``."""
        h = self.preprocess(x)
        outs: list[Tensor] = []
        for stage in self.stages:
            h = stage(h)
            outs.append(h)
        return outs

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the plain (undefended) network."""
        h = self.preprocess(x)
        for stage in self.stages:
            h = stage(h)
        out: Tensor = self.classifier(h)
        return out

    def penultimate(self, x: Tensor) -> Tensor:
        """The input of the final linear layer, flattened (used by surrogates and SVD attacks)."""
        h = self.preprocess(x)
        for stage in self.stages:
            h = stage(h)
        mods = list(self.classifier.modules())
        linears = [m for m in mods if isinstance(m, nn.Linear)]
        if not linears:
            return h.flatten(1)
        last = linears[-1]
        captured: list[Tensor] = []
        handle = last.register_forward_hook(lambda _m, inp, _o: captured.append(inp[0]))
        try:
            self.classifier(h)
        finally:
            handle.remove()
        return captured[0].flatten(1)


def from_sequential(
    model: nn.Sequential,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    cut_after: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    arch: str = "custom",
) -> StagedBackbone:
    """Stage a user's ``nn.Sequential`` (bring your own model).

    The layers are shared, not copied. By default every layer except the last becomes its own stage
    and the last layer is the classifier; ``cut_after`` lists the layer indices after which a stage
    ends (the layers after the last cut form the classifier).

    Args:
        model: the user's network; it must map ``input_shape`` images to ``num_classes`` logits.
        input_shape: ``(C, H, W)`` of inputs in [0, 1].
        num_classes: number of classes.
        cut_after: increasing layer indices ending each stage.
        mean: normalisation mean applied before the first layer (``None``: the model normalises itself).
        std: normalisation std.
        arch: a label recorded in saved configs.

    Example:
        >>> seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
        >>> from_sequential(seq, (1, 28, 28), 10, cut_after=[1]).num_stages
        1
    """
    layers = list(model)
    if len(layers) < 2:
        raise ConfigError(f"a Sequential needs at least 2 layers to be staged, got {len(layers)}")
    cuts = list(range(len(layers) - 1)) if cut_after is None else [int(c) for c in cut_after]
    if not cuts or cuts != sorted(set(cuts)) or cuts[0] < 0 or cuts[-1] >= len(layers) - 1:
        raise ConfigError(
            f"cut_after must be increasing layer indices in [0, {len(layers) - 2}], got {list(cut_after or [])}"
        )
    stages: list[nn.Module] = []
    start = 0
    for c in cuts:
        chunk = layers[start : c + 1]
        stages.append(chunk[0] if len(chunk) == 1 else nn.Sequential(*chunk))
        start = c + 1
    tail = layers[start:]
    classifier = tail[0] if len(tail) == 1 else nn.Sequential(*tail)
    return StagedBackbone(
        stages, classifier, input_shape=input_shape, num_classes=num_classes, mean=mean, std=std, arch=arch
    )


def from_stages(
    stages: Sequence[nn.Module],
    classifier: nn.Module,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    arch: str = "custom",
) -> StagedBackbone:
    """Stage a user's module given the list of its stages and its classifier (bring your own model).

    ``classifier(stages[-1](… stages[0](x)))`` must equal the user's forward pass; the modules are
    shared, so the user's trained weights are used as they are.
    """
    return StagedBackbone(
        list(stages),
        classifier,
        input_shape=input_shape,
        num_classes=num_classes,
        mean=mean,
        std=std,
        arch=arch,
    )


def square_backbone(
    stages: Sequence[nn.Module],
    classifier: nn.Module,
    *,
    arch: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> StagedBackbone:
    """The staged backbone of a built-in factory for square ``(in_channels, image_size, image_size)``
    inputs, recording the factory's arguments so :func:`~fortress.models.build_model` can rebuild it."""
    return StagedBackbone(
        stages,
        classifier,
        input_shape=(in_channels, image_size, image_size),
        num_classes=num_classes,
        mean=mean,
        std=std,
        arch=arch,
        arch_params={"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size},
    )
