"""Dynamic Neural Fortresses: losses, training and the defense (the DCGAN and OOD sources come from generative)."""

from __future__ import annotations

from fortress.defenses.dnf.defense import DNF
from fortress.defenses.dnf.losses import DNFLossWeights, entropy, id_loss, ood_loss
from fortress.defenses.dnf.threshold_search import ThresholdSearchConfig, ThresholdSearchResult, search_thresholds
from fortress.defenses.dnf.training import DNFTrainConfig, DNFTrainReport, StepInfo, train_dnf
from fortress.generative.dcgan import DCGANGenerator, train_dcgan
from fortress.generative.ood import GeneratorOOD, MixtureOOD, NoiseOOD, OODSource, PoolOOD

__all__ = [
    "DNF",
    "DCGANGenerator",
    "DNFLossWeights",
    "DNFTrainConfig",
    "DNFTrainReport",
    "GeneratorOOD",
    "MixtureOOD",
    "NoiseOOD",
    "OODSource",
    "PoolOOD",
    "StepInfo",
    "ThresholdSearchConfig",
    "ThresholdSearchResult",
    "entropy",
    "id_loss",
    "ood_loss",
    "search_thresholds",
    "train_dcgan",
    "train_dnf",
]
