"""The early-exit network: a frozen staged backbone with exit heads (DNF paper §4, Alg. 2, Fig. 4).

Exits are numbered in depth order: ``0 … H-1`` are the heads attached after backbone stages and
``H`` is the backbone's own classifier (the final exit). A query leaves at the **first exit whose
maximum softmax probability reaches its threshold** (Alg. 2, ``max_j V*_{i,j} ≥ r_i``); a query
that passes no threshold leaves at the final exit.

Two inference paths give the same answers:

* :meth:`EarlyExitNet.forward_all` runs every stage and every head (training, simulation, and the
  constant-time serving mode that hides the exit from response timing);
* :meth:`EarlyExitNet.forward_dynamic` really skips work: after each head it keeps only the rows
  still active (``index_select``), runs the next stage on them, and scatters finished rows back by
  index — no per-row Python loop.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fortress.errors import ConfigError
from fortress.exits.heads import ExitHead, HeadKind, HeadOutput, PoolKind
from fortress.models.staged import StagedBackbone

__all__ = ["PAPER_THRESHOLDS", "AllExits", "EarlyExitNet", "default_thresholds", "select_exits"]

#: Paper App. D defaults: MNIST (3 heads on LeNet-5), CIFAR/ImageNet-style sets (4 heads on ResNets).
PAPER_THRESHOLDS: dict[str, tuple[float, ...]] = {
    "mnist": (0.92, 0.94, 0.96),
    "cifar10": (0.90, 0.92, 0.94, 0.96),
    "cifar100": (0.90, 0.92, 0.94, 0.96),
    "imagenet": (0.90, 0.92, 0.94, 0.96),
}


def default_thresholds(num_heads: int, dataset: str | None = None) -> tuple[float, ...]:
    """The paper's default thresholds for ``dataset``, else increasing by 0.02 from 0.90 (App. D).

    Example:
        >>> default_thresholds(3, "mnist")
        (0.92, 0.94, 0.96)
    """
    if dataset is not None:
        key = dataset.split("-")[0].lower()
        if key in PAPER_THRESHOLDS and len(PAPER_THRESHOLDS[key]) == num_heads:
            return PAPER_THRESHOLDS[key]
    if num_heads == 3:
        return PAPER_THRESHOLDS["mnist"]
    return tuple(round(min(0.90 + 0.02 * i, 0.99), 4) for i in range(num_heads))


def select_exits(logits: Tensor, thresholds: Tensor) -> Tensor:
    """Exit index per row: the first head whose max softmax ≥ its threshold, else the final exit.

    Args:
        logits: ``(E, B, K)`` logits of every exit (the last one is the final exit).
        thresholds: ``(E-1,)`` thresholds of the heads.

    Returns:
        ``(B,)`` int64 exit indices in ``[0, E-1]``.
    """
    e = logits.shape[0]
    conf = torch.softmax(logits[:-1], dim=2).amax(dim=2)  # (E-1, B)
    passed = conf >= thresholds.view(-1, 1)
    # append an always-true row for the final exit, then take the first True per column
    passed = torch.cat([passed, torch.ones(1, logits.shape[1], dtype=torch.bool, device=logits.device)])
    idx = torch.arange(e, device=logits.device).view(-1, 1).expand_as(passed)
    return torch.where(passed, idx, torch.full_like(idx, e)).amin(dim=0)


@dataclass(frozen=True)
class AllExits:
    """Every exit's output for a batch.

    Attributes:
        logits: ``(E, B, K)``, exits in depth order (last = final exit); sampled VIB latents in training.
        heads: each head's :class:`HeadOutput` (``E-1`` entries; VIB heads carry ``mu``/``logvar``).
    """

    logits: Tensor
    heads: tuple[HeadOutput, ...]

    @property
    def mean_logits(self) -> Tensor:
        """``(E, B, K)`` logits of the latent means (what inference answers with)."""
        return torch.stack([h.inference_logits for h in self.heads] + [self.logits[-1]])


class EarlyExitNet(nn.Module):
    """A frozen staged backbone plus trainable exit heads.

    Args:
        backbone: the victim, staged; its parameters are frozen (``requires_grad=False``).
        exit_after: stage indices that get a head (default: every stage, paper App. E).
        head_kind: ``"vib"`` (paper Eq. 5) or ``"plain"``.
        hidden: head hidden/latent width (``None``: one linear layer as in Table 6), or one per head.
        pool: feature reduction before the head (``"auto"``: flatten small maps, pool large ones).
        thresholds: per-head confidence thresholds (default: paper values for ``dataset``).
        dataset: data set name used to pick paper default thresholds.
        train_final_exit: give the final exit its own trainable copy of the classifier (default: the
            victim's frozen classifier, as in the paper).
        seed: seeds the heads' initial weights (``None``: the global torch generator).

    Shape:
        ``(B, C, H, W)`` float32 in [0, 1] → logits ``(B, K)`` and exits ``(B,)``.

    Example:
        >>> from fortress.models import create_model
        >>> net = EarlyExitNet(create_model("lenet5"), head_kind="plain")
        >>> logits, exits = net.forward_dynamic(torch.rand(8, 1, 28, 28))
        >>> logits.shape, exits.shape
        (torch.Size([8, 10]), torch.Size([8]))
    """

    thresholds: Tensor

    def __init__(
        self,
        backbone: StagedBackbone,
        *,
        exit_after: Sequence[int] | None = None,
        head_kind: HeadKind = "vib",
        hidden: int | Sequence[int | None] | None = None,
        pool: PoolKind = "auto",
        thresholds: Sequence[float] | None = None,
        dataset: str | None = None,
        train_final_exit: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        stages = list(range(backbone.num_stages)) if exit_after is None else [int(s) for s in exit_after]
        if not stages or stages != sorted(set(stages)) or stages[0] < 0 or stages[-1] >= backbone.num_stages:
            raise ConfigError(
                f"exit_after must be increasing stage indices in [0, {backbone.num_stages - 1}], got {exit_after}"
            )
        hiddens: list[int | None] = (
            [hidden] * len(stages) if hidden is None or isinstance(hidden, int) else list(hidden)
        )
        if len(hiddens) != len(stages):
            raise ConfigError(f"hidden has {len(hiddens)} entries for {len(stages)} heads")
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.exit_after = stages
        self.head_kind: HeadKind = head_kind
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.heads = nn.ModuleList(
                ExitHead(backbone.stage_shapes[s], backbone.num_classes, kind=head_kind, hidden=h, pool=pool)
                for s, h in zip(stages, hiddens, strict=True)
            )
        self.train_final_exit = train_final_exit
        self.final_head: nn.Module = copy.deepcopy(backbone.classifier) if train_final_exit else backbone.classifier
        if train_final_exit:
            for p in self.final_head.parameters():
                p.requires_grad_(True)
        thr = default_thresholds(len(stages), dataset) if thresholds is None else tuple(thresholds)
        self.register_buffer("thresholds", torch.zeros(len(stages)))
        self.set_thresholds(thr)
        self._head_of_stage = {s: i for i, s in enumerate(stages)}

    # -- configuration ---------------------------------------------------------------------------
    @property
    def num_exits(self) -> int:
        """Heads plus the final exit."""
        return len(self.heads) + 1

    @property
    def num_classes(self) -> int:
        """Classes per output row."""
        return self.backbone.num_classes

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        """Replace the per-head thresholds (values > 1 disable a head; it never fires)."""
        thr = [float(t) for t in thresholds]
        if len(thr) != len(self.heads):
            raise ConfigError(f"need {len(self.heads)} thresholds (one per head), got {len(thr)}: {thr}")
        if any(not (t >= 0.0) or t != t for t in thr):
            raise ConfigError(f"thresholds must be non-negative numbers, got {thr}")
        self.thresholds.copy_(torch.tensor(thr))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters DNF trains: the heads (and the final head's copy when it is trainable)."""
        params = list(self.heads.parameters())
        if self.train_final_exit:
            params += list(self.final_head.parameters())
        return params

    def train(self, mode: bool = True) -> EarlyExitNet:
        """Set heads to ``mode``; the frozen backbone always stays in eval mode (BatchNorm statistics
        of the victim must not drift during DNF training, unlike the authors' released code)."""
        super().train(mode)
        self.backbone.eval()
        if self.train_final_exit:
            self.final_head.train(mode)
        return self

    # -- inference -------------------------------------------------------------------------------
    def forward_all(self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> AllExits:
        """Run every stage and every exit on the whole batch.

        Args:
            x: images ``(B, C, H, W)`` in [0, 1].
            sample: draw the VIB latent (training) instead of using its mean.
            generator: random source for the latent samples.
        """
        h = self.backbone.preprocess(x)
        outs: list[HeadOutput] = []
        for k, stage in enumerate(self.backbone.stages):
            h = stage(h)
            j = self._head_of_stage.get(k)
            if j is not None:
                outs.append(self.heads[j](h, sample=sample, generator=generator))
        final = self.final_head(h)
        return AllExits(torch.stack([o.logits for o in outs] + [final]), tuple(outs))

    def forward_static(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Exit selection on :meth:`forward_all` (every stage computed): ``(logits (B, K), exits (B,))``."""
        allx = self.forward_all(x)
        exits = select_exits(allx.logits, self.thresholds)
        rows = torch.arange(x.shape[0], device=x.device)
        return allx.logits[exits, rows], exits

    def forward_dynamic(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Early-exit inference that skips the stages a row no longer needs.

        Returns:
            ``(logits (B, K), exits (B,))`` — identical to :meth:`forward_static` up to float rounding.
        """
        b = x.shape[0]
        out = x.new_empty(b, self.num_classes)
        exits = torch.full((b,), len(self.heads), dtype=torch.long, device=x.device)
        active = torch.arange(b, device=x.device)
        h = self.backbone.preprocess(x)
        for k, stage in enumerate(self.backbone.stages):
            h = stage(h)
            j = self._head_of_stage.get(k)
            if j is None:
                continue
            logits = self.heads[j](h).logits
            done = torch.softmax(logits, dim=1).amax(dim=1) >= self.thresholds[j]
            n_done = int(done.sum())
            if n_done == 0:
                continue
            idx = active[done]
            out.index_copy_(0, idx, logits[done])
            exits.index_fill_(0, idx, j)
            if n_done == active.numel():
                return out, exits
            keep = torch.nonzero(~done).flatten()
            active = active.index_select(0, keep)
            h = h.index_select(0, keep)
        out.index_copy_(0, active, self.final_head(h))
        return out, exits

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the dynamic early-exit path."""
        return self.forward_dynamic(x)[0]
