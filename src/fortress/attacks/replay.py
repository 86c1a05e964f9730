"""Pieces the generator-based attacks share: an experience-replay memory and a second clone.

* :class:`ReplayMemory` is DisGUIDE's "classic" experience replay (Rosenthal et al., AAAI 2023): a
  first-in-first-out buffer of queried images and the victim's answers, sampled uniformly.
* :func:`reinitialised_copy` builds another clone of the same architecture with fresh weights
  (DisGUIDE's ensemble of clones).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from fortress.errors import ConfigError

__all__ = ["ReplayMemory", "reinitialised_copy"]


class ReplayMemory:
    """A circular buffer of ``(image, answer)`` pairs, sampled uniformly (DisGUIDE's experience replay).

    Storage grows with what is stored (never beyond ``capacity`` rows); once full, the oldest rows
    are overwritten. Rows are kept on the CPU in float32, exactly as the victim saw them.

    Args:
        capacity: rows kept at most (DisGUIDE: 1M).

    Shape:
        :meth:`add` takes images ``(B, C, H, W)`` and answers ``(B, K)``; :meth:`sample` returns
        ``n`` of each.

    Example:
        >>> memory = ReplayMemory(capacity=4)
        >>> memory.add(torch.zeros(3, 1, 2, 2), torch.eye(3))
        >>> memory.add(torch.ones(3, 1, 2, 2), torch.eye(3))
        >>> len(memory), memory.sample(2, torch.Generator().manual_seed(0))[0].shape
        (4, torch.Size([2, 1, 2, 2]))
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ConfigError(f"replay capacity must be >= 1 row, got {capacity}")
        self.capacity = capacity
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        self._size = 0
        self._head = 0

    def __len__(self) -> int:
        return self._size

    def add(self, x: Tensor, y: Tensor) -> None:
        """Store a batch (the oldest rows make room once the buffer is full)."""
        x, y = x.detach().to("cpu", torch.float32), y.detach().to("cpu", torch.float32)
        if self._x is None or self._y is None:
            self._x = x.new_empty((0, *x.shape[1:]))
            self._y = y.new_empty((0, *y.shape[1:]))
        x, y = x[-self.capacity :], y[-self.capacity :]
        grow = min(self.capacity - self._x.shape[0], x.shape[0])
        if grow > 0:  # still filling: append (amortised by torch.cat's copy; the buffer only grows)
            self._x, self._y = torch.cat([self._x, x[:grow]]), torch.cat([self._y, y[:grow]])
            self._size = self._x.shape[0]
            self._head = self._size % self.capacity
            x, y = x[grow:], y[grow:]
        if x.shape[0]:
            idx = (self._head + torch.arange(x.shape[0])) % self.capacity
            self._x[idx], self._y[idx] = x, y
            self._head = int((self._head + x.shape[0]) % self.capacity)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` stored pairs drawn uniformly without replacement (all of them if fewer are stored)."""
        if self._x is None or self._y is None or self._size == 0:
            raise ConfigError("the replay memory is empty: store a batch before sampling")
        idx = torch.randperm(self._size, generator=generator)[:n]
        return self._x[idx], self._y[idx]


def reinitialised_copy(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """A deep copy of ``module`` with every layer re-initialised from a seed drawn from ``generator``.

    The layers' own initialisers draw from torch's global generator; they run under a seed taken
    from ``generator`` (the caller's global state is left as it was). Seeding them from the
    caller's stream matters: a clone created right after ``torch.manual_seed(s)`` and a copy
    re-initialised right after the same call would otherwise be identical. Layers without
    ``reset_parameters`` (activations, pooling, containers) have nothing to reset; BatchNorm
    running statistics are reset too.

    Example:
        >>> a = nn.Linear(3, 2)
        >>> b = reinitialised_copy(a, torch.Generator().manual_seed(0))
        >>> b.weight.shape == a.weight.shape and not torch.equal(a.weight, b.weight)
        True
    """
    twin = copy.deepcopy(module)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in twin.modules():
            reset = getattr(layer, "reset_parameters", None)
            if callable(reset):
                reset()
    return twin
