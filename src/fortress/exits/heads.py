"""Exit heads: plain classifiers or variational-information-bottleneck (VIB) heads (paper Eq. 5).

A head reads one stage's output. It first pools or flattens it (paper Table 6 flattens LeNet
features: 1176/400/120 inputs; Table 5 pools ResNet features to 64/128/256/512), then:

* ``plain`` — ``Linear(F, M)``, or ``Linear(F, d) → ReLU → Linear(d, M)`` with a hidden width ``d``
  (the shape of the authors' released heads);
* ``vib`` — an encoder gives the mean and log-variance of a Gaussian latent ``z`` (Eq. 5,
  ``P(z|x) = N(f^μ(x), f^Σ(x))`` with diagonal covariance); in training ``z = μ + σ·ε`` is sampled
  with the reparameterisation trick, at inference the mean is used. Without a hidden width the
  latent *is* the logit vector (one linear layer, as in Table 6, but emitting ``2M`` numbers); with
  one, ``z`` has ``d`` dimensions and a linear decoder maps it to the ``M`` logits (Table 5's
  ``Linear(F, 100) → Linear(100, M)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fortress.errors import ConfigError

__all__ = ["ExitHead", "HeadOutput", "gaussian_kl"]

HeadKind = Literal["vib", "plain"]
PoolKind = Literal["auto", "flatten", "avg"]

#: "auto" pooling flattens features up to this size and average-pools larger maps.
AUTO_FLATTEN_MAX = 4096
#: Log-variance is clamped to this range for numerical safety.
LOGVAR_RANGE = (-10.0, 10.0)


@dataclass(frozen=True)
class HeadOutput:
    """A head's answer: logits plus, for VIB heads, the latent Gaussian's parameters.

    Attributes:
        logits: logits of the sampled latent in training, of the mean otherwise.
        mu: latent mean (VIB heads).
        logvar: latent log-variance (VIB heads).
        mean_logits: logits of the latent mean (what inference answers with); equals ``logits``
            for plain heads and when not sampling.
    """

    logits: Tensor
    mu: Tensor | None = None
    logvar: Tensor | None = None
    mean_logits: Tensor | None = None

    @property
    def inference_logits(self) -> Tensor:
        """The logits inference uses (the latent mean's)."""
        return self.logits if self.mean_logits is None else self.mean_logits


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(μ, diag σ²) ‖ N(0, I))`` per row (the prior β(Z) of Eq. 6 is a standard normal).

    Shape:
        ``(B, D)``, ``(B, D)`` → ``(B,)``.
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


class ExitHead(nn.Module):
    """One exit classifier attached after a backbone stage.

    Args:
        feature_shape: per-sample shape of the stage output it reads, e.g. ``(6, 14, 14)``.
        num_classes: output classes ``M``.
        kind: ``"vib"`` (paper Eq. 5) or ``"plain"`` (the released code's heads).
        hidden: hidden/latent width ``d``; ``None`` for a single linear layer (Table 6).
        pool: ``"flatten"``, ``"avg"`` (global average pool) or ``"auto"``.

    Shape:
        stage output ``(B, *feature_shape)`` → logits ``(B, M)``.

    Example:
        >>> head = ExitHead((6, 14, 14), 10, kind="plain")
        >>> head(torch.rand(3, 6, 14, 14)).logits.shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        feature_shape: tuple[int, ...],
        num_classes: int,
        *,
        kind: HeadKind = "vib",
        hidden: int | None = None,
        pool: PoolKind = "auto",
    ) -> None:
        super().__init__()
        if kind not in ("vib", "plain"):
            raise ConfigError(f"head kind must be 'vib' or 'plain', got {kind!r}")
        if pool not in ("auto", "flatten", "avg"):
            raise ConfigError(f"pool must be 'auto', 'flatten' or 'avg', got {pool!r}")
        if hidden is not None and hidden < 1:
            raise ConfigError(f"hidden must be a positive width or None, got {hidden}")
        flat = 1
        for d in feature_shape:
            flat *= int(d)
        if pool == "auto":
            pool = "avg" if len(feature_shape) == 3 and flat > AUTO_FLATTEN_MAX else "flatten"
        if pool == "avg" and len(feature_shape) != 3:
            raise ConfigError(f"average pooling needs (C, H, W) features, got {feature_shape}")
        self.kind: HeadKind = kind
        self.pool: PoolKind = pool
        self.in_features = int(feature_shape[0]) if pool == "avg" else flat
        self.num_classes = num_classes
        self.hidden = hidden
        latent = num_classes if hidden is None else hidden
        self.latent_dim = latent
        if kind == "vib":
            self.encoder = nn.Linear(self.in_features, 2 * latent)
            self.decoder: nn.Module = nn.Identity() if hidden is None else nn.Linear(hidden, num_classes)
        else:
            self.encoder = nn.Linear(self.in_features, latent)
            self.decoder = nn.Identity() if hidden is None else nn.Sequential(nn.ReLU(), nn.Linear(hidden, num_classes))

    def _reduce(self, h: Tensor) -> Tensor:
        if self.pool == "avg":
            return h.mean(dim=(2, 3))
        return h.flatten(1)

    def forward(self, h: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> HeadOutput:
        """Logits for stage output ``h``; VIB heads sample ``z`` when ``sample`` (training)."""
        e = self.encoder(self._reduce(h))
        if self.kind == "plain":
            return HeadOutput(self.decoder(e))
        mu, logvar = e.chunk(2, dim=1)
        logvar = logvar.clamp(*LOGVAR_RANGE)
        mean_logits = self.decoder(mu)
        if not sample:
            return HeadOutput(mean_logits, mu, logvar, mean_logits)
        # drawn where the generator lives (the CPU's, for seeds that mean the same on every device)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype).to(mu.device)
        z = mu + eps * (0.5 * logvar).exp()
        return HeadOutput(self.decoder(z), mu, logvar, mean_logits)
