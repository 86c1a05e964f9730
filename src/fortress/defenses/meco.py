"""MeCo (Wang et al., NeurIPS 2023): distributionally robust defensive training with a random input perturbation.

Re-implementation from the paper's published text: no code is public, and only the abstract, the
DNF paper's description (App. C) and the notes of the defense fact sheet (§5) were available. Every
design choice is listed in :class:`MeCo`'s docstring; results should be labelled
"MeCo (re-implementation)".
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fortress.data.transforms import random_shift
from fortress.defenses.base import DefenseOutput
from fortress.defenses.trainable import DefenderData, TrainableDefense
from fortress.errors import ConfigError
from fortress.generative.ood import NoiseOOD, OODSource
from fortress.models.staged import StagedBackbone
from fortress.training import EpochCallback, EpochLoop, History, RunOptions

__all__ = ["MeCo", "MeCoTrainConfig", "MeCoTrainReport", "PerturbationGenerator"]

log = logging.getLogger(__name__)

#: Checkpoint files: ``meco-checkpoint.json`` naming ``meco-checkpoint-e<epoch>.safetensors``.
CKPT_NAME = "meco-checkpoint"
CKPT_STATE = f"{CKPT_NAME}.json"


class PerturbationGenerator(nn.Module):
    """G_ω(x, ξ): a data-dependent random input perturbation bounded by ``epsilon`` in ℓ∞.

    Two 3×3 convolutions on the image stacked with a noise image ξ; ``epsilon·tanh`` bounds the
    output. The last convolution starts at zero, so an untrained generator adds nothing.

    Args:
        channels: image channels.
        noise_channels: channels of the Gaussian noise image ξ.
        width: hidden channels.
        epsilon: ℓ∞ bound on the perturbation (pixels are in [0, 1]).

    Shape:
        ``x (B, C, H, W)``, ``xi (B, noise_channels, H, W)`` → ``(B, C, H, W)``.
    """

    def __init__(self, channels: int, *, noise_channels: int = 1, width: int = 8, epsilon: float = 0.1) -> None:
        super().__init__()
        self.noise_channels = noise_channels
        self.epsilon = epsilon
        self.conv1 = nn.Conv2d(channels + noise_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, channels, 3, padding=1, bias=False)
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: Tensor, xi: Tensor) -> Tensor:
        h = F.relu(self.conv1(torch.cat([x, xi], dim=1)))
        return self.epsilon * torch.tanh(self.conv2(h))


@dataclass(frozen=True)
class MeCoTrainConfig:
    """Hyper-parameters of MeCo's defensive training (all choices of this re-implementation).

    Attributes:
        epochs: passes over the ID training set.
        lr: Adam learning rate of the generator and the deployed copy of the victim.
        batch_size: ID rows per step.
        ood_batch_size: rows per step drawn from the seed distribution of the uncertainty set.
        finetune_victim: train the deployed copy of the victim together with the generator
            (fact sheet §5.2: "both the victim θ (fine-tuned) and the generator ω"); ``False``
            trains the generator alone on the frozen victim.
        dro_steps: gradient-ascent steps of the inner maximisation (0: no distribution shift).
        dro_step_size: ℓ2 length of each ascent step in pixel space.
        dro_gamma: transport-cost penalty γ of the Wasserstein Lagrangian (larger: smaller shift).
        w_ce: weight of the cross-entropy on perturbed ID inputs.
        w_kl: weight of KL(victim ‖ defended) on perturbed ID inputs (consistency with the victim).
        w_defense: weight of the defense term on the worst-case shifted inputs.
        w_diversity: weight of the diversity term (answers to two draws of ξ should differ).
        max_shift: random translation of ID images in pixels (as in victim training).
        seed: seeds batches, noise draws and OOD samples (epoch ``e`` uses ``(seed, e)``).
    """

    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 128
    ood_batch_size: int = 128
    finetune_victim: bool = True
    dro_steps: int = 3
    dro_step_size: float = 1.0
    dro_gamma: float = 0.5
    w_ce: float = 1.0
    w_kl: float = 1.0
    w_defense: float = 1.0
    w_diversity: float = 0.5
    max_shift: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.ood_batch_size < 1 or self.dro_steps < 0:
            raise ConfigError(
                f"need epochs >= 1, batch sizes >= 1, dro_steps >= 0; got epochs={self.epochs}, "
                f"batch_size={self.batch_size}, ood_batch_size={self.ood_batch_size}, dro_steps={self.dro_steps}"
            )
        if not self.lr > 0 or not self.dro_step_size >= 0 or not self.dro_gamma >= 0:
            raise ConfigError(
                f"need lr > 0, dro_step_size >= 0, dro_gamma >= 0; got lr={self.lr}, "
                f"dro_step_size={self.dro_step_size}, dro_gamma={self.dro_gamma}"
            )
        weights = {"w_ce": self.w_ce, "w_kl": self.w_kl, "w_defense": self.w_defense, "w_diversity": self.w_diversity}
        bad = {k: v for k, v in weights.items() if not v >= 0}
        if bad:
            raise ConfigError(f"loss weights must be >= 0, got {bad}")
        if self.max_shift < 0:
            raise ConfigError(f"max_shift must be >= 0, got {self.max_shift}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class MeCoTrainReport(History):
    """History of a MeCo training run (per epoch, besides the mean loss of :class:`~fortress.training.History`).

    Attributes:
        utility_loss: mean utility term (cross-entropy and KL to the victim on perturbed ID inputs).
        defense_loss: mean defense term on the shifted OOD inputs.
        diversity: mean diversity term.
        val_acc: defended accuracy on the ID validation data.
        ood_top1_changed: share of 512 fixed OOD probes whose top-1 the defense changes.
    """

    utility_loss: list[float] = field(default_factory=list)
    defense_loss: list[float] = field(default_factory=list)
    diversity: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    ood_top1_changed: list[float] = field(default_factory=list)


def _defense_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-row ``−log(1 − p_c)`` for the victim's label ``c``: small once the answer avoids it."""
    masked = logits.scatter(1, labels[:, None], float("-inf"))
    return torch.logsumexp(logits, dim=1) - torch.logsumexp(masked, dim=1)


class MeCo(TrainableDefense[MeCoTrainConfig]):
    """MeCo (re-implementation): answer f_θ'(x + G_ω(x, ξ)) with fresh noise ξ for every query.

    What the paper's text fixes, and where this follows it:

    * *Deployment* — "randomize the input" (MeCo abstract); "adding a data-dependent random
      perturbation generator to perturb the input data" (DNF paper App. C). Here
      ``δ = G_ω(x, ξ)`` with ξ ~ N(0, I) drawn afresh per query, ``‖δ‖∞ ≤ epsilon``, and the
      answer is the softmax of the deployed model on ``clip(x + δ, 0, 1)``. The cost is one small
      generator and one victim-sized forward pass (DNF paper Table 11: MeCo runs at the
      undefended model's speed; fact sheet §8). To report ℓ1 and top-1 changes per query, this
      implementation also runs the original victim once per query (bookkeeping, not defense).
    * *Training on the victim* — "distributionally robust defensive training on the target victim
      model" (abstract). The deployed model is a copy of the victim fine-tuned jointly with G_ω
      (fact sheet §5.2); the original victim is kept untouched as the reference whose answers
      ℓ1 and top-1 changes are measured against.
    * *Utility* — "maintaining the model utility" (abstract; DNF App. C "MeCo can keep the target
      model utility"): on ID training images through the perturbation, cross-entropy with the
      labels plus KL(victim ‖ defended).
    * *Distributional robustness* — the attacker's query distribution is unknown ("no prior on
      the attacker's query data distribution", abstract), so the defense term is taken on the
      worst case over a Wasserstein ball around a data-free seed distribution Q₀ (noise images,
      :class:`~fortress.generative.ood.NoiseOOD`). The inner maximisation uses the Lagrangian
      relaxation of Sinha, Namkoong & Duchi (2018, "WRM"): ``dro_steps`` ℓ2-normalised gradient
      ascent steps on ``L_def(x') − γ‖x' − x₀‖²`` from ``x₀ ~ Q₀`` — the shifted queries on which
      the defense currently leaks the most. This choice of solver is ours; the paper's is unknown.
    * *Defense term* — the abstract's goals (1) "mismatch of the knowledge distillation loss" and
      (3) "changes the label prediction for the attack query data": ``−log(1 − p_c(x'))`` with
      ``c`` the victim's label on ``x'`` (pushes the answer away from the victim's label); goal
      (2) "disturbs the zeroth-order gradient estimation": a diversity term rewarding ½‖ŷ(x', ξ₁) −
      ŷ(x', ξ₂)‖₁ between two noise draws, so repeated or nearby queries get inconsistent answers.

    Not taken from the paper (its values are unknown): the generator architecture, ``epsilon``,
    the noise shape, every weight and step size of :class:`MeCoTrainConfig`, and Q₀.

    Args:
        victim: the trained victim (never modified).
        epsilon: ℓ∞ bound of the input perturbation (default 0.1 in [0, 1] pixel units).
        noise_channels: channels of the noise image ξ.
        width: hidden channels of the generator.
        seed: seeds the generator's initial weights and the per-query noise stream.

    Example:
        >>> from fortress.models import create_model
        >>> MeCo(create_model("lenet5"))(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    name = "meco"
    saved_parts = ("model", "generator")
    fit_config = MeCoTrainConfig

    def __init__(
        self,
        victim: StagedBackbone,
        *,
        epsilon: float = 0.1,
        noise_channels: int = 1,
        width: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__(victim)
        if not (isinstance(epsilon, int | float) and 0.0 <= float(epsilon) <= 1.0):
            raise ConfigError(f"epsilon (ℓ∞ input perturbation bound) must be in [0, 1], got {epsilon!r}")
        for label, value in (("noise_channels", noise_channels), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{label} must be an integer >= 1, got {value!r}")
        self.epsilon = float(epsilon)
        self.noise_channels = int(noise_channels)
        self.width = int(width)
        self.seed = int(seed)
        self.model: StagedBackbone = copy.deepcopy(victim).eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.generator = PerturbationGenerator(
                victim.input_shape[0], noise_channels=self.noise_channels, width=self.width, epsilon=self.epsilon
            ).eval()
        self._gen = torch.Generator().manual_seed(self.seed)
        self.train_report: MeCoTrainReport | None = None
        self._train_config: dict[str, Any] | None = None

    def modules(self) -> list[nn.Module]:
        return [self.victim, self.model, self.generator]

    def reset_rng(self) -> None:
        """Rewind the per-query noise stream to its seed (the next calls repeat the first ones)."""
        self._gen.manual_seed(self.seed)

    def _noise(self, n: int, like: Tensor, gen: torch.Generator) -> Tensor:
        _, h, w = self.input_shape
        return torch.randn((n, self.noise_channels, h, w), generator=gen).to(like)

    def _defended_logits(self, x: Tensor, xi: Tensor) -> Tensor:
        out: Tensor = self.model((x + self.generator(x, xi)).clamp(0.0, 1.0))
        return out

    @torch.no_grad()
    def _respond(self, x: Tensor) -> DefenseOutput:
        y = torch.softmax(self.victim(x), dim=1)  # the reference the ℓ1 and top-1 bookkeeping needs
        y_hat = torch.softmax(self._defended_logits(x, self._noise(x.shape[0], x, self._gen)), dim=1)
        return DefenseOutput(
            probs=y_hat,
            l1=(y_hat - y).abs().sum(dim=1),
            top1_changed=y_hat.argmax(dim=1) != y.argmax(dim=1),
        )

    # ---------------------------------------------------------------------------------- training

    def _trainable(self, cfg: MeCoTrainConfig) -> list[nn.Parameter]:
        params = list(self.generator.parameters())
        if cfg.finetune_victim:
            params += list(self.model.parameters())
        return params

    def _shift(self, x0: Tensor, cfg: MeCoTrainConfig, gen: torch.Generator) -> Tensor:
        """Inner maximisation: move ``x0`` towards where the defense leaks most, at a transport cost."""
        x = x0.clone()
        for _ in range(cfg.dro_steps):
            x.requires_grad_(True)
            with torch.no_grad():
                c = self.victim(x).argmax(dim=1)
            obj = _defense_loss(self._defended_logits(x, self._noise(x.shape[0], x, gen)), c).sum()
            obj = obj - cfg.dro_gamma * (x - x0).pow(2).sum()
            (grad,) = torch.autograd.grad(obj, x)
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            x = (x.detach() + cfg.dro_step_size * grad / norm).clamp(0.0, 1.0)
        return x.detach()

    def fit(
        self,
        data: DefenderData,
        config: MeCoTrainConfig | None = None,
        *,
        ood: OODSource | None = None,
        checkpoint_dir: Path | None = None,
        resume: bool = True,
        on_epoch: EpochCallback | None = None,
    ) -> MeCoTrainReport:
        """Defensive training of the generator and the deployed model (see the class docstring).

        Resumable: after every epoch the trainable weights, optimiser state and history go to
        ``checkpoint_dir`` (safetensors + JSON); epoch ``e`` draws everything from a generator
        seeded by ``(seed, e)``, so a resumed run ends where an uninterrupted one would.

        Args:
            data: the defender's data (labelled ID training images; validation accuracy is logged).
            config: hyper-parameters (default :class:`MeCoTrainConfig`).
            ood: seed distribution Q₀ of the uncertainty set (default: noise images).
            checkpoint_dir: per-epoch checkpoint directory (``None``: none).
            resume: continue from a checkpoint in ``checkpoint_dir`` written with the same config.
            on_epoch: called as ``on_epoch(epoch, loss)`` after each epoch.

        Raises:
            ArtifactError: the checkpoint is corrupt or was written with another configuration.
            TrainingDiverged: weights became non-finite.
        """
        cfg = self._fit_config(data, config)
        source = ood or NoiseOOD(self.input_shape)
        return self._train(data.to(self.device), cfg, source, RunOptions(checkpoint_dir, resume, on_epoch))

    def _fit(self, data: DefenderData, config: MeCoTrainConfig, options: RunOptions) -> MeCoTrainReport:
        return self._train(data, config, NoiseOOD(self.input_shape), options)

    def _train(
        self, data: DefenderData, cfg: MeCoTrainConfig, source: OODSource, options: RunOptions
    ) -> MeCoTrainReport:
        x_id, y_id = data.x_train, data.y_train
        params = self._trainable(cfg)
        for p in self.model.parameters():
            p.requires_grad_(cfg.finetune_victim)
        opt = torch.optim.Adam(params, lr=cfg.lr)
        report = MeCoTrainReport()
        probe = source.sample(512, torch.Generator().manual_seed(cfg.seed + 7)).to(x_id.device)
        n = x_id.shape[0]

        def train_epoch(epoch: int, gen: torch.Generator) -> list[float]:
            perm = torch.randperm(n, generator=gen)
            sums = [0.0, 0.0, 0.0, 0.0, 0.0]
            self.generator.train()
            self.model.train(cfg.finetune_victim)
            for s in range(0, n, cfg.batch_size):
                idx = perm[s : s + cfg.batch_size]
                xb = random_shift(x_id[idx], cfg.max_shift, gen)
                x0 = source.sample(cfg.ood_batch_size, gen).to(xb.device)  # sources answer on the CPU
                xs = self._shift(x0, cfg, gen)
                with torch.no_grad():
                    y_ref = torch.softmax(self.victim(xb), dim=1)
                    c = self.victim(xs).argmax(dim=1)
                z_id = self._defended_logits(xb, self._noise(xb.shape[0], xb, gen))
                utility = cfg.w_ce * F.cross_entropy(z_id, y_id[idx]) + cfg.w_kl * F.kl_div(
                    F.log_softmax(z_id, dim=1), y_ref, reduction="batchmean"
                )
                m = xs.shape[0]
                z_ood = self._defended_logits(torch.cat([xs, xs]), self._noise(2 * m, xs, gen))
                defense = _defense_loss(z_ood, torch.cat([c, c])).mean()
                p_ood = torch.softmax(z_ood, dim=1)
                diversity = 0.5 * (p_ood[:m] - p_ood[m:]).abs().sum(dim=1).mean()
                loss = utility + cfg.w_defense * defense - cfg.w_diversity * diversity
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for k, v in enumerate((loss, utility, defense, diversity)):
                    sums[k] += v.item()
                sums[4] += 1
            self.generator.eval()
            self.model.eval()
            return sums

        def record_epoch(epoch: int, sums: list[float]) -> None:
            steps = sums[4]
            report.loss.append(sums[0] / steps)
            report.utility_loss.append(sums[1] / steps)
            report.defense_loss.append(sums[2] / steps)
            report.diversity.append(sums[3] / steps)
            eval_gen = torch.Generator().manual_seed(cfg.seed + 11)
            with torch.no_grad():
                xv, yv = data.x_val, data.y_val
                pv = self._defended_logits(xv, self._noise(xv.shape[0], xv, eval_gen))
                report.val_acc.append(float((pv.argmax(1) == yv).float().mean()))
                po = self._defended_logits(probe, self._noise(probe.shape[0], probe, eval_gen)).argmax(1)
                report.ood_top1_changed.append(float((po != self.victim(probe).argmax(1)).float().mean()))

        loop = EpochLoop(
            "MeCo",
            epochs=cfg.epochs,
            seed=cfg.seed,
            config=cfg.as_dict(),
            parts={"generator": self.generator, "model": self.model},
            optimizer=opt,
            guarded=params,
            prefix=CKPT_NAME,
        )
        loop.run(report, train_epoch, record_epoch, options)
        self.train_report = report
        self._train_config = json.loads(json.dumps(cfg.as_dict()))
        return report

    # ---------------------------------------------------------------------------------- artifacts

    def hparams(self) -> dict[str, Any]:
        return {**self._params(), "train": self._train_config}

    def _state(self) -> dict[str, Any]:
        report = None if self.train_report is None else asdict(self.train_report)
        return {"train": self._train_config, "report": report}

    def _restore_state(self, meta: dict[str, Any]) -> None:
        self._train_config = meta.get("train")
        report = meta.get("report")
        if isinstance(report, dict):
            self.train_report = MeCoTrainReport(**report)
