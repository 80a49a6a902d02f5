"""The optimizer and learning-rate schedule every training script here uses."""
from __future__ import annotations

import math

import torch


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
          scaled: tuple[torch.nn.Module, ...] = (), lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only (not on norms, biases, tokens).
    Every group carries an "lr_scale" (lr_scale for the parameters of the `scaled` modules, else 1) that the
    training loop multiplies its scheduled learning rate by."""
    slow = {id(p) for module in scaled for p in module.parameters()}
    groups = []
    for scale, in_slow in ((1.0, False), (lr_scale, True)):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in slow) == in_slow]
        groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": scale},
                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def warmup_cosine(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine to zero at `total` (zero after it)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(total - warmup, 1), 1)))
