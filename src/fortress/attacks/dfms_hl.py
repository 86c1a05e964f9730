"""DFMS-HL: data-free model stealing from hard labels (Sanyal, Addepalli, Babu, CVPR 2022).

The attacker owns a *proxy* pool of images unrelated to the victim's task. A DCGAN learns the proxy
distribution; the clone learns from the victim's top-1 labels on proxy and generated images; then
generator, discriminator and clone train in alternation, the generator's loss adding a
class-diversity term computed through the *clone* (white-box, no queries) so that its samples cover
every class of the victim.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fortress.attacks.base import Attack, AttackRun, PoolKind
from fortress.attacks.common import (
    OptimizerName,
    class_diversity_loss,
    keep_requires_grad,
    make_optimizer,
    train_clone,
)
from fortress.attacks.hparams import hp
from fortress.data.transforms import random_shift
from fortress.errors import ConfigError
from fortress.generative.dcgan import DCGANDiscriminator, DCGANGenerator, train_dcgan
from fortress.oracle import OutputMode

__all__ = ["DFMSHL", "hard_labels"]

log = logging.getLogger(__name__)


def hard_labels(answers: Tensor) -> Tensor:
    """Top-1 labels ``(B,)`` of oracle rows: one-hot (hard), top-k or probability rows alike."""
    return answers.argmax(dim=1)


class DFMSHL(Attack):
    """Data-Free Model Stealing in a hard-label setting (Sanyal, Addepalli, Babu, CVPR 2022).

    Three stages, all charged to one budget (one query per image the victim labels):

    1. **DCGAN on the proxy pool** (paper: 200 epochs, batch 64, Adam 2e-4, β1 0.5). The victim
       plays no part and no query is spent.
    2. **Clone warm-up** on ``warmup_fraction`` of the budget: ``proxy_ratio`` of it labels proxy
       images (at most the whole pool), the rest labels DCGAN samples; the clone trains on them
       for ``warmup_epochs`` with cross-entropy on the victim's labels and pad-and-crop shifts.
    3. **Alternating training** (the paper's main query consumer) until the budget is spent. Per
       step: ``batch_size`` generator samples are augmented, labelled by the victim (the last
       batch is truncated to what is left) and the clone takes one cross-entropy step on them;
       the generator minimises the GAN loss plus ``diversity_weight`` times the class-diversity
       loss of the clone's predictions on its samples (paper ``d_l = 500``); the discriminator
       takes one step on a real proxy batch against the generated one.

    Only top-1 labels are used: a ``soft`` or ``topk`` oracle's rows are reduced to their argmax.

    Deviations, all for a LeNet-size clone on a CPU (defaults; the paper values stay options
    where they are knobs):

    * the DCGAN is the library's 28×28 one (two transposed convolutions, sigmoid output,
      ``dcgan_ngf=32``; paper: four, ngf 64, 32×32, tanh) and trains ``dcgan_epochs=10`` (paper 200)
      on at most ``dcgan_images`` pool images: on MNIST-size images it converges in minutes;
    * the DivGAN stage (100 generator epochs with the diversity term at weight 10, then a second
      warm-up) is left out: the alternating stage applies the same term at weight 500 from its
      first step;
    * the victim-labelled validation set used only to pick the best clone is left out (it spends
      queries for model selection); the result reports the last clone and, when an eval set is
      given, the best off-budget checkpoint (optimistic, like DFME's best-epoch figure). The EMA
      copies of the clone are left out too;
    * AutoAugment is replaced by random pad-and-crop shifts of ``max_shift`` pixels (AutoAugment's
      colour policies mean nothing on one-channel digits);
    * the clone optimiser is Adam at ``lr_s=1e-3`` (paper: SGD 0.1 warm-up, 0.01 alternating,
      momentum 0.9, weight decay 5e-4, cosine): DFME's measurements found plain SGD at 0.1 kills a
      LeNet-5 student; ``student_optimizer="sgd"`` restores it with ``lr_s``;
    * the warm-up share is a fraction of the budget (paper: 20k proxy + about 50k generated images
      of an 8M budget) so that it scales with the small budgets used here.

    Args:
        oracle: any output mode (labels are taken as the top-1 of each row).
        budget: queries (paper: 8M for CIFAR-10, 10M for CIFAR-100).
        seed: seeds the GAN, the batches, the latents and the augmentation.
        batch_size: images per alternating step (paper 64).
        nz: generator latent size (paper 100).
        dcgan_ngf: DCGAN base width (paper 64).
        dcgan_epochs: DCGAN pre-training epochs (paper 200).
        dcgan_images: proxy images the DCGAN and the discriminator see (``None``: the whole pool).
        lr_gan: Adam learning rate of generator and discriminator (paper 2e-4, β1 0.5).
        warmup_fraction: budget share of the warm-up labelling (0 skips the warm-up).
        proxy_ratio: share of the warm-up labels spent on proxy images (paper 0.5).
        warmup_epochs: clone epochs over the warm-up set (paper 200).
        diversity_weight: weight ``d_l`` of the class-diversity loss (paper 500).
        lr_s: clone learning rate.
        student_optimizer: ``"adam"`` or ``"sgd"`` (paper).
        momentum_s: clone SGD momentum (paper 0.9).
        weight_decay_s: clone weight decay (paper 5e-4).
        max_shift: pad-and-crop augmentation of queried and warm-up images, in pixels.

    Example:
        >>> from fortress.defenses.undefended import Undefended
        >>> from fortress.models import create_model
        >>> from fortress.oracle import LocalOracle
        >>> oracle = LocalOracle(Undefended(create_model("lenet5")), output_mode="hard")
        >>> attack = DFMSHL(oracle, budget=300, batch_size=32, dcgan_epochs=1, dcgan_ngf=4)
        >>> attack.run(create_model("lenet5-half"), torch.rand(64, 1, 28, 28)).queries_used
        300
    """

    name = "dfms-hl"
    output_modes = (OutputMode.HARD, OutputMode.SOFT, OutputMode.TOPK)
    pool_kind = PoolKind.NATURAL
    default_pool = "patches"
    cadence = "budget"

    batch_size: int = hp(default=64, ge=2, why="BatchNorm needs two samples")
    nz: int = hp(default=100, ge=1)
    dcgan_ngf: int = hp(default=32, ge=1)
    dcgan_epochs: int = hp(default=10, ge=1)
    dcgan_images: int | None = hp(default=2000, ge=2)
    lr_gan: float = hp(default=2e-4, gt=0)
    warmup_fraction: float = hp(default=0.1, ge=0, le=1)
    proxy_ratio: float = hp(default=0.5, ge=0, le=1)
    warmup_epochs: int = hp(default=10, ge=1)
    diversity_weight: float = hp(default=500.0, ge=0)
    lr_s: float = hp(default=1e-3, gt=0)
    student_optimizer: OptimizerName = hp(default="adam")
    momentum_s: float = hp(default=0.9, ge=0, lt=1)
    weight_decay_s: float = hp(default=5e-4, ge=0)
    max_shift: int = hp(default=2, ge=0, unit="pixels")

    def _validate(self) -> None:
        _, h, w = self.oracle.input_shape
        if h != w or h % 4 or h < 8:
            raise ConfigError(f"the DCGAN needs square images with a side divisible by 4 (>= 8), got {h}×{w}")

    def _pool_minimum(self) -> tuple[int, str]:
        return 2, "2 (the GAN needs a batch)"

    def warmup_split(self, pool_size: int) -> tuple[int, int]:
        """Queries of the warm-up: ``(proxy images, generated images)`` for a pool of ``pool_size``."""
        total = int(self.budget * self.warmup_fraction)
        proxy = min(round(total * self.proxy_ratio), pool_size)
        return proxy, total - proxy

    # -- the attack ------------------------------------------------------------------------------
    def _extract(self, run: AttackRun) -> dict[str, Any]:
        """Steal ``run.clone`` with the proxy pool (the attacker's unlabelled images).

        Extras of the result: ``warmup_proxy_queries``, ``warmup_generated_queries``,
        ``alternating_steps``, ``label_hist`` (victim top-1 counts over every query),
        ``dcgan_s``, ``warmup_s``, ``alternating_s`` (wall time of each stage, victim included).
        """
        proxy, rng, device, clone = run.pool, run.rng, run.device, run.clone
        k = self.oracle.num_classes
        shape = self.oracle.input_shape

        # 1. DCGAN on the proxy pool (no queries)
        t0 = time.perf_counter()
        gan_x = proxy[torch.randperm(proxy.shape[0], generator=rng)[: self.dcgan_images]]
        gen, _ = train_dcgan(
            gan_x,
            epochs=self.dcgan_epochs,
            lr=self.lr_gan,
            batch_size=min(self.batch_size, gan_x.shape[0]),
            nz=self.nz,
            ngf=self.dcgan_ngf,
            seed=self.seed,
        )
        gen = gen.to(device)
        disc = DCGANDiscriminator(shape, ndf=self.dcgan_ngf).to(device)
        t_gan = time.perf_counter() - t0

        # 2. warm-up: victim labels on proxy and generated images, then a few clone epochs
        t0 = time.perf_counter()
        n_proxy, n_gen = self.warmup_split(proxy.shape[0])
        parts = [proxy[torch.randperm(proxy.shape[0], generator=rng)[:n_proxy]].to(device)]
        if n_gen:
            parts.append(self._sample(gen, n_gen, rng, device))
        warm_x = torch.cat(parts)
        if warm_x.shape[0] >= 2:
            warm_y = hard_labels(run.query_batches(warm_x, self.batch_size))
            train_clone(
                clone,
                warm_x,
                F.one_hot(warm_y, k).float(),
                epochs=self.warmup_epochs,
                batch_size=self.batch_size,
                lr=self.lr_s,
                optimizer=self.student_optimizer,
                momentum=self.momentum_s,
                weight_decay=self.weight_decay_s,
                max_shift=self.max_shift,
                generator=rng,
            )
        run.step_done()
        t_warm = time.perf_counter() - t0

        # 3. alternating clone / generator / discriminator steps until the budget is spent
        t0 = time.perf_counter()
        opt_s = make_optimizer(
            clone, self.student_optimizer, lr=self.lr_s, momentum=self.momentum_s, weight_decay=self.weight_decay_s
        )
        opt_g = torch.optim.Adam(gen.parameters(), lr=self.lr_gan, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=self.lr_gan, betas=(0.5, 0.999))
        steps = 0
        while run.queries_left > 0:
            n = min(self.batch_size, run.queries_left)
            gen.train()
            fake = gen(torch.randn(self.batch_size, self.nz, generator=rng).to(device))
            # (a) clone step on victim labels of augmented samples (the last batch is truncated)
            queried = random_shift(fake[:n].detach(), self.max_shift, rng)
            y = hard_labels(run.query(queried))
            if n >= 2:  # a one-row batch would break BatchNorm clones; its label is still paid for
                clone.train()
                loss_s = F.cross_entropy(clone(queried), y)
                opt_s.zero_grad(set_to_none=True)
                torch.autograd.backward(loss_s)
                opt_s.step()
            # (b) generator step: fool D and spread the clone's predictions over the classes
            clone.eval()
            d_fake = disc(fake)
            loss_g = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
            with keep_requires_grad(clone):
                clone.requires_grad_(False)  # white-box through the clone, but only G learns here
                if self.diversity_weight > 0:
                    loss_g = loss_g + self.diversity_weight * class_diversity_loss(clone(fake))
                opt_g.zero_grad(set_to_none=True)
                torch.autograd.backward(loss_g)
            opt_g.step()
            # (c) discriminator step: real proxy batch against the generated one
            real = gan_x[torch.randint(0, gan_x.shape[0], (self.batch_size,), generator=rng)].to(device)
            d_real, d_fake = disc(real), disc(fake.detach())
            loss_d = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real)) + (
                F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
            )
            opt_d.zero_grad(set_to_none=True)
            torch.autograd.backward(loss_d)
            opt_d.step()
            steps += 1
            run.step_done()
        t_alt = time.perf_counter() - t0

        warmed = warm_x.shape[0] >= 2
        return {
            "warmup_proxy_queries": n_proxy if warmed else 0,
            "warmup_generated_queries": n_gen if warmed else 0,
            "alternating_steps": steps,
            "dcgan_s": t_gan,
            "warmup_s": t_warm,
            "alternating_s": t_alt,
        }

    @torch.no_grad()
    def _sample(self, gen: DCGANGenerator, n: int, rng: torch.Generator, device: torch.device) -> Tensor:
        """``n`` generator images (eval mode: running BatchNorm statistics), latents drawn on the CPU."""
        gen.eval()
        out: Tensor = gen(torch.randn(n, self.nz, generator=rng).to(device))
        return out
