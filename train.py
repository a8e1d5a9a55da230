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
import fcntl
import functools
import gc
import html
import inspect
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import typer
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.text import Text
from safetensors import safe_open

import eval as ev
import rsmclip
import rsmclip_cli
from data import augment
from data import shards as shardlib
from data.demo import make_demo
from data.prepare import ImageCache, load_manifest

ROOT = Path(__file__).resolve().parent
DEMO_DIR = ROOT / "demo_data"


class TrainError(rsmclip.RsmclipError):
    pass


# ===================================================================== config

@dataclass
class TrainConfig:
    data: list[str] = field(default_factory=list, metadata={
        "help": "captions.jsonl manifests, or WebDataset tar shards: 'DIR/train-{000000..000099}.tar', a "
                "folder of .tar files (repeat the flag, or separate them with commas)",
        "unset": "none, the built-in demo"})
    out: str = field(default="runs/demo", metadata={"help": "run directory; an existing one is resumed"})
    init: str = field(default="", metadata={
        "help": "weights to start from: a file, or rs-m-clip / laion once downloaded",
        "unset": "none, a random init of --arch"})
    arch: str = field(default="tiny", metadata={
        "help": f"architecture when starting from random init: {', '.join(rsmclip.PRESETS)}"})
    tokenizer: str = field(default="", metadata={
        "help": "SentencePiece model",
        "unset": "the one the --init weights name, next to them; the demo's own"})
    langs: str = field(default=",".join(rsmclip.LANGS), metadata={"help": "caption languages drawn from"})
    val_data: str = field(default="", metadata={
        "help": "manifest for validation (val split every --val-every steps, test split before and after)",
        "unset": "the first --data (none with shards)"})
    steps: int = field(default=600, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "images per step and process"})
    lr: float = field(default=5e-4, metadata={
        "help": "peak learning rate (linear warm-up, then cosine to 0)"})
    head_lr: float = field(default=5e-4, metadata={"help": "peak learning rate of the DINO head (same form)"})
    warmup: int = field(default=60, metadata={"help": "warm-up steps"})
    weight_decay: float = field(default=0.2, metadata={"help": "AdamW decay for tensors of 2+ dims"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 (the gradients' running mean)"})
    beta2: float = field(default=0.98, metadata={"help": "AdamW beta2 (the squared gradients' running mean)"})
    eps: float = field(default=1e-6, metadata={"help": "AdamW epsilon"})
    grad_clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip; 0: off"})
    text_dropout: float = field(default=0.1, metadata={"help": "XLM-R dropout (0.1 as in open_clip)"})
    clip_weight: float = field(default=1.0, metadata={
        "help": "lambda of the CLIP loss; 0: self-distillation alone (no text forward)"})
    distill_weight: float = field(default=1.0, metadata={
        "help": "lambda of the self-distillation loss; 0: CLIP only, open_clip's recipe (one light view)"})
    clip_view: str = field(default="global", metadata={
        "help": "CLIP loss on the 2 global crops (global, SILC) or on one more, open_clip-like view (light)"})
    local_crops: int = field(default=8, metadata={"help": "local crops per image"})
    local_size: int = field(default=24, metadata={"help": "local crop pixels (96 for ViT-B/32: a 3x3 grid)"})
    global_scale: tuple[float, float] = field(default=(0.4, 1.0), metadata={"help": "global crop area range"})
    local_scale: tuple[float, float] = field(default=(0.05, 0.4), metadata={"help": "local crop area range"})
    prototypes: int = field(default=1024, metadata={"help": "DINO head prototypes (output dimensions)"})
    head_hidden: int = field(default=2048, metadata={"help": "DINO head MLP width"})
    head_bottleneck: int = field(default=256, metadata={"help": "DINO head bottleneck before the prototypes"})
    head_bn: bool = field(default=True, metadata={
        "help": "batch norm after the head's hidden layers (DINO's use_bn_in_head): a random-init ViT's "
                "class token after ln_pre is nearly the same for every image; without it the teacher goes "
                "uniform"})
    norm_last_layer: bool = field(default=True, metadata={"help": "keep prototype norms at 1"})
    student_temp: float = field(default=0.1, metadata={"help": "DINO student temperature"})
    teacher_temp: float = field(default=0.04, metadata={
        "help": "teacher temperature after warm-up (DINO's default)"})
    warmup_teacher_temp: float = field(default=0.04, metadata={"help": "teacher temperature at step 0"})
    teacher_temp_steps: int = field(default=180, metadata={"help": "teacher temperature warm-up steps"})
    center_momentum: float = field(default=0.9, metadata={
        "help": "momentum of the DINO centre (the running mean of the teacher's outputs)"})
    ema_momentum: float = field(default=0.996, metadata={"help": "teacher EMA momentum"})
    ema_schedule: str = field(default="fixed", metadata={"help": "fixed (SILC) or cosine (DINO: ramp to 1)"})
    freeze_last_layer: int = field(default=0, metadata={"help": "steps with frozen head prototypes"})
    flip: float = field(default=0.5, metadata={"help": "horizontal flip probability"})
    jitter_prob: float = field(default=0.8, metadata={"help": "colour jitter probability"})
    hue: float = field(default=0.1, metadata={"help": "colour jitter hue range"})
    grayscale: float = field(default=0.2, metadata={"help": "greyscale probability"})
    solarize: float = field(default=0.2, metadata={"help": "solarisation probability, second global crop"})
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16"})
    fp32_logits: bool = field(default=True, metadata={"help": "CLIP logits, prototypes: fp32 under autocast"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the student"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    workers: int = field(default=1, metadata={"help": "data loader processes"})
    image_cache: str = field(default="", metadata={
        "help": "decoded image cache of the --data manifest (data/prepare.py cache): no decoding in the "
                "loop", "unset": "none, images decoded from their files"})
    augment: str = field(default="auto", metadata={
        "help": "pil (in the loader processes), tensor (batched on the training device), auto: tensor on "
                "CUDA, pil on CPU"})
    seed: int = field(default=0, metadata={"help": "seed of the init, data order, augmentation and dropout"})
    log_every: int = field(default=20, metadata={"help": "write a metrics.jsonl line every N steps"})
    val_every: int = field(default=0, metadata={"help": "validate every N steps; 0: at the end only"})
    ckpt_every: int = field(default=100, metadata={
        "help": "checkpoint every N steps (and on SIGINT/SIGTERM)"})
    shuffle_buffer: int = field(default=1000, metadata={
        "help": "shards: samples shuffled together (a block each loader worker reads and holds)"})
    strict_images: bool = field(default=False, metadata={
        "help": "stop on an unreadable image instead of skipping it"})
    deterministic: bool = field(default=False, metadata={
        "help": "torch deterministic algorithms (exact resume on CPU)"})

    def recipe(self) -> augment.Recipe:
        """The views' recipe (data/augment.py) these settings ask for."""
        return augment.Recipe(self.distill_weight > 0, self.clip_view, self.global_scale, self.local_scale,
                              self.local_crops, self.local_size, self.flip, self.jitter_prob, self.hue,
                              self.grayscale, self.solarize)


RECIPES = {
    # Built-in demo: the tiny model from scratch on the demo dataset, 5 min 53 s on an idle 2-core CPU.
    # Demo captions name colours and corners: no colour jitter, greyscale, solarisation or flips, and
    # global crops that keep most of the scene. Brightness, contrast and saturation jitter alone (hue
    # already off) held colour at 43.5% (one caption per colour, chance 25%); off, 66.5% at 600 steps and
    # 96.5% at 900 (docs/internals.md, "What the demo learns").
    # A head the size of the tiny model, not of ViT-B's.
    # 750 steps at lr 1e-3 with 2 local crops, not 8 (so that 750 steps fit), on demo 3 (kinds of different
    # sizes), seeds 0-2: colour 95.3 +- 2.1%, kind 61.2 +- 3.3% (65.0, 59.0, 59.5), ground 100%, test mR
    # 34.09 +- 2.11, 412 s on one core beside a busy one (900 steps, 8 crops, lr 5e-4: 629 s).
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


# ===================================================================== schedules (pure functions)

def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """open_clip's cosine_lr: linear warm-up from base/warmup, then cosine to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    e, es = step - warmup, max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base


def teacher_temp_at(step: int, start: float, end: float, warmup: int) -> float:
    """DINO's teacher temperature: linspace(start, end, warmup) (end reached at warmup - 1), then end."""
    return end if step >= warmup - 1 else start + (end - start) * step / (warmup - 1)


def ema_momentum_at(step: int, base: float, total: int, schedule: str) -> float:
    """Fixed (SILC: the teacher keeps following the image-text objective) or DINO's cosine ramp to 1."""
    return base if schedule == "fixed" else 1 + 0.5 * (base - 1) * (1 + math.cos(math.pi * step / total))


# ===================================================================== data

def read_manifests(paths: list[str], split: str) -> list[dict]:
    """Records of one split, image paths resolved inside their manifest's folder."""
    items = []
    for path in map(Path, paths):
        try:
            records = load_manifest(path)
        except rsmclip.RsmclipError as e:
            raise TrainError(str(e)) from None
        items += [{**r, "path": path.parent / r["image"]} for r in records if r["split"] == split]
    return items


class MultiCropDataset(torch.utils.data.Dataset):
    """Sample (index, seed) -> full-size views (augment.view_layout), local crops, a caption per CLIP view.
    Images come from their files or, with `cache`, from the decoded image cache (no decoding). With
    tensor=True a sample is its 8-bit image and its views' parameters: the training device applies them
    to the whole batch (collate, data/augment.py). An unreadable image is replaced by the next readable one
    (batches keep their size, which DDP needs) and reported."""

    def __init__(self, items: list[dict], cfg: TrainConfig, image_size: int, tokenizer: rsmclip.Tokenizer,
                 cache: Optional[ImageCache] = None, tensor: bool = False):
        self.items, self.recipe, self.image_size, self.tokenizer = items, cfg.recipe(), image_size, tokenizer
        self.langs = rsmclip.parse_langs(cfg.langs)
        self.cache, self.tensor = cache, tensor

    def __len__(self):
        return len(self.items)

    def read(self, index: int) -> tuple[dict, np.ndarray | Image.Image, list[str]]:
        """-> (item, image, failures): [H, W, 3] uint8 from the cache, else the first readable file from
        `index` on."""
        if self.cache is not None:
            return self.items[index], self.cache[index], []
        failures = []
        for attempt in range(len(self.items)):
            item = self.items[(index + attempt) % len(self.items)]
            try:
                return item, rsmclip.open_image(item["path"]), failures
            except rsmclip.ImageError as e:
                failures.append(str(e))
        raise TrainError("no training image can be read")

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        rng = random.Random(seed)
        item, image, failures = self.read(index)
        height, width = image.shape[:2] if isinstance(image, np.ndarray) else image.size[::-1]
        views, local = augment.draw_sample(width, height, self.recipe, self.image_size, rng)
        langs = [lang for lang in self.langs if item["captions"].get(lang)]
        clip_views = augment.view_layout(self.recipe)[1]
        captions = [rng.choice(item["captions"][rng.choice(langs)]) for _ in range(clip_views)]
        sample = {"ids": self.tokenizer(captions), "failures": failures}
        if self.tensor:
            return sample | {"pixels": torch.from_numpy(np.array(image)), "view_params": views,
                             "local_params": local}
        image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
        pil = augment.apply_pil
        return sample | {"views": torch.stack([pil(image, self.image_size, p) for p in views]),
                         "locals": torch.stack([pil(image, self.recipe.local_size, p) for p in local])
                         if local else None}


class ShardDataset(MultiCropDataset):
    """The same samples as MultiCropDataset, read from tar shards: a key is ((stream, position), seed)
    (data/shards.py). A sample without image or caption, or whose image does not decode, is replaced by
    the next one of its stream and reported, as an unreadable file is; a shard that cannot be read stops the
    run with its message (carried in the batch: a loader worker's exception would arrive as a traceback)."""

    def __init__(self, shards: shardlib.ShardSet, streams: shardlib.Streams, cfg: TrainConfig,
                 image_size: int, tokenizer: rsmclip.Tokenizer, tensor: bool = False):
        super().__init__([], cfg, image_size, tokenizer, None, tensor)
        self.reader = shardlib.ShardReader(shards, streams)

    def read(self, index: tuple[int, int]) -> tuple[dict, Image.Image, list[str]]:
        stream, position = index
        failures = []
        for attempt in range(self.reader.streams.block):
            shard, key, data = self.reader.get(stream, position + attempt)
            try:
                captions, name, image = shardlib.parse_sample(shard, key, data)
                if not any(captions.get(lang) for lang in self.langs):
                    raise rsmclip.ImageError(f"{name}: no caption in --langs {','.join(self.langs)}")
                return {"captions": captions}, rsmclip.open_image(name, image), failures
            except rsmclip.ImageError as e:
                failures.append(str(e))
        raise shardlib.ShardError(f"stream {stream}: {len(failures)} samples in a row cannot be used, the "
                                  f"last: {failures[-1]}")

    def __getitem__(self, key):
        try:
            return super().__getitem__(key)
        except shardlib.ShardError as e:
            return {"fatal": str(e)}


def collate(samples: list[dict]) -> dict:
    """Stack view-major ([view 0 of every image, view 1 of every image, ...]) as the losses expect. Tensor
    samples give their images, padded to one size, and the plans of their views (data/augment.py)."""
    if fatal := [s["fatal"] for s in samples if "fatal" in s]:
        return {"fatal": fatal[0]}
    ids = torch.stack([s["ids"] for s in samples], 1).flatten(0, 1)
    # cut after the longest caption here, on the CPU: the text tower does not on a GPU (a host sync)
    last = int((ids != rsmclip.PAD).any(0).nonzero().max()) + 1
    out = {"ids": ids[:, :last], "failures": [f for s in samples for f in s["failures"]]}
    if "pixels" in samples[0]:
        def view_major(key):
            return [(i, s[key][v]) for v in range(len(samples[0][key])) for i, s in enumerate(samples)]

        return out | {"pixels": augment.pad_images([s["pixels"] for s in samples]),
                      "view_plan": augment.plan(view_major("view_params")),
                      "local_plan": augment.plan(view_major("local_params"))}
    out["views"] = torch.stack([s["views"] for s in samples], 1).flatten(0, 1)
    out["locals"] = (torch.stack([s["locals"] for s in samples], 1).flatten(0, 1)
                     if samples[0]["locals"] is not None else None)
    return out


class StepSampler:
    """Batches of (index, seed) for steps start..steps-1. The order of epoch e is a permutation seeded by
    (seed, e); each process takes its slice of the global batch; each sample's augmentation seed is
    derived from (seed, step, position). So data are a pure function of the step: resume is exact."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int, start: int, steps: int):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self.start, self.steps = start, steps
        self.per_epoch = n // (batch * world)

    def __len__(self):
        return self.steps - self.start

    def __iter__(self):
        order, epoch = None, -1
        for step in range(self.start, self.steps):
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
                order = torch.randperm(self.n, generator=generator)
            pos = (step % self.per_epoch) * self.batch * self.world + self.rank * self.batch
            yield [(int(i), (self.seed * 1_000_003 + step) * 4096 + self.rank * self.batch + j)
                   for j, i in enumerate(order[pos:pos + self.batch])]


class StreamSampler:
    """Shards' batches for steps start..steps-1: ((stream, position), seed) keys. At step k each process
    reads the next batch of its stream k mod S (S = max(workers, 1) streams a process): the loader sends
    a step's batch to worker (k - start) mod workers, so each worker always reads the same stream, in
    order. Augmentation seeds as StepSampler's."""

    def __init__(self, streams: int, batch: int, rank: int, seed: int, start: int, steps: int):
        self.streams, self.batch, self.rank, self.seed = streams, batch, rank, seed
        self.start, self.steps = start, steps

    def __len__(self):
        return self.steps - self.start

    def __iter__(self):
        for step in range(self.start, self.steps):
            stream = self.rank * self.streams + step % self.streams
            position = (step // self.streams) * self.batch
            seed = (self.seed * 1_000_003 + step) * 4096 + self.rank * self.batch
            yield [((stream, position + j), seed + j) for j in range(self.batch)]


def open_shards(data: list[str]) -> shardlib.ShardSet:
    """The shards, opened once while their files are unchanged: the settings check and the run share them
    (others' shards are counted from their headers, minutes at millions of samples)."""
    paths = shardlib.shard_paths(data)
    files = [*paths, *{p.parent / shardlib.INDEX for p in paths if (p.parent / shardlib.INDEX).is_file()}]
    return opened_shards(tuple(data), tuple(tuple(rsmclip.file_stamp(f)) for f in files))


@functools.lru_cache(maxsize=1)
def opened_shards(data: tuple[str, ...], stamps: tuple) -> shardlib.ShardSet:
    return shardlib.open_shards(list(data))


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
                   student_temp: float) -> dict:
    """What tells DINO's collapse modes apart, per step (before the centre moves): the teacher's output for
    different images of the batch (mean pairwise cosine, near 1: the same output for every image; the std
    across images of the centred logits, to compare with the teacher temperature: below it the targets are
    uniform whatever the head learns), the student's entropy and the centre's norm."""
    t = teacher[0].float()
    unit = F.normalize(t, dim=-1)
    n = len(t)
    cosine = ((unit @ unit.T).sum() - n) / max(n * (n - 1), 1)
    log_p = torch.cat([F.log_softmax(s.float() / student_temp, dim=-1) for s in student])
    return {"teacher_cosine": cosine, "teacher_spread": (t - center).std(0).mean() if n > 1 else cosine * 0,
            "student_entropy": -(log_p.exp() * log_p).sum(-1).mean(), "center_norm": center.norm()}


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float):
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    torch._foreach_lerp_(list(teacher.parameters()), [p.detach() for p in student.parameters()], 1 - momentum)


class Student(nn.Module):
    """What the optimizer trains (and DDP wraps): the CLIP model and the self-distillation head.
    Backbone passes are grouped by crop size (DINO's multi-crop wrapper), the head runs once."""

    def __init__(self, clip: rsmclip.CLIP, head: Optional[DINOHead], views: int, fp32_logits: bool):
        super().__init__()
        self.clip, self.head, self.views, self.fp32_logits = clip, head, views, fp32_logits

    def forward(self, views: torch.Tensor, locals_: Optional[torch.Tensor], ids: Optional[torch.Tensor]):
        """views: view-major full-size crops (augment.view_layout); the last len(ids) rows: the CLIP views.
        ids None (--clip-weight 0): no CLIP features, no text forward; images and texts are None."""
        tokens = self.clip.visual.forward_features(views)
        images = texts = None
        if ids is not None:
            images = self.clip.visual.proj(tokens[len(tokens) - len(ids):])
            texts = self.clip.encode_text(ids)
            if self.fp32_logits:  # normalise the features in fp32 too: the logits are their dot products
                images, texts = images.float(), texts.float()
            images, texts = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
        head = None
        if self.head is not None:
            tokens = tokens[:2 * len(views) // self.views]  # the two global crops
            if locals_ is not None:
                tokens = torch.cat([tokens, self.clip.visual.forward_features(locals_)])
            head = self.head(tokens)
        return images, texts, self.clip.logit_scale.exp(), head


class Teacher(nn.Module):
    def __init__(self, student: Student):
        super().__init__()
        self.visual, self.head = copy.deepcopy(student.clip.visual), copy.deepcopy(student.head)
        self.requires_grad_(False)

    def forward(self, global_crops: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual.forward_features(global_crops))


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
        temp = teacher_temp_at(step, cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.teacher_temp_steps)
        with torch.no_grad():
            teacher = run.teacher(views[:2 * len(views) // n_views]).chunk(2)
        student = head.chunk(2 + (cfg.local_crops if locals_ is not None else 0))
        stats = collapse_stats(student, teacher, run.dino.center, cfg.student_temp)
        distill, entropy = run.dino(student, teacher, temp)
    loss = cfg.distill_weight * distill + (cfg.clip_weight * clip if clip is not None else 0)
    return loss, ({"clip": clip} if clip is not None else {}) | stats | {
        "distill": distill, "teacher_entropy": entropy, "kl": distill - entropy, "teacher_temp": temp}


def train_step(run: Run, batch: dict, step: int) -> dict:
    """Schedule, forward, losses, backward, clip, AdamW, logit_scale clamp, EMA: one open_clip/DINO step.
    -> its logs: losses, logit scale and gradient norm as device tensors, read by the loop only on logging
    steps (reading them here would make the host wait for the device every step)."""
    cfg = run.cfg
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(step, group["base_lr"], cfg.warmup, cfg.steps)
    torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout masks depend on the step only: exact resume
    run.optimizer.zero_grad(set_to_none=True)
    loss, parts = compute_loss(run, batch, step)
    (run.scaler.scale(loss) if run.scaler else loss).backward()
    if run.scaler:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients
    if run.unwrapped.head is not None and step < cfg.freeze_last_layer:
        for p in run.unwrapped.head.last_layer():  # DINO: the prototypes stay put while the head settles
            p.grad = None
    grad_norm = (torch.nn.utils.clip_grad_norm_(run.unwrapped.parameters(), cfg.grad_clip) if cfg.grad_clip
                 else torch.full((), float("nan"), device=run.device))
    if run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    with torch.no_grad():
        run.unwrapped.clip.logit_scale.clamp_(0, math.log(100))
    momentum = ema_momentum_at(step, cfg.ema_momentum, cfg.steps, cfg.ema_schedule)
    if run.teacher is not None:
        student = nn.ModuleDict({"visual": run.unwrapped.clip.visual, "head": run.unwrapped.head})
        ema_update(run.teacher, student, momentum)
    lrs = {"lr": lr_at(step, cfg.lr, cfg.warmup, cfg.steps)} | (
        {"head_lr": lr_at(step, cfg.head_lr, cfg.warmup, cfg.steps)} if run.unwrapped.head is not None
        else {})
    parts = {k: v.detach() if torch.is_tensor(v) else v for k, v in parts.items()}
    return {"loss": loss.detach(), **parts, **lrs,
            "logit_scale": run.unwrapped.clip.logit_scale.detach().exp(), "ema_momentum": momentum,
            "grad_norm": grad_norm}


def read_logs(logs: dict) -> dict:
    """train_step's logs as numbers: one transfer for all the device values."""
    names = [k for k, v in logs.items() if torch.is_tensor(v)]
    values = torch.stack([logs[k].float().reshape(()) for k in names]).tolist() if names else []
    return logs | dict(zip(names, values))


class FiniteWatch:
    """The first step whose loss is not finite, kept on the device (no host sync per step); check() reads
    it, on logging steps and before each checkpoint, so no checkpoint is ever written past that step."""

    def __init__(self, device: torch.device):
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.loss = torch.zeros((), device=device)

    def update(self, loss: torch.Tensor, step: int):
        first = (self.step < 0) & ~torch.isfinite(loss)
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss.float(), self.loss)

    def check(self):
        step, loss = torch.stack([self.step.float(), self.loss]).tolist()
        if step >= 0:
            raise TrainError(f"non-finite loss ({loss}) at step {int(step)}; the last checkpoint is kept")


# ===================================================================== checkpoints (no pickle)

def save_checkpoint(run: Run, path: Path, step: int, skipped: int, data: Optional[dict] = None):
    """Everything a resume needs in one safetensors file (tensors + JSON metadata), written to a
    temporary file and renamed: a kill at any moment leaves the previous checkpoint intact. `data`: where
    the shards' streams stand (shards.stream_state); a manifest's order is a function of the step alone."""
    tensors = {f"student.{k}": v for k, v in run.unwrapped.state_dict().items()}
    if run.teacher is not None:
        tensors |= {f"teacher.{k}": v for k, v in run.teacher.state_dict().items()}
        tensors["dino.center"] = run.dino.center
    optim = run.optimizer.state_dict()
    for index, state in optim["state"].items():
        tensors |= {f"optim.{index}.{k}": v for k, v in state.items()}
    meta = {"step": step, "skipped": skipped, "param_groups": optim["param_groups"],
            "scaler": run.scaler.state_dict() if run.scaler else None, "data": data}
    tensors = {k: v.detach().clone() for k, v in tensors.items()}
    rsmclip.atomic_save(tensors, path, {"state": json.dumps(meta)})


def read_checkpoint(path: Path, device: Optional[str] = None) -> tuple[dict, dict]:
    """The one reader of a checkpoint: (metadata, its step included; the tensors, on `device`, or none
    without one)."""
    try:
        with safe_open(str(path), "pt", device=device or "cpu") as f:
            meta = json.loads(f.metadata()["state"])
            meta["step"]
            tensors = {k: f.get_tensor(k) for k in f.keys()} if device else {}
    except Exception as e:  # any failure here means the file is not a checkpoint of ours
        raise TrainError(f"{path}: unreadable checkpoint ({e})") from None
    return meta, tensors


def load_checkpoint(run: Run, path: Path) -> tuple[int, int]:
    meta, tensors = read_checkpoint(path, str(run.device))

    def section(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    run.unwrapped.load_state_dict(section("student."), strict=True)
    if run.teacher is not None:
        run.teacher.load_state_dict(section("teacher."), strict=True)
        run.dino.center.copy_(tensors["dino.center"])
    state = {}
    for key, value in section("optim.").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value if name != "step" else value.cpu()
    run.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if run.scaler and meta["scaler"]:
        run.scaler.load_state_dict(meta["scaler"])
    return meta["step"], meta["skipped"]


# ===================================================================== distributed

def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Only under torchrun (WORLD_SIZE > 1) is a process group created."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        return torch.distributed.get_rank(), world, device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def barrier():
    if rsmclip.world()[1] > 1:
        torch.distributed.barrier()


def teardown_distributed():
    """Destroy the process group once every rank is done with it. Callers first drop what holds it (the
    DDP wrapper, graphs with collectives): freed later, during interpreter shutdown, gloo's objects can
    abort the process ("terminate called without an active exception"), so they are collected here while
    Python is alive."""
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ===================================================================== the run

def resolve_precision(precision: str, device_type: str) -> tuple[str, Optional[torch.dtype]]:
    """(name, autocast dtype or None for fp32) of auto | fp32 | bf16 | fp16: auto is bf16 on CUDA, else
    fp32."""
    name = precision if precision != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    return name, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def memory_mb(device_type: str, peak: bool = True) -> float:
    """MiB in use: on CUDA the allocator's peak (or current) allocation; elsewhere the process' peak
    (VmHWM) or current (VmRSS) resident set, read from Linux's /proc/self/status."""
    if device_type == "cuda":
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2 ** 20
    field_name = "VmHWM" if peak else "VmRSS"
    line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith(field_name))
    return int(line.split()[1]) / 1024


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
    unwrapped = Student(model, head, augment.view_layout(cfg.recipe())[0], cfg.fp32_logits).to(device)
    unwrapped.clip.set_grad_checkpointing(cfg.grad_checkpointing)
    dino = DINOLoss(cfg.prototypes, cfg.student_temp, cfg.center_momentum).to(device) if head else None
    precision, dtype = resolve_precision(cfg.precision, device.type)
    optimizer = torch.optim.AdamW(param_groups(unwrapped, cfg.weight_decay, cfg.lr, cfg.head_lr), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=device.type == "cuda")
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
    """Retrieval with eval.py's protocol on a manifest split, in the run's languages that the split has
    (None if it has no such images, or there is no manifest)."""
    if manifest is None:
        return None
    chosen = [r for r in load_manifest(Path(manifest)) if r["split"] == split]
    langs = [lang for lang in rsmclip.parse_langs(run.cfg.langs)
             if all(r["captions"].get(lang) for r in chosen)]
    if not chosen or not langs:
        return None
    model = run.unwrapped.clip  # evaluate_retrieval switches dropout off and back on itself
    preprocess = rsmclip.Preprocess(model.config.vision.image_size)
    return ev.evaluate_retrieval(model, run.tokenizer, preprocess, Path(manifest), split, langs, 128,
                                 str(run.device), workers=0)


def recall(result: dict) -> float:
    """mR over languages (or of the only one)."""
    return result.get("mean", next(iter(result.values())))["mR"]


def mean_recall(result: Optional[dict]) -> str:
    return "n/a" if result is None else f"{recall(result):.2f}"


def check_languages(items: list[dict], langs: list[str]):
    """The training data hold captions in each language (their codes were checked with the other settings);
    shards are passed as one item holding the languages their shards.json lists (others': English)."""
    present = {lang for item in items for lang, caps in item["captions"].items() if caps}
    if missing := [lang for lang in langs if lang not in present]:
        raise TrainError(f"no {', '.join(missing)} captions in the training data (it has "
                         f"{', '.join(sorted(present)) or 'none'}); translate them or pass --langs")
    if unusable := sum(1 for item in items if not any(item["captions"].get(lang) for lang in langs)):
        raise TrainError(f"{unusable} training images have no caption in {','.join(langs)}")


class StepRate(ProgressColumn):
    """steps/s and the time left, from the mean duration of the steps this process has run, shown from the
    first finished step on (rich's own estimate waits for several updates within 30 s, so a slow run read
    -:--:-- throughout)."""

    def render(self, task) -> Text:
        if not task.fields["ran"]:
            return Text("first step ...")
        rate = task.fields["ran"] / task.fields["seconds"]
        left = round((task.total - task.completed) / rate)
        return Text(f"{rate:.2f} steps/s, {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left")


def train(cfg: TrainConfig, argv: list[str]) -> Path:
    out = Path(cfg.out)
    if (done := finished_step(out)) is not None and done >= cfg.steps:  # before any process group exists
        if os.environ.get("RANK", "0") == "0":
            print(f"{out} already finished at step {done}: nothing to do, no file changed. To train it "
                  f"further, run the same command with a larger --steps (e.g. --steps {2 * done}): it "
                  "continues from its last checkpoint")
        return out / "model.safetensors"
    rank, world, device = setup_distributed()
    is_main = rank == 0
    checkpoint = out / "checkpoint.safetensors"
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)

    # ----- data -----
    if cfg.data == [str(DEMO_DIR / "captions.jsonl")]:
        if is_main:
            make_demo(DEMO_DIR)  # a few seconds, once
        barrier()
    shards = open_shards(cfg.data) if shardlib.is_shards(cfg.data) else None
    if shards:
        items = []
        streams = shardlib.Streams(shards.counts, world * max(cfg.workers, 1), cfg.seed, cfg.shuffle_buffer)
        check_languages([{"captions": {lang: [""] for lang in shards.langs}}], rsmclip.parse_langs(cfg.langs))
        size = sum(shards.counts)
    else:
        items = read_manifests(cfg.data, "train")
        if not items:
            raise TrainError(f"no training images in {', '.join(cfg.data)} (split 'train')")
        check_languages(items, rsmclip.parse_langs(cfg.langs))
        size = len(items)
    cache = ImageCache(Path(cfg.image_cache), Path(cfg.data[0])) if cfg.image_cache else None
    # Batched on a GPU the augmentation costs little of the step; on a CPU it would share the cores with
    # the model, while PIL runs in the loader processes beside it
    tensor = cfg.augment == "tensor" or cfg.augment == "auto" and device.type == "cuda"
    if size < cfg.batch_size * world:
        raise TrainError(f"{size} training images: fewer than one batch of {cfg.batch_size * world}")

    # ----- model, optimizer, resume -----
    model, tokenizer = build_model(cfg, Path(cfg.tokenizer) if cfg.tokenizer else None)
    run = build_run(cfg, model, tokenizer, device)
    start, skipped = (load_checkpoint(run, checkpoint) if checkpoint.exists() else (0, 0))
    if start:
        check_data_state(read_checkpoint(checkpoint)[0].get("data"), shards and shardlib.stream_state(
            shards, streams, max(cfg.workers, 1), cfg.batch_size, start))
    val_manifest = cfg.val_data or (None if shards else cfg.data[0])
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        # A kill during a write leaves a temporary file: atomic_write's (.NAME.PID.XXXX.tmp) or the one
        # safetensors itself writes and renames (.tmpXXXXXX, Rust's tempfile)
        for stale in [*out.glob(".*.tmp"), *out.glob(".tmp??????")]:
            stale.unlink()
        cut_metrics(out / "metrics.jsonl", start)
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        saved = {"config": asdict(cfg), "argv": argv, "git_commit": commit, "world_size": world}
        text = json.dumps(saved, indent=2) + "\n"
        rsmclip.atomic_write(out / "config.json", lambda tmp: tmp.write_text(text))
        for note in shards.notes if shards else []:
            print(f"note: {note}")
        source = f"{size:,} training images" + (f" in {len(shards.paths)} shards, {streams.streams} streams"
                                                if shards else "")
        print(f"{'resuming at step ' + str(start) if start else 'starting'}: {source}, "
              f"{cfg.steps} steps of {cfg.batch_size * world}, {rsmclip.count_parameters(model)['total']:,} "
              f"parameters, device {device}, precision {cfg.precision}, "
              f"augment {'tensor' if tensor else 'pil'}" + (f" from {cfg.image_cache}" if cache else ""))
    before = None
    if is_main:
        before = validate(run, val_manifest, "test") if start == 0 else earlier_before(out)
    if is_main and start == 0 and val_manifest:
        print(f"retrieval before training ({val_manifest}, test split): mR {mean_recall(before)}")
    elif is_main and start == 0:
        print("no --val-data: retrieval is not measured (shards hold one split; give the manifest)")

    # ----- loop -----
    if shards:
        dataset = ShardDataset(shards, streams, cfg, model.config.vision.image_size, tokenizer, tensor)
        sampler = StreamSampler(max(cfg.workers, 1), cfg.batch_size, rank, cfg.seed, start, cfg.steps)
    else:
        dataset = MultiCropDataset(items, cfg, model.config.vision.image_size, tokenizer, cache, tensor)
        sampler = StepSampler(len(items), cfg.batch_size, rank, world, cfg.seed, start, cfg.steps)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=False)
    stop = {"signal": None}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _: stop.update(signal=s))
    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   StepRate(), disable=not is_main)
    step, tick, finite, saved = start, time.perf_counter(), FiniteWatch(device), start
    began = tick
    with bar, open(out / "metrics.jsonl", "a") if is_main else open(os.devnull, "w") as metrics:
        task = bar.add_task("train", total=cfg.steps, completed=start, info="", ran=0, seconds=0.0)
        for batch in loader:
            if "fatal" in batch:
                raise TrainError(batch["fatal"])
            if batch["failures"]:
                if cfg.strict_images:
                    raise TrainError(f"unreadable training image: {batch['failures'][0]} "
                                     "(drop --strict-images to skip)")
                skipped += len(batch["failures"])
                for failure in batch["failures"]:
                    bar.console.print(f"warning: skipped {failure} ({skipped} so far)")
            logs = train_step(run, batch, step)
            finite.update(logs["loss"], step)
            step += 1
            bar.update(task, completed=step, ran=step - start, seconds=time.perf_counter() - began)
            if step % cfg.log_every == 0 or step == cfg.steps:
                finite.check()
                if is_main:
                    now = time.perf_counter()
                    logs = read_logs(logs) | {
                        "step": step, "images_per_s": cfg.log_every * cfg.batch_size * world / (now - tick),
                        "skipped_images": skipped, "memory_mb": memory_mb(device.type)}
                    tick = now
                    log_line(metrics, logs, step, saved)
                    clip = f" clip {logs['clip']:.3f}" if "clip" in logs else ""
                    bar.update(task, info=f"loss {logs['loss']:.3f}{clip} {logs['images_per_s']:.0f} img/s")
            if cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps and is_main:
                result = validate(run, val_manifest, "val")
                log_line(metrics, {"step": step, "val": result}, step, saved)
                bar.console.print(f"step {step}: validation mR {mean_recall(result)}")
            if stop["signal"] or step % cfg.ckpt_every == 0 or step == cfg.steps:
                finite.check()
                if is_main:
                    try:
                        save_checkpoint(run, checkpoint, step, skipped, shards and shardlib.stream_state(
                            shards, streams, max(cfg.workers, 1), cfg.batch_size, step))
                    except rsmclip.RsmclipError as e:  # a full disk: the previous checkpoint is whole
                        raise stopped(str(e), step, saved) from None
                    saved = step
                barrier()
            if stop["signal"]:
                raise TrainError(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved, "
                                 f"the same command resumes")

    # ----- final weights -----
    final = out / "model.safetensors"
    if is_main:
        rsmclip.save(run.unwrapped.clip, final, tokenizer_sha256=rsmclip.file_sha256(tokenizer.path))
        tokenizer_copy = out / model.config.tokenizer
        if tokenizer.path.resolve() != tokenizer_copy.resolve():
            data = tokenizer.path.read_bytes()
            rsmclip.atomic_write(tokenizer_copy, lambda tmp: tmp.write_bytes(data))
        after = validate(run, val_manifest, "test")
        summary = {"steps": cfg.steps, "skipped_images": skipped, "before": before, "after": after}
        curves = plot(out)
        text = json.dumps(summary, indent=2) + "\n"
        rsmclip.atomic_write(out / "summary.json", lambda tmp: tmp.write_text(text))  # last: finished_step
        print(f"wrote {curves}, {out / 'summary.json'}")
        print(f"wrote {final} (tokenizer {tokenizer_copy.name} beside it); retrieval mR before "
              f"{mean_recall(before)} -> after {mean_recall(after)}")
    if world > 1:
        del run, model  # DDP's reducer holds the process group: see teardown_distributed
        teardown_distributed()
    return final


def stopped(why: str, step: int, saved: int) -> TrainError:
    """A run that cannot write (a full disk): where it stopped, and what a resume starts from."""
    kept = f"its last good checkpoint, step {saved}, is unchanged" if saved else "it has no checkpoint yet"
    return TrainError(f"{why}; the run stopped at step {step} and {kept}: free space and run the same "
                      "command to resume")


def log_line(metrics, row: dict, step: int, saved: int):
    """One metrics.jsonl line, flushed (a kill loses at most the line being written)."""
    try:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
    except OSError as e:
        raise stopped(f"{rsmclip.display(metrics.name)}: cannot write it ({e.strerror})", step,
                      saved) from None


def check_data_state(saved: Optional[dict], now: Optional[dict]):
    """A run resumes on the kind of data it began on, and a run on shards only on the same shards and
    streams: else its data order would change."""
    if (saved is None) != (now is None):
        kinds = ("shards", "manifests") if now is None else ("manifests", "shards")
        raise TrainError(f"the checkpoint is of a run on {kinds[0]}, this one reads {kinds[1]}: its data "
                         "order cannot continue; train into a new --out (--init the checkpoint's model, if "
                         "wanted)")
    if now is None:
        return
    for key, what in (("shards", "the shards (their names or sample counts)"),
                      ("streams", "processes x loader workers (--workers, torchrun's --nproc-per-node)"),
                      ("block", "--shuffle-buffer")):
        if saved[key] != now[key]:
            raise TrainError(f"{what} changed since the checkpoint ({saved[key]} then, {now[key]} now): the "
                             "resumed run would not read what the first one would have; run with the same "
                             "data and settings")
    if saved["positions"] != now["positions"]:
        raise TrainError("the streams' positions recorded in the checkpoint differ from those its step "
                         "gives (a checkpoint from another version?)")


def finished_step(out: Path) -> Optional[int]:
    """The step of a run directory's checkpoint if the run got to its end (summary.json, the last file
    written, is there), else None."""
    checkpoint = out / "checkpoint.safetensors"
    if not (checkpoint.is_file() and (out / "summary.json").is_file()):
        return None
    return read_checkpoint(checkpoint)[0]["step"]


def earlier_before(out: Path) -> Optional[dict]:
    """Retrieval before training as the summary of a finished run, now extended, recorded it; None when the
    run never finished (a resumed run cannot measure it again: its model has trained)."""
    path = out / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["before"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        print(f"warning: {path} is damaged ({e!r}): the new summary's 'before' is null", file=sys.stderr)
        return None


def cut_metrics(path: Path, step: int):
    """Drop the lines of steps after `step`, the checkpoint resumed from: those steps run and log again."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except json.JSONDecodeError:  # the last line, torn by a kill
            break
    rsmclip.atomic_write(path, lambda tmp: tmp.write_text("".join(keep)))


# ===================================================================== command line: the config is the CLI

def check_config(cfg: TrainConfig):
    """Every setting checked before any work (a bad flag must not fail after the model is built and the
    first validation has run): one message listing every problem."""
    bad = []

    def need(name, ok, what):
        if not ok:
            bad.append(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: {what}")

    for name in ("steps", "batch_size", "log_every", "ckpt_every", "local_size", "prototypes", "head_hidden",
                 "head_bottleneck", "shuffle_buffer"):
        need(name, type(getattr(cfg, name)) is int and getattr(cfg, name) >= 1, "a whole number >= 1")
    for name in ("warmup", "val_every", "workers", "local_crops", "teacher_temp_steps", "freeze_last_layer",
                 "seed"):
        need(name, type(getattr(cfg, name)) is int and getattr(cfg, name) >= 0, "a whole number >= 0")
    for name, lo, hi, open_lo in (("lr", 0, math.inf, True), ("head_lr", 0, math.inf, False),
                                  ("weight_decay", 0, math.inf, False), ("eps", 0, 1, True),
                                  ("grad_clip", 0, math.inf, False), ("distill_weight", 0, math.inf, False),
                                  ("clip_weight", 0, math.inf, False),
                                  ("student_temp", 0, math.inf, True), ("teacher_temp", 0, math.inf, True),
                                  ("warmup_teacher_temp", 0, math.inf, True), ("beta1", 0, 1, False),
                                  ("beta2", 0, 1, False), ("text_dropout", 0, 1, False),
                                  ("center_momentum", 0, 1, False), ("ema_momentum", 0, 1, False),
                                  ("flip", 0, 1, False), ("jitter_prob", 0, 1, False), ("hue", 0, 0.5, False),
                                  ("grayscale", 0, 1, False), ("solarize", 0, 1, False)):
        value = getattr(cfg, name)
        need(name, isinstance(value, (int, float)) and math.isfinite(value)
             and (lo < value if open_lo else lo <= value) and value <= hi,
             f"a number in {'(' if open_lo else '['}{lo}, {hi}]")
    if cfg.clip_weight == 0 and cfg.distill_weight == 0:
        bad.append("--clip-weight 0 and --distill-weight 0: no loss is left to train; keep one of them > 0")
    for name in ("global_scale", "local_scale"):
        lo, hi = (tuple(getattr(cfg, name)) + (None, None))[:2]
        numbers = len(getattr(cfg, name)) == 2 and all(isinstance(v, (int, float)) for v in (lo, hi))
        need(name, numbers and 0 < lo <= hi <= 1, "two area fractions 0 < min <= max <= 1")
    for name, choices in (("precision", ("auto", "fp32", "bf16", "fp16")),
                          ("ema_schedule", ("fixed", "cosine")), ("clip_view", ("global", "light")),
                          ("augment", ("auto", "pil", "tensor")),
                          ("arch", tuple(rsmclip.PRESETS))):
        need(name, getattr(cfg, name) in choices, f"choose {', '.join(choices)}")
    try:
        rsmclip.parse_langs(cfg.langs)
    except rsmclip.RsmclipError as e:
        bad.append(str(e))
    demo = cfg.data == [str(DEMO_DIR / "captions.jsonl")]  # the run makes it, tokenizer included
    for name in ("init", "tokenizer", "val_data"):
        given = getattr(cfg, name)
        need(name, not given or Path(given).is_file() or demo and name == "tokenizer", "no such file")
    shards = shardlib.is_shards(cfg.data)
    if shards:
        try:  # their shards.json, or their headers (others' shards): read again when the run starts
            found = open_shards(cfg.data)
            shardlib.Streams(found.counts, int(os.environ.get("WORLD_SIZE", "1")) * max(cfg.workers, 1),
                             cfg.seed, cfg.shuffle_buffer)
        except rsmclip.RsmclipError as e:
            bad.append(str(e))
        need("image_cache", not cfg.image_cache, "shards are read as they are; the cache holds a manifest's "
             "images")
    missing = [d for d in cfg.data if not Path(d).is_file() and not demo and not shards]
    need("data", not missing, f"no such file: {', '.join(missing)}")
    need("out", not Path(cfg.out).exists() or Path(cfg.out).is_dir(), "a file; a run directory is a folder")
    need("image_cache", not cfg.image_cache or len(cfg.data) == 1, "one cache holds one manifest: give one "
         "--data (merge several with data/prepare.py merge)")
    if cfg.image_cache and len(cfg.data) == 1 and not missing and not shards:
        try:  # a stale or foreign cache must stop the run before any work
            ImageCache(Path(cfg.image_cache), Path(cfg.data[0]))
        except rsmclip.RsmclipError as e:
            bad.append(f"--image-cache: {e}")
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
        saved = read_config_json(config_file)
        if unknown := set(saved) - {f.name for f in fields(TrainConfig)}:
            raise TrainError(f"{config_file}: unknown settings {', '.join(sorted(unknown))}")
        cfg = replace(cfg, **{k: tuple(v) if isinstance(v, list) and k.endswith("scale") else v
                              for k, v in saved.items()})
    given = {k: v for k, v in given.items() if v is not None and v != []}
    if "data" in given:
        # commas separate entries, except inside a shard pattern's braces ({a,b})
        given["data"] = [p for arg in given["data"] for p in re.split(r",(?![^{}]*\})", arg) if p]
    cfg = replace(cfg, **given)
    if not cfg.data:  # the built-in demo
        cfg = replace(cfg, data=[str(DEMO_DIR / "captions.jsonl")],
                      tokenizer=cfg.tokenizer or str(DEMO_DIR / "spm.model"))
    if cfg.init:  # a known name (rs-m-clip, laion) is the file `download` put in the user cache
        cfg = replace(cfg, init=str(rsmclip.weights_path(cfg.init)))
    return cfg


RENAMED = {"model": "arch", "head_dim": "prototypes"}  # settings' old names -> new (old config.json files)


def read_config_json(path: Path) -> dict:
    """The settings of a run's config.json (or of a bare settings file), or one message why not."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainError(f"{path}: unreadable ({e}); a run directory with a damaged config.json cannot be "
                         "resumed: use another --out") from None
    saved = doc.get("config", doc) if isinstance(doc, dict) else None
    if not isinstance(saved, dict):
        raise TrainError(f"{path}: expected a JSON object of settings")
    return {RENAMED.get(k, k): v for k, v in saved.items()}  # run directories made before a rename resume


def resolved(key: str, value):
    """Paths compare by the file they name: runs/x/, ./runs/x and /abs/runs/x are one run directory."""
    if key == "data":
        return [str(Path(v).resolve()) for v in value]
    paths = ("out", "init", "tokenizer", "val_data", "image_cache")
    return str(Path(value).resolve()) if key in paths and value else value


def lock_run_dir(out: Path):
    """One writer per run directory: an exclusive lock on OUT/.lock, held while the returned file is open,
    so a second train.py on the same --out stops at once instead of interleaving its steps with the
    first's. The kernel releases it when the process ends in any way (SIGKILL too): no stale lock. A POSIX
    lock (lockf), not flock: a flock is shared with the loader processes forked after it, which outlive a
    killed trainer by seconds and would hold the lock against its resume. The file stays empty (a finished
    run, run again, changes no file); the holder is found in /proc/locks."""
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".lock", "a")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # EAGAIN or EACCES: held by another process
        holder = lock_holder(out / ".lock")
        f.close()
        raise TrainError(f"{out} is in use by another train.py (pid {holder}): one run writes a run "
                         "directory at a time; wait for it to end, or use another --out") from None
    return f


def lock_holder(path: Path) -> str:
    """The pid holding a lock on `path`, from /proc/locks ("1: POSIX ADVISORY WRITE PID MAJ:MIN:INODE
    0 EOF"), or "unknown" where there is no such file."""
    inode = str(path.stat().st_ino)
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "unknown"
    for fields_ in map(str.split, lines):
        if "POSIX" in fields_ and "->" not in fields_ and len(fields_) >= 6:
            pid, where = fields_[4], fields_[5]
            if where.rsplit(":", 1)[-1] == inode:
                return pid
    return "unknown"


def check_resume(cfg: TrainConfig):
    """An existing run directory is resumed with its own config: other settings would not be a resume."""
    saved = Path(cfg.out) / "config.json"
    if not (Path(cfg.out) / "checkpoint.safetensors").exists():
        return
    if not saved.exists():
        raise TrainError(f"{cfg.out} holds a checkpoint but no config.json, so its settings are unknown and "
                         "a resume could silently change them; use another --out")
    old = read_config_json(saved)
    now = json.loads(json.dumps(asdict(cfg)))
    if differ := [k for k in old if k != "steps" and resolved(k, old[k]) != resolved(k, now.get(k))]:
        raise TrainError(f"{cfg.out} holds a run with other settings ({', '.join(differ)}); "
                         "use another --out, or the same settings to resume")


def _cli_signature():
    """Typer options generated from TrainConfig: one typed config, and the CLI is it."""
    demo, paper = asdict(RECIPES["demo"]), asdict(RECIPES["rs-m-clip"])
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
              inspect.Parameter("preset", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                                default=typer.Option("demo",
                                                     help=f"defaults to start from: {', '.join(RECIPES)}")),
              inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                default=typer.Option(None, help="re-run a saved run's config.json (default: "
                                                     "none, the preset's settings)"))]
    for f in fields(TrainConfig):
        default = (demo[f.name] if demo[f.name] == paper[f.name]
                   else f"demo {demo[f.name]}, rs-m-clip {paper[f.name]}")
        if default in ("", []):  # an empty value means something: say what
            default = f.metadata["unset"]
        scalar = {bool: Optional[bool], int: Optional[int], float: Optional[float], str: Optional[str]}
        annotation = scalar.get(type(demo[f.name]),
                                Optional[list[str]] if f.name == "data" else Optional[tuple[float, float]])
        option = typer.Option(None, help=f"{f.metadata['help']} (default: {default})", show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=option))
    return inspect.Signature(params)


def main(**options):
    """Train RS-M-CLIP (CLIP + local-to-global self-distillation). No flags: the built-in demo.
    `python train.py plot RUN_DIR` draws a run's curves."""
    if options.pop("ctx").invoked_subcommand:  # the options belong to training, not to `plot`
        return
    preset, config_file = options.pop("preset"), options.pop("config")
    cfg = resolve_config(preset, config_file, options)
    check_config(cfg)
    lock = lock_run_dir(Path(cfg.out)) if os.environ.get("RANK", "0") == "0" else None  # noqa: F841 (held)
    check_resume(cfg)
    train(cfg, sys.argv)


main.__signature__ = _cli_signature()
main.__annotations__ = {p.name: p.annotation for p in main.__signature__.parameters.values()}
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.callback(invoke_without_command=True)(main)  # training: the options without a command


# ===================================================================== the picture of a run: curves.svg

# (metrics.jsonl key, panel title), one panel each when logged; "val" lines hold a validation result
CURVES = (("loss", "loss (CLIP + distill weight x distillation)"), ("clip", "CLIP loss"),
          ("distill", "self-distillation loss"), ("lr", "learning rate"), ("logit_scale", "logit scale"),
          ("teacher_temp", "teacher temperature"), ("val", "validation mR (val split)"))
PANEL_W, PANEL_H = 380, 220
PLOT_LIMIT = 1e12  # beyond it a logged value is a blow-up, not a curve


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise TrainError(f"{path}: no such file; a run directory gets it from its first --log-every steps")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise TrainError(f"{path}: not UTF-8 text ({e})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row, why = None, e.msg
        else:
            why = "expected a JSON object with an integer \"step\""
        if not isinstance(row, dict) or type(row.get("step")) is not int:
            raise TrainError(f"{path} line {number} is damaged ({why}): delete or fix that line")
        rows.append(row)
    return rows


def nice_ticks(lo: float, hi: float, count: int = 4) -> list[tuple[float, str]]:
    """Round values (1, 2 or 5 x 10^k apart) from lo to hi, about `count` of them, with labels of the
    fewest significant digits that tell them apart (14.295 and 14.305 are not both "14.3")."""
    raw = (hi - lo) / count
    unit = 10 ** math.floor(math.log10(raw))
    gap = next(m * unit for m in (1, 2, 5, 10) if m * unit >= raw)
    values = [k * gap for k in range(math.ceil(lo / gap), math.floor(hi / gap) + 1)]
    digits = next(d for d in range(3, 17) if len({f"{v:.{d}g}" for v in values}) == len(values))
    return [(v, f"{v:.{digits}g}") for v in values]


def svg_panel(title: str, points: list[tuple[int, float]], off: list[tuple[int, float]], last_step: int,
              left: float, top: float) -> list[str]:
    """One quantity against the step: frame, ticks and labels on both axes, the curve as one polyline; the
    values it cannot draw (`off`) are named in red under the title."""
    x0, y0, w, h = left + 64, top + 30, PANEL_W - 84, PANEL_H - 74  # the plotting area
    marks = []
    if off:
        more = f" (+{len(off) - 3} more)" if len(off) > 3 else ""
        listed = ", ".join(f"step {s}: {v:.3g}" for s, v in off[:3]) + more
        marks = [f'<text x="{left + PANEL_W / 2:.1f}" y="{top + 32}" text-anchor="middle" fill="#c0392b">'
                 f'not drawn: {html.escape(listed)}</text>']
        y0 += 12
        h -= 12
    if not points:
        return [f'<text x="{left + PANEL_W / 2:.1f}" y="{top + 18}" text-anchor="middle" font-weight="bold">'
                f'{html.escape(title)}</text>', *marks]
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0  # a flat curve gets a band around it
    lo, hi = lo - pad, hi + pad

    def x(step):
        return x0 + w * step / last_step

    def y(value):
        return y0 + h * (hi - value) / (hi - lo)

    out = [f'<text x="{left + PANEL_W / 2:.1f}" y="{top + 18}" text-anchor="middle" font-weight="bold">'
           f'{html.escape(title)}</text>',
           f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>', *marks]
    for t, label in nice_ticks(lo, hi):
        out += [f'<line x1="{x0 - 4}" y1="{y(t):.1f}" x2="{x0 + w}" y2="{y(t):.1f}" stroke="#e6e6e6"/>',
                f'<text x="{x0 - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{label}</text>']
    for t, label in nice_ticks(0, last_step):
        out += [f'<line x1="{x(t):.1f}" y1="{y0 + h}" x2="{x(t):.1f}" y2="{y0 + h + 4}" stroke="#999"/>',
                f'<text x="{x(t):.1f}" y="{y0 + h + 16}" text-anchor="middle">{label}</text>']
    out.append(f'<text x="{x0 + w / 2:.1f}" y="{y0 + h + 34}" text-anchor="middle">step</text>')
    coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
    out.append(f'<polyline points="{coords}" fill="none" stroke="#1f5fa8" stroke-width="1.5"/>')
    if len(points) == 1:  # a polyline of one point draws nothing
        out.append(f'<circle cx="{x(points[0][0]):.1f}" cy="{y(points[0][1]):.1f}" r="3" fill="#1f5fa8"/>')
    return out


def drawable(value: float) -> bool:
    """A value a panel can scale to: a blow-up (inf, nan, a loss of 1e308) would leave every other point
    on one line, or give the SVG inf coordinates; it is marked in its panel instead."""
    return math.isfinite(value) and abs(value) <= PLOT_LIMIT


def ordered(key: str, points: list[tuple[int, float]], path: Path) -> list[tuple[int, float]]:
    """The points in step order, one per step (the last logged). A repeated or decreasing step means two
    runs wrote one file (or it was edited): say so rather than draw a zigzag."""
    back = next(((a, b) for (a, _), (b, _) in zip(points, points[1:]) if b <= a), None)
    if back:
        print(f"warning: {path}: {key} has repeated or decreasing steps ({back[1]} after {back[0]}): was the "
              "file written by two runs? Drawn: the last value logged for each step", file=sys.stderr)
    return sorted(dict(points).items())


def plot(run_dir: Path) -> Path:
    """RUN_DIR/curves.svg from RUN_DIR/metrics.jsonl: one panel per logged quantity of CURVES, a plain-text
    SVG that any browser shows (no plotting library)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TrainError(f"{run_dir}: no such run directory")
    rows = read_metrics(run_dir / "metrics.jsonl")
    panels = []
    for key, title in CURVES:
        if key == "val":
            points = [(r["step"], recall(r["val"])) for r in rows if r.get("val")]
        else:
            points = [(r["step"], r[key]) for r in rows
                      if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if points:
            points = ordered(key, points, run_dir / "metrics.jsonl")
            panels.append((title, [(s, v) for s, v in points if drawable(v)],
                           [(s, v) for s, v in points if not drawable(v)]))
    if not panels:
        raise TrainError(f"{run_dir / 'metrics.jsonl'}: no logged steps to draw yet")
    last_step = max(1, *(s for _, points, off in panels for s, _ in points + off))
    width, height = 2 * PANEL_W, 40 + PANEL_H * math.ceil(len(panels) / 2)
    body = [f'<text x="12" y="24" font-size="15">{html.escape(str(run_dir))}: training curves</text>']
    for i, (title, points, off) in enumerate(panels):
        body += svg_panel(title, points, off, last_step, PANEL_W * (i % 2), 40 + PANEL_H * (i // 2))
    svg = "\n".join([f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                     f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
                     f'<rect width="{width}" height="{height}" fill="white"/>', *body, "</svg>", ""])
    path = run_dir / "curves.svg"
    rsmclip.atomic_write(path, lambda tmp: tmp.write_text(svg, encoding="utf-8"))
    return path


@app.command("plot")
def plot_command(run_dir: Path = typer.Argument(..., help="a run directory (it holds metrics.jsonl)")):
    """Draw RUN_DIR/metrics.jsonl into RUN_DIR/curves.svg: loss parts, lr, logit scale, teacher temperature,
    validation mR (training writes it at the end of every run too)."""
    print(f"wrote {plot(run_dir)}")


if __name__ == "__main__":
    rsmclip_cli.run_cli(app)
