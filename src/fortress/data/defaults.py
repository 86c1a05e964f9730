"""Defaults that depend on the data, per image shape and per data set, each with its reason.

Everything the pipeline chooses for the user from the victim's data lives here:

* **attacker pools** (:func:`attacker_pools`, :func:`default_pool`): what an attack that needs
  images queries when its config names no pool;
* **DNF's OOD proxy** (:func:`ood_proxy`): the images its DCGAN learns to imitate;
* **the paper's threshold family** (:func:`threshold_family`): three exits MNIST-style, four
  CIFAR-style;
* **augmentation of the victim's training** (:func:`augmentation`): shifts always, left-right
  flips only where a mirror image keeps its class.

:func:`load_pool` loads a pool fitted to the victim: sets that are drawn at any size (``patches``,
``noise``, ``digits28``, image folders) are drawn at the victim's size and channels; any other set
must already have the victim's shape.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal

from fortress.data.base import ImageSet
from fortress.data.registry import DATASETS, load_dataset
from fortress.data.resolve import ResolvedData
from fortress.data.spec import DataSpec
from fortress.errors import ConfigError

__all__ = [
    "MIRROR_SYMMETRIC",
    "PoolChoice",
    "attacker_pools",
    "attacker_split_pool",
    "augmentation",
    "default_pool",
    "fitted_options",
    "load_pool",
    "ood_proxy",
    "other_real_set",
    "threshold_family",
]

PoolRole = Literal["id_seeds", "natural"]

#: Data sets whose classes do not change under a left-right mirror image (clothes, photographs).
#: Digits are not: a mirrored 2, 3, 4, 5, 6, 7 or 9 is no digit of its class.
MIRROR_SYMMETRIC = frozenset({"fashion-mnist", "cifar10", "cifar100"})

#: The two real 28×28 grey-scale sets the package can name, each the other's "different real set".
_OTHER_REAL = {"mnist": "fashion-mnist", "mnist-idx": "fashion-mnist", "fashion-mnist": "mnist"}


@dataclass(frozen=True)
class PoolChoice:
    """One attacker pool for a victim's data, and why it is there.

    Attributes:
        pool: what an attack config's ``pool`` says (a data spec ``NAME[:PATH]``, or
            ``<data>-attacker`` for the attacker's ID split of the victim's own data).
        reason: why an attacker would use it.
    """

    pool: str
    reason: str


def attacker_split_pool(data_name: str) -> str:
    """The pool name of the attacker's ID split of the victim's data (``mnist-attacker``, ...)."""
    return f"{data_name}-attacker"


def other_real_set(data_name: str) -> str | None:
    """The other real set of the same shape: Fashion-MNIST for MNIST, the embedded digits for Fashion-MNIST."""
    return _OTHER_REAL.get(data_name)


def attacker_pools(data_name: str, image_shape: tuple[int, int, int]) -> dict[str, PoolChoice]:
    """The attacker pools that fit a victim on ``data_name`` with inputs ``image_shape``, by role.

    Roles: ``id_seeds`` (ID images the attacker owns: JBDA's seeds), ``photos`` (natural-photo
    crops: the data-based setting with a distribution unrelated to the task, paper §5.1), and
    for 1×28×28 victims ``digits28`` (another digit style) and ``other`` (the other real 28×28 set).
    """
    out = {
        "id_seeds": PoolChoice(
            attacker_split_pool(data_name),
            "held-out images of the victim's own distribution, disjoint from the defender's training data",
        ),
        "photos": PoolChoice(
            "patches",
            "crops of the photographs scikit-learn ships (grey-scale for grey victims, colour for colour ones), "
            "drawn at the victim's size: images unrelated to the task",
        ),
    }
    if tuple(image_shape) == (1, 28, 28):
        out["digits28"] = PoolChoice("digits28", "scikit-learn's 8x8 digits upscaled: a different, real digit style")
        other = other_real_set(data_name)
        if other is not None:
            why = f"the other real 28x28 set: a natural distribution close in style to {data_name}"
            out["other"] = PoolChoice(other, why)
    return out


def default_pool(role: PoolRole, data_name: str, image_shape: tuple[int, int, int]) -> str:
    """The pool an attack of ``role`` queries when its config names none.

    ``id_seeds`` → the attacker's ID split of the victim's data (``mnist-attacker`` for the
    embedded digits); ``natural`` → ``patches`` (photo crops at the victim's size and channels), as
    the paper's data-based attacks use a natural set unrelated to the task.
    """
    roles = attacker_pools(data_name, image_shape)
    if role == "id_seeds":
        return roles["id_seeds"].pool
    if role == "natural":
        return roles["photos"].pool
    raise ConfigError(f"unknown pool role {role!r}; valid roles: id_seeds, natural")


def ood_proxy(image_shape: tuple[int, int, int]) -> str:
    """DNF's OOD proxy set: ``patches`` at the victim's size and channels.

    The paper trains its OOD generator on a proxy set of a different distribution (App. F, Table 3:
    the choice matters little); photo crops exist at any size, grey or colour, and are never the
    victim's own distribution.
    """
    del image_shape  # patches are drawn at any shape (see load_pool)
    return "patches"


def threshold_family(num_heads: int) -> str:
    """Which of the paper's default threshold sets a DNF with ``num_heads`` exit heads starts from (App. D).

    Three heads (LeNet-5-style backbones): MNIST's 0.92 / 0.94 / 0.96; four (ResNet-style): the
    CIFAR set 0.90 / 0.92 / 0.94 / 0.96. The paper gives thresholds per backbone depth, not per
    data set beyond these two families, so a Fashion-MNIST LeNet-5 uses MNIST's.
    """
    return "mnist" if num_heads == 3 else "cifar10"


def augmentation(data_name: str, image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """The victim's training augmentation for ``data_name``: random shifts, and flips only where they keep the class.

    Shifts of up to 2 pixels at 28×28 (digits and clothes are centred; a small shift keeps the
    class), 4 at 32×32 (the usual CIFAR pad-and-crop). Left-right flips only for
    :data:`MIRROR_SYMMETRIC` sets; never for digits.
    """
    shift = 4 if image_shape[1] >= 32 else 2
    return {"max_shift": shift, "hflip": data_name in MIRROR_SYMMETRIC}


# -- loading pools ---------------------------------------------------------------------------------


def fitted_options(name: str, image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """Options that draw a shape-parametric set at ``image_shape`` (``size``, ``channels``, ``shape``)."""
    info = DATASETS.get(name)
    params = {p.name for p in inspect.signature(info.load).parameters.values() if p.kind is p.KEYWORD_ONLY}
    c, h, w = image_shape
    out: dict[str, Any] = {}
    if "size" in params and h == w:
        out["size"] = h
    if "channels" in params and c in (1, 3):
        out["channels"] = c
    if "shape" in params:
        out["shape"] = (c, h, w)
    return out


def load_pool(pool: str, image_shape: tuple[int, int, int], data: ResolvedData | None = None, **kw: Any) -> ImageSet:
    """Load attacker pool ``pool`` for a victim with inputs ``image_shape``.

    Args:
        pool: a data spec ``NAME[:PATH]``, or ``<data>-attacker`` for the attacker's split of ``data``.
        image_shape: the victim's ``(C, H, W)``.
        data: the victim's resolved data (for ``<data>-attacker``).
        **kw: more loader options (e.g. ``n`` for ``patches``).

    Raises:
        UnknownComponent: an unknown data set name.
        ConfigError: the pool's images do not have the victim's shape.
        ArtifactError: a missing file.
    """
    if data is not None and pool == attacker_split_pool(data.name):
        images = data.attacker
    else:
        spec = DataSpec.parse(pool)
        images = load_dataset(spec.name, spec.path, **{**fitted_options(spec.name, image_shape), **kw})
    if tuple(images.x.shape[1:]) != tuple(image_shape):
        raise ConfigError(
            f"pool {pool!r} has images {tuple(images.x.shape[1:])}, the victim takes {tuple(image_shape)}; "
            f"choose a pool of that shape (fortress list datasets)"
        )
    return images
