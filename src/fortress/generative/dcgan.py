"""A DCGAN (Radford et al. 2016) trained on proxy data: DNF's OOD generator (paper §4.1, App. F) and
the proxy generator of DFMS-HL.

The DNF paper trains a DCGAN on a proxy data set unrelated to the victim's task (TinyImageNet, or SVHN)
with Adam at lr 2e-4 for 30 epochs, then samples it for the OOD loss. Here the default proxy is
``natural_patches`` (crops of the photographs scikit-learn ships); any image set works. The
generator emits images in [0, 1] (sigmoid output) at the victim's input shape. A trained generator
is saved as safetensors plus JSON (:func:`save_generator`), so an expensive training is done once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortress.errors import ArtifactError, ConfigError
from fortress.models.io import atomic_write_text, copy_state_checked, load_state, read_json, save_state

__all__ = ["DCGANDiscriminator", "DCGANGenerator", "DCGANReport", "load_generator", "save_generator", "train_dcgan"]

WEIGHTS = "dcgan.safetensors"
CONFIG = "dcgan.json"

log = logging.getLogger(__name__)


def _init_weights(m: nn.Module) -> None:
    # DCGAN initialisation: N(0, 0.02) for convolutions, N(1, 0.02) for BatchNorm gains.
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) and m.affine:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """DCGAN generator for ``(C, S, S)`` images with ``S`` divisible by 4.

    ``z (nz) → Linear → 2·ngf × S/4 × S/4 → BN, ReLU → ConvT ×2 → ngf → BN, ReLU → ConvT ×2 → C → sigmoid``.

    Args:
        image_shape: ``(C, H, W)`` with ``H == W`` divisible by 4.
        nz: latent size (DCGAN uses 100).
        ngf: base width.

    Example:
        >>> DCGANGenerator((1, 28, 28))(torch.randn(2, 100)).shape
        torch.Size([2, 1, 28, 28])
    """

    def __init__(self, image_shape: tuple[int, int, int], *, nz: int = 100, ngf: int = 64) -> None:
        super().__init__()
        c, h, w = image_shape
        if h != w or h % 4 != 0 or h < 8:
            raise ConfigError(f"DCGAN images must be square with side divisible by 4 (>= 8), got {image_shape}")
        self.image_shape = (c, h, w)
        self.nz = nz
        self.ngf = ngf
        self.s0 = h // 4
        self.project = nn.Sequential(nn.Linear(nz, 2 * ngf * self.s0 * self.s0), nn.BatchNorm1d(2 * ngf * self.s0**2))
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(2 * ngf, ngf, 4, 2, 1),
            nn.BatchNorm2d(ngf),
            nn.ReLU(),
            nn.ConvTranspose2d(ngf, c, 4, 2, 1),
            nn.Sigmoid(),
        )
        self.apply(_init_weights)

    def forward(self, z: Tensor) -> Tensor:
        """Images in [0, 1] for latents ``z`` ``(N, nz)``."""
        h = self.project(z).view(z.shape[0], -1, self.s0, self.s0)
        out: Tensor = self.net(h)
        return out

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` images from standard-normal latents (eval mode)."""
        was = self.training
        self.eval()
        try:
            out: Tensor = self(torch.randn(n, self.nz, generator=generator))
            return out
        finally:
            self.train(was)


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator: two stride-2 convolutions with LeakyReLU(0.2) and a linear logit."""

    def __init__(self, image_shape: tuple[int, int, int], *, ndf: int = 64) -> None:
        super().__init__()
        c, h, w = image_shape
        self.net = nn.Sequential(
            nn.Conv2d(c, ndf, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ndf, 2 * ndf, 4, 2, 1),
            nn.BatchNorm2d(2 * ndf),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(2 * ndf * (h // 4) * (w // 4), 1),
        )
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        """Real/fake logits ``(N,)``."""
        out: Tensor = self.net(x * 2 - 1)
        return out.squeeze(1)


@dataclass
class DCGANReport:
    """Per-epoch generator and discriminator losses and wall time of :func:`train_dcgan`."""

    g_loss: list[float] = field(default_factory=list)
    d_loss: list[float] = field(default_factory=list)
    wall_s: float = 0.0


def train_dcgan(
    images: Tensor,
    *,
    epochs: int = 30,
    lr: float = 2e-4,
    batch_size: int = 64,
    nz: int = 100,
    ngf: int = 64,
    seed: int = 0,
    on_epoch: Callable[[int, float, float], None] | None = None,
    device: torch.device | str | None = None,
) -> tuple[DCGANGenerator, DCGANReport]:
    """Train a DCGAN on proxy ``images`` (paper App. F: Adam, lr 2e-4, 30 epochs; β1 = 0.5 as in DCGAN).

    Args:
        images: proxy images ``(N, C, H, W)`` in [0, 1].
        epochs: passes over ``images``.
        lr: Adam learning rate for both networks.
        batch_size: mini-batch size.
        nz: latent size.
        ngf: generator (and discriminator) base width.
        seed: seeds initialisation, batches and latents.
        on_epoch: called as ``on_epoch(epoch, g_loss, d_loss)``.
        device: where both networks train (``None``: the CPU); images and latents are drawn on the
            CPU and moved, so a seed gives the same draws everywhere.

    Returns:
        The trained generator (eval mode) and a :class:`DCGANReport`.
    """
    if epochs < 1 or batch_size < 2:
        raise ConfigError(f"need epochs >= 1 and batch_size >= 2, got {epochs}, {batch_size}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    shape = (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))
    dev = torch.device("cpu") if device is None else torch.device(device)
    g = DCGANGenerator(shape, nz=nz, ngf=ngf).to(dev)
    d = DCGANDiscriminator(shape, ndf=ngf).to(dev)
    opt_g = torch.optim.Adam(g.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=lr, betas=(0.5, 0.999))
    report = DCGANReport()
    t0 = time.perf_counter()
    n = images.shape[0]
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        gl = dl = 0.0
        steps = 0
        for i in range(0, n - batch_size + 1, batch_size):
            real = images[perm[i : i + batch_size]].to(dev)
            z = torch.randn(real.shape[0], nz, generator=gen).to(dev)
            fake = g(z)
            d_real, d_fake = d(real), d(fake.detach())
            loss_d = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real)) + (
                F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
            )
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            d_out = d(fake)
            loss_g = F.binary_cross_entropy_with_logits(d_out, torch.ones_like(d_out))
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            gl += loss_g.item()
            dl += loss_d.item()
            steps += 1
        report.g_loss.append(gl / max(steps, 1))
        report.d_loss.append(dl / max(steps, 1))
        log.info("dcgan epoch %d/%d g %.3f d %.3f", epoch + 1, epochs, report.g_loss[-1], report.d_loss[-1])
        if on_epoch is not None:
            on_epoch(epoch, report.g_loss[-1], report.d_loss[-1])
    report.wall_s = time.perf_counter() - t0
    g.eval()
    return g, report


def save_generator(generator: DCGANGenerator, directory: Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``dcgan.safetensors`` (weights and BatchNorm statistics) and ``dcgan.json`` into ``directory``.

    The JSON, written last and atomically, names the architecture and holds ``extra`` (e.g. the
    training settings), so its presence means a complete save.
    """
    directory = Path(directory)
    save_state(generator.state_dict(), directory / WEIGHTS, metadata={"format": "fortress-dcgan"})
    meta = {
        "image_shape": list(generator.image_shape),
        "nz": generator.nz,
        "ngf": generator.ngf,
        "extra": dict(extra or {}),
    }
    atomic_write_text(directory / CONFIG, json.dumps(meta, indent=1))
    return directory


def load_generator(directory: Path) -> tuple[DCGANGenerator, dict[str, Any]]:
    """Restore a generator written by :func:`save_generator` (eval mode) and the ``extra`` saved with it.

    Raises:
        ArtifactError: a file is missing, corrupt, or does not fit the architecture it names.
    """
    directory = Path(directory)
    meta = read_json(directory / CONFIG)
    try:
        c, h, w = (int(v) for v in meta["image_shape"])
        generator = DCGANGenerator((c, h, w), nz=int(meta["nz"]), ngf=int(meta["ngf"]))
        extra = dict(meta.get("extra", {}))
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise ArtifactError(f"{directory / CONFIG} does not describe a DCGAN generator: {exc}") from exc
    copy_state_checked(generator, load_state(directory / WEIGHTS), directory / WEIGHTS)
    return generator.eval(), extra
