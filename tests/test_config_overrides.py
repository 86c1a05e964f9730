"""Command-line overrides as library calls: KEY=VALUE pairs, number lists, and options laid over a config."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest

from fortress.config import (
    AttackConfig,
    ProtectConfig,
    defense_params,
    merge_overrides,
    parse_floats,
    parse_params,
    protect_overrides,
)
from fortress.defenses.dnf.threshold_search import ThresholdSearchConfig
from fortress.errors import ConfigError


def test_parse_params_reads_json_values_and_keeps_other_text() -> None:
    got = parse_params(["epochs=2", "lr=1e-3", "fast=true", "pool=patches", "sizes=[1, 2]", "empty=", "x=null"])
    assert got == {"epochs": 2, "lr": 1e-3, "fast": True, "pool": "patches", "sizes": [1, 2], "empty": "", "x": None}
    assert parse_params(["url=http://a/b?c=d"]) == {"url": "http://a/b?c=d"}  # only the first '=' splits


def test_parse_params_nests_dotted_keys_and_later_pairs_win() -> None:
    got = parse_params(["train.epochs=1", "ood.kind=noise", "train.lr=0.1", "max_attempts=1", "max_attempts=2"])
    assert got == {"train": {"epochs": 1, "lr": 0.1}, "ood": {"kind": "noise"}, "max_attempts": 2}
    assert parse_params(['train={"epochs": 3}', "train.lr=0.5"]) == {"train": {"epochs": 3, "lr": 0.5}}
    assert parse_params(["train.lr=0.5", "train=4"]) == {"train": 4}


@pytest.mark.parametrize(
    ("pairs", "needle"),
    [
        (["epochs"], "--param takes KEY=VALUE, got 'epochs'"),
        (["=3"], "KEY=VALUE"),
        (["train.=3"], "KEY=VALUE"),
        (["train=1", "train.epochs=2"], "'train' already holds a value"),
    ],
)
def test_parse_params_refuses_malformed_pairs(pairs: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_params(pairs)
    assert needle in str(err.value)


def test_parse_params_names_the_option() -> None:
    with pytest.raises(ConfigError, match="--fit-param takes KEY=VALUE"):
        parse_params(["oops"], what="--fit-param")


def test_parse_floats() -> None:
    assert parse_floats(None, "--x") is None
    assert parse_floats("0.9, 0.95,,1", "--x") == (0.9, 0.95, 1.0)
    assert parse_floats("", "--x") == ()
    with pytest.raises(ConfigError, match=r"--thresholds must be comma-separated numbers, got 'a,b'"):
        parse_floats("a,b", "--thresholds")


def test_defense_params_adds_a_fit_table_only_when_asked() -> None:
    assert defense_params(["tau=0.5"]) == {"tau": 0.5}
    assert defense_params(["tau=0.5"], fit=True) == {"tau": 0.5, "fit": {}}
    assert defense_params([], ["epochs=1"]) == {"fit": {"epochs": 1}}
    with pytest.raises(ConfigError, match="--fit-param takes KEY=VALUE"):
        defense_params([], ["epochs"])


def test_merge_overrides_merges_tables_and_keeps_the_rest() -> None:
    base = ProtectConfig(max_attempts=2)
    got = merge_overrides(base, {"train": {"epochs": 1}, "ood": {"kind": "noise"}})
    assert got == replace(base, train=replace(base.train, epochs=1), ood=replace(base.ood, kind="noise"))
    assert merge_overrides(base, {}) == base
    # a table for a field that is None starts from that config's defaults
    assert merge_overrides(base, {"search": {"n_trials": 7}}).search == ThresholdSearchConfig(n_trials=7)
    assert merge_overrides(AttackConfig(params={"a": 1}), {"params": {"b": 2}}).params == {"a": 1, "b": 2}


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"train": {"epoch": 1}}, "unknown keys ['epoch'] in options.train"),
        ({"head_kind": "deep"}, "options.head_kind must be one of ['vib', 'plain'], got 'deep'"),
        ({"max_attempts": "three"}, "options.max_attempts must be int"),
        ({"train": {"epochs": 0}}, "epochs must be >= 1, got 0"),
    ],
)
def test_merge_overrides_checks_like_a_config_file(overrides: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        merge_overrides(ProtectConfig(), overrides)
    assert needle in str(err.value)


def test_merge_overrides_takes_only_a_config_instance() -> None:
    with pytest.raises(TypeError):
        merge_overrides({"a": 1}, {})
    with pytest.raises(TypeError):
        merge_overrides(ProtectConfig, {})


def _field_by_field(
    cfg: ProtectConfig,
    head: str | None,
    epochs: int | None,
    seed: int | None,
    ood: str | None,
    thresholds: tuple[float, ...] | None,
    search: bool,
    search_trials: int | None,
) -> ProtectConfig:
    """What each ``fortress protect`` option means, written out one ``replace`` at a time."""
    if head is not None:
        cfg = replace(cfg, head_kind=head)  # type: ignore[arg-type]
    if epochs is not None:
        cfg = replace(cfg, train=replace(cfg.train, epochs=epochs))
    if seed is not None:
        cfg = replace(cfg, train=replace(cfg.train, seed=seed), ood=replace(cfg.ood, seed=seed))
    if ood is not None:
        cfg = replace(cfg, ood=replace(cfg.ood, kind=ood))
    if thresholds is not None:
        cfg = replace(cfg, thresholds=thresholds)
    if search or search_trials is not None:
        base = cfg.search or ThresholdSearchConfig()
        cfg = replace(cfg, search=base if search_trials is None else replace(base, n_trials=search_trials))
    return cfg


BASES = [
    ProtectConfig(),
    ProtectConfig(head_kind="plain", thresholds=(0.5, 0.6, 0.7), search=ThresholdSearchConfig(clone_epochs=1)),
]


@pytest.mark.parametrize(
    ("base", "head", "epochs", "seed", "ood", "thresholds", "search", "search_trials"),
    [
        (b, *opts)
        for b, opts in itertools.product(
            BASES,
            [
                (None, None, None, None, None, False, None),
                ("plain", 1, 7, "noise", (0.9, 0.9, 0.95), False, None),
                ("vib", None, 3, None, None, True, None),
                (None, 2, None, "proxy", None, False, 6),
                (None, None, None, "dcgan", (0.1,), True, 4),
            ],
        )
    ],
)
def test_protect_overrides_mean_what_each_option_says(
    base: ProtectConfig,
    head: str | None,
    epochs: int | None,
    seed: int | None,
    ood: str | None,
    thresholds: tuple[float, ...] | None,
    search: bool,
    search_trials: int | None,
) -> None:
    got = protect_overrides(
        base,
        head=head,
        epochs=epochs,
        seed=seed,
        ood=ood,
        thresholds=thresholds,
        search=search,
        search_trials=search_trials,
    )
    assert got == _field_by_field(base, head, epochs, seed, ood, thresholds, search, search_trials)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"head": "deep"}, "head_kind must be one of"),
        ({"ood": "moon"}, "ood.kind must be one of"),
        ({"search_trials": 0}, "n_trials must be >= 2, got 0"),
        ({"epochs": 0}, "epochs must be >= 1, got 0"),
    ],
)
def test_protect_overrides_refuse_bad_values_before_any_work(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        protect_overrides(ProtectConfig(), **kw)
    assert needle in str(err.value)
