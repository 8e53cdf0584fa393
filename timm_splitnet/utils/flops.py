""" Parameter and multiply-add counts

The paper reports "FLOPs" as multiply-adds (its counter halves 2 * MACs), so `count_macs` returns multiply-adds
counted by PyTorch's public `torch.utils.flop_counter.FlopCounterMode` (convolutions and matrix products).
Both functions work on models built on the meta device, so paper-size models are counted without memory.
"""
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_params', 'count_macs']


def count_params(model: nn.Module, include_buffers: bool = False) -> int:
    """Number of parameters (plus floating point buffers, i.e. BN running statistics, if `include_buffers`)."""
    n = sum(p.numel() for p in model.parameters())
    if include_buffers:
        n += sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return n


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Sequence[int] = (3, 224, 224), batch_size: int = 1) -> int:
    """Multiply-adds of one eval-mode forward pass per image (convolutions, linear layers, matmuls)."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros((batch_size, *input_size), device=param.device, dtype=param.dtype)
        counter = FlopCounterMode(display=False)
        with counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // (2 * batch_size)
