"""Resolve a :class:`~fortress.data.spec.DataSpec` into the defender's and the attacker's data.

:func:`resolve_data` gives, deterministically for the same files and options:

========== ==================================================================================
split      what it is
========== ==================================================================================
train      the defender's training images (the victim's data; DNF's ID loss)
val        the defender's held-out validation images (utility guard, threshold search, monitor)
test       the ID test images (utility, clone accuracy and fidelity)
attacker   held-out ID images the attacker may own (JBDA's seeds), disjoint from the others
========== ==================================================================================

How the splits are made:

* the embedded digits (``mnist``) keep their fixed stratified split (3,500 / 300 / 1,000 / 200,
  :func:`fortress.data.embedded.mnist_splits`), so every result on them keeps its meaning;
* a set with its own train and test files (``fashion-mnist``, ``mnist-idx``, ``cifar10``, ...): the
  test file is the test split; validation and attacker images are drawn from the train file,
  stratified by class (``val_size`` default 10 %, ``attacker_size`` default 2 % of it), and the rest
  is the training split;
* any other labelled set (``imagefolder``, ``npz``, ``digits28``): stratified test 20 %, validation
  6 %, attacker 4 % and training the rest (the embedded digits' proportions).

Split options (in the spec's ``options``, next to the loader's own): ``val_size``,
``attacker_size``, ``test_size`` (a count, or a fraction in (0, 1)), ``train_size`` (keep at most
this many training images, stratified; default all), ``split_seed`` (default 0). With a test file,
``test_size`` keeps a stratified subset of it.

The content hash is the sha256 over the files read (name and sha256 of each, in a fixed order),
or, for sets built into the package (the embedded digits, ``digits28``) and image folders, over
the loaded arrays.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fortress.data.base import ImageSet
from fortress.data.registry import DATASETS, DatasetInfo, dataset_path, loader_options
from fortress.data.spec import DataCard, DataSpec
from fortress.errors import ConfigError

__all__ = ["SPLIT_OPTIONS", "ResolvedData", "check_spec", "resolve_data"]

#: Options of every spec that shape the splits rather than the loading.
SPLIT_OPTIONS = ("val_size", "attacker_size", "test_size", "train_size", "split_seed")
#: Default split sizes of a set with its own test file (fractions of the train file).
WITH_TEST_FILE: dict[str, int | float] = {"val": 0.1, "attacker": 0.02}
#: Default split sizes of a single labelled set (fractions of it): the embedded digits' proportions.
SINGLE_SET: dict[str, int | float] = {"test": 0.2, "val": 0.06, "attacker": 0.04}


@dataclass(frozen=True)
class ResolvedData:
    """A resolved data spec: the four splits and what describes them.

    Attributes:
        spec: the spec it came from.
        train: the defender's training images, labelled.
        val: the defender's validation images, labelled.
        test: the ID test images, labelled.
        attacker: ID images the attacker may own (JBDA seeds), labelled; disjoint from the others.
        classes: class names (label ``i`` is ``classes[i]``).
        sha256: content hash of the files read (or of the arrays; see :attr:`hashed`).
        hashed: ``"files"`` or ``"arrays"``.
        files: file name → sha256 of every file read (empty when the arrays were hashed).
    """

    spec: DataSpec
    train: ImageSet
    val: ImageSet
    test: ImageSet
    attacker: ImageSet
    classes: tuple[str, ...]
    sha256: str
    hashed: str
    files: dict[str, str]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Per-image shape ``(C, H, W)``."""
        c, h, w = (int(v) for v in self.train.x.shape[1:])
        return c, h, w

    @property
    def name(self) -> str:
        """The spec's registry name (what records call the data set)."""
        return self.spec.name

    def card(self) -> DataCard:
        """What a model trained on these data remembers (saved in ``model.json``)."""
        return DataCard(self.spec, self.sha256, self.classes, self.image_shape)

    def describe(self) -> dict[str, Any]:
        """The spec, hash, classes, shape and split sizes as plain data (recorded with results)."""
        return {
            **self.spec.to_dict(),
            "sha256": self.sha256,
            "hashed": self.hashed,
            "classes": list(self.classes),
            "image_shape": list(self.image_shape),
            "splits": {k: len(getattr(self, k)) for k in ("train", "val", "test", "attacker")},
        }


# -- checks ----------------------------------------------------------------------------------------


def _options(info: DatasetInfo, spec: DataSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``spec.options`` into (loader options, split options); refuse unknown ones."""
    loader = [o for o in loader_options(info) if o != "split"]
    split = ["split_seed"] if info.fixed_splits is not None else list(SPLIT_OPTIONS)
    unknown = sorted(set(spec.options) - set(loader) - set(split))
    if unknown:
        valid = ", ".join(sorted(loader + split)) or "(none)"
        raise ConfigError(f"data set {spec.name!r} does not take option(s) {', '.join(unknown)}; valid: {valid}")
    load_opts = {k: v for k, v in spec.options.items() if k in loader}
    split_opts = {k: v for k, v in spec.options.items() if k in split}
    for key in ("val_size", "attacker_size", "test_size", "train_size"):
        if key in split_opts:
            _check_size(split_opts[key], key)
    seed = split_opts.get("split_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"data option split_seed must be an integer, got {seed!r}")
    return load_opts, split_opts


def _check_size(value: Any, key: str) -> None:
    ok_int = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    ok_frac = isinstance(value, float) and 0.0 < value < 1.0
    if not (ok_int or ok_frac):
        raise ConfigError(f"data option {key} must be a count >= 0 or a fraction in (0, 1), got {value!r}")


def check_spec(spec: DataSpec) -> DatasetInfo:
    """Check a spec without loading anything: the name is registered, its options are known, its path exists.

    Raises:
        UnknownComponent: the name is not registered (the message lists the valid names).
        ConfigError: an unknown option or a bad value, a path given to a built-in set, or none to a set that needs one.
        ArtifactError: the path does not exist (with the set's install hint, if it has one).
    """
    info = DATASETS.get(spec.name)
    if spec.path is not None and not info.needs_path and info.default_path is None:
        raise ConfigError(f"data set {spec.name!r} is built in and takes no path, got {spec.path!r}")
    _options(info, spec)
    where = dataset_path(info, spec.path)
    if info.files is not None and where is not None:  # every file it reads is there (names the first missing)
        accepted = inspect.signature(info.files).parameters
        info.files(where, **{k: v for k, v in spec.options.items() if k in accepted})
    return info


# -- splitting -------------------------------------------------------------------------------------


def _allocate(size: int | float, counts: list[int], key: str, whole: int | None = None) -> list[int]:
    """Per-class counts that add up to ``size`` (a count, or a fraction of ``whole``), proportional to ``counts``."""
    n = sum(counts)
    target = round(size * (n if whole is None else whole)) if isinstance(size, float) else int(size)
    if target > n:
        raise ConfigError(f"data option {key}={size!r} asks for {target} images, the set has {n} to draw from")
    raw = [target * c / n for c in counts] if n else [0.0] * len(counts)
    out = [math.floor(r) for r in raw]
    order = sorted(range(len(counts)), key=lambda i: (-(raw[i] - out[i]), i))  # largest remainders first
    for i in order[: target - sum(out)]:
        out[i] += 1
    return out


def _stratified(
    y: Tensor, sizes: dict[str, int | float], rest: str, cap: int | float | None, gen: torch.Generator
) -> dict[str, Tensor]:
    """Index sets per split, drawn per class in the order of ``sizes``; ``rest`` gets what remains."""
    k = int(y.max()) + 1
    per_class = [torch.nonzero(y == c).flatten() for c in range(k)]
    per_class = [idx[torch.randperm(idx.numel(), generator=gen)] for idx in per_class]
    left = [int(idx.numel()) for idx in per_class]
    whole = sum(left)  # fractions are of the whole set, whatever was drawn before
    start = [0] * k
    parts: dict[str, list[Tensor]] = {name: [] for name in (*sizes, rest)}
    for name, size in sizes.items():
        for c, m in enumerate(_allocate(size, left, f"{name}_size", whole)):
            parts[name].append(per_class[c][start[c] : start[c] + m])
            start[c] += m
            left[c] -= m
    keep = left if cap is None else _allocate(cap, left, "train_size", whole)
    for c in range(k):
        parts[rest].append(per_class[c][start[c] : start[c] + keep[c]])
    out = {}
    for name, chunks in parts.items():
        idx = torch.cat(chunks)
        out[name] = idx[torch.randperm(idx.numel(), generator=gen)]  # mix the classes
    return out


def _labelled(s: ImageSet, spec: DataSpec) -> ImageSet:
    if s.y is None:
        raise ConfigError(f"data set {spec.name!r} has no labels; the defender's data must be labelled images")
    if len(s) == 0:
        raise ConfigError(f"data set {spec.text()!r} holds no images")
    return s


def _classes(*sets: ImageSet) -> tuple[str, ...]:
    for s in sets:
        if s.classes is not None:
            return tuple(s.classes)
    k = max(int(s.targets.max()) + 1 for s in sets)
    return tuple(str(i) for i in range(k))


def _hash_arrays(*sets: ImageSet) -> str:
    h = hashlib.sha256()
    for s in sets:
        h.update(np.ascontiguousarray(s.x.numpy()).tobytes())
        h.update(np.ascontiguousarray(s.targets.numpy()).tobytes())
    return h.hexdigest()


def _hash_files(files: tuple[Path, ...]) -> tuple[str, dict[str, str]]:
    per_file: dict[str, str] = {}
    total = hashlib.sha256()
    for path in files:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        per_file[path.name] = h.hexdigest()
        total.update(f"{path.name}\0{per_file[path.name]}\n".encode())
    return total.hexdigest(), per_file


def _named(s: ImageSet, idx: Tensor, spec: DataSpec, split: str) -> ImageSet:
    return s.subset(idx, f"{spec.name}-{split}")


def _resolve(spec: DataSpec) -> ResolvedData:
    info = check_spec(spec)
    load_opts, split_opts = _options(info, spec)
    seed = int(split_opts.get("split_seed", 0))
    if info.fixed_splits is not None:
        fixed = info.fixed_splits(seed)
        classes = _classes(fixed.train)
        parts = (fixed.train, fixed.val, fixed.test, fixed.attacker)
        whole = _labelled(info.load(None), spec)  # the hash is of the set, whatever its split
        return ResolvedData(spec, *parts, classes, _hash_arrays(whole), "arrays", {})
    path = dataset_path(info, spec.path)
    gen = torch.Generator().manual_seed(seed)
    cap = split_opts.get("train_size")
    if "split" in loader_options(info):  # a set with its own test files
        train_file = _labelled(info.load(path, split="train", **load_opts), spec)
        test_file = _labelled(info.load(path, split="test", **load_opts), spec)
        sizes = {k: split_opts.get(f"{k}_size", v) for k, v in WITH_TEST_FILE.items()}
        idx = _stratified(train_file.targets, sizes, "train", cap, gen)
        test_idx = torch.arange(len(test_file))
        if "test_size" in split_opts:
            test_idx = _stratified(test_file.targets, {}, "test", split_opts["test_size"], gen)["test"]
        splits = {k: _named(train_file, idx[k], spec, k) for k in ("train", "val", "attacker")}
        splits["test"] = _named(test_file, test_idx, spec, "test")
        sources: tuple[ImageSet, ...] = (train_file, test_file)
    else:
        full = _labelled(info.load(path, **load_opts), spec)
        sizes = {k: split_opts.get(f"{k}_size", v) for k, v in SINGLE_SET.items()}
        idx = _stratified(full.targets, sizes, "train", cap, gen)
        splits = {k: _named(full, idx[k], spec, k) for k in ("train", "val", "test", "attacker")}
        sources = (full,)
    for name in ("train", "val", "test"):
        if len(splits[name]) == 0:
            raise ConfigError(f"data set {spec.text()!r} leaves no images for the {name} split; check its size options")
    classes = _classes(*sources)
    if info.files is not None and path is not None:
        digest, per_file = _hash_files(info.files(path, **_file_options(info, load_opts)))
        hashed = "files"
    else:
        digest, per_file, hashed = _hash_arrays(*sources), {}, "arrays"
    return ResolvedData(
        spec, splits["train"], splits["val"], splits["test"], splits["attacker"], classes, digest, hashed, per_file
    )


def _file_options(info: DatasetInfo, load_opts: dict[str, Any]) -> dict[str, Any]:
    assert info.files is not None
    accepted = {p.name for p in inspect.signature(info.files).parameters.values() if p.kind is p.KEYWORD_ONLY}
    return {k: v for k, v in load_opts.items() if k in accepted}


@lru_cache(maxsize=4)
def _cached(canonical: str) -> ResolvedData:
    return _resolve(DataSpec.from_dict(json.loads(canonical)))


def resolve_data(spec: DataSpec | None = None) -> ResolvedData:
    """The defender's and the attacker's splits, classes, image shape and content hash of ``spec``.

    Deterministic: the same spec over the same files gives the same splits, in any process. The
    last few resolutions are cached in the process (the images are shared, never modified).

    Args:
        spec: the data spec (default: the embedded MNIST digits).

    Raises:
        UnknownComponent: the name is not registered.
        ConfigError: an unknown or bad option, an unlabelled set, or sizes that leave a split empty.
        ArtifactError: a missing path or file (named, with the set's install hint), or bad data.

    Example:
        >>> d = resolve_data()
        >>> len(d.train), len(d.val), len(d.test), len(d.attacker), d.image_shape
        (3500, 300, 1000, 200, (1, 28, 28))
    """
    return _cached((spec or DataSpec()).canonical())
