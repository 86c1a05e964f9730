"""Users' own architectures: a small user package on ``sys.path`` (a factory path and a ``fortress.models``
entry point declared by a dist-info) is trained, protected, saved, reloaded in a fresh process, served on a
real socket and attacked through the CLI, with identical answers throughout; imported weights; every bad
factory or weights file is one line before any training."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import fortress
from fortress.bench.records import read_records
from fortress.bench.steps import protect_saved
from fortress.cli import app
from fortress.config import ProtectConfig, protect_overrides
from fortress.defenses import load_defense
from fortress.errors import ArtifactError, ModelFactoryError
from fortress.exits import EarlyExitNet
from fortress.models import Staging, build_model, load_model, stage_by_names
from fortress.oracle import HttpOracle, LocalOracle
from fortress.serve import KeyStore
from serve_harness import Served

runner = CliRunner()
PKG = "fortress_userpkg"

NETS = '''
import torch
from torch import nn
from fortress.models import stage_by_names


class TinyNet(nn.Module):
    """A stem, two blocks, pooling, flattening and a linear head (laid out like torchvision's ResNet)."""

    def __init__(self, num_classes=10, in_channels=1, width=4):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.act = nn.ReLU()
        self.block1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x):
        x = self.act(self.stem(x))
        x = self.block2(self.block1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class SkipNet(TinyNet):
    def forward(self, x):
        h = self.act(self.stem(x))
        y = self.block1(h)
        y = self.block2(y + h[:, :, ::2, ::2])
        return self.fc(torch.flatten(self.pool(y), 1))


def build(num_classes, in_channels, width=4):
    return TinyNet(num_classes, in_channels, width)


def staged(num_classes, in_channels, image_size, width=4):
    net = TinyNet(num_classes, in_channels, width)
    shape = (in_channels, image_size, image_size)
    return stage_by_names(net, ["block1", "block2"], "fc", input_shape=shape, num_classes=num_classes)


def skipnet(num_classes, in_channels):
    return SkipNet(num_classes, in_channels)


def not_a_module(num_classes):
    return 42


def fails(num_classes):
    raise RuntimeError("out of widgets")
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A user package with its architectures, registered as ``fortress.models`` entry point ``tinyarch``."""
    root = tmp_path_factory.mktemp("site")
    pkg = root / PKG
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(NETS))
    (pkg / "raises_on_import.py").write_text("raise RuntimeError('needs a licence server')\n")
    dist = root / f"{PKG}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PKG}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[fortress.models]\ntinyarch = {PKG}.nets:staged\n")
    src = Path(fortress.__file__).resolve().parents[1]
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        mp.setenv("PYTHONPATH", os.pathsep.join([str(root), str(src), os.environ.get("PYTHONPATH", "")]))
        yield root
    for name in [m for m in sys.modules if m == PKG or m.startswith(PKG + ".")]:
        del sys.modules[name]


def invoke(*args: str) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def fresh_answers(defense_dir: Path, x_file: Path, out: Path, env: dict[str, str] | None = None) -> np.ndarray:
    """The saved defense's answers to the images in ``x_file``, computed by a fresh Python process."""
    code = (
        "import sys, numpy as np, torch; torch.set_num_threads(1)\n"
        "from fortress.defenses import load_defense\n"
        "from fortress.oracle import LocalOracle\n"
        "x = torch.from_numpy(np.load(sys.argv[2]))\n"
        "np.save(sys.argv[3], LocalOracle(load_defense(sys.argv[1])).query(x).numpy())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(defense_dir), str(x_file), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.load(out)


def test_a_users_model_is_trained_protected_reloaded_served_and_attacked(site: Path, tmp_path: Path) -> None:
    victim, dnf_dir = tmp_path / "victim", tmp_path / "dnf"
    arch = f"{PKG}.nets:build"
    invoke("train-victim", "--arch", arch, "--arch-param", "width=6", "--stages", "block1,block2",
           "--classifier", "fc", "--epochs", "2", "--lr", "3e-3", "--out", victim, "--threads", "1")  # fmt: skip
    saved = load_model(victim)
    assert saved.arch == arch and saved.arch_params == {"num_classes": 10, "in_channels": 1, "width": 6}
    assert saved.staging is not None and saved.staging["stages"] == ["block1", "block2"]
    assert [tuple(s) for s in saved.stage_shapes] == [(6, 14, 14), (12, 7, 7)]

    cfg = protect_overrides(ProtectConfig(), epochs=1, ood="noise", seed=0)
    made = protect_saved(victim, dnf_dir, cfg)  # what `fortress protect` runs
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    before = LocalOracle(made.dnf).query(x)
    assert before.shape == (64, 10)
    np.save(tmp_path / "x.npy", x.numpy())
    after = torch.from_numpy(fresh_answers(dnf_dir, tmp_path / "x.npy", tmp_path / "after.npy"))
    assert torch.equal(before, after)

    store = KeyStore(tmp_path / "keys.db", create=True)
    _, secret = store.add("user")
    with Served(dnf_dir, tmp_path / "keys.db", tmp_path / "server.log") as server:
        with HttpOracle(server.url, secret) as remote:
            assert torch.equal(remote.query(x), before)
        out = invoke("attack", "knockoff", "--target", server.url, "--api-key", secret, "--reference", dnf_dir,
                     "--budget", "200", "--pool", "digits28", "--param", "epochs=1", "--clone", "tinyarch",
                     "--out", tmp_path / "attack", "--threads", "1")  # fmt: skip
        assert "record appended" in out
    assert store.authenticate(secret).used == 64 + 200
    store.close()
    (rec,) = read_records(tmp_path / "attack" / "results.jsonl")
    assert rec.defense == "dnf" and rec.victim_arch == arch and rec.clone_arch == "tinyarch"
    assert rec.queries_used == 200 and 0.0 <= rec.clone_acc <= 1.0


def test_import_model_takes_a_users_trained_weights(site: Path, tmp_path: Path) -> None:
    nets = __import__(f"{PKG}.nets", fromlist=["TinyNet"])
    torch.manual_seed(11)
    net = nets.TinyNet(10, 1, 4).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # weights no fresh initialisation gives
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = net(x)

    out = invoke("import-model", "--arch", f"{PKG}.nets:build", "--weights", tmp_path / "w.safetensors",
                 "--stages", "block1,block2", "--classifier", "fc", "--out", tmp_path / "by-factory")  # fmt: skip
    assert "ID test accuracy" in out
    # the registered entry point stages the network itself; the user's own tensor names still fit it
    invoke("import-model", "--arch", "tinyarch", "--weights", tmp_path / "w.safetensors", "--out", tmp_path / "by-ep")
    assert "tinyarch" in invoke("list", "models")
    for d in ("by-factory", "by-ep"):
        with torch.no_grad():
            assert torch.equal(load_model(tmp_path / d)(x), want), d
    code = (
        "import sys, torch; from fortress.models import load_model\n"
        "m = load_model(sys.argv[1]); x = torch.load(sys.argv[2]); torch.save(m(x).detach(), sys.argv[3])\n"
    )
    torch.save(x, tmp_path / "x.pt")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "by-ep"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "y.pt"), want)

    invoke("protect", tmp_path / "by-factory", "--out", tmp_path / "dnf", "--epochs", "1", "--ood", "noise",
           "--threads", "1")  # fmt: skip
    dnf = load_defense(tmp_path / "dnf")
    with torch.no_grad():  # the protected model's final exit is the user's network
        assert torch.equal(dnf.victim(x), want)


def test_staging_by_names_computes_the_users_forward_and_dnf_dynamic_equals_full(site: Path) -> None:
    nets = __import__(f"{PKG}.nets", fromlist=["TinyNet"])
    torch.manual_seed(0)
    net = nets.TinyNet(10, 1, 4).eval()
    staged = stage_by_names(net, ["block1", "block2"], "fc", input_shape=(1, 28, 28), num_classes=10).eval()
    x = torch.rand(50, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(staged(x), net(x))
    part = {"stem": "stages.0", "block1": "stages.0", "block2": "stages.1", "fc": "classifier"}
    assert sorted(staged.state_dict()) == sorted(f"{part[k.split('.')[0]]}.{k}" for k in net.state_dict())
    ee = EarlyExitNet(staged, head_kind="plain").eval()
    with torch.no_grad():
        conf = torch.softmax(ee.forward_all(x).mean_logits[:-1], dim=2).amax(dim=2)
        ee.set_thresholds([float(c.median()) for c in conf])  # about half the rows leave at head 0, some at 1
        ld, ed = ee.forward_dynamic(x)
        ls, es = ee.forward_static(x)
    assert torch.equal(ed, es) and torch.allclose(ld, ls, atol=1e-5)
    assert len(set(ed.tolist())) == ee.num_exits  # every exit is taken by some row


def test_nested_modules_are_staged_by_dotted_names() -> None:
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("stem", nn.Conv2d(1, 4, 3, padding=1))
    net.add_module(
        "blocks", nn.Sequential(*[nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(3)])
    )
    net.add_module("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    net.add_module("fc", nn.Linear(4, 10))
    net.eval()
    staging = Staging(("blocks.0", "blocks.2"), "fc")
    staged = stage_by_names(net, staging.stages, staging.classifier, input_shape=(1, 8, 8), num_classes=10).eval()
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(staged(x), net(x))
    assert staged.num_stages == 2 and "stages.1.blocks.1.0.weight" in staged.state_dict()


BAD = [
    (["--arch", f"{PKG}.nosuch:build"], f"cannot import module '{PKG}.nosuch'"),
    (["--arch", f"{PKG}.raises_on_import:build"], "RuntimeError: needs a licence server"),
    (["--arch", f"{PKG}.nets:missing"], "has no attribute 'missing'"),
    (["--arch", f"{PKG}.nets:not_a_module"], "returns int, not a torch.nn.Module"),
    (["--arch", f"{PKG}.nets:fails"], "RuntimeError: out of widgets"),
    (["--arch", f"{PKG}.nets:build"], "name its stages and classifier"),
    (["--arch", f"{PKG}.nets:build", "--stages", "block1"], "--stages and --classifier go together"),
    (
        [
            "--arch",
            f"{PKG}.nets:build",
            "--stages",
            "block1,block2",
            "--classifier",
            "fc",
            "--arch-param",
            "num_classes=3",
        ],
        "output per image has shape (3,)",
    ),
    (["--arch", f"{PKG}.nets:build", "--stages", "block1,block9", "--classifier", "fc"], "has no module 'block9'"),
    (["--arch", f"{PKG}.nets:skipnet", "--stages", "block1,block2", "--classifier", "fc"], "skip connection"),
    (["--arch", "tinyarch", "--stages", "block1", "--classifier", "fc"], "returns a staged network already"),
    (["--arch", "nosuchnet"], "unknown model 'nosuchnet'"),
]


@pytest.mark.parametrize(("args", "needle"), BAD, ids=[n for _, n in BAD])
def test_a_bad_factory_is_one_line_before_any_training(
    args: list[str], needle: str, site: Path, tmp_path: Path
) -> None:
    res = runner.invoke(app, ["train-victim", *args, "--out", str(tmp_path / "v"), "--epochs", "1"])
    assert res.exit_code == 1, res.output
    assert needle in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "v").exists()


def test_weights_that_do_not_fit_are_one_line_naming_the_file_and_tensor(site: Path, tmp_path: Path) -> None:
    nets = __import__(f"{PKG}.nets", fromlist=["TinyNet"])
    state = nets.TinyNet(10, 1, 4).state_dict()
    cases = {
        "missing.safetensors": ({k: v for k, v in state.items() if k != "fc.bias"}, "missing ['fc.bias']"),
        "extra.safetensors": ({**state, "head2.weight": torch.zeros(2)}, "unexpected ['head2.weight']"),
        "narrow.safetensors": (nets.TinyNet(10, 1, 3).state_dict(), "'stem.weight' has shape (3, 1, 3, 3)"),
    }
    common = ["--arch", f"{PKG}.nets:build", "--stages", "block1,block2", "--classifier", "fc"]
    for name, (tensors, needle) in cases.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / name))
        res = runner.invoke(
            app, ["import-model", *common, "--weights", str(tmp_path / name), "--out", str(tmp_path / "m")]
        )
        assert res.exit_code == 1 and needle in res.output and name in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "m").exists(), res.output
    res = runner.invoke(
        app, ["import-model", *common, "--weights", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "m")]
    )
    assert res.exit_code == 1 and "weights file not found" in res.output
    with pytest.raises(ArtifactError, match=r"stages\.0\.stem\.weight"):  # staged names fit a staged network too
        build_model(
            "tinyarch", None, input_shape=(1, 28, 28), num_classes=10, weights={"stages.0.stem.weight": torch.zeros(1)}
        )


def test_a_saved_users_model_whose_package_is_gone_is_one_line(site: Path, tmp_path: Path) -> None:
    nets = __import__(f"{PKG}.nets", fromlist=["TinyNet"])
    save_file(nets.TinyNet(10, 1, 4).state_dict(), str(tmp_path / "w.safetensors"))
    invoke("import-model", "--arch", f"{PKG}.nets:build", "--stages", "block1,block2", "--classifier", "fc",
           "--weights", tmp_path / "w.safetensors", "--out", tmp_path / "v")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(fortress.__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "fortress", "attack", "knockoff", "--target", str(tmp_path / "v"), "--budget", "10",
         "--out", str(tmp_path / "a"), "--pool", "digits28"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert str(tmp_path / "v" / "model.json") in line and f"cannot import module '{PKG}.nets'" in line


def test_factory_arguments_must_be_json_values(site: Path) -> None:
    staging = Staging(("block1", "block2"), "fc")
    with pytest.raises(ModelFactoryError, match=r"width=.* is not a JSON value"):
        build_model(f"{PKG}.nets:build", {"width": nn.ReLU()}, input_shape=(1, 28, 28), num_classes=10, staging=staging)
    with pytest.raises(ModelFactoryError, match=r"must be written package\.module:function"):
        build_model("not a path:", None, input_shape=(1, 28, 28), num_classes=10)


def test_a_grid_victim_names_a_factory_and_its_staging_and_builtin_keys_stay() -> None:
    from fortress.bench.grid import victim_artifact_key, victim_key_view
    from fortress.config import VictimConfig, from_dict

    table = {
        "arch": f"{PKG}.nets:build",
        "arch_params": {"width": 8},
        "staging": {"stages": ["block1", "block2"], "classifier": "fc"},
    }
    v = from_dict(VictimConfig, table, where="victims[0]")
    assert v.staging == Staging(("block1", "block2"), "fc") and v.arch_params == {"width": 8}
    assert victim_key_view(v)["staging"]["stages"] == ["block1", "block2"]
    assert ":" not in victim_artifact_key(v)
    # a built-in victim's key view is what it was before users' models existed (cells keep their keys)
    assert set(victim_key_view(VictimConfig())) == {
        "arch",
        "epochs",
        "lr",
        "batch_size",
        "max_shift",
        "seed",
        "dataset",
    }
