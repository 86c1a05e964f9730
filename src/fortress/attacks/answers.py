"""What a defense-aware attacker does with the answers it gets, before training on them.

Perturbation defenses (reverse sigmoid, MAD, RandP, GRAD², …) return rows whose top-1 is usually
the victim's and whose other values are distorted; an attacker who knows this has simple counters,
collected here and used by the attacks (ModelGuard, Tang et al., USENIX Security 2024, evaluates
defenses against the same adaptive attacker variants):

* :func:`top1_rows`: train on the top-1 label only (one-hot rows), discarding the distorted rest;
* :func:`smoothed_answers`: ask each image ``r`` times under small random shifts and pixel noise
  and average the answers — a perturbation that is not a smooth function of the input (noise drawn
  per query, a line search that jumps between simplex vertices) partly averages out, at ``r``
  queries per image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fortress.data.transforms import random_shift
from fortress.errors import ConfigError

__all__ = ["jittered_copies", "smoothed_answers", "top1_rows"]


def top1_rows(answers: Tensor) -> Tensor:
    """One-hot rows of the answers' top-1 classes: ``(B, K)`` → ``(B, K)`` (ties: the first class).

    Example:
        >>> top1_rows(torch.tensor([[0.2, 0.5, 0.3]]))
        tensor([[0., 1., 0.]])
    """
    return torch.nn.functional.one_hot(answers.argmax(dim=1), answers.shape[1]).to(answers.dtype)


def jittered_copies(x: Tensor, repeats: int, *, max_shift: int, noise_std: float, generator: torch.Generator) -> Tensor:
    """``repeats`` copies of every image, image-major: the original first, then jittered ones.

    A jittered copy is shifted by up to ``max_shift`` pixels (zero padding) and gets Gaussian pixel
    noise of standard deviation ``noise_std``, clamped to [0, 1].

    Shape:
        ``(N, C, H, W)`` → ``(N · repeats, C, H, W)``; rows ``i·repeats … (i+1)·repeats − 1`` are image ``i``.
    """
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    n = x.shape[0]
    copies = x.unsqueeze(1).expand(n, repeats, *x.shape[1:]).reshape(n * repeats, *x.shape[1:])
    if repeats == 1:
        return copies.clone()
    jitter = random_shift(copies, max_shift, generator)
    if noise_std > 0:
        noise = torch.randn(jitter.shape, generator=generator).to(jitter.device)
        jitter = (jitter + noise_std * noise).clamp(0.0, 1.0)
    first = (torch.arange(n * repeats, device=x.device) % repeats == 0).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(first, copies, jitter)


def smoothed_answers(
    query: Callable[[Tensor, int], Tensor],
    x: Tensor,
    *,
    repeats: int,
    max_shift: int,
    noise_std: float,
    batch_size: int,
    generator: torch.Generator,
) -> Tensor:
    """Each image's mean answer over ``repeats`` queries of jittered copies (:func:`jittered_copies`).

    Args:
        query: ``AttackRun.query_batches``-like callable ``(images, batch_size) -> answers``; it is
            charged ``N · repeats`` queries.
        x: images ``(N, C, H, W)``.
        repeats: queries per image (the first is the image itself).
        max_shift: largest shift of a copy, in pixels.
        noise_std: pixel noise of a copy.
        batch_size: rows per oracle call.
        generator: randomness of the jitter.

    Returns:
        Mean answer rows ``(N, K)`` (probability rows stay probability rows).
    """
    copies = jittered_copies(x, repeats, max_shift=max_shift, noise_std=noise_std, generator=generator)
    return query(copies, batch_size).view(x.shape[0], repeats, -1).mean(dim=1)
