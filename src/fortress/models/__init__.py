"""Model zoo: staged backbones registered by name, plus saving/loading as safetensors + JSON.

Every factory takes keyword arguments ``num_classes``, ``in_channels`` and ``image_size`` and
returns a :class:`StagedBackbone`. :func:`recipe_for` gives the training recipe of an architecture
on a named data set (:mod:`fortress.models.recipes`). A user's own architecture is named by a factory
path ``package.module:function`` or registered by its package in the ``fortress.models`` entry-point
group, and a plain network is staged by module names (:mod:`fortress.models.user`,
:func:`stage_by_names`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fortress.models import densenet as _densenet
from fortress.models import lenet as _lenet
from fortress.models import mobilenet as _mobilenet
from fortress.models import resnet as _resnet
from fortress.models import resnet_s as _resnet_s
from fortress.models import vgg as _vgg
from fortress.models.by_names import stage_by_names
from fortress.models.io import load_model, load_state, save_model, save_state
from fortress.models.recipes import TrainRecipe, recipe_for
from fortress.models.staged import StagedBackbone, from_sequential, from_stages
from fortress.models.train import TrainReport, evaluate_accuracy, predict_logits, train_classifier
from fortress.models.user import Staging, build_model, entry_point_names, model_names
from fortress.registry import Registry

__all__ = [
    "MODELS",
    "StagedBackbone",
    "Staging",
    "TrainRecipe",
    "TrainReport",
    "build_model",
    "create_model",
    "entry_point_names",
    "evaluate_accuracy",
    "from_sequential",
    "from_stages",
    "load_model",
    "load_state",
    "model_names",
    "predict_logits",
    "recipe_for",
    "save_model",
    "save_state",
    "stage_by_names",
    "train_classifier",
]

ModelFactory = Callable[..., StagedBackbone]

MODELS: Registry[ModelFactory] = Registry("model")


def _lenet5(**kw: Any) -> StagedBackbone:
    return _lenet.lenet5(width=1.0, arch="lenet5", **kw)


def _lenet5_half(**kw: Any) -> StagedBackbone:
    return _lenet.lenet5(width=0.5, arch="lenet5-half", **kw)


MODELS.add("lenet5", _lenet5)
MODELS.add("lenet5-half", _lenet5_half)
MODELS.add("resnet18-8x", _resnet.resnet18_8x)
MODELS.add("resnet34-8x", _resnet.resnet34_8x)
MODELS.add("resnet14-s", _resnet_s.resnet14_s)
MODELS.add("vgg11", _vgg.vgg11)
MODELS.add("vgg16", _vgg.vgg16)
MODELS.add("mobilenetv2", _mobilenet.mobilenetv2)
MODELS.add("densenet121", _densenet.densenet121)


def create_model(name: str, **params: Any) -> StagedBackbone:
    """Build model ``name`` with ``params`` (``num_classes``, ``in_channels``, ``image_size``, ...).

    ``name`` is a registry name, an entry point of the ``fortress.models`` group or a factory path
    ``package.module:function`` whose factory returns a staged network (:func:`build_model`; the
    sizes default to 10 classes of 1×28×28 images and reach a user's factory where it names them).

    Raises:
        UnknownComponent: no such model.
        ModelFactoryError: a user's factory cannot build it (see :func:`build_model`).

    Example:
        >>> create_model("lenet5", num_classes=10).num_stages
        3
    """
    if name in MODELS:
        return MODELS.get(name)(**params)
    rest = dict(params)
    classes = int(rest.pop("num_classes", 10))
    channels = int(rest.pop("in_channels", 1))
    size = int(rest.pop("image_size", 28))
    return build_model(name, rest, input_shape=(channels, size, size), num_classes=classes)
