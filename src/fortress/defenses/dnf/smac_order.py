"""SMAC3's acquisition maximizer with its local-search start points in a fixed order.

SMAC3 (2.x) hands its local search the start points as ``list(set(configs))``, and a ConfigSpace
``Configuration`` hashes its ``repr``, a string. Their order, and with it every configuration SMAC
suggests after the initial design, therefore followed Python's per-process string hash
(``PYTHONHASHSEED``): the same threshold search with the same seed suggested different thresholds
in different interpreters. Sorting the start points by their numeric vector makes the search a
function of its seed alone; the search itself (SMAC3's defaults for hyper-parameter optimisation)
is otherwise unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smac import Scenario
    from smac.acquisition.maximizer import LocalAndSortedRandomSearch

__all__ = ["ordered_acquisition_maximizer"]


def ordered_acquisition_maximizer(scenario: Scenario) -> LocalAndSortedRandomSearch:
    """``HyperparameterOptimizationFacade``'s acquisition maximizer, independent of ``PYTHONHASHSEED``.

    Pass it as ``acquisition_maximizer=`` to the facade.
    """
    from ConfigSpace import Configuration
    from smac import HyperparameterOptimizationFacade
    from smac.acquisition.maximizer.local_search import LocalSearch

    class OrderedLocalSearch(LocalSearch):
        def _get_initial_points(self, *args: Any, **kwargs: Any) -> list[Configuration]:
            points: list[Configuration] = super()._get_initial_points(*args, **kwargs)
            return sorted(points, key=lambda c: tuple(float(v) for v in c.get_array()))

    maximizer = HyperparameterOptimizationFacade.get_acquisition_maximizer(scenario)
    # the facade's local search takes LocalSearch's defaults; only the start-point order changes
    maximizer._local_search = OrderedLocalSearch(configspace=scenario.configspace, seed=scenario.seed)
    return maximizer
