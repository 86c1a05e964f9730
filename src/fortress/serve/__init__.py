"""The protected prediction API (``fortress serve``): FastAPI app, key ledger, limits and metrics.

Needs the ``serve`` extra (``pip install "fortress[serve]"``). ``import fortress`` never imports
this package; importing it loads only the key ledger and settings, and FastAPI the first time
:func:`create_app` is asked for, so ``fortress keys`` works without the web stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fortress.serve.keys import ApiKey, KeyRejected, KeyStore
from fortress.serve.settings import ServeSettings

if TYPE_CHECKING:
    from fortress.serve.app import create_app

__all__ = ["ApiKey", "KeyRejected", "KeyStore", "ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from fortress.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'fortress.serve' has no attribute {name!r}")
