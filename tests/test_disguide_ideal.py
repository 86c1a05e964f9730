"""DisGUIDE and IDEAL: their losses, their query accounting and what each step may spend."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from fortress.attacks import DisGUIDE, EvalSet
from fortress.attacks.disguide import disagreement, soft_vote
from fortress.attacks.ideal import IDEAL, ideal_generator_loss
from fortress.attacks.replay import ReplayMemory, reinitialised_copy
from fortress.data.embedded import mnist_splits
from fortress.defenses import Undefended
from fortress.defenses.base import DefenseOutput
from fortress.errors import ConfigError
from fortress.models import StagedBackbone, create_model
from fortress.oracle import LocalOracle


@pytest.fixture(scope="module")
def victim() -> StagedBackbone:
    torch.manual_seed(0)
    return create_model("lenet5").eval()


@pytest.fixture(scope="module")
def eval_set(victim: StagedBackbone) -> EvalSet:
    test = mnist_splits().test
    with torch.no_grad():
        return EvalSet(test.x[:64], test.targets[:64], victim(test.x[:64]).argmax(1))


def recording_oracle(victim: StagedBackbone, mode: str = "soft") -> tuple[LocalOracle, list[Tensor]]:
    """An oracle that keeps every image it answered (to check what the victim saw)."""
    seen: list[Tensor] = []

    def observe(x: Tensor, _: DefenseOutput) -> None:
        seen.append(x.detach().clone())

    return LocalOracle(Undefended(victim), output_mode=mode, observer=observe), seen


# -- DisGUIDE -------------------------------------------------------------------------------------
def test_disagreement_is_the_spread_across_clones() -> None:
    same = torch.softmax(torch.randn(1, 5, 4), dim=2).expand(3, 5, 4)
    assert float(disagreement(same)) == pytest.approx(0.0, abs=1e-7)
    apart = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert float(disagreement(apart)) == pytest.approx(2**-0.5)  # std of {0, 1} (unbiased) is 1/sqrt(2)
    assert torch.allclose(soft_vote(torch.zeros(2, 3, 4)).sum(1), torch.ones(3))


def test_disguide_spends_queries_only_on_student_batches(victim: StagedBackbone, eval_set: EvalSet) -> None:
    oracle, seen = recording_oracle(victim)
    attack = DisGUIDE(oracle, budget=100, batch_size=16, d_iter=2, replay_iter=2, ngf=4, nz=8)
    result = attack.run(create_model("lenet5-half"), eval_set=eval_set)
    # 3 iterations of 2 student batches of 16, then one batch of the 4 queries left
    assert [x.shape[0] for x in seen] == [16] * 6 + [4]
    assert result.queries_used == oracle.queries_used == 100
    assert result.extras["iterations"] == 3 and result.extras["replay_rows"] == 100
    assert len(result.extras["member_accs"]) == 2 and 0.0 <= result.extras["ensemble_acc"] <= 1.0
    assert result.extras["member_accs"][0] == result.clone_acc  # the clone returned is member 0
    assert result.extras["mean_disagreement"] > 1e-4  # two different clones, something to disagree on


def test_disguide_clones_start_apart_when_the_clone_was_made_under_the_attack_seed(victim: StagedBackbone) -> None:
    """The benchmark seeds torch with the attack's seed before creating the clone; the second clone must differ."""
    torch.manual_seed(0)
    clone = create_model("lenet5-half")
    result = DisGUIDE(LocalOracle(Undefended(victim)), budget=32, batch_size=16, ngf=4, nz=8, seed=0).run(clone)
    assert result.extras["mean_disagreement"] > 1e-4


def test_disguide_hard_label_mode_matches_a_hard_oracle(victim: StagedBackbone) -> None:
    """The paper's hard-label variant: a soft oracle with hard_label=True trains exactly like a hard oracle."""
    clones = []
    for mode, flag in (("hard", False), ("soft", True)):
        torch.manual_seed(5)
        clone = create_model("lenet5-half")
        oracle = LocalOracle(Undefended(victim), output_mode=mode)
        DisGUIDE(oracle, budget=64, batch_size=16, ngf=4, nz=8, hard_label=flag, seed=2).run(clone)
        clones.append(torch.cat([p.detach().flatten() for p in clone.parameters()]))
    assert torch.equal(clones[0], clones[1])


def test_disguide_refuses_bad_settings(victim: StagedBackbone) -> None:
    oracle = LocalOracle(Undefended(victim))
    with pytest.raises(ConfigError, match=r"ensemble_size must be >= 2 \(disagreement needs two clones\)"):
        DisGUIDE(oracle, budget=100, ensemble_size=1)
    with pytest.raises(ConfigError, match="lr_milestones"):
        DisGUIDE(oracle, budget=100, lr_milestones=[0.8, 0.4])


def test_replay_memory_keeps_the_newest_rows() -> None:
    memory = ReplayMemory(capacity=5)
    for i in range(4):
        memory.add(torch.full((2, 1, 1, 1), float(i)), torch.full((2, 3), float(i)))
    assert len(memory) == 5
    x, y = memory.sample(10, torch.Generator().manual_seed(0))
    assert sorted(x.flatten().tolist()) == [1.0, 2.0, 2.0, 3.0, 3.0]  # 0, 0 and one 1 were overwritten
    assert torch.equal(x.flatten(), y[:, 0])  # rows stay paired
    with pytest.raises(ConfigError, match="empty"):
        ReplayMemory(3).sample(1, torch.Generator())


def test_a_reinitialised_copy_has_the_architecture_but_new_weights() -> None:
    """Even right after the seed the model was made under (the attack seeds torch with its own seed)."""
    torch.manual_seed(0)
    model = create_model("lenet5-half")
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    twin = reinitialised_copy(model, torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's global stream is untouched
    assert type(twin) is type(model)
    pairs = list(zip(model.parameters(), twin.parameters(), strict=True))
    assert all(a.shape == b.shape for a, b in pairs)
    assert all(not torch.equal(a, b) for a, b in pairs if a.dim() > 1)


# -- IDEAL ----------------------------------------------------------------------------------------
def test_ideal_generator_loss_is_ce_plus_the_information_term() -> None:
    logits = torch.randn(6, 4)
    targets = torch.arange(6) % 4
    p = logits.softmax(1)
    info = (p * p.log()).mean()
    expected = torch.nn.functional.cross_entropy(logits, targets) + 5 * info
    assert torch.allclose(ideal_generator_loss(logits, targets, 5.0), expected)


def test_ideal_queries_every_image_once_and_never_in_the_generation_stage(victim: StagedBackbone) -> None:
    oracle, seen = recording_oracle(victim, "hard")
    attack = IDEAL(oracle, budget=70, batch_size=20, g_steps=3, ngf=4, nz=8, train_batch_size=16)
    result = attack.run(create_model("lenet5-half"))
    # one oracle call per round: the round's images, the last round cut to the budget
    assert [x.shape[0] for x in seen] == [20, 20, 20, 10]
    assert result.queries_used == result.extras["labelled"] == 70
    everything = torch.cat(seen).flatten(1)
    assert torch.unique(everything, dim=0).shape[0] == 70  # no image was labelled twice
    assert len(result.checkpoints) == 0  # no eval set: nothing scored
    assert result.extras["rounds"] == attack.rounds == 4


def test_ideal_scores_a_checkpoint_every_round(victim: StagedBackbone, eval_set: EvalSet) -> None:
    oracle = LocalOracle(Undefended(victim))  # soft answers: only the top-1 label is used
    result = IDEAL(oracle, budget=60, batch_size=20, g_steps=2, ngf=4, nz=8).run(
        create_model("lenet5-half"), eval_set=eval_set
    )
    assert [c.queries for c in result.checkpoints] == [20, 40, 60]
