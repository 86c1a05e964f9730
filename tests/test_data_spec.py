"""The data spec: parsing, resolving into splits, content hashes, pools fitted to the victim, the defaults.

Every file is written by the tests (tiny IDX and .npz sets); nothing is downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fortress.data import mnist_splits, natural_patches
from fortress.data.defaults import (
    attacker_pools,
    augmentation,
    default_pool,
    load_pool,
    other_real_set,
    threshold_family,
)
from fortress.data.registry import FASHION_CLASSES
from fortress.data.resolve import _cached, check_spec, resolve_data
from fortress.data.spec import DataCard, DataSpec
from fortress.errors import ArtifactError, ConfigError, UnknownComponent
from fortress.models import create_model, load_model, save_model

STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx(arr: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_fashion(root: Path, n_train: int = 200, n_test: int = 50, seed: int = 0) -> Path:
    """Four gzipped IDX files of random 28x28 images, balanced over 10 classes (a tiny Fashion-MNIST)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = np.arange(n, dtype=np.uint8) % 10
        files = {f"{prefix}-images-idx3-ubyte": _idx(x, 0x803), f"{prefix}-labels-idx1-ubyte": _idx(y, 0x801)}
        for stem, data in files.items():
            with gzip.open(root / f"{stem}.gz", "wb") as fh:
                fh.write(data)
    return root


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    return write_fashion(tmp_path / "fashion")


def _keys(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


# -- the spec --------------------------------------------------------------------------------------


def test_parse_name_path_and_options() -> None:
    spec = DataSpec.parse("Fashion-MNIST:/data/f:mnist", ["train_size=1000", "val_size=0.05", "channels=x"])
    assert spec == DataSpec("fashion-mnist", "/data/f:mnist", {"train_size": 1000, "val_size": 0.05, "channels": "x"})
    assert DataSpec.parse("mnist").is_default and DataSpec().is_default
    assert not DataSpec("mnist", options={"split_seed": 1}).is_default
    assert DataSpec.from_dict(spec.to_dict()) == spec and DataSpec.from_dict("npz:/a.npz") == DataSpec("npz", "/a.npz")
    assert spec.text() == 'fashion-mnist:/data/f:mnist channels="x" train_size=1000 val_size=0.05'


@pytest.mark.parametrize(
    ("text", "options", "match"),
    [("npz:", [], "empty path"), ("", [], "needs a data set name"), ("npz:/a", ["size"], "KEY=VALUE")],
)
def test_parse_refuses_malformed_specs(text: str, options: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DataSpec.parse(text, options)


def test_data_card_round_trip_and_malformed() -> None:
    card = DataCard(DataSpec("npz", "/x.npz", {"val_size": 3}), "ab" * 32, ("a", "b"), (3, 32, 32))
    assert DataCard.from_dict(card.to_dict()) == card and card.num_classes == 2
    with pytest.raises(ConfigError, match="image_shape"):
        DataCard.from_dict({"spec": {"name": "mnist"}, "sha256": "x", "classes": []})


# -- resolving -------------------------------------------------------------------------------------


def test_the_default_spec_is_the_embedded_digits_with_their_fixed_splits() -> None:
    data, fixed = resolve_data(), mnist_splits()
    for split in ("train", "val", "test", "attacker"):
        assert torch.equal(getattr(data, split).x, getattr(fixed, split).x)
        assert torch.equal(getattr(data, split).targets, getattr(fixed, split).targets)
    assert data.name == "mnist" and data.image_shape == (1, 28, 28) and data.classes == tuple("0123456789")
    assert data.hashed == "arrays" and len(data.sha256) == 64
    assert data.describe()["splits"] == {"train": 3500, "val": 300, "test": 1000, "attacker": 200}
    other = resolve_data(DataSpec("mnist", options={"split_seed": 1}))
    assert not torch.equal(other.train.x, data.train.x) and other.sha256 == data.sha256  # same digits, other split


def test_fashion_mnist_splits_come_from_its_own_files(fashion_dir: Path) -> None:
    spec = DataSpec("fashion-mnist", str(fashion_dir))
    data = resolve_data(spec)
    assert data.classes == FASHION_CLASSES and data.num_classes == 10 and data.image_shape == (1, 28, 28)
    assert [len(getattr(data, s)) for s in ("train", "val", "test", "attacker")] == [176, 20, 50, 4]
    assert torch.bincount(data.val.targets, minlength=10).tolist() == [2] * 10  # stratified
    keys = {s: _keys(getattr(data, s).x) for s in ("train", "val", "attacker")}
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["attacker"])
    assert not (keys["val"] & keys["attacker"])
    with gzip.open(fashion_dir / "t10k-images-idx3-ubyte.gz") as fh:  # the test split is the test file, in order
        raw = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    assert torch.equal(data.test.x[:, 0], torch.from_numpy(raw.copy()).float() / 255)
    # the content hash is over the files read: name and sha256 of each, in a fixed order
    total = hashlib.sha256()
    for stem in STEMS:
        digest = hashlib.sha256((fashion_dir / f"{stem}.gz").read_bytes()).hexdigest()
        assert data.files[f"{stem}.gz"] == digest
        total.update(f"{stem}.gz\0{digest}\n".encode())
    assert data.hashed == "files" and data.sha256 == total.hexdigest()
    _cached.cache_clear()  # a fresh resolution gives the same splits
    again = resolve_data(spec)
    assert torch.equal(again.train.x, data.train.x) and torch.equal(again.attacker.targets, data.attacker.targets)


def test_split_options_change_sizes_and_caps(fashion_dir: Path) -> None:
    opts = {"val_size": 30, "attacker_size": 0.1, "train_size": 50, "test_size": 20, "split_seed": 3}
    data = resolve_data(DataSpec("fashion-mnist", str(fashion_dir), opts))
    assert [len(getattr(data, s)) for s in ("train", "val", "test", "attacker")] == [50, 30, 20, 20]
    assert torch.bincount(data.train.targets, minlength=10).tolist() == [5] * 10
    with pytest.raises(ConfigError, match="asks for 500 images"):
        resolve_data(DataSpec("fashion-mnist", str(fashion_dir), {"val_size": 500}))


def test_a_single_labelled_set_is_split_stratified(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", x=x, y=np.arange(100) % 5)
    data = resolve_data(DataSpec("npz", str(tmp_path / "rgb.npz")))
    assert data.image_shape == (3, 32, 32) and data.classes == ("0", "1", "2", "3", "4")
    assert [len(getattr(data, s)) for s in ("train", "val", "test", "attacker")] == [70, 6, 20, 4]
    assert data.hashed == "files" and data.sha256 != resolve_data().sha256


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        (DataSpec("nope"), UnknownComponent, "valid datasets: .*fashion-mnist"),
        (DataSpec("fashion-mnist", options={"size": 3}), ConfigError, "does not take option.*size.*valid: "),
        (DataSpec("mnist", options={"val_size": 3}), ConfigError, "valid: split_seed"),
        (DataSpec("mnist", "/somewhere"), ConfigError, "built in and takes no path"),
        (DataSpec("patches"), ConfigError, "has no labels"),
        (DataSpec("npz"), ConfigError, "needs a path"),
        (DataSpec("fashion-mnist", options={"val_size": -1}), ConfigError, "count >= 0 or a fraction"),
    ],
)
def test_bad_specs_are_one_clear_error(spec: DataSpec, error: type[Exception], match: str, fashion_dir: Path) -> None:
    if spec.name == "fashion-mnist":
        spec = DataSpec(spec.name, str(fashion_dir), spec.options)
    with pytest.raises(error, match=match) as info:
        resolve_data(spec)
    assert "\n" not in str(info.value)


def test_missing_fashion_files_name_the_package_and_the_path(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError) as info:
        check_spec(DataSpec("fashion-mnist", str(tmp_path / "absent")))
    text = str(info.value)
    assert "dataset-fashion-mnist" in text and str(tmp_path / "absent") in text and "\n" not in text
    (tmp_path / "empty").mkdir()
    hint = f"not in {tmp_path / 'empty'}; install the Debian package dataset-fashion-mnist"
    with pytest.raises(ArtifactError, match=hint):
        resolve_data(DataSpec("fashion-mnist", str(tmp_path / "empty")))


# -- pools and defaults ----------------------------------------------------------------------------


def test_pools_are_drawn_at_the_victims_shape(fashion_dir: Path) -> None:
    grey = load_pool("patches", (1, 28, 28))
    assert torch.equal(grey.x, natural_patches(5000, 28).x)  # the pool every MNIST result used
    colour = load_pool("patches", (3, 32, 32), n=50)
    assert colour.x.shape == (50, 3, 32, 32)
    assert not torch.equal(colour.x[:, 0], colour.x[:, 1])  # real colour, not grey copied thrice
    assert load_pool("noise", (3, 16, 16)).x.shape[1:] == (3, 16, 16)
    data = resolve_data(DataSpec("fashion-mnist", str(fashion_dir)))
    assert load_pool("fashion-mnist-attacker", (1, 28, 28), data) is data.attacker
    assert torch.equal(load_pool("mnist-attacker", (1, 28, 28), resolve_data()).x, mnist_splits().attacker.x)
    with pytest.raises(ConfigError, match=r"pool 'digits28' has images \(1, 32, 32\), the victim takes \(3, 32, 32\)"):
        load_pool("digits28", (3, 32, 32))


def test_defaults_per_data_set_and_shape() -> None:
    assert other_real_set("fashion-mnist") == "mnist" and other_real_set("mnist") == "fashion-mnist"
    pools = attacker_pools("fashion-mnist", (1, 28, 28))
    assert {k: v.pool for k, v in pools.items()} == {
        "id_seeds": "fashion-mnist-attacker",
        "photos": "patches",
        "digits28": "digits28",
        "other": "mnist",
    }
    assert set(attacker_pools("cifar10", (3, 32, 32))) == {"id_seeds", "photos"}
    assert default_pool("id_seeds", "mnist", (1, 28, 28)) == "mnist-attacker"
    assert default_pool("natural", "fashion-mnist", (1, 28, 28)) == "patches"
    assert augmentation("fashion-mnist", (1, 28, 28)) == {"max_shift": 2, "hflip": True}
    assert augmentation("mnist", (1, 28, 28)) == {"max_shift": 2, "hflip": False}
    assert augmentation("cifar10", (3, 32, 32)) == {"max_shift": 4, "hflip": True}
    assert threshold_family(3) == "mnist" and threshold_family(4) == "cifar10"


def test_a_saved_model_remembers_its_data(fashion_dir: Path, tmp_path: Path) -> None:
    card = resolve_data(DataSpec("fashion-mnist", str(fashion_dir))).card()
    model = create_model("lenet5")
    model.data_card = card
    save_model(model, tmp_path / "m")
    assert load_model(tmp_path / "m").data_card == card
    assert load_model(save_model(create_model("lenet5"), tmp_path / "plain")).data_card is None


# -- the real files (slow; skipped where the Debian package is not installed) -----------------------


@pytest.mark.slow
def test_the_real_fashion_mnist_files() -> None:
    from fortress.data.registry import FASHION_MNIST_DIR

    if not all((FASHION_MNIST_DIR / f"{stem}.gz").is_file() for stem in STEMS):
        pytest.skip(f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")
    data = resolve_data(DataSpec("fashion-mnist"))
    assert [len(getattr(data, s)) for s in ("train", "val", "test", "attacker")] == [52_800, 6_000, 10_000, 1_200]
    assert data.classes == FASHION_CLASSES and data.image_shape == (1, 28, 28)
    assert torch.bincount(data.test.targets).tolist() == [1000] * 10
    assert torch.bincount(data.val.targets).tolist() == [600] * 10
    _cached.cache_clear()
    assert resolve_data(DataSpec("fashion-mnist")).sha256 == data.sha256
