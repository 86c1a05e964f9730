"""Where an architecture comes from: the registry, a factory the user names, or an installed package.

An architecture is named three ways, in this order:

1. a registry name (``lenet5``, ``resnet18-8x``; ``fortress list models``);
2. a factory path ``package.module:function`` (or ``package.module:Class``), imported on use;
3. an entry point of the ``fortress.models`` group: a user's package declares
   ``[project.entry-points."fortress.models"] mynet = "mypkg.nets:build"`` and ``mynet`` is then a
   model name everywhere (``--arch mynet``, ``--clone mynet``), as pytest finds its plugins.

A factory returns either a :class:`~fortress.models.staged.StagedBackbone` (staged by its author, e.g.
with :func:`~fortress.models.by_names.stage_by_names`) or a plain :class:`torch.nn.Module` that is
staged by module names (:class:`Staging`). It is called with the keyword arguments the user gives
plus, for the parameters its signature names, ``num_classes``, ``in_channels`` and ``image_size`` of
the data. The arguments it was called with, which must be JSON values, and the staging are saved in
``model.json``, so :func:`fortress.models.load_model` rebuilds the network in any process where the
user's package imports.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from fortress.errors import FortressError, ModelFactoryError, UnknownComponent
from fortress.models.by_names import probe_output, stage_by_names
from fortress.models.io import copy_state_checked
from fortress.models.staged import StagedBackbone

__all__ = [
    "ENTRY_POINT_GROUP",
    "Staging",
    "build_model",
    "entry_point_names",
    "is_factory_path",
    "load_factory",
    "model_names",
    "rebuild_architecture",
]

log = logging.getLogger(__name__)

#: The entry-point group in which packages register architectures.
ENTRY_POINT_GROUP = "fortress.models"
#: The data's sizes passed to a user's factory when its signature names them.
DATA_KWARGS = ("num_classes", "in_channels", "image_size")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_MODULE_NAME = re.compile(r"^\w+(\.\w+)*$")  # named_modules() names: "layer1", "blocks.3.0"


@dataclass(frozen=True)
class Staging:
    """How to stage a plain network by module names (:func:`~fortress.models.by_names.stage_by_names`).

    Attributes:
        stages: dotted module names ending each stage, in forward order (``("layer1", ..., "layer4")``).
        classifier: dotted name of the final classification module (``"fc"``).
        mean: per-channel normalisation mean applied before the network (``None``: none).
        std: per-channel normalisation std.
    """

    stages: tuple[str, ...]
    classifier: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(str(s).strip() for s in self.stages))
        if not self.stages or not all(self.stages):
            raise ModelFactoryError(f"staging needs at least one stage name, got {list(self.stages)}")
        if not str(self.classifier).strip():
            raise ModelFactoryError("staging needs the classifier's module name, got ''")
        for name in (*self.stages, self.classifier):
            if not _MODULE_NAME.match(name):
                raise ModelFactoryError(f"{name!r} is not a dotted module name (like 'layer1' or 'blocks.3')")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v is not None:
                object.__setattr__(self, key, tuple(float(x) for x in v))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Staging:
        """Read the ``staging`` entry of a ``model.json`` (or a config table).

        Raises:
            ModelFactoryError: a key is missing or malformed.
        """
        try:
            return cls(
                stages=tuple(data["stages"]),
                classifier=str(data["classifier"]),
                mean=None if data.get("mean") is None else tuple(data["mean"]),
                std=None if data.get("std") is None else tuple(data["std"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFactoryError(f"malformed staging {dict(data)!r}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the inverse of :meth:`from_dict`)."""
        return {
            "stages": list(self.stages),
            "classifier": self.classifier,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
        }


def is_factory_path(arch: str) -> bool:
    """Whether ``arch`` names a factory (``package.module:function``) rather than a model name."""
    return ":" in arch


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def load_factory(path: str) -> Callable[..., Any]:
    """Import the factory ``package.module:function`` (the part after ``:`` may be dotted: ``mod:Class.make``).

    Raises:
        ModelFactoryError: the path is malformed, the module does not import, the attribute is
            missing or not callable (the message names the path and the part that failed).
    """
    module_name, _, attr = path.partition(":")
    if not _DOTTED.match(module_name) or not _DOTTED.match(attr):
        raise ModelFactoryError(f"model factory {path!r} must be written package.module:function")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of the user's module
        raise ModelFactoryError(
            f"model factory {path!r}: cannot import module {module_name!r} ({_first_line(exc)})"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelFactoryError(
                f"model factory {path!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if not callable(obj):
        raise ModelFactoryError(f"model factory {path!r} is a {type(obj).__name__}, not a callable")
    return obj  # type: ignore[no-any-return]


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            log.warning(
                "model entry point %r is declared twice (%s, %s); using the first",
                ep.name,
                found[ep.name].value,
                ep.value,
            )
        found.setdefault(ep.name, ep)
    return found


def entry_point_names() -> list[str]:
    """Names of the architectures installed packages register in the ``fortress.models`` group, sorted."""
    return sorted(_entry_points())


def model_names() -> list[str]:
    """Every model name: the registry's and the entry points' (the registry's win on a clash), sorted."""
    from fortress.models import MODELS

    return sorted({*MODELS.names(), *entry_point_names()})


def _resolve(arch: str) -> tuple[Callable[..., Any], bool]:
    """The factory of ``arch`` and whether it is a registry one."""
    from fortress.models import MODELS

    if is_factory_path(arch):
        return load_factory(arch), False
    if arch in MODELS:
        return MODELS.get(arch), True
    eps = _entry_points()
    if arch in eps:
        ep = eps[arch]
        try:
            obj = ep.load()
        except Exception as exc:
            raise ModelFactoryError(
                f"model entry point {arch!r} = {ep.value!r} does not load ({_first_line(exc)})"
            ) from None
        if not callable(obj):
            raise ModelFactoryError(
                f"model entry point {arch!r} = {ep.value!r} is a {type(obj).__name__}, not a callable"
            )
        return obj, False
    valid = ", ".join(model_names())
    raise UnknownComponent(
        f"unknown model {arch!r}; valid models: {valid}; or name a factory as package.module:function"
    )


def _named_parameters(fn: Callable[..., Any]) -> set[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in kinds}


def _check_json(kwargs: Mapping[str, Any], what: str) -> None:
    for key, value in kwargs.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ModelFactoryError(
                f"{what}: keyword argument {key}={value!r} is not a JSON value; model.json must record it"
            ) from None


def build_model(
    arch: str,
    params: Mapping[str, Any] | None = None,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    staging: Staging | None = None,
    weights: Mapping[str, Tensor] | None = None,
    weights_source: Path | None = None,
) -> StagedBackbone:
    """Build architecture ``arch`` (registry name, factory path or entry-point name) for the data.

    Args:
        arch: what to build (see the module docstring for the order of lookup).
        params: the factory's keyword arguments (JSON values); they override the data's sizes.
        input_shape: ``(C, H, W)`` of the data; ``image_size`` is ``H``.
        num_classes: classes of the data.
        staging: module names to stage a factory's plain network by (``None`` for staged ones).
        weights: trained weights to copy in, named as the factory's network names them (for a
            network staged by names: its own names, ``layer1.0.conv1.weight``; for a staged one:
            either its own or its staged names, ``stages.0.…``).
        weights_source: the file ``weights`` came from, named by errors.

    Returns:
        The staged network; ``arch``, ``arch_params`` (the arguments the factory was called with)
        and ``staging`` rebuild it (:func:`fortress.models.load_model`).

    Raises:
        UnknownComponent: ``arch`` is no registry name, entry point or factory path.
        ModelFactoryError: the factory does not import or fails, its arguments are not JSON values,
            it returns no module, a module for other inputs or classes (the message says which), or
            a network that cannot be staged by the names given.
        ArtifactError: ``weights`` do not fit the network (missing, unexpected or misshapen
            tensors, named with the file).
    """
    fn, registry = _resolve(arch)
    c, h = int(input_shape[0]), int(input_shape[1])
    sizes = {"num_classes": int(num_classes), "in_channels": c, "image_size": h}
    named = set(DATA_KWARGS) if registry else _named_parameters(fn)
    kwargs = {**{k: v for k, v in sizes.items() if k in named}, **dict(params or {})}
    what = f"model {arch!r}" if registry else f"model factory {arch!r}"
    _check_json(kwargs, what)
    try:
        out = fn(**kwargs)
    except FortressError:
        raise
    except Exception as exc:
        raise ModelFactoryError(f"{what} fails when called with {kwargs}: {_first_line(exc)}") from None
    shape = (c, h, int(input_shape[2]))
    source = Path(weights_source) if weights_source is not None else Path("the weights")
    if isinstance(out, StagedBackbone):
        if staging is not None:
            raise ModelFactoryError(f"{what} returns a staged network already; give no stages or classifier")
        if out.input_shape != shape or out.num_classes != num_classes:
            raise ModelFactoryError(
                f"{what} builds a network for inputs {out.input_shape} and {out.num_classes} classes; "
                f"the data have inputs {shape} and {num_classes} classes"
            )
        if not registry:  # rebuilt by calling the factory again, which stages the network itself
            out.arch, out.arch_params, out.staging = arch, dict(kwargs), None
        if weights is not None:
            own = out.source_network
            fits_staged = set(weights) == set(out.state_dict())
            copy_state_checked(out if fits_staged or own is None else own, weights, source)
        return out
    if not isinstance(out, nn.Module):
        raise ModelFactoryError(f"{what} returns {type(out).__name__}, not a torch.nn.Module")
    if staging is None:
        raise ModelFactoryError(
            f"{what} returns a plain {type(out).__name__}; name its stages and classifier "
            "(--stages, --classifier) or return a StagedBackbone"
        )
    if weights is not None:
        copy_state_checked(out, weights, source)
    got = probe_output(out, shape, what)
    if got != (num_classes,):
        raise ModelFactoryError(
            f"{what} returns a network whose output per image has shape {got} for inputs {shape}; "
            f"the data have {num_classes} classes, expected ({num_classes},)"
        )
    return stage_by_names(
        out,
        staging.stages,
        staging.classifier,
        input_shape=shape,
        num_classes=num_classes,
        mean=staging.mean,
        std=staging.std,
        arch=arch,
        arch_params=dict(kwargs),
        what=what,
    )


def rebuild_architecture(model: StagedBackbone) -> StagedBackbone:
    """A freshly initialised network with ``model``'s architecture (from its ``arch``, ``arch_params``, ``staging``).

    Raises:
        UnknownComponent: ``model.arch`` is a label (a network staged in Python without a factory).
        ModelFactoryError: the factory cannot be rebuilt here.
    """
    staging = Staging.from_dict(model.staging) if model.staging is not None else None
    return build_model(
        model.arch, model.arch_params, input_shape=model.input_shape, num_classes=model.num_classes, staging=staging
    )
