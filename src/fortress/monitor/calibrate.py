"""Calibrating ``dadd`` on a defense: the reference on training images, the threshold on held-out ones.

The reference (class means, whitening) comes from the victim's features of the defender's
training images, grouped by the victim's predictions; the threshold from simulated benign keys
replaying the held-out validation images under every realistic shift and class mix of
:mod:`fortress.monitor.benign` (never the training images, never the test images that measure
the false-positive rate afterwards).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fortress.defenses import Defense
from fortress.monitor.benign import IMAGE_SHIFTS, shifted
from fortress.monitor.dadd import DADDCalibration, FeatureKind, calibrate_dadd, fit_reference, log_prob_features

__all__ = ["dadd_from_defense", "penultimate_answers"]


@torch.no_grad()
def penultimate_answers(
    defense: Defense, x: Tensor, *, feature: FeatureKind = "penultimate", chunk: int = 2048
) -> tuple[Tensor, Tensor]:
    """Features ``(N, F)`` of ``x`` in ``feature``'s space and the defense's predicted classes ``(N,)``.

    ``"penultimate"``: the victim's input to its last linear layer; ``"logits"``: the defense's
    answers as centred log-probabilities (:func:`~fortress.monitor.dadd.log_prob_features`).
    """
    feats, cls = [], []
    for i in range(0, x.shape[0], chunk):
        part = x[i : i + chunk]
        probs = defense.respond(part).probs
        feats.append(defense.victim.penultimate(part) if feature == "penultimate" else log_prob_features(probs))
        cls.append(probs.argmax(1))
    return torch.cat(feats), torch.cat(cls)


def dadd_from_defense(
    defense: Defense,
    x_train: Tensor,
    x_val: Tensor,
    *,
    shifts: Sequence[str] = IMAGE_SHIFTS,
    variants: int = 10,
    seed: int = 0,
    feature: FeatureKind = "penultimate",
    **kw: Any,
) -> DADDCalibration:
    """Calibrate ``dadd`` for ``defense`` in the ``feature`` space (``"penultimate"`` or the free ``"logits"``).

    Args:
        defense: the served defense (its victim gives the features).
        x_train: the defender's training images (the reference).
        x_val: held-out ID images (the benign banks: ``variants`` shifted copies per shift).
        shifts: realistic shifts simulated (:data:`~fortress.monitor.benign.IMAGE_SHIFTS`).
        variants: shifted copies of ``x_val`` per shift.
        seed: seeds the shifts and the simulation.
        **kw: passed to :func:`~fortress.monitor.dadd.calibrate_dadd` (``alpha``, ``horizon``, ...).
    """
    gen = torch.Generator().manual_seed(seed)
    feats, cls = penultimate_answers(defense, x_train)
    ref = fit_reference(feats, cls, defense.num_classes, feature="penultimate")
    banks = {
        s: penultimate_answers(defense, torch.cat([shifted(x_val, s, gen) for _ in range(variants)])) for s in shifts
    }
    return calibrate_dadd(ref, banks, seed=seed, variants=variants, **kw)
