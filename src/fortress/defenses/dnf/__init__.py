"""Dynamic Neural Fortresses: losses, training, the defense, its threshold search and its protection recipe.

The DCGAN and the OOD sources DNF trains with live in :mod:`fortress.generative` (attacks use them
too) and are re-exported here.
"""

from __future__ import annotations

from fortress.defenses.dnf.defense import DNF
from fortress.defenses.dnf.losses import DNFLossWeights, entropy, id_loss, ood_loss
from fortress.defenses.dnf.probe import ProbeConfig, ProbeResult, extraction_probe
from fortress.defenses.dnf.provenance import Attempt, Candidate, GuardResult, Provenance, SearchSummary, Selection
from fortress.defenses.dnf.recipe import OODConfig, ProtectConfig, SelectConfig, build_ood, guard_utility, protect
from fortress.defenses.dnf.threshold_search import ThresholdSearchConfig, ThresholdSearchResult, search_thresholds
from fortress.defenses.dnf.training import DNFTrainConfig, DNFTrainReport, StepInfo, train_dnf
from fortress.generative.dcgan import DCGANGenerator, train_dcgan
from fortress.generative.ood import GeneratorOOD, MixtureOOD, NoiseOOD, OODSource, PoolOOD

__all__ = [
    "DNF",
    "Attempt",
    "Candidate",
    "DCGANGenerator",
    "DNFLossWeights",
    "DNFTrainConfig",
    "DNFTrainReport",
    "GeneratorOOD",
    "GuardResult",
    "MixtureOOD",
    "NoiseOOD",
    "OODConfig",
    "OODSource",
    "PoolOOD",
    "ProbeConfig",
    "ProbeResult",
    "ProtectConfig",
    "Provenance",
    "SearchSummary",
    "SelectConfig",
    "Selection",
    "StepInfo",
    "ThresholdSearchConfig",
    "ThresholdSearchResult",
    "build_ood",
    "entropy",
    "extraction_probe",
    "guard_utility",
    "id_loss",
    "ood_loss",
    "protect",
    "search_thresholds",
    "train_dcgan",
    "train_dnf",
]
