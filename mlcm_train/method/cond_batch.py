"""Batch plumbing for conditioning objects: pick rows, and join cond with uncond for one CFG call.

A conditioning object is a tensor, a mapping/list/tuple of them, or a dataclass of them (such as
``Conditioning``), with every tensor batch-first; tensors with batch 1 broadcast. New objects are
returned; inputs are never modified.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor


def _map_cond(cond: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside ``cond``, keeping its structure (a new object; cond untouched)."""
    if cond is None or isinstance(cond, (str, bytes, int, float, bool)):
        return cond
    if isinstance(cond, Tensor):
        return fn(cond)
    if isinstance(cond, Mapping):
        return type(cond)({k: _map_cond(v, fn) for k, v in cond.items()})
    if isinstance(cond, (list, tuple)):
        return type(cond)(_map_cond(v, fn) for v in cond)
    if dataclasses.is_dataclass(cond) and not isinstance(cond, type):
        changes = {f.name: _map_cond(getattr(cond, f.name), fn) for f in dataclasses.fields(cond) if f.init}
        return dataclasses.replace(cond, **changes)
    raise TypeError(
        f"cannot split or join conditioning of type {type(cond).__name__}; pass a tensor, a mapping, "
        "a tuple or a dataclass of batch-first tensors"
    )


def select_cond(cond: Any, index: Tensor, batch_size: int) -> Any:
    """Rows ``index`` of every batch-first tensor in ``cond``; tensors with batch 1 broadcast and are kept."""
    index = index.to(torch.long)

    def pick(x: Tensor) -> Tensor:
        if x.ndim == 0 or x.shape[0] == 1 and batch_size != 1:
            return x
        if x.shape[0] != batch_size:
            raise ValueError(
                f"conditioning tensor of shape {tuple(x.shape)} is not batch-first for batch {batch_size}"
            )
        return x[index.to(x.device)]

    return _map_cond(cond, pick)


def _zip_cond(cond: Any, uncond: Any, fn: Callable[[Tensor, Tensor], Tensor]) -> Any:
    """Walk ``cond`` and ``uncond`` in parallel and combine paired tensors with ``fn`` (same structure needed)."""
    if isinstance(cond, Tensor) and isinstance(uncond, Tensor):
        return fn(cond, uncond)
    if cond is None or isinstance(cond, (str, bytes, int, float, bool)):
        if cond != uncond:
            raise ValueError(f"cond and uncond differ in a non-tensor field ({cond!r} vs {uncond!r})")
        return cond
    if isinstance(cond, Mapping) and isinstance(uncond, Mapping):
        if set(cond) != set(uncond):
            raise ValueError(f"cond and uncond have different keys: {sorted(cond)} vs {sorted(uncond)}")
        return type(cond)({k: _zip_cond(v, uncond[k], fn) for k, v in cond.items()})
    if isinstance(cond, (list, tuple)) and isinstance(uncond, (list, tuple)) and len(cond) == len(uncond):
        return type(cond)(_zip_cond(c, u, fn) for c, u in zip(cond, uncond))
    if dataclasses.is_dataclass(cond) and type(cond) is type(uncond):
        changes = {
            f.name: _zip_cond(getattr(cond, f.name), getattr(uncond, f.name), fn)
            for f in dataclasses.fields(cond)
            if f.init
        }
        return dataclasses.replace(cond, **changes)
    raise TypeError(f"cannot join conditioning of types {type(cond).__name__} and {type(uncond).__name__}")


def cat_cond(cond: Any, uncond: Any, batch_size: int) -> Any:
    """``cond`` then ``uncond`` along the batch (2B rows); batch-1 tensors are expanded to the batch first."""

    def join(c: Tensor, u: Tensor) -> Tensor:
        if c.ndim == 0:
            return c
        c = c.expand(batch_size, *c.shape[1:]) if c.shape[0] == 1 else c
        u = u.expand(batch_size, *u.shape[1:]) if u.shape[0] == 1 else u
        if c.shape != u.shape:
            raise ValueError(f"cond {tuple(c.shape)} and uncond {tuple(u.shape)} tensors do not match")
        return torch.cat([c, u.to(device=c.device, dtype=c.dtype)])

    return _zip_cond(cond, uncond, join)
