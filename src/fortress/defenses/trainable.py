"""Defenses that train: one ``fit(data, config)`` for all of them, on one bundle of the defender's data.

:class:`DefenderData` is everything a defender may train on — labelled ID training and validation
images (the victim's own data), the class count and, optionally, a proxy pool of other images —
validated once against the tensor and label contracts. :class:`TrainableDefense` gives every
defense that trains the same entry point: ``fit(data, config)`` with ``config`` an instance of the
defense's own frozen :attr:`~TrainableDefense.fit_config` dataclass (the grid's ``fit`` table), and
runs the training in the shared resumable epoch loop (:mod:`fortress.training`).
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor

from fortress.data.base import ImageSet
from fortress.defenses.base import Defense
from fortress.errors import ConfigError, InvalidInput
from fortress.tensors import check_images, check_labels
from fortress.training import EpochCallback, History, RunOptions

__all__ = ["DefenderData", "NetworkFitConfig", "TrainableDefense"]

C = TypeVar("C")


@dataclass(frozen=True)
class NetworkFitConfig:
    """Adam training of one of a defense's own networks on the defender's images.

    Attributes:
        epochs: passes over the images.
        lr: Adam learning rate.
        batch_size: images per step.
        max_shift: random translation of the images in pixels (as in the victim's training).
    """

    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 128
    max_shift: int = 2

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.max_shift < 0:
            raise ConfigError(
                f"need epochs >= 1, batch_size >= 1, lr > 0, max_shift >= 0; got epochs={self.epochs}, "
                f"batch_size={self.batch_size}, lr={self.lr}, max_shift={self.max_shift}"
            )


@dataclass(frozen=True)
class DefenderData:
    """The defender's own data: the one data argument of every ``fit``.

    Labels follow :func:`fortress.tensors.check_labels`: integer class indices in ``[0, K)``, shape
    ``(N,)`` or ``(N, 1)``, any integer dtype; they are stored as int64 ``(N,)``.

    Attributes:
        x_train: labelled ID training images ``(N, C, H, W)`` float32 in [0, 1] (the victim's data).
        y_train: their labels.
        x_val: held-out labelled ID images ``(M, C, H, W)`` (calibration, acceptance checks, utility).
        y_val: their labels.
        num_classes: ``K``, the victim's class count.
        proxy: optional unlabelled images from other distributions ``(P, C, H, W)`` (an OOD pool).
        dataset: the data set's registry name, recorded with results (``None``: unnamed data).

    Raises:
        InvalidInput: images or labels break the contracts, or the splits disagree in image shape.

    Example:
        >>> from fortress.data import mnist_splits
        >>> d = mnist_splits()
        >>> DefenderData.from_splits(d.train, d.val, num_classes=10).image_shape
        (1, 28, 28)
    """

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    num_classes: int
    proxy: Tensor | None = None
    dataset: str | None = None

    def to(self, device: torch.device | str) -> DefenderData:
        """The same data with every tensor on ``device`` (itself when they are there already)."""
        dev = torch.device(device)
        tensors = (self.x_train, self.y_train, self.x_val, self.y_val, self.proxy)
        if all(t is None or t.device == dev for t in tensors):
            return self
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(dev),
            y_train=self.y_train.to(dev),
            x_val=self.x_val.to(dev),
            y_val=self.y_val.to(dev),
            proxy=None if self.proxy is None else self.proxy.to(dev),
        )

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise InvalidInput(f"num_classes must be an integer >= 2, got {self.num_classes!r}")
        check_images(self.x_train, name="training images")
        shape = tuple(self.x_train.shape[1:])
        check_images(self.x_val, shape, name="validation images")
        if self.proxy is not None:
            check_images(self.proxy, shape, name="proxy images")
        k = self.num_classes
        y_train = check_labels(self.y_train, self.x_train.shape[0], k, name="training labels")
        object.__setattr__(self, "y_train", y_train)
        object.__setattr__(self, "y_val", check_labels(self.y_val, self.x_val.shape[0], k, name="validation labels"))

    @classmethod
    def from_splits(
        cls,
        train: ImageSet,
        val: ImageSet,
        *,
        num_classes: int,
        proxy: ImageSet | None = None,
        dataset: str | None = None,
    ) -> DefenderData:
        """Bundle labelled training and validation :class:`~fortress.data.base.ImageSet` s (and a proxy pool)."""
        return cls(
            train.x,
            train.targets,
            val.x,
            val.targets,
            num_classes,
            proxy=None if proxy is None else proxy.x,
            dataset=dataset,
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Per-image shape ``(C, H, W)``."""
        c, h, w = (int(v) for v in self.x_train.shape[1:])
        return c, h, w

    def check_fits(self, image_shape: tuple[int, int, int], num_classes: int, *, what: str) -> None:
        """Refuse data whose image shape or class count differs from ``what`` (a defense or victim).

        Raises:
            InvalidInput: naming both shapes or both class counts.
        """
        if self.image_shape != tuple(image_shape):
            raise InvalidInput(f"the defender's images are {self.image_shape}, {what} takes {tuple(image_shape)}")
        if self.num_classes != num_classes:
            raise InvalidInput(f"the defender's data have {self.num_classes} classes, {what} has {num_classes}")


class TrainableDefense(Defense, Generic[C]):
    """A defense with networks of its own that train on the defender's data.

    Subclasses set :attr:`fit_config` to the frozen dataclass of their training options and
    implement :meth:`_fit`, which trains in a :class:`fortress.training.EpochLoop` run with the
    given :class:`~fortress.training.RunOptions`. ``fit`` validates the data against the victim and
    the configuration against :attr:`fit_config` before anything trains.

    Attributes:
        fit_config: the dataclass of training options (the grid's ``fit`` table is read into it).
    """

    fit_config: ClassVar[type[Any]]

    def fit(
        self,
        data: DefenderData,
        config: C | None = None,
        *,
        checkpoint_dir: Path | None = None,
        resume: bool = True,
        on_epoch: EpochCallback | None = None,
    ) -> History:
        """Train the defense's own networks on ``data`` (resumable from ``checkpoint_dir``).

        Args:
            data: the defender's data.
            config: training options (default: ``fit_config()``).
            checkpoint_dir: per-epoch checkpoints go here (``None``: none).
            resume: continue from a checkpoint in ``checkpoint_dir`` written with the same settings.
            on_epoch: called as ``on_epoch(epoch, mean_loss)`` after each epoch.

        Returns:
            The training history.

        Raises:
            InvalidInput: ``data`` does not fit the victim.
            ConfigError: ``config`` is not a :attr:`fit_config`.
            ArtifactError: the checkpoint is corrupt or was written with other settings.
        """
        cfg = self._fit_config(data, config)
        return self._fit(data.to(self.device), cfg, RunOptions(checkpoint_dir, resume, on_epoch))

    def _fit_config(self, data: DefenderData, config: C | None) -> C:
        """Check ``data`` against the victim and return the configuration to train with."""
        data.check_fits(self.input_shape, self.num_classes, what=f"defense {self.name!r}")
        cfg = self.fit_config() if config is None else config
        if not isinstance(cfg, self.fit_config):
            raise ConfigError(
                f"defense {self.name!r} trains with a {self.fit_config.__name__}, got {type(config).__name__}"
            )
        out: C = cfg
        return out

    @abstractmethod
    def _fit(self, data: DefenderData, config: C, options: RunOptions) -> History:
        """Train on validated ``data`` with ``config``; checkpoint and resume as ``options`` say."""
