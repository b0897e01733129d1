"""What one UNet (or VAE decoder) call costs at a given shape, traced on the meta device: no weights, no compute.

A trace runs the module's real forward and backward on tensors that have a shape
and a dtype but no data, and counts:

- FLOPs, with torch's own ``FlopCounterMode`` (matmuls and convolutions; elementwise work is not counted);
- the bytes autograd keeps between forward and backward, through saved-tensor hooks, once per storage and
  without the module's own parameters. On the meta device attention has no fused kernel, so the trace
  stands in one with the memory of the fused (flash / memory-efficient) kernels that CPU and CUDA run: it
  keeps q, k, v, the output and one float per query row, never the L x S score matrix.

With gradient checkpointing a checkpointed block keeps only its inputs, and backward recomputes one block at
a time: the trace counts the inputs of every block plus the largest block's own saved bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class CallCost:
    """One trained call of a module on one batch."""

    forward_flops: int
    backward_flops: int
    saved_bytes: int  # what autograd keeps for backward
    largest_saved_bytes: int  # the largest single saved tensor


class _FusedAttention(torch.autograd.Function):
    """Shapes and saved tensors of a fused attention kernel: q, k, v, the output and a log-sum-exp per row."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # noqa: ARG004
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        logsumexp = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # noqa: ARG004
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _FusedAttentionMode(TorchFunctionMode):
    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = args[:3]
            return _FusedAttention.apply(q, k, v)
        return func(*args, **(kwargs or {}))


class _SavedBytes:
    """Saved-tensor hooks that sum each storage once, leaving out the module's parameters."""

    def __init__(self, module: nn.Module) -> None:
        self.parameters = {p.untyped_storage()._cdata for p in module.parameters()}
        self.sizes: dict[int, int] = {}

    def pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.parameters:
            self.sizes[storage._cdata] = storage.nbytes()
        return tensor

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
            yield

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    @property
    def largest(self) -> int:
        return max(self.sizes.values(), default=0)


class _CheckpointedBlocks:
    """Stands in for diffusers' checkpoint function: keeps a block's tensor inputs, and traces the block alone
    once to know what recomputing it in backward holds."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.inputs: dict[int, int] = {}
        self.largest_block = 0

    def __call__(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        """diffusers calls ``checkpoint_func(block, *args)``."""
        for arg in args:
            if isinstance(arg, Tensor):
                self.inputs[arg.untyped_storage()._cdata] = arg.untyped_storage().nbytes()
        inner = _SavedBytes(self.module)
        with inner.counting():
            function(*args, **kwargs)
        self.largest_block = max(self.largest_block, inner.total)
        with torch.no_grad():
            out = function(*args, **kwargs)
        # Reattach the outputs to the graph through the inputs without keeping anything of the block.
        anchor = sum(a.sum() * 0 for a in args if isinstance(a, Tensor) and a.requires_grad)
        if isinstance(out, Tensor):
            return out + anchor
        return tuple(o + anchor if isinstance(o, Tensor) else o for o in out)


def trace_call(
    module: nn.Module, inputs: Callable[[], dict[str, Any]], *, checkpointing: bool = False
) -> CallCost:
    """The cost of the trained call ``module(**inputs())`` and its backward, on the meta device."""
    with FlopCounterMode(display=False) as flops:  # the plain forward: attention counted as its matmuls
        out = _first_tensor(module(**inputs()))
        forward = flops.get_total_flops()
        out.float().sum().backward()
    backward = flops.get_total_flops() - forward
    saved = _SavedBytes(module)
    blocks = _CheckpointedBlocks(module)
    if checkpointing:
        module.enable_gradient_checkpointing(blocks)
    try:
        with _FusedAttentionMode(), saved.counting():
            _first_tensor(module(**inputs()))
    finally:
        if checkpointing:
            module.disable_gradient_checkpointing()
    if not checkpointing:
        return CallCost(forward, backward, saved.total, saved.largest)
    if not blocks.inputs:
        raise ValueError(f"{type(module).__name__} checkpoints no blocks; trace it without checkpointing")
    kept = saved.total + sum(blocks.inputs.values()) + blocks.largest_block
    # Backward recomputes every checkpointed block's forward: about one more forward.
    return CallCost(forward, backward + forward, kept, max(saved.largest, blocks.largest_block))


def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]
