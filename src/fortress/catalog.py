"""Every component registry under the name the CLI and config files use for it."""

from __future__ import annotations

__all__ = ["REGISTRIES", "registered"]

#: The registries, in the order ``fortress list`` shows them.
REGISTRIES = ("attacks", "defenses", "models", "datasets", "monitors")


def registered() -> dict[str, list[str]]:
    """The registered names of each kind of component (see :data:`REGISTRIES`).

    Example:
        >>> "dnf" in registered()["defenses"]
        True
    """
    from fortress.attacks import ATTACKS
    from fortress.data.registry import DATASETS
    from fortress.defenses import DEFENSES
    from fortress.models import model_names
    from fortress.monitor import MONITORS

    names = {
        "attacks": ATTACKS.names(),
        "defenses": DEFENSES.names(),
        "models": model_names(),
        "datasets": DATASETS.names(),
        "monitors": MONITORS.names(),
    }
    return {kind: names[kind] for kind in REGISTRIES}
