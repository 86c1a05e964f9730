"""One resumable epoch loop for everything a defense trains (DNF's exit heads, MeCo, surrogate networks).

After every epoch the trainable tensors, the optimiser state and the history are written to a
checkpoint directory (safetensors + JSON, the JSON replaced atomically last), so an interrupted run
resumes from the last finished epoch and ends exactly where an uninterrupted one would: epoch ``e``
draws its randomness either from a generator seeded by ``(seed, e)`` or from one generator seeded
once, whose state is checkpointed with the weights. Weights that turn non-finite stop the run with
:class:`~fortress.errors.TrainingDiverged` before anything is written, so the last good checkpoint
is kept.

Example:
    >>> loop = EpochLoop("toy", epochs=2, seed=0, config={}, parts={"net": net}, optimizer=opt)  # doctest: +SKIP
    >>> history = loop.run(History(), train_epoch, options=RunOptions(checkpoint_dir=tmp))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from fortress.errors import ArtifactError, TrainingDiverged
from fortress.models.io import atomic_write_text, copy_state_checked, load_state, read_json, save_state

__all__ = [
    "EpochCallback",
    "EpochLoop",
    "History",
    "RunOptions",
    "optimizer_state_tensors",
    "restore_optimizer_state",
]

log = logging.getLogger(__name__)

#: ``on_epoch(epoch, mean_loss)``, called after each finished (and checkpointed) epoch; 0-based.
EpochCallback = Callable[[int, float], None]
#: Checkpoint tensor holding the state of a generator that runs across epochs.
RNG_KEY = "rng"

H = TypeVar("H", bound="History")
T = TypeVar("T")


@dataclass
class History:
    """Per-epoch history of a training run (subclasses add their own per-epoch lists).

    Attributes:
        epochs_done: finished epochs, including those restored from a checkpoint.
        loss: mean training loss of each epoch.
        wall_s: training seconds so far (across resumptions).
        resumed_from: the epoch a resumed run started from (0: a fresh run).
    """

    epochs_done: int = 0
    loss: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    resumed_from: int = 0


@dataclass(frozen=True)
class RunOptions:
    """Where and how a training run keeps its checkpoints.

    Attributes:
        checkpoint_dir: directory of the per-epoch checkpoint (``None``: no checkpoints).
        resume: continue from a checkpoint in ``checkpoint_dir`` written with the same configuration.
        on_epoch: progress callback after each epoch.
    """

    checkpoint_dir: Path | None = None
    resume: bool = True
    on_epoch: EpochCallback | None = None


def optimizer_state_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimiser's state into tensors (``opt/<param>/<name>``) and JSON-ready scalars."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"opt/{pid}/{k}"] = v
            else:
                scalars[f"{pid}/{k}"] = v
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def restore_optimizer_state(opt: torch.optim.Optimizer, tensors: Mapping[str, Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


@dataclass
class EpochLoop:
    """A resumable run of ``epochs`` epochs over the modules in ``parts``.

    Args:
        what: what trains, for messages (``"DNF"``, ``"MeCo"``).
        epochs: epochs of the whole run.
        seed: seeds the epochs' random generators.
        config: the run's settings as JSON-ready data; a checkpoint written with other settings is refused.
        parts: the modules whose state is checkpointed, each under ``<name>.`` in the weights file.
        optimizer: the optimiser (its state is checkpointed too).
        guarded: tensors that must stay finite (default: every parameter of ``parts``).
        reseed_each_epoch: ``True``: epoch ``e`` draws from a generator seeded with
            ``seed·1_000_003 + e``; ``False``: one generator seeded with ``seed`` runs across epochs.
        diverged_hint: what to try when the weights turn non-finite.
        prefix: checkpoint file names ``<prefix>.json`` and ``<prefix>-e<epoch>.safetensors``
            (default: ``what`` in lower case, spaces as dashes, then ``-checkpoint``).
    """

    what: str
    epochs: int
    seed: int
    config: Mapping[str, Any]
    parts: Mapping[str, nn.Module]
    optimizer: torch.optim.Optimizer
    guarded: Sequence[Tensor] | None = None
    reseed_each_epoch: bool = True
    diverged_hint: str = "lower the learning rate"
    prefix: str | None = None

    @property
    def file_prefix(self) -> str:
        """Stem of the checkpoint's file names."""
        return self.prefix or f"{self.what.lower().replace(' ', '-')}-checkpoint"

    @property
    def state_file(self) -> str:
        """Name of the checkpoint's JSON file."""
        return f"{self.file_prefix}.json"

    def run(
        self,
        history: H,
        train_epoch: Callable[[int, torch.Generator], T],
        record_epoch: Callable[[int, T], None] | None = None,
        options: RunOptions | None = None,
    ) -> H:
        """Train the remaining epochs; return the history (including epochs restored from a checkpoint).

        Args:
            history: an empty history of the run's type; a resumed run refills it from the checkpoint
                (in place, so ``train_epoch`` and ``record_epoch`` may hold on to it).
            train_epoch: ``train_epoch(epoch, generator) -> sums`` trains one epoch, drawing every random
                number from ``generator``, and leaves the modules in eval mode.
            record_epoch: ``record_epoch(epoch, sums)`` appends the epoch's figures to ``history``
                (called once the weights are known to be finite). Default: ``sums`` is the epoch's
                mean loss and is appended to ``history.loss``.
            options: checkpoint directory, resumption and progress callback.

        Raises:
            ArtifactError: the checkpoint is corrupt or was written with another configuration.
            TrainingDiverged: weights became non-finite (nothing is written for that epoch).
        """
        opts = options or RunOptions()
        ckpt = None if opts.checkpoint_dir is None else Path(opts.checkpoint_dir)
        config = json.loads(json.dumps(dict(self.config)))
        carried = None if self.reseed_each_epoch else torch.Generator().manual_seed(self.seed)
        if ckpt is not None and opts.resume and (ckpt / self.state_file).exists():
            self._restore(ckpt, config, history, carried)
        guarded = list(self.guarded) if self.guarded is not None else self._parameters()
        t0 = time.perf_counter() - history.wall_s
        for epoch in range(history.epochs_done, self.epochs):
            gen = carried if carried is not None else torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            sums = train_epoch(epoch, gen)
            if not all(bool(torch.isfinite(p).all()) for p in guarded):
                raise TrainingDiverged(
                    f"{self.what} training diverged in epoch {epoch + 1}: weights are not finite; "
                    f"{self.diverged_hint} (the last good checkpoint, if any, is kept)"
                )
            if record_epoch is not None:
                record_epoch(epoch, sums)
            else:
                history.loss.append(float(sums))  # type: ignore[arg-type]
            history.epochs_done = epoch + 1
            history.wall_s = time.perf_counter() - t0
            log.info("%s epoch %d/%d loss %.4f", self.what, epoch + 1, self.epochs, history.loss[-1])
            if ckpt is not None:
                self._save(ckpt, config, history, carried)
            if opts.on_epoch is not None:
                opts.on_epoch(epoch, history.loss[-1])
        return history

    def _parameters(self) -> list[Tensor]:
        return [p for m in self.parts.values() for p in m.parameters() if p.requires_grad]

    def _save(self, directory: Path, config: dict[str, Any], history: History, gen: torch.Generator | None) -> None:
        # weights go to an epoch-numbered file first; the JSON that names it is replaced atomically
        # afterwards, so a crash at any point leaves a consistent (weights, state) pair on disk.
        tensors, opt_meta = optimizer_state_tensors(self.optimizer)
        for name, module in self.parts.items():
            tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        if gen is not None:
            tensors[RNG_KEY] = gen.get_state()
        weights = f"{self.file_prefix}-e{history.epochs_done:04d}.safetensors"
        save_state(tensors, directory / weights)
        meta = {"config": config, "optimizer": opt_meta, "report": asdict(history), "weights": weights}
        atomic_write_text(directory / self.state_file, json.dumps(meta, indent=1))
        for old in directory.glob(f"{self.file_prefix}-e*.safetensors"):
            if old.name != weights:
                old.unlink(missing_ok=True)

    def _restore(self, directory: Path, config: dict[str, Any], history: History, gen: torch.Generator | None) -> None:
        meta = read_json(directory / self.state_file)
        if meta.get("config") != config:
            raise ArtifactError(
                f"checkpoint in {directory} was written with a different {self.what} configuration; "
                "remove it or pass resume=False to start over"
            )
        tensors = load_state(directory / str(meta.get("weights", "")))
        for name, module in self.parts.items():
            part = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
            copy_state_checked(module, part, directory)
        try:
            restore_optimizer_state(self.optimizer, tensors, meta["optimizer"])
            if gen is not None:
                gen.set_state(tensors[RNG_KEY])
            restored = type(history)(**meta["report"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ArtifactError(f"corrupt {self.what} checkpoint in {directory}: {exc}") from exc
        for f in fields(restored):
            setattr(history, f.name, getattr(restored, f.name))
        history.resumed_from = history.epochs_done
        log.info("resuming %s training from epoch %d", self.what, history.epochs_done)
