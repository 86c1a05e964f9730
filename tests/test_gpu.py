"""The equivalence and contract tests again, on a CUDA device (skipped, with the reason, without one).

* dynamic == full: ``forward_dynamic`` gives the exits and outputs of ``forward_static`` on the GPU;
* every defense answers probability rows on the GPU, on the caller's device through the oracle, and
  the rows match its CPU answers;
* every attack spends exactly what it reports, never more than its budget, with its clone and the
  oracle's defense on the GPU;
* a grid cell, a victim's training and a DNF protection run end to end on ``cuda`` and record it.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch

from fortress.attacks import ATTACKS
from fortress.data.embedded import mnist_splits
from fortress.defenses import DEFENSES, Defense, Undefended
from fortress.models import StagedBackbone, create_model
from fortress.oracle import LocalOracle
from test_attack_contract import NO_CLONE, TINY
from test_exits import CASES_PER_CONFIG, CONFIGS, draw_case, make_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"),
]

CUDA = torch.device("cuda")
BUDGET = 240


def victim() -> StagedBackbone:
    torch.manual_seed(0)
    return create_model("lenet5").eval()


def build(name: str) -> Defense:
    cls = DEFENSES.get(name)
    kwargs = {"seed": 0} if "seed" in inspect.signature(cls).parameters else {}
    return cls(victim(), **kwargs)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_dynamic_equals_full_on_cuda(config: str) -> None:
    net = CONFIGS[config]().to(CUDA)
    for case in range(CASES_PER_CONFIG):
        n, thr, seed = draw_case(case, len(net.heads))
        net.set_thresholds(thr)
        x = make_batch(n, torch.Generator().manual_seed(seed)).to(CUDA)
        with torch.no_grad():
            ls, es = net.forward_static(x)
            ld, ed = net.forward_dynamic(x)
        assert ld.device.type == "cuda" and torch.equal(ed, es), f"{config} case {case}"
        assert torch.allclose(ld, ls, atol=1e-4), f"{config} case {case}: {float((ld - ls).abs().max())}"


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_answers_probability_rows_on_cuda(name: str) -> None:
    torch.manual_seed(1)
    x = torch.cat([mnist_splits().test.x[:24], torch.rand(24, 1, 28, 28)])
    cpu = build(name)
    gpu = copy.deepcopy(cpu).to(CUDA)
    assert gpu.device.type == "cuda"
    out = gpu.respond(x.to(CUDA))
    p = out.probs
    assert p.device.type == "cuda" and p.shape == (48, 10)
    assert torch.isfinite(p).all() and (p >= 0).all()
    torch.testing.assert_close(p.sum(1), torch.ones(48, device=CUDA), atol=1e-5, rtol=0)
    answers = LocalOracle(gpu, budget=48).query(x)  # the oracle moves the queries and answers on the caller's
    assert answers.device.type == "cpu"
    if name in ("undefended", "reverse-sigmoid", "dnf"):  # deterministic answers: the CPU's, to float tolerance
        torch.testing.assert_close(answers, cpu.respond(x).probs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_attack_spends_its_exact_budget_on_cuda(name: str) -> None:
    splits = mnist_splits()
    pool = torch.cat([splits.attacker.x, splits.val.x])
    settings, mode = TINY[name]
    oracle = LocalOracle(Undefended(victim()).to(CUDA), budget=BUDGET, output_mode=mode)
    attack = ATTACKS.get(name)(oracle, budget=BUDGET, seed=0, **settings)
    torch.manual_seed(123)
    clone = create_model("lenet5-half").to(CUDA)
    result = attack.run(clone, pool)
    assert 0 < result.queries_used <= BUDGET
    assert oracle.queries_used == result.queries_used and oracle.log.refused == 0
    if name not in NO_CLONE:
        assert next(result.clone.parameters()).device.type == "cuda"


def test_a_victim_a_dnf_and_an_attack_run_on_cuda_and_record_it(tmp_path: Path) -> None:
    from fortress.bench.pipeline import protect, run_attack, train_victim
    from fortress.config import AttackConfig, OODConfig, ProtectConfig, VictimConfig
    from fortress.defenses.dnf import DNFTrainConfig

    model, acc = train_victim(VictimConfig(epochs=1), tmp_path / "victim", device="cuda", amp=True)
    assert next(model.parameters()).device.type == "cuda" and acc > 0.5
    cfg = ProtectConfig(train=DNFTrainConfig(epochs=1), ood=OODConfig(dcgan_epochs=1, proxy_size=256))
    dnf = protect(model, cfg)
    assert dnf.device.type == "cuda"
    rec = run_attack(dnf, AttackConfig(name="dfme", budget=2000, params=TINY["dfme"][0]), device="cuda")
    assert rec.extra["device"].startswith("cuda") and rec.extra["device_name"] and rec.queries_used <= 2000
