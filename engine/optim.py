"""AdamW with decay only on weight matrices, and warmup + constant/linear/cosine schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.config import OptimizerConfig, SchedulerConfig


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; norms and biases (1-D tensors) get no weight decay."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        foreach=True,
    )


def warmup_steps(total_steps: int, cfg: SchedulerConfig) -> int:
    """Steps of linear warmup: `warmup_steps`, or `warmup_ratio` of the total, rounded up."""
    return cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)


def lr_factor(step: int, total_steps: int, cfg: SchedulerConfig) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    warmup = warmup_steps(total_steps, cfg)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.type == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if cfg.type == "linear":
        shape = 1.0 - progress
    else:  # cosine
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: SchedulerConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
