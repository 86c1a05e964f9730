"""Tests for fortress.data: the embedded splits, pools, user-data loaders and the dataset registry.

Every loader test writes small files in the real on-disk format itself (nothing is downloaded).
"""

from __future__ import annotations

import gzip
import os
import pickle
import shlex
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fortress.data import (
    DATASETS,
    ImageSet,
    MnistSplits,
    digits28,
    load_cifar,
    load_dataset,
    load_image_folder,
    load_mnist_idx,
    load_npz,
    mnist_all,
    mnist_splits,
    natural_patches,
    noise_images,
)
from fortress.errors import ArtifactError, ConfigError, UnknownComponent

SPLIT_SIZES = {"train": 3500, "val": 300, "test": 1000, "attacker": 200}


def _assert_contract(s: ImageSet, shape: tuple[int, ...]) -> None:
    assert s.x.dtype == torch.float32
    assert tuple(s.x.shape) == shape
    assert float(s.x.min()) >= 0.0
    assert float(s.x.max()) <= 1.0
    if s.y is not None:
        assert s.y.dtype == torch.int64
        assert s.y.shape == (shape[0],)


def _to_u8(x: torch.Tensor) -> np.ndarray:
    """Undo the 1/255 scaling exactly."""
    return (x * 255).round().to(torch.uint8).numpy()


# ------------------------------------------------------------------------------------ embedded data


@pytest.fixture(scope="module")
def splits() -> MnistSplits:
    return mnist_splits(0)


def _image_keys(s: ImageSet) -> list[bytes]:
    return [row.numpy().tobytes() for row in s.x]


def test_embedded_split_sizes_stratified_and_contract(splits: MnistSplits) -> None:
    for name, size in SPLIT_SIZES.items():
        s: ImageSet = getattr(splits, name)
        _assert_contract(s, (size, 1, 28, 28))
        assert s.classes == tuple(str(i) for i in range(10))
        assert s.name == f"mnist-{name}"
        assert s.y is not None
        assert torch.bincount(s.y, minlength=10).tolist() == [size // 10] * 10


def test_embedded_splits_pairwise_disjoint_and_cover_all(splits: MnistSplits) -> None:
    full = mnist_all()
    _assert_contract(full, (5000, 1, 28, 28))
    index = {key: i for i, key in enumerate(_image_keys(full))}
    assert len(index) == 5000, "the embedded digits are expected to be pairwise distinct"
    seen: set[int] = set()
    for name in SPLIT_SIZES:
        s: ImageSet = getattr(splits, name)
        idx = [index[key] for key in _image_keys(s)]
        assert len(set(idx)) == len(idx)
        assert seen.isdisjoint(idx), f"split {name} overlaps an earlier split"
        seen.update(idx)
        assert full.y is not None
        assert s.y is not None
        assert torch.equal(full.y[idx], s.y)  # labels travel with their images
    assert len(seen) == 5000


def test_embedded_splits_deterministic_per_seed(splits: MnistSplits) -> None:
    again = mnist_splits(0)
    other = mnist_splits(1)
    for name in SPLIT_SIZES:
        assert torch.equal(getattr(splits, name).x, getattr(again, name).x)
        assert torch.equal(getattr(splits, name).y, getattr(again, name).y)
    assert not torch.equal(splits.train.x, other.train.x)
    assert set(_image_keys(splits.test)) != set(_image_keys(other.test))


def test_digits28() -> None:
    d = digits28()
    _assert_contract(d, (1797, 1, 28, 28))
    assert d.classes == tuple(str(i) for i in range(10))
    assert float(d.x.max()) > 0.5


def test_natural_patches_deterministic_shapes_ranges() -> None:
    a = natural_patches(20, seed=3)
    b = natural_patches(20, seed=3)
    c = natural_patches(20, seed=4)
    _assert_contract(a, (20, 1, 28, 28))
    assert a.y is None
    assert torch.equal(a.x, b.x)
    assert not torch.equal(a.x, c.x)
    rgb = natural_patches(4, size=16, channels=3, seed=0)
    _assert_contract(rgb, (4, 3, 16, 16))


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "smooth"])
def test_noise_images_deterministic_shapes_ranges(kind: Any) -> None:
    a = noise_images(8, (3, 14, 14), kind=kind, seed=5)
    b = noise_images(8, (3, 14, 14), kind=kind, seed=5)
    c = noise_images(8, (3, 14, 14), kind=kind, seed=6)
    _assert_contract(a, (8, 3, 14, 14))
    assert torch.equal(a.x, b.x)
    assert not torch.equal(a.x, c.x)


@pytest.mark.parametrize("n", [0, -3])
def test_pools_reject_bad_n(n: int) -> None:
    with pytest.raises(ConfigError, match=str(n)):
        natural_patches(n)
    with pytest.raises(ConfigError, match=str(n)):
        noise_images(n)


def test_noise_rejects_unknown_kind() -> None:
    with pytest.raises(ConfigError, match="plaid"):
        noise_images(2, kind="plaid")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- IDX


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def _write(path: Path, data: bytes, gz: bool) -> None:
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def _mnist_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def _write_idx_split(root: Path, prefix: str, n: int, seed: int, gz: bool) -> tuple[np.ndarray, np.ndarray]:
    x, y = _mnist_arrays(n, seed)
    _write(root / f"{prefix}-images-idx3-ubyte", _idx_bytes(x, 0x803), gz)
    _write(root / f"{prefix}-labels-idx1-ubyte", _idx_bytes(y, 0x801), gz)
    return x, y


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    x_tr, y_tr = _write_idx_split(tmp_path, "train", 7, 0, gz)
    x_te, y_te = _write_idx_split(tmp_path, "t10k", 3, 1, gz)
    train = load_mnist_idx(tmp_path)
    test = load_mnist_idx(tmp_path, "test")
    for s, x, y in ((train, x_tr, y_tr), (test, x_te, y_te)):
        _assert_contract(s, (len(x), 1, 28, 28))
        assert np.array_equal(_to_u8(s.x)[:, 0], x)
        assert torch.equal(s.x, torch.from_numpy(x).float().div(255).unsqueeze(1))
        assert s.y is not None
        assert s.y.tolist() == y.tolist()
        assert s.classes == tuple(str(i) for i in range(10))


def test_idx_truncated_image_file(tmp_path: Path) -> None:
    x, y = _mnist_arrays(4, 0)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(x, 0x803)[:-10])
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(y, 0x801))
    with pytest.raises(ArtifactError, match=r"train-images-idx3-ubyte is truncated"):
        load_mnist_idx(tmp_path)


def test_idx_truncated_header(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">II", 0x803, 4))
    _, y = _mnist_arrays(4, 0)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(y, 0x801))
    with pytest.raises(ArtifactError, match=r"train-images-idx3-ubyte is truncated.*header"):
        load_mnist_idx(tmp_path)


def test_idx_wrong_magic(tmp_path: Path) -> None:
    x, y = _mnist_arrays(4, 0)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(x, 0x803))
    # a labels file carrying the images magic number (e.g. the two files swapped)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(y, 0x803))
    with pytest.raises(ArtifactError, match=r"train-labels-idx1-ubyte has IDX magic number 0x00000803.*0x00000801"):
        load_mnist_idx(tmp_path)


def test_idx_label_count_mismatch(tmp_path: Path) -> None:
    x, y = _mnist_arrays(5, 0)
    _write(tmp_path / "t10k-images-idx3-ubyte", _idx_bytes(x, 0x803), gz=True)
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx_bytes(y[:4], 0x801), gz=True)
    with pytest.raises(ArtifactError, match=r"t10k-labels-idx1-ubyte.gz holds 4 labels.*5 images"):
        load_mnist_idx(tmp_path, "test")


def test_idx_corrupt_gzip_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"definitely not gzip")
    _, y = _mnist_arrays(2, 0)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(y, 0x801))
    with pytest.raises(ArtifactError, match=r"train-images-idx3-ubyte.gz"):
        load_mnist_idx(tmp_path)
    with pytest.raises(ArtifactError, match="t10k-images-idx3-ubyte"):
        load_mnist_idx(tmp_path, "test")
    with pytest.raises(ArtifactError, match="does not exist"):
        load_mnist_idx(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="valid"):
        load_mnist_idx(tmp_path, "valid")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- CIFAR


def _cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def _dump(path: Path, obj: object, protocol: int = 2) -> None:
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=protocol)


def _make_cifar10(parent: Path, protocol: int = 2, bytes_keys: bool = True) -> dict[str, Any]:
    """Write a miniature cifar-10-batches-py folder (2 images per train batch, 3 test images)."""
    root = parent / "cifar-10-batches-py"
    root.mkdir()

    def k(key: str) -> str | bytes:
        return key.encode() if bytes_keys else key

    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(
        root / "batches.meta",
        {k("num_cases_per_batch"): 2, k("label_names"): [k(n) for n in names], k("num_vis"): 3072},
        protocol,
    )
    train_x, train_y = [], []
    for i in range(1, 6):
        rows = _cifar_rows(2, i)
        labels = [(2 * i) % 10, (2 * i + 1) % 10]
        _dump(
            root / f"data_batch_{i}",
            {
                k("batch_label"): k(f"training batch {i} of 5"),
                k("labels"): labels,
                k("data"): rows,
                k("filenames"): [k(f"img_{i}_{j}.png") for j in range(2)],
            },
            protocol,
        )
        train_x.append(rows)
        train_y.extend(labels)
    test_rows = _cifar_rows(3, 99)
    test_rows[0, :1024], test_rows[0, 1024:2048], test_rows[0, 2048:] = 10, 20, 30  # pure R, G, B planes
    _dump(
        root / "test_batch",
        {
            k("batch_label"): k("testing batch 1 of 1"),
            k("labels"): [9, 0, 4],
            k("data"): test_rows,
            k("filenames"): [k(f"t{j}.png") for j in range(3)],
        },
        protocol,
    )
    return {
        "root": root,
        "names": tuple(names),
        "train_x": np.concatenate(train_x),
        "train_y": train_y,
        "test_x": test_rows,
        "test_y": [9, 0, 4],
    }


def _make_cifar100(parent: Path) -> dict[str, Any]:
    root = parent / "cifar-100-python"
    root.mkdir()
    fine = [f"fine{i}".encode() for i in range(100)]
    coarse = [f"coarse{i}".encode() for i in range(20)]
    _dump(root / "meta", {b"fine_label_names": fine, b"coarse_label_names": coarse})
    out: dict[str, Any] = {"root": root}
    for split, n in (("train", 4), ("test", 2)):
        rows = _cifar_rows(n, n)
        fine_y = [int(v) for v in np.random.default_rng(n).integers(0, 100, n)]
        coarse_y = [v // 5 for v in fine_y]
        _dump(
            root / split,
            {
                b"filenames": [f"{split}{j}.png".encode() for j in range(n)],
                b"batch_label": f"{split} batch".encode(),
                b"fine_labels": fine_y,
                b"coarse_labels": coarse_y,
                b"data": rows,
            },
        )
        out[split] = (rows, fine_y, coarse_y)
    return out


def _expected_cifar(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 3, 32, 32)


@pytest.mark.parametrize(("protocol", "bytes_keys"), [(2, True), (4, True), (5, True), (2, False)])
def test_cifar10_round_trip(tmp_path: Path, protocol: int, bytes_keys: bool) -> None:
    ref = _make_cifar10(tmp_path, protocol, bytes_keys)
    train = load_cifar(tmp_path)  # the parent of the extracted folder
    test = load_cifar(ref["root"], "test")  # the extracted folder itself
    _assert_contract(train, (10, 3, 32, 32))
    _assert_contract(test, (3, 3, 32, 32))
    assert np.array_equal(_to_u8(train.x), _expected_cifar(ref["train_x"]))
    assert np.array_equal(_to_u8(test.x), _expected_cifar(ref["test_x"]))
    assert train.y is not None
    assert train.y.tolist() == ref["train_y"]
    assert test.y is not None
    assert test.y.tolist() == ref["test_y"]
    assert train.classes == test.classes == ref["names"]
    # channel planes: R, then G, then B, each 32x32 row-major
    assert torch.all(test.x[0, 0] == 10 / 255)
    assert torch.all(test.x[0, 1] == 20 / 255)
    assert torch.all(test.x[0, 2] == 30 / 255)
    row = ref["test_x"][1]
    assert test.x[1, 1, 5, 7] == torch.tensor(float(row[1024 + 5 * 32 + 7])) / 255


@pytest.mark.parametrize("label", ["fine", "coarse"])
def test_cifar100_round_trip(tmp_path: Path, label: Any) -> None:
    ref = _make_cifar100(tmp_path)
    for split in ("train", "test"):
        s = load_cifar(tmp_path, split, variant="cifar100", label=label)
        rows, fine_y, coarse_y = ref[split]
        _assert_contract(s, (len(rows), 3, 32, 32))
        assert np.array_equal(_to_u8(s.x), _expected_cifar(rows))
        assert s.y is not None
        assert s.y.tolist() == (fine_y if label == "fine" else coarse_y)
        n = 100 if label == "fine" else 20
        assert s.classes == tuple(f"{label}{i}" for i in range(n))


def _py2_pickle_batch(rows: np.ndarray, labels: list[int]) -> bytes:
    """Hand-assemble a batch the way Python 2's cPickle wrote the official files (protocol 2).

    Unlike Python 3, it names ``numpy.core.multiarray`` and stores byte strings with the
    ``SHORT_BINSTRING``/``BINSTRING`` opcodes (no ``_codecs.encode`` calls).
    """

    def short(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b

    raw = rows.tobytes()
    out = b"\x80\x02}(" + short(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + short(b"b") + b"\x87R"
    out += b"(K\x01M" + struct.pack("<H", rows.shape[0]) + b"M" + struct.pack("<H", 3072) + b"\x86"
    out += b"cnumpy\ndtype\n" + short(b"u1") + b"K\x00K\x01\x87R"
    out += b"(K\x03" + short(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    out += b"\x89T" + struct.pack("<I", len(raw)) + raw + b"tb"
    out += short(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"eu."
    return out


def test_cifar_python2_pickles(tmp_path: Path) -> None:
    ref = _make_cifar10(tmp_path)
    rows = _cifar_rows(3, 7)
    blob = _py2_pickle_batch(rows, [5, 6, 7])
    assert pickle.loads(blob, encoding="bytes")[b"labels"] == [5, 6, 7]  # the hand-made pickle is valid
    (ref["root"] / "test_batch").write_bytes(blob)
    s = load_cifar(tmp_path, "test")
    assert np.array_equal(_to_u8(s.x), _expected_cifar(rows))
    assert s.y is not None
    assert s.y.tolist() == [5, 6, 7]


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


class _EvalEvil:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (eval, ("1 + 1",))


def test_cifar_refuses_malicious_pickle(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    ref = _make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    payload = {b"data": _Evil(f"echo pwned; touch {shlex.quote(str(marker))}"), b"labels": [0]}
    _dump(ref["root"] / "test_batch", payload)
    with pytest.raises(ArtifactError, match=rf"refusing to unpickle {os.system.__module__}\.system from .*test_batch"):
        load_cifar(tmp_path, "test")
    assert not marker.exists()
    assert "pwned" not in capfd.readouterr().out
    _dump(ref["root"] / "batches.meta", {b"label_names": _EvalEvil()}, protocol=4)
    with pytest.raises(ArtifactError, match=r"refusing to unpickle builtins\.eval from .*batches\.meta"):
        load_cifar(tmp_path, "train")


def test_cifar_refuses_array_subclasses(tmp_path: Path) -> None:
    ref = _make_cifar10(tmp_path)
    _dump(ref["root"] / "test_batch", {b"data": np.ma.masked_array(_cifar_rows(3, 0)), b"labels": [0, 1, 2]})
    with pytest.raises(ArtifactError, match=r"refusing to unpickle numpy\.ma"):
        load_cifar(tmp_path, "test")


def test_cifar_malformed_files(tmp_path: Path) -> None:
    ref = _make_cifar10(tmp_path)
    root = ref["root"]
    _dump(root / "test_batch", {b"data": _cifar_rows(3, 0), b"labels": [0, 1]})
    with pytest.raises(ArtifactError, match=r"test_batch has 3 images.*'labels'"):
        load_cifar(tmp_path, "test")
    _dump(root / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ArtifactError, match=r"test_batch 'data'.*\(N, 3072\)"):
        load_cifar(tmp_path, "test")
    _dump(root / "test_batch", {b"labels": [0, 1]})
    with pytest.raises(ArtifactError, match=r"test_batch has no 'data' entry; available keys: labels"):
        load_cifar(tmp_path, "test")
    _dump(root / "test_batch", [1, 2, 3])
    with pytest.raises(ArtifactError, match="holds a list, expected a dict"):
        load_cifar(tmp_path, "test")
    (root / "test_batch").write_bytes(pickle.dumps({b"data": _cifar_rows(1, 0)}, protocol=2)[:-40])
    with pytest.raises(ArtifactError, match=r"cannot unpickle .*test_batch"):
        load_cifar(tmp_path, "test")
    (root / "data_batch_3").unlink()
    with pytest.raises(ArtifactError, match="data_batch_3 does not exist"):
        load_cifar(tmp_path, "train")
    with pytest.raises(ArtifactError, match="neither cifar-100-python"):
        load_cifar(tmp_path, variant="cifar100")
    with pytest.raises(ArtifactError, match="does not exist"):
        load_cifar(tmp_path / "missing")
    with pytest.raises(ConfigError, match="coarse"):
        load_cifar(tmp_path, label="coarse")


# --------------------------------------------------------------------------------------- ImageFolder


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _make_tree(root: Path) -> dict[str, np.ndarray]:
    """Two classes of 4x5 RGB PNGs with known pixels (plus files that must be ignored)."""
    rng = np.random.default_rng(0)
    images = {
        "dog/b.png": rng.integers(0, 256, (4, 5, 3), dtype=np.uint8),
        "dog/a.png": rng.integers(0, 256, (4, 5, 3), dtype=np.uint8),
        "cat/x.png": rng.integers(0, 256, (4, 5, 3), dtype=np.uint8),
        "cat/sub/y.PNG": rng.integers(0, 256, (4, 5, 3), dtype=np.uint8),
    }
    for rel, arr in images.items():
        _png(root / rel, arr)
    (root / "cat" / "notes.txt").write_text("not an image")
    _png(root / ".hidden" / "z.png", np.zeros((9, 9, 3), np.uint8))
    return images


def test_image_folder_round_trip_rgb(tmp_path: Path) -> None:
    images = _make_tree(tmp_path)
    s = load_image_folder(tmp_path)
    _assert_contract(s, (4, 3, 4, 5))
    assert s.classes == ("cat", "dog")
    assert s.y is not None
    assert s.y.tolist() == [0, 0, 1, 1]
    order = ["cat/sub/y.PNG", "cat/x.png", "dog/a.png", "dog/b.png"]  # sorted paths within each class
    expected = np.stack([images[rel] for rel in order]).transpose(0, 3, 1, 2)
    assert np.array_equal(_to_u8(s.x), expected)


def test_image_folder_grey_and_resize(tmp_path: Path) -> None:
    level = np.arange(20, dtype=np.uint8).reshape(4, 5) * 12
    _png(tmp_path / "a" / "0.png", np.repeat(level[:, :, None], 3, axis=2))  # R = G = B
    _png(tmp_path / "b" / "0.png", np.full((6, 6, 3), 200, np.uint8))
    with pytest.raises(ArtifactError, match=r"differ in size.*pass size="):
        load_image_folder(tmp_path, channels=1)
    (tmp_path / "b" / "0.png").unlink()
    _png(tmp_path / "b" / "0.png", np.full((4, 5), 200, np.uint8))  # a grey-scale PNG
    grey = load_image_folder(tmp_path, channels=1)
    _assert_contract(grey, (2, 1, 4, 5))
    assert np.array_equal(_to_u8(grey.x[0, 0]), level)
    assert np.all(_to_u8(grey.x[1]) == 200)
    rgb = load_image_folder(tmp_path, channels=3, size=8)
    _assert_contract(rgb, (2, 3, 8, 8))
    assert np.all(_to_u8(rgb.x[1]) == 200)  # a constant image stays constant when resized


def test_image_folder_errors(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    bad = tmp_path / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ArtifactError, match=r"image .*broken\.png is not a readable image"):
        load_image_folder(tmp_path)
    bad.unlink()
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ArtifactError, match=r"without images.*empty_class"):
        load_image_folder(tmp_path)
    empty = tmp_path / "nothing"
    (empty / ".git").mkdir(parents=True)
    with pytest.raises(ArtifactError, match="no class sub-folders"):
        load_image_folder(empty)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(ConfigError, match="channels"):
        load_image_folder(tmp_path, channels=2)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- npz


def test_npz_nhwc_uint8(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 3, 4, 5], dtype=np.int32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    s = load_npz(tmp_path / "d.npz")
    _assert_contract(s, (6, 3, 5, 7))
    assert np.array_equal(_to_u8(s.x), x.transpose(0, 3, 1, 2))
    assert s.y is not None
    assert s.y.tolist() == y.tolist()


def test_npz_nchw_float_and_grey(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.random((4, 1, 8, 8)).astype(np.float64)
    grey = rng.integers(0, 256, (3, 9, 9), dtype=np.uint8)
    np.savez_compressed(tmp_path / "f.npz", images=x, grey=grey, labels=np.array([3, 1, 0, 2]))
    s = load_npz(tmp_path / "f.npz", x_key="images", y_key="labels")
    _assert_contract(s, (4, 1, 8, 8))
    assert torch.equal(s.x, torch.from_numpy(x.astype(np.float32)))
    assert s.y is not None
    assert s.y.tolist() == [3, 1, 0, 2]
    g = load_npz(tmp_path / "f.npz", x_key="grey", y_key=None)
    _assert_contract(g, (3, 1, 9, 9))
    assert g.y is None
    assert np.array_equal(_to_u8(g.x)[:, 0], grey)


def test_npz_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ArtifactError, match=r"no array 'x'; available keys: images"):
        load_npz(path)
    with pytest.raises(ArtifactError, match=r"no array 'y'; available keys: images"):
        load_npz(path, x_key="images")
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ArtifactError, match=r"cannot load array 'x'.*object"):
        load_npz(path, y_key=None)
    np.savez(path, x=np.full((2, 1, 4, 4), 255.0, np.float32))
    with pytest.raises(ArtifactError, match=r"values in \[255, 255\]; expected floats in \[0, 1\]"):
        load_npz(path, y_key=None)
    np.savez(path, x=np.zeros((2, 5, 4, 4), np.uint8))
    with pytest.raises(ArtifactError, match=r"shape \(2, 5, 4, 4\)"):
        load_npz(path, y_key=None)
    np.savez(path, x=np.zeros((2, 4, 4), np.uint8), y=np.zeros(3, np.int64))
    with pytest.raises(ArtifactError, match=r"'y' hold 3 entries for 2 images"):
        load_npz(path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ArtifactError, match=r"junk\.npz"):
        load_npz(tmp_path / "junk.npz")
    with pytest.raises(ArtifactError, match="does not exist"):
        load_npz(tmp_path / "missing.npz")


# ------------------------------------------------------------------------------------------ registry


def test_registry_names() -> None:
    assert set(DATASETS.names()) == {
        "mnist",
        "mnist-train",
        "mnist-val",
        "mnist-test",
        "mnist-attacker",
        "digits28",
        "patches",
        "noise",
        "mnist-idx",
        "fashion-mnist",
        "cifar10",
        "cifar100",
        "imagefolder",
        "npz",
    }
    for name in DATASETS:
        info = DATASETS.get(name)
        assert info.name == name
        assert info.description
        assert info.needs_path == (name in {"mnist-idx", "cifar10", "cifar100", "imagefolder", "npz"})


def test_load_dataset_embedded(splits: MnistSplits) -> None:
    assert len(load_dataset("mnist")) == 5000
    val = load_dataset("mnist-val", Path("/ignored"))
    assert torch.equal(val.x, splits.val.x)
    assert len(load_dataset("mnist-attacker", seed=1)) == 200
    _assert_contract(load_dataset("noise", n=5), (5, 1, 28, 28))
    _assert_contract(load_dataset("patches", n=3, size=12), (3, 1, 12, 12))


def test_load_dataset_default_pool_size() -> None:
    assert len(load_dataset("noise")) == 5000


def test_load_dataset_with_paths(tmp_path: Path) -> None:
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    x, _ = _write_idx_split(idx_dir, "t10k", 2, 0, gz=True)
    assert np.array_equal(_to_u8(load_dataset("mnist-idx", idx_dir, split="test").x)[:, 0], x)
    _make_cifar10(tmp_path)
    assert len(load_dataset("cifar10", str(tmp_path), split="test")) == 3
    _make_cifar100(tmp_path)
    assert load_dataset("cifar100", tmp_path, label="coarse").num_classes == 20
    _make_tree(tmp_path / "tree")
    assert load_dataset("imagefolder", tmp_path / "tree", size=3).x.shape == (4, 3, 3, 3)
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3, 3), np.uint8))
    assert load_dataset("npz", tmp_path / "d.npz", y_key=None).x.shape == (2, 1, 3, 3)


def test_load_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'cifar10' needs a path"):
        load_dataset("cifar10")
    with pytest.raises(ArtifactError, match=r"does not exist"):
        load_dataset("npz", tmp_path / "missing.npz")
    with pytest.raises(UnknownComponent, match=r"unknown dataset 'svhn'.*cifar10.*mnist-train.*npz"):
        load_dataset("svhn")
    with pytest.raises(ConfigError, match=r"does not take option\(s\) colour; valid options: n, shape, kind, seed"):
        load_dataset("noise", colour=True)
