"""RS-M-CLIP training: the CLIP loss plus multi-crop local-to-global self-distillation.

    python train.py                                   # the built-in demo: tiny model, a few CPU minutes
    python train.py --preset rs-m-clip --data rsicd/captions.jsonl --data rsitmd/captions.jsonl \
        --init laion --out runs/rs-m-clip
    torchrun --nproc_per_node 4 train.py --preset rs-m-clip ...    # DDP: same script, no flags
    python data/prepare.py cache D.jsonl && python train.py ... --data D.jsonl \
        --image-cache D.train.imagecache.safetensors      # decoded once; views made on the GPU (README)
    python data/prepare.py shards D.jsonl --out S && python train.py ... \
        --data 'S/train-{000000..000099}.tar' --val-data D.jsonl   # streamed tar shards (data/shards.py)

Each image gives 2 global crops and N local crops. The student (the CLIP model and a DINO head on the
ViT class token) sees every crop; an EMA teacher (image tower + head) sees the global crops. Loss =
CLIP(global crop v, a caption of the image in a random enabled language) averaged over the 2 global
views (--clip-view light: on one more, lightly cropped view instead) + distill_weight * DINO
cross-entropy (every teacher global view -> every other student view). --distill-weight 0 is
open_clip's recipe: one lightly cropped view per image and the CLIP loss.
A run directory holds config.json, metrics.jsonl, checkpoint.safetensors (everything needed to resume
exactly, no pickle) and, at the end, model.safetensors (rsmclip format) with its tokenizer beside it,
curves.svg (also `python train.py plot RUN_DIR`) and summary.json. A finished run is left alone; a larger
--steps extends it from its checkpoint.
"""
from __future__ import annotations

import copy
import inspect
import math
import os
import re
import signal
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import typer

import cli
import curves
import eval as ev
import files
import optimization as opt
import rsmclip
import rundir
from cli import COUNT, FRACTION, POSITIVE, WHOLE, Range, option
from data import augment, demo, loading
from data.manifest import LANGS, parse_langs
from data.shards import MAX_MEMBER_MIB


class TrainError(files.RsmclipError):
    pass


# ===================================================================== config

# The DINO loss divides fp32 logits by its temperatures: down to 1e-30 that stays finite (for logits up to
# 3e8 in size) and the softmax is exact; below it the division overflows and the loss is nan.
DINO_TEMPERATURE = Range(1e-30)


@dataclass
class TrainConfig:
    data: list[str] = option([], "captions.jsonl manifests, or WebDataset tar shards: "
                             "'DIR/train-{000000..000099}.tar', a folder of .tar files (repeat the flag, or "
                             "separate them with commas)", unset="none, the built-in demo")
    out: str = option("runs/demo", "run directory; an existing one is resumed")
    init: str = option("", "weights to start from: a file, or rs-m-clip / laion once downloaded",
                       unset="none, a random init of --arch")
    arch: str = option("tiny", f"architecture when starting from random init: {', '.join(rsmclip.PRESETS)}",
                       tuple(rsmclip.PRESETS))
    tokenizer: str = option("", "SentencePiece model",
                            unset="the one the --init weights name, next to them; the demo's own")
    langs: str = option(",".join(LANGS), "caption languages drawn from")
    lang_weights: str = option("", "LANG=P,...: the probability of drawing each named language (en=0.5); the "
                               "other --langs share the rest", unset="every --langs language alike")
    val_data: str = option("", "manifest for validation (val split every --val-every steps, test split "
                           "before and after)", unset="the first --data (none with shards)")
    steps: int = option(600, "optimizer steps", WHOLE)
    batch_size: int = option(32, "images per step and process", WHOLE)
    lr: float = option(5e-4, "peak learning rate (linear warm-up, then cosine to 0)", POSITIVE)
    head_lr: float = option(5e-4, "peak learning rate of the DINO head (same form)", Range())
    warmup: int = option(60, "warm-up steps", COUNT)
    weight_decay: float = option(0.2, "AdamW decay for tensors of 2+ dims", Range())
    weight_decay_schedule: str = option("fixed", "fixed, or cosine to --weight-decay-end (DINO)",
                                        ("fixed", "cosine"))
    weight_decay_end: float = option(0.4, "weight decay at the last step of the cosine schedule", Range())
    beta1: float = option(0.9, "AdamW beta1 (the gradients' running mean)", FRACTION)
    beta2: float = option(0.98, "AdamW beta2 (the squared gradients' running mean)", FRACTION)
    eps: float = option(1e-6, "AdamW epsilon", Range(0, 1, open_lo=True))
    grad_clip: float = option(1.0, "gradient-norm clip; 0: off", Range())
    grad_clip_mode: str = option("global", "clip the norm of all (open_clip) or each parameter's (DINO)",
                                 ("global", "parameter"))
    text_dropout: float = option(0.1, "XLM-R dropout (0.1 as in open_clip)", FRACTION)
    clip_weight: float = option(1.0, "lambda of the CLIP loss; 0: self-distillation alone (no text forward)",
                                Range())
    distill_weight: float = option(1.0, "lambda of the self-distillation loss; 0: CLIP only, open_clip's "
                                   "recipe (one light view)", Range())
    clip_view: str = option("auto", "CLIP loss on the 2 global crops (global, SILC; also with no teacher) or "
                            "on one open_clip view (light); auto: global when distilling, else light",
                            ("auto", "global", "light"))
    local_crops: int = option(8, "local crops per image", COUNT)
    local_size: int = option(24, "local crop pixels (96 for ViT-B/32: a 3x3 grid)", WHOLE)
    global_scale: tuple[float, float] = option((0.4, 1.0), "global crop area range")
    local_scale: tuple[float, float] = option((0.05, 0.4), "local crop area range")
    prototypes: int = option(1024, "DINO head prototypes (output dimensions)", WHOLE)
    head_hidden: int = option(2048, "DINO head MLP width", WHOLE)
    head_bottleneck: int = option(256, "DINO head bottleneck before the prototypes", WHOLE)
    head_input: str = option("class", "DINO head's input: class token or patches' mean", ("class", "patches"))
    head_bn: bool = option(True, "batch norm after the head's hidden layers (DINO's use_bn_in_head): without "
                           "it a random-init ViT's teacher goes uniform (one class token for all images)")
    norm_last_layer: bool = option(True, "keep prototype norms at 1")
    student_temp: float = option(0.1, "DINO student temperature", DINO_TEMPERATURE)
    teacher_temp: float = option(0.04, "teacher temperature after warm-up (DINO's default)", DINO_TEMPERATURE)
    warmup_teacher_temp: float = option(0.04, "teacher temperature at step 0", DINO_TEMPERATURE)
    teacher_temp_steps: int = option(180, "teacher temperature warm-up steps", COUNT)
    center_momentum: float = option(0.9, "momentum of the DINO centre (the teacher outputs' mean)", FRACTION)
    ema_momentum: float = option(0.996, "teacher EMA momentum", FRACTION)
    ema_schedule: str = option("fixed", "fixed (SILC) or cosine (DINO: ramp to 1)", ("fixed", "cosine"))
    drop_path: float = option(0.0, "stochastic depth of the student's ViT blocks (DINO: 0.1)", Range(0, 0.99))
    freeze_last_layer: int = option(0, "steps with frozen head prototypes", COUNT)
    flip: float = option(0.5, "horizontal flip probability", FRACTION)
    jitter_prob: float = option(0.8, "colour jitter probability", FRACTION)
    hue: float = option(0.1, "colour jitter hue range", Range(0, 0.5))
    grayscale: float = option(0.2, "greyscale probability", FRACTION)
    solarize: float = option(0.2, "solarisation probability, second global crop", FRACTION)
    blur: bool = option(True, "DINO's Gaussian blur of the crops")
    precision: str = option("auto", "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16",
                            ("auto", "fp32", "bf16", "fp16"))
    fp32_logits: bool = option(True, "CLIP logits, prototypes: fp32 under autocast")
    compile: bool = option(False, "torch.compile the student")
    grad_checkpointing: bool = option(False, "recompute activations in backward")
    workers: int = option(1, "data loader processes", COUNT)
    image_cache: str = option("", "decoded image cache of the --data manifest (data/prepare.py cache): no "
                              "decoding in the loop", unset="none, images decoded from their files")
    augment: str = option("auto", "pil (in the loader processes), tensor (batched on the training device), "
                          "auto: tensor on CUDA, pil on CPU", ("auto", "pil", "tensor"))
    seed: int = option(0, "seed of the init, data order, augmentation and dropout", COUNT)
    log_every: int = option(20, "write a metrics.jsonl line every N steps", WHOLE)
    val_every: int = option(0, "validate every N steps; 0: at the end only", COUNT)
    ckpt_every: int = option(100, "checkpoint every N steps (and on SIGINT/SIGTERM)", WHOLE)
    shuffle_buffer: int = option(1000, "shards: samples shuffled together (a block each loader worker reads "
                                 "and holds)", WHOLE)
    max_member: int = option(MAX_MEMBER_MIB, "shards: MiB above which a tar member is skipped by its header, "
                             "never read", WHOLE)
    strict_images: bool = option(False, "stop on an unreadable image instead of skipping it")
    deterministic: bool = option(False, "torch deterministic algorithms (exact resume on CPU)")

    def recipe(self) -> augment.Recipe:
        """The views' recipe (data/augment.py) these settings ask for: local crops only for distillation."""
        distill = self.distill_weight > 0
        view = self.clip_view if self.clip_view != "auto" else "global" if distill else "light"
        return augment.Recipe(distill or view == "global", view, self.global_scale, self.local_scale,
                              self.local_crops if distill else 0, self.local_size, self.flip,
                              self.jitter_prob, self.hue, self.grayscale, self.solarize, self.blur)


RECIPES = {
    # Built-in demo: the tiny model from scratch on the demo dataset, in minutes on a CPU. Its captions name
    # colours and corners: no colour jitter (it turned the named colours into others), greyscale,
    # solarisation or flips, and global crops that keep most of the scene; a head the size of the tiny
    # model; 2 local crops, not 8, so that enough steps fit. Why each, measured: docs/internals.md, "What
    # the demo learns".
    "demo": TrainConfig(steps=750, lr=1e-3, local_crops=2, jitter_prob=0.0, hue=0.0, grayscale=0.0,
                        solarize=0.0, flip=0.0, global_scale=(0.8, 1.0), head_hidden=512,
                        head_bottleneck=128),
    # The paper-style run: fine-tune laion's xlm-roberta-base-ViT-B-32 on one GPU. The paper publishes
    # no hyper-parameters: DINO/SILC/COSMOS values where it is silent (see docs/internals.md).
    "rs-m-clip": TrainConfig(
        out="runs/rs-m-clip", arch="xlmr-b32", steps=5000, batch_size=256, lr=1e-5, warmup=500,
        local_size=96, prototypes=65536, teacher_temp_steps=1500, ema_momentum=0.999, freeze_last_layer=300,
        head_bn=False, teacher_temp=0.07,  # a trained CLIP: DINO's ViT head, long-run temperature
        ckpt_every=500, val_every=1000, workers=8),
}


# ===================================================================== model parts

# The self-distillation method lives here, whole: DINO's head, loss and EMA beside the student and teacher
# that use them (as dino's main_dino.py keeps its loss and multi-crop wrapper with the training loop);
# rsmclip.py holds the model and the CLIP loss that inference and open_clip parity need.

class DINOHead(nn.Module):
    """DINO's projection head: 3-layer MLP (bn: batch norm after each hidden layer, batch statistics also in
    the teacher, which DINO never puts in eval mode) -> L2 norm -> weight-normalised prototypes. With
    norm_last_layer the prototype norms (weight norm's g) stay 1, which DINO found stabilising. The
    prototype layer runs in fp32 also under autocast (fp32=False: in the autocast dtype)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden: int = 2048, bottleneck: int = 256,
                 norm_last_layer: bool = True, fp32: bool = True, bn: bool = False):
        super().__init__()
        layers = []
        for n_in in (in_dim, hidden):  # DINO's use_bn_in_head: batch norm after each hidden layer
            layers += [nn.Linear(n_in, hidden)] + ([nn.BatchNorm1d(hidden)] if bn else []) + [nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden, bottleneck))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.prototypes = nn.Parameter(
            nn.Linear(bottleneck, out_dim, bias=False).weight.detach())  # weight norm's v
        self.prototype_norm = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)  # its g
        self.fp32 = fp32

    def last_layer(self) -> list[nn.Parameter]:
        """Every parameter of the prototype layer (what DINO freezes at the start)."""
        return [self.prototypes, self.prototype_norm]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        with rsmclip.outside_autocast(self.fp32, x.device.type):
            prototypes = self.prototype_norm * F.normalize(self.prototypes, dim=-1)
            return F.linear(x.float() if self.fp32 else x, prototypes)


class DINOLoss(nn.Module):
    """Cross-entropy from the centred, sharpened teacher (global views) to the student (every other view),
    averaged over the (teacher view, student view) pairs; then the centre moves toward the teacher mean.
    Computed in fp32, also under autocast."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor],
                teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (loss, mean entropy of the teacher's targets). loss - entropy is the mean student-teacher KL;
        entropy near 0 means collapse to one prototype, near log(out_dim) a uniform (silent) teacher."""
        with rsmclip.outside_autocast(True, self.center.device.type):
            targets = [F.softmax((t.float() - self.center) / teacher_temp, dim=-1).detach() for t in teacher]
            log_probs = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student]
            terms = [(-q * log_p).sum(-1).mean() for i, q in enumerate(targets)
                     for v, log_p in enumerate(log_probs) if v != i]  # a teacher view never teaches itself
            entropy = sum(torch.special.entr(q).sum(-1).mean() for q in targets) / len(targets)
            self.update_center(torch.cat(teacher))
        return sum(terms) / len(terms), entropy

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor):
        total, count = teacher.float().sum(0, keepdim=True), len(teacher)
        if rsmclip.world()[1] > 1:
            torch.distributed.all_reduce(total)
            count *= rsmclip.world()[1]
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)


@torch.no_grad()
def collapse_stats(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
                   student_temp: float, teacher_temp: float) -> dict:
    """What tells DINO's collapse modes apart, per step, on the teacher's first global crops: the mean cosine
    of its outputs between images (1: one for all) and the std across images of its centred logits (below the
    temperature the targets are uniform whatever the head learns); the entropy of the batch-mean target (0:
    one prototype for all images, ln B or ln K: different targets) and the prototypes some image's target
    peaks at; the student's entropy and the centre's norm."""
    t = teacher[0].float()
    unit = F.normalize(t, dim=-1)
    n = len(t)
    cosine = ((unit @ unit.T).sum() - n) / max(n * (n - 1), 1)
    q = F.softmax((t - center) / teacher_temp, dim=-1)
    used = torch.zeros_like(q[0]).index_fill_(0, q.argmax(-1), 1).sum()  # a device tensor: no host sync
    log_p = torch.cat([F.log_softmax(s.float() / student_temp, dim=-1) for s in student])
    return {"teacher_cosine": cosine, "teacher_spread": (t - center).std(0).mean() if n > 1 else cosine * 0,
            "teacher_batch_entropy": torch.special.entr(q.mean(0)).sum(), "teacher_prototypes_used": used,
            "student_entropy": -(log_p.exp() * log_p).sum(-1).mean(), "center_norm": center.norm()}


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float):
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    torch._foreach_lerp_(list(teacher.parameters()), [p.detach() for p in student.parameters()], 1 - momentum)


class Student(nn.Module):
    """What the optimizer trains (and DDP wraps): the CLIP model and the self-distillation head.
    Backbone passes are grouped by crop size (DINO's multi-crop wrapper), the head runs once."""

    def __init__(self, clip: rsmclip.CLIP, head: Optional[DINOHead], views: int, fp32_logits: bool,
                 patches: bool = False):
        super().__init__()
        self.clip, self.head, self.views, self.fp32_logits = clip, head, views, fp32_logits
        self.patches = patches  # the head reads the patch tokens' mean, not the class token

    def forward(self, views: torch.Tensor, locals_: Optional[torch.Tensor], ids: Optional[torch.Tensor]):
        """views: view-major full-size crops (augment.view_layout); the last len(ids) rows: the CLIP views.
        ids None (--clip-weight 0): no CLIP features, no text forward; images and texts are None."""
        visual = self.clip.visual
        tokens = visual.forward_tokens(views)
        images = texts = None
        if ids is not None:
            images = visual.proj(visual.pool(tokens[len(tokens) - len(ids):]))
            texts = self.clip.encode_text(ids)
            if self.fp32_logits:  # normalise the features in fp32 too: the logits are their dot products
                images, texts = images.float(), texts.float()
            images, texts = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
        head = None
        if self.head is not None:
            features = visual.pool(tokens[:2 * len(views) // self.views], self.patches)  # the 2 global crops
            if locals_ is not None:
                features = torch.cat([features, visual.forward_features(locals_, self.patches)])
            head = self.head(features)
        return images, texts, self.clip.logit_scale.exp(), head


class Teacher(nn.Module):
    def __init__(self, student: Student):
        super().__init__()
        self.visual, self.head = copy.deepcopy(student.clip.visual), copy.deepcopy(student.head)
        self.visual.set_drop_path(0)  # stochastic depth is the student's (DINO's teacher has none)
        self.patches = student.patches
        self.requires_grad_(False)

    def forward(self, global_crops: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual.forward_features(global_crops, self.patches))


# ===================================================================== one training step

@dataclass
class Run:
    cfg: TrainConfig
    student: nn.Module  # Student, maybe DDP-wrapped or compiled
    unwrapped: Student  # the student itself, not DDP-wrapped or compiled (checkpoints, EMA)
    teacher: Optional[Teacher]
    dino: Optional[DINOLoss]
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    tokenizer: rsmclip.Tokenizer
    device: torch.device
    dtype: Optional[torch.dtype]  # autocast dtype, None for fp32


def compute_loss(run: Run, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
    """Forward every crop once per resolution; CLIP loss on each CLIP view, DINO loss from the teacher."""
    cfg, dev = run.cfg, run.device
    if "pixels" in batch:  # --augment tensor: the views are made here, on the device, from 8-bit images
        pixels = batch["pixels"].to(dev, non_blocking=True)
        size = run.unwrapped.clip.config.vision.image_size
        radius = augment.blur_taps(size)
        views = augment.views(pixels, batch["view_plan"], size, radius)
        locals_ = (augment.views(pixels, batch["local_plan"], cfg.local_size, radius) if batch["local_plan"]
                   else None)
    else:
        views = batch["views"].to(dev, non_blocking=True)
        locals_ = batch["locals"].to(dev, non_blocking=True) if batch["locals"] is not None else None
    ids = batch["ids"].to(dev, non_blocking=True) if cfg.clip_weight > 0 else None  # 0: no text forward
    n_views, n_clip = augment.view_layout(cfg.recipe())
    with torch.autocast(dev.type, dtype=run.dtype or torch.float32, enabled=run.dtype is not None):
        images, texts, scale, head = run.student(views, locals_ if run.teacher else None, ids)
        clip = (sum(rsmclip.clip_loss(i, t, scale, cfg.fp32_logits)
                    for i, t in zip(images.chunk(n_clip), texts.chunk(n_clip))) / n_clip
                if ids is not None else None)
        if run.teacher is None:
            return cfg.clip_weight * clip, {"clip": clip}
        temp = opt.teacher_temp_at(step, cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.teacher_temp_steps)
        with torch.no_grad():
            teacher = run.teacher(views[:2 * len(views) // n_views]).chunk(2)
        student = head.chunk(2 + (cfg.local_crops if locals_ is not None else 0))
        stats = collapse_stats(student, teacher, run.dino.center, cfg.student_temp, temp)
        distill, entropy = run.dino(student, teacher, temp)
    loss = cfg.distill_weight * distill + (cfg.clip_weight * clip if clip is not None else 0)
    return loss, ({"clip": clip} if clip is not None else {}) | stats | {
        "distill": distill, "teacher_entropy": entropy, "kl": distill - entropy, "teacher_temp": temp}


def train_step(run: Run, batch: dict, step: int) -> dict:
    """Schedule, forward, losses, backward, clip, AdamW, logit_scale clamp, EMA: one open_clip/DINO step.
    -> its logs: losses, logit scale and gradient norm as device tensors, read by the loop only on logging
    steps (reading them here would make the host wait for the device every step)."""
    cfg = run.cfg
    decay = opt.weight_decay_at(step, cfg.weight_decay, cfg.weight_decay_end, cfg.steps,
                                cfg.weight_decay_schedule)
    for group in run.optimizer.param_groups:
        group["lr"] = opt.lr_at(step, group["base_lr"], cfg.warmup, cfg.steps)
        if group["params"][0].ndim >= 2:  # the decayed groups (param_groups)
            group["weight_decay"] = decay
    torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout masks depend on the step only: exact resume
    run.optimizer.zero_grad(set_to_none=True)
    loss, parts = compute_loss(run, batch, step)
    (run.scaler.scale(loss) if run.scaler else loss).backward()
    if run.scaler:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients
    head = run.unwrapped.head
    frozen = head.last_layer() if head is not None and step < cfg.freeze_last_layer else []  # DINO's freeze
    grad_norm = opt.clip_gradients(list(run.unwrapped.parameters()), frozen, cfg.grad_clip,
                                   cfg.grad_clip_mode)
    if run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    with torch.no_grad():
        run.unwrapped.clip.logit_scale.clamp_(0, math.log(100))
    momentum = opt.ema_momentum_at(step, cfg.ema_momentum, cfg.steps, cfg.ema_schedule)
    if run.teacher is not None:
        student = nn.ModuleDict({"visual": run.unwrapped.clip.visual, "head": run.unwrapped.head})
        ema_update(run.teacher, student, momentum)
    lrs = {"lr": opt.lr_at(step, cfg.lr, cfg.warmup, cfg.steps)} | (
        {"head_lr": opt.lr_at(step, cfg.head_lr, cfg.warmup, cfg.steps)} if run.unwrapped.head is not None
        else {})
    parts = {k: v.detach() if torch.is_tensor(v) else v for k, v in parts.items()}
    return {"loss": loss.detach(), **parts, **lrs, "weight_decay": decay,
            "logit_scale": run.unwrapped.clip.logit_scale.detach().exp(), "ema_momentum": momentum,
            "grad_norm": grad_norm}


# ===================================================================== the run

def resolve_precision(precision: str, device_type: str) -> tuple[str, Optional[torch.dtype]]:
    """(name, autocast dtype or None for fp32) of auto | fp32 | bf16 | fp16: auto is bf16 on CUDA, else
    fp32."""
    name = precision if precision != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    return name, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def build_model(cfg: TrainConfig, tokenizer_path: Optional[Path]) -> tuple[rsmclip.CLIP, rsmclip.Tokenizer]:
    if cfg.init:
        model_cfg, sd = rsmclip.read_weights(cfg.init)
        expected = rsmclip.PRESETS[cfg.arch]
        if (model_cfg.vision, model_cfg.embed_dim) != (expected.vision, expected.embed_dim) or \
                replace(model_cfg.text, dropout=0) != replace(expected.text, dropout=0):
            raise TrainError(f"{cfg.init} is not the {cfg.arch} architecture (vision width "
                             f"{model_cfg.vision.width} x {model_cfg.vision.layers}, text vocabulary "
                             f"{model_cfg.text.vocab_size}); pass --arch to match it")
        model_cfg = replace(model_cfg, text=replace(model_cfg.text, dropout=cfg.text_dropout))
        model = rsmclip.build(model_cfg, sd)
        tokenizer_path = tokenizer_path or Path(cfg.init).parent / model_cfg.tokenizer
    else:
        base = rsmclip.PRESETS[cfg.arch]  # a known name: checked with the other settings
        torch.manual_seed(cfg.seed)
        model = rsmclip.CLIP(replace(base, text=replace(base.text, dropout=cfg.text_dropout)))
    return model, rsmclip.tokenizer_for(model.config, tokenizer_path)


def build_run(cfg: TrainConfig, model: rsmclip.CLIP, tokenizer: rsmclip.Tokenizer,
              device: torch.device) -> Run:
    torch.manual_seed(cfg.seed + 7919)  # --seed decides the head's init (a stream apart from the model's)
    head = (DINOHead(model.config.vision.width, cfg.prototypes, cfg.head_hidden, cfg.head_bottleneck,
                     cfg.norm_last_layer, cfg.fp32_logits, cfg.head_bn) if cfg.distill_weight > 0 else None)
    if head is not None and cfg.head_bn and rsmclip.world()[1] > 1 and device.type == "cuda":
        head = nn.SyncBatchNorm.convert_sync_batchnorm(head)  # as DINO: the batch statistics of all ranks
    model.visual.set_drop_path(cfg.drop_path)
    unwrapped = Student(model, head, augment.view_layout(cfg.recipe())[0], cfg.fp32_logits,
                        cfg.head_input == "patches").to(device)
    unwrapped.clip.set_grad_checkpointing(cfg.grad_checkpointing)
    dino = DINOLoss(cfg.prototypes, cfg.student_temp, cfg.center_momentum).to(device) if head else None
    precision, dtype = resolve_precision(cfg.precision, device.type)
    groups = opt.param_groups(unwrapped, cfg.weight_decay, cfg.lr, cfg.head_lr)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    student = unwrapped
    if rsmclip.world()[1] > 1:  # DDP's constructor broadcasts rank 0's parameters into every rank's student
        device_ids = [device.index] if device.type == "cuda" else None
        student = nn.parallel.DistributedDataParallel(unwrapped, device_ids=device_ids)
    teacher = Teacher(unwrapped).to(device) if head else None  # after the broadcast: equal on all ranks
    if cfg.compile:
        student = torch.compile(student)
    return Run(cfg, student, unwrapped, teacher, dino, optimizer, scaler, tokenizer, device, dtype)


def validate(run: Run, manifest: Optional[str], split: str) -> Optional[dict]:
    """Retrieval with eval.py's protocol on a manifest split, in the run's languages that the split has."""
    return ev.validate(run.unwrapped.clip, run.tokenizer, manifest, split, parse_langs(run.cfg.langs),
                       str(run.device))


def begin(run: Run, data: loading.TrainingData, world: loading.World, val_manifest: Optional[str], start: int,
          argv: list[str]) -> Optional[dict]:
    """The main process's start: the run directory made ready (config.json), what is trained said, and
    retrieval before training measured (-> it; on a resume, what the run's first start measured)."""
    cfg, out = run.cfg, Path(run.cfg.out)
    rundir.begin(out, {"config": asdict(cfg), "argv": argv, "world_size": world.size}, start)
    for note in data.shards.notes if data.shards else []:
        print(f"note: {note}")
    source = f"{data.size:,} training images" + (
        f" in {len(data.shards.paths)} shards, {data.streams.streams} streams" if data.shards else "")
    print(f"{'resuming at step ' + str(start) if start else 'starting'}: {source}, "
          f"{cfg.steps} steps of {cfg.batch_size * world.size}, "
          f"{rsmclip.count_parameters(run.unwrapped.clip)['total']:,} parameters, device {world.device}, "
          f"precision {cfg.precision}, augment {'tensor' if loading.tensor_views(cfg, world) else 'pil'}"
          + (f" from {cfg.image_cache}" if data.cache else ""))
    if start:
        return rundir.earlier_before(out)
    before = validate(run, val_manifest, "test")
    if val_manifest:
        print(f"retrieval before training ({val_manifest}, test split): mR {ev.mean_recall(before)}")
    else:
        print("no --val-data: retrieval is not measured (shards hold one split; give the manifest)")
    return before


def finish(run: Run, out: Path, val_manifest: Optional[str], summary: dict):
    """The final weights and their tokenizer, retrieval after training, the curves, and summary.json, written
    last: a run directory that holds it is finished."""
    final = rundir.save_final(out, run.unwrapped.clip, run.tokenizer)
    summary["after"] = validate(run, val_manifest, "test")
    drawn = curves.plot(out)
    rundir.write_summary(out, summary)
    print(f"wrote {drawn}, {out / 'summary.json'}")
    print(f"wrote {final} (tokenizer {run.unwrapped.clip.config.tokenizer} beside it); retrieval mR before "
          f"{ev.mean_recall(summary['before'])} -> after {ev.mean_recall(summary['after'])}")


def train(cfg: TrainConfig, argv: list[str]) -> Path:
    """One run, top to bottom: its data, its model and optimizer (resumed from the checkpoint when there is
    one), the loop, the final weights. Every process of a torchrun runs it; only rank 0 writes."""
    out = Path(cfg.out)
    if rundir.finished(out, cfg.steps):  # before any process group exists
        return out / "model.safetensors"
    world = rundir.setup_distributed()
    main_process = world.rank == 0
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)

    # ----- data -----
    if cfg.data == [str(demo.DEMO_DIR / "captions.jsonl")]:
        if main_process:
            demo.make_demo(demo.DEMO_DIR)  # a few seconds, once
        rundir.barrier()
    data = loading.open_data(cfg, world)

    # ----- model, optimizer, resume -----
    model, tokenizer = build_model(cfg, Path(cfg.tokenizer) if cfg.tokenizer else None)
    run = build_run(cfg, model, tokenizer, world.device)
    checkpoint = out / "checkpoint.safetensors"
    start, skipped = rundir.load_checkpoint(run, checkpoint) if checkpoint.exists() else (0, 0)
    if start:
        rundir.check_data_state(rundir.read_checkpoint(checkpoint)[0].get("data"),
                                data.state(cfg.workers, cfg.batch_size, start), data.shards)
    val_manifest = cfg.val_data or (None if data.shards else cfg.data[0])
    before = begin(run, data, world, val_manifest, start, argv) if main_process else None

    # ----- loop -----
    loader = loading.build_loader(data, cfg, world, model.config.vision.image_size, tokenizer, start,
                                  cfg.steps)
    stop = {"signal": None}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _: stop.update(signal=s))
    step, finite, saved = start, rundir.FiniteWatch(world.device), start
    with rundir.Metrics(out, main_process) as metrics, cli.StepProgress(cfg.steps, start, main_process) as \
            bar:
        for batch in loader:
            failures = loading.failures(batch, cfg.strict_images)
            skipped += len(failures)
            for failure in failures:
                bar.console.print(f"warning: skipped {failure} ({skipped} so far)")
            logs = train_step(run, batch, step)
            finite.update(logs["loss"], step)
            step += 1
            bar.step(step)
            if step % cfg.log_every == 0 or step == cfg.steps:
                finite.check()
                if main_process:
                    logs = metrics.log_step(logs, step, saved, skipped,
                                            cfg.log_every * cfg.batch_size * world.size, world.device.type)
                    clip = f" clip {logs['clip']:.3f}" if "clip" in logs else ""
                    bar.info(f"loss {logs['loss']:.3f}{clip} {logs['images_per_s']:.0f} img/s")
            if cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps and main_process:
                result = validate(run, val_manifest, "val")
                metrics.log({"step": step, "val": result}, step, saved)
                bar.console.print(f"step {step}: validation mR {ev.mean_recall(result)}")
            if stop["signal"] or step % cfg.ckpt_every == 0 or step == cfg.steps:
                finite.check()
                if main_process:
                    state = data.state(cfg.workers, cfg.batch_size, step)
                    rundir.save_checkpoint(run, checkpoint, step, skipped, state, saved)
                    saved = step
                rundir.barrier()
            if stop["signal"]:
                raise TrainError(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved, "
                                 f"the same command resumes")

    # ----- final weights -----
    if main_process:
        finish(run, out, val_manifest, {"steps": cfg.steps, "skipped_images": skipped, "before": before})
    if world.size > 1:
        del run, model  # DDP's reducer holds the process group: see rundir.teardown_distributed
        rundir.teardown_distributed()
    return out / "model.safetensors"


# ===================================================================== command line: the config is the CLI

def check_config(cfg: TrainConfig):
    """Every setting checked before any work (a bad flag must not fail after the model is built and the
    first validation has run): one message listing every problem."""
    bad = cli.check_options(cfg)

    def need(name, ok, what):
        if not ok:
            bad.append(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: {what}")

    if cfg.clip_weight == 0 and cfg.distill_weight == 0:
        bad.append("--clip-weight 0 and --distill-weight 0: no loss is left to train; keep one of them > 0")
    for name in ("global_scale", "local_scale"):
        lo, hi = (tuple(getattr(cfg, name)) + (None, None))[:2]
        numbers = len(getattr(cfg, name)) == 2 and all(isinstance(v, (int, float)) for v in (lo, hi))
        need(name, numbers and 0 < lo <= hi <= 1, "two area fractions 0 < min <= max <= 1")
    try:
        loading.lang_probabilities(cfg.langs, cfg.lang_weights)  # parses --langs too
    except rsmclip.RsmclipError as e:
        bad.append(str(e))
    is_demo = cfg.data == [str(demo.DEMO_DIR / "captions.jsonl")]  # the run makes it, tokenizer included
    for name in ("init", "tokenizer", "val_data"):
        given = getattr(cfg, name)
        need(name, not given or Path(given).is_file() or is_demo and name == "tokenizer", "no such file")
    bad += loading.check_data(cfg, is_demo, int(os.environ.get("WORLD_SIZE", "1")))
    need("out", not Path(cfg.out).exists() or Path(cfg.out).is_dir(), "a file; a run directory is a folder")
    need("tokenizer", cfg.tokenizer or cfg.init, "training a new model from --data needs --tokenizer "
         "(the SentencePiece model for its vocabulary; with --init it is the one next to the weights)")
    if bad:
        raise TrainError("bad settings, nothing was started:\n  " + "\n  ".join(bad))


def resolve_config(preset: str, config_file: Optional[Path], given: dict) -> TrainConfig:
    """Preset defaults, then a saved config.json, then the flags given on the command line."""
    if preset not in RECIPES:
        raise TrainError(f"unknown preset {preset!r}; choose from {', '.join(RECIPES)}")
    cfg = RECIPES[preset]
    if config_file:
        if not config_file.is_file():
            raise TrainError(f"{config_file}: no such config file")
        saved = rundir.read_config_json(config_file, TrainConfig)  # each setting of its type and range
        cfg = replace(cfg, **{k: tuple(v) if isinstance(v, list) and k.endswith("scale") else v
                              for k, v in saved.items()})
    given = {k: v for k, v in given.items() if v is not None and v != []}
    if "data" in given:
        # commas separate entries, except inside a shard pattern's braces ({a,b})
        given["data"] = [p for arg in given["data"] for p in re.split(r",(?![^{}]*\})", arg) if p]
    cfg = replace(cfg, **given)
    if not cfg.data:  # the built-in demo
        cfg = replace(cfg, data=[str(demo.DEMO_DIR / "captions.jsonl")],
                      tokenizer=cfg.tokenizer or str(demo.DEMO_DIR / "spm.model"))
    if cfg.init:  # a known name (rs-m-clip, laion) is the file `download` put in the user cache
        cfg = replace(cfg, init=str(rsmclip.weights_path(cfg.init)))
    return cfg


def _cli_signature():
    """Typer options generated from TrainConfig: one typed config, and the CLI is it."""
    return cli.options_signature(TrainConfig, RECIPES, [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        inspect.Parameter("preset", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
            "demo", help=f"defaults to start from: {', '.join(RECIPES)}")),
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=typer.Option(None, help="re-run a saved run's config.json (default: none, "
                                               "the preset's settings)"))])


def main(**options):
    """Train RS-M-CLIP (CLIP + local-to-global self-distillation). No flags: the built-in demo.
    `python train.py plot RUN_DIR` draws a run's curves."""
    if options.pop("ctx").invoked_subcommand:  # the options belong to training, not to `plot`
        return
    preset, config_file = options.pop("preset"), options.pop("config")
    cfg = resolve_config(preset, config_file, options)
    check_config(cfg)
    lock = rundir.lock_run_dir(Path(cfg.out)) if os.environ.get("RANK", "0") == "0" else None  # noqa: F841 (held)
    rundir.check_resume(cfg)
    train(cfg, sys.argv)


main.__signature__ = _cli_signature()
main.__annotations__ = {p.name: p.annotation for p in main.__signature__.parameters.values()}
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.callback(invoke_without_command=True)(main)  # training: the options without a command


# ===================================================================== the picture of a run: curves.svg


@app.command("plot")
def plot_command(run_dir: Path = typer.Argument(..., help="a run directory (it holds metrics.jsonl)")):
    """Draw RUN_DIR/metrics.jsonl into RUN_DIR/curves.svg: loss parts, lr, logit scale, teacher temperature,
    validation mR (training writes it at the end of every run too)."""
    print(f"wrote {curves.plot(run_dir)}")


if __name__ == "__main__":
    cli.run_cli(app)
