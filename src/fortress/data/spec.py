"""The data spec: how every verb, grid and saved model names its data (DESIGN §3, "Data").

A :class:`DataSpec` is a registry name (``fortress list datasets``), an optional path and loader
options. It is written ``NAME[:PATH]`` on the command line (``--data fashion-mnist:/data/fmnist``,
options as repeated ``--data-option KEY=VALUE``), as a ``[data]`` table in grid TOML files, and
next to every saved model (``model.json``, see :class:`DataCard`). Resolving it
(:func:`fortress.data.resolve.resolve_data`) gives the defender's and the attacker's splits, the
classes, the image shape and a content hash, always the same for the same files.

The default spec, ``DataSpec()``, is the embedded MNIST digits with their fixed splits.

Example:
    >>> DataSpec.parse("fashion-mnist:/data/fmnist", ["train_size=10000"])
    DataSpec(name='fashion-mnist', path='/data/fmnist', options={'train_size': 10000})
    >>> DataSpec.parse("mnist").is_default
    True
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fortress.errors import ConfigError

__all__ = ["DEFAULT_DATA", "DataCard", "DataSpec"]

#: Registry name of the default data: the embedded MNIST digits.
DEFAULT_DATA = "mnist"


def _option_value(raw: str) -> Any:
    """A ``--data-option`` value: JSON where it parses (``3``, ``0.1``, ``true``), text otherwise."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


@dataclass(frozen=True)
class DataSpec:
    """A data set by registry name, optional path and loader options.

    Attributes:
        name: a ``dataset`` registry name (``mnist``, ``fashion-mnist``, ``mnist-idx``, ``cifar10``,
            ``imagefolder``, ``npz``, ...).
        path: the file or folder to read (``None``: the set's default location, if it has one).
        options: loader options (e.g. ``size``, ``channels``) and split options (``val_size``,
            ``attacker_size``, ``test_size``, ``train_size``, ``split_seed``; see
            :func:`fortress.data.resolve.resolve_data`), JSON values.

    Raises:
        ConfigError: an empty name, a path that is not text, or option keys that are not text.
    """

    name: str = DEFAULT_DATA
    path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"a data spec needs a data set name, got {self.name!r}")
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            raise ConfigError(f"data path must be a non-empty text or absent, got {self.path!r}")
        if not isinstance(self.options, Mapping) or not all(isinstance(k, str) and k for k in self.options):
            raise ConfigError(f"data options must be a table with text keys, got {self.options!r}")
        object.__setattr__(self, "options", dict(self.options))

    @classmethod
    def parse(cls, text: str, options: Sequence[str] = ()) -> DataSpec:
        """Read ``NAME[:PATH]`` and ``KEY=VALUE`` options (the CLI's ``--data`` / ``--data-option``).

        The path is everything after the first ``:``; values are JSON where they parse.

        Raises:
            ConfigError: an empty name or path, or an option without ``=``.
        """
        name, sep, path = str(text).strip().partition(":")
        if sep and not path:
            raise ConfigError(f"--data takes NAME[:PATH]; {text!r} has an empty path after ':'")
        opts: dict[str, Any] = {}
        for pair in options:
            key, eq, raw = pair.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"--data-option takes KEY=VALUE, got {pair!r}")
            opts[key.strip()] = _option_value(raw)
        return cls(name.strip().lower(), path or None, opts)

    @property
    def is_default(self) -> bool:
        """Whether this is the default spec (the embedded digits, default splits)."""
        return self.name == DEFAULT_DATA and self.path is None and not self.options

    def text(self) -> str:
        """``NAME[:PATH]`` followed by ``KEY=VALUE`` options, for messages and tables."""
        head = self.name if self.path is None else f"{self.name}:{self.path}"
        opts = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(self.options.items()))
        return f"{head} {opts}" if opts else head

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``path`` omitted when absent); :meth:`from_dict` reads it back."""
        out: dict[str, Any] = {"name": self.name, "options": dict(self.options)}
        if self.path is not None:
            out["path"] = self.path
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | str) -> DataSpec:
        """Read :meth:`to_dict`'s form, or ``NAME[:PATH]`` text.

        Raises:
            ConfigError: unknown keys or values of the wrong type.
        """
        if isinstance(data, str):
            return cls.parse(data)
        if not isinstance(data, Mapping):
            raise ConfigError(f"a data spec is NAME[:PATH] text or a table, got {data!r}")
        unknown = sorted(set(data) - {"name", "path", "options"})
        if unknown:
            raise ConfigError(f"unknown keys {unknown} in a data spec; valid keys: ['name', 'options', 'path']")
        return cls(str(data.get("name", DEFAULT_DATA)), data.get("path"), dict(data.get("options") or {}))

    def canonical(self) -> str:
        """Canonical JSON of the spec (sorted keys): equal specs give equal text."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class DataCard:
    """What a saved model remembers about its data: the spec and what resolving it gave.

    Written as the ``data`` entry of ``model.json``, so ``protect``, ``defend``, ``attack``,
    ``serve`` and ``monitor calibrate`` of a saved model find its data without being told.

    Attributes:
        spec: the data spec the model was trained on.
        sha256: content hash of the files read (or of the arrays, for built-in sets).
        classes: class names, label ``i`` is ``classes[i]``.
        image_shape: ``(C, H, W)``.
    """

    spec: DataSpec
    sha256: str
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data."""
        return {
            "spec": self.spec.to_dict(),
            "sha256": self.sha256,
            "classes": list(self.classes),
            "image_shape": list(self.image_shape),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataCard:
        """Read :meth:`to_dict`'s form.

        Raises:
            ConfigError: a missing entry or one of the wrong type.
        """
        try:
            c, h, w = (int(v) for v in data["image_shape"])
            classes = tuple(map(str, data["classes"]))
            return cls(DataSpec.from_dict(data["spec"]), str(data["sha256"]), classes, (c, h, w))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"a saved data card needs spec, sha256, classes and image_shape: {exc}") from None
