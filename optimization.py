"""The optimisation side of training, as functions of the parameters and the step: open_clip's AdamW groups,
the gradient clips (open_clip's of the global norm, DINO's of each parameter's) with DINO's freeze of the
prototypes, and every schedule (the learning rate as open_clip's; the teacher temperature, the EMA momentum
and the weight decay as DINO's). train.py uses them each step; tests compare them with open_clip's and
DINO's own code."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

# ----------------------------------------------------------------------------- what AdamW is given


def param_groups(module: nn.Module, weight_decay: float, lr: float, head_lr: float) -> list[dict]:
    """open_clip's AdamW groups: no decay for gains, biases, the class token and logit_scale (every
    tensor under 2 dims); decay for the rest, embeddings and positional tables included. The DINO head
    (parameters under `head.`) has groups of its own with its own peak lr: it starts from random while
    the backbone is fine-tuned, and DINO trains it at 5e-4 x batch / 256."""
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    groups = []
    for in_head, base_lr in ((False, lr), (True, head_lr)):
        part = [p for n, p in params if n.startswith("head.") == in_head]
        for decay in (False, True):
            if chosen := [p for p in part if (p.ndim >= 2) == decay]:
                groups.append({"params": chosen, "base_lr": base_lr,
                               "weight_decay": weight_decay if decay else 0.0})
    return groups


def clip_gradients(params: list[nn.Parameter], frozen: list[nn.Parameter], max_norm: float,
                   mode: str) -> torch.Tensor:
    """open_clip's clip of the global norm (mode global) after DINO's freeze (the `frozen` parameters lose
    their gradients), or DINO's clip of each parameter's own norm before it (mode parameter); max_norm 0:
    no clip. -> the global norm before clipping (nan without a clip: not measured)."""
    params = [p for p in params if p.grad is not None]
    norm = torch.full((), float("nan"), device=params[0].device if params else None)
    if mode == "parameter" and max_norm:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        for p in params:  # DINO's clip_gradients: each scaled by min(1, max_norm / (its norm + 1e-6))
            torch.nn.utils.clip_grad_norm_(p, max_norm)
    for p in frozen:
        p.grad = None
    if mode == "global" and max_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm


# ----------------------------------------------------------------------------- schedules


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """open_clip's cosine_lr: linear warm-up from base/warmup, then cosine to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    e, es = step - warmup, max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base


def teacher_temp_at(step: int, start: float, end: float, warmup: int) -> float:
    """DINO's teacher temperature: linspace(start, end, warmup) (end reached at warmup - 1), then end."""
    return end if step >= warmup - 1 else start + (end - start) * step / (warmup - 1)


def cosine_to(step: int, start: float, end: float, total: int) -> float:
    """DINO's cosine_scheduler: start at step 0, end at step `total`."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * step / total))


def ema_momentum_at(step: int, base: float, total: int, schedule: str) -> float:
    """Fixed (SILC: the teacher keeps following the image-text objective) or DINO's cosine ramp to 1."""
    return base if schedule == "fixed" else cosine_to(step, base, 1, total)


def weight_decay_at(step: int, start: float, end: float, total: int, schedule: str) -> float:
    """Fixed (open_clip) or DINO's cosine ramp from start to end (0.04 -> 0.4 in DINO)."""
    return start if schedule == "fixed" else cosine_to(step, start, end, total)
