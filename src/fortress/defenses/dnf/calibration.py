"""Per-exit temperature calibration of DNF's intermediate exits (beyond the paper).

The VIB heads' KL term pulls every latent towards the prior ``N(0, I)``; with one linear layer per
head (paper Table 6) the latent *is* the logits, so ID answers at the intermediate exits come out
flat (measured on LeNet-5/MNIST: median max-softmax 0.28 at exits 1–2 where the heads were 91 % and
79 % right), and no ID query ever reaches a 0.9x threshold there. Temperature scaling (Guo et al.,
ICML 2017) fits one temperature ``T_j`` per exit on held-out ID data by minimising the negative
log-likelihood of ``logits / T_j``; the arg-max is unchanged, only the confidence becomes what the
head's accuracy warrants, so the thresholds (and the utility guard) decide on meaningful numbers.
Exit 0 is left alone: its flat ID answers are what lets it tell ID from attack queries.

The temperature is folded into the head's output layer (weights and bias scaled by ``1 / T``), so
a calibrated DNF is saved, loaded and served like any other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortress.defenses.dnf.defense import DNF
from fortress.errors import ConfigError
from fortress.exits.heads import ExitHead
from fortress.tensors import check_labels

__all__ = ["calibrate_exits", "fit_temperature", "scale_head"]

#: Temperatures tried (log-spaced); the fit is a deterministic grid search, no optimiser state.
GRID = torch.logspace(-3, 1, 401)


def fit_temperature(logits: Tensor, y: Tensor) -> float:
    """The temperature of :data:`GRID` minimising the mean NLL of ``softmax(logits / T)`` for labels ``y``."""
    nll = torch.stack([F.cross_entropy(logits / t, y) for t in GRID])
    return float(GRID[int(nll.argmin())])


def _output_layer(head: ExitHead) -> tuple[nn.Linear, int]:
    """The linear layer producing the head's (mean) logits, and how many of its rows are logits."""
    if isinstance(head.decoder, nn.Linear):
        return head.decoder, head.decoder.out_features
    if isinstance(head.decoder, nn.Sequential) and isinstance(head.decoder[-1], nn.Linear):
        return head.decoder[-1], head.decoder[-1].out_features
    return head.encoder, head.latent_dim  # no decoder: the (mean) latent is the logits


@torch.no_grad()
def scale_head(head: ExitHead, factor: float) -> None:
    """Multiply the head's (mean) logits by ``factor`` by scaling its output layer's weights and bias."""
    layer, rows = _output_layer(head)
    layer.weight[:rows].mul_(factor)
    if layer.bias is not None:
        layer.bias[:rows].mul_(factor)


@torch.no_grad()
def calibrate_exits(dnf: DNF, x_val: Tensor, y_val: Tensor, *, first: int = 1) -> tuple[float, ...]:
    """Fit and fold a temperature into every head from ``first`` on (exit 0 and the final exit are left alone).

    Args:
        dnf: the trained DNF (its heads are changed in place).
        x_val: held-out ID images ``(N, C, H, W)`` in [0, 1].
        y_val: their labels.
        first: the first head calibrated (>= 1).

    Returns:
        One temperature per head (1.0 for the heads left alone).

    Raises:
        ConfigError: ``first`` < 1.
        InvalidInput: ``y_val`` breaks the label contract.
    """
    if first < 1:
        raise ConfigError(f"calibration starts at exit 1 or later (exit 0 stays as trained), got {first}")
    y_val = check_labels(y_val, len(x_val), dnf.num_classes, name="y_val")
    dnf.net.eval()
    logits = dnf.net.forward_all(x_val).logits
    temps = []
    for j, head in enumerate(dnf.net.heads):
        t = fit_temperature(logits[j], y_val) if j >= first else 1.0
        if t != 1.0:
            assert isinstance(head, ExitHead)
            scale_head(head, 1.0 / t)
        temps.append(t)
    return tuple(temps)
