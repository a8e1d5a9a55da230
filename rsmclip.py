"""rsmclip: RS-M-CLIP (multilingual CLIP for remote sensing) in plain PyTorch.

The model is open_clip's `xlm-roberta-base-ViT-B-32` (a ViT-B/32 image tower and an XLM-RoBERTa base
text tower), re-implemented so that it gives the same numbers as open_clip on the same weights, loads
and exports open_clip checkpoints, and reads its own safetensors files that carry their config.

    model, preprocess, tokenizer = rsmclip.load("rs-m-clip")  # or a weights file
    image = model.encode_image(preprocess("scene.tif")[None], normalize=True)
    text = model.encode_text(tokenizer(["many planes parked at an airport"]), normalize=True)

The public API (`__all__`): `load` returns (a `CLIP` in eval mode at the asked precision, a `Preprocess`, a
`Tokenizer`); `CLIP.encode_image` / `CLIP.encode_text` embed one batch; `embed_images` / `embed_texts` embed
many (batched, L2-normalised); `save` writes safetensors (ours or open_clip's names); `convert` turns an
open_clip checkpoint into ours or back; `PRESETS` and `CLIPConfig` describe architectures.

Importing it only defines: no Typer app, no CUDA query, no global setting changed, nothing drawn or
printed but warnings. The `rsmclip` command (info, download, convert, embed, classify, search) is
rsmclip_cli.py: `python rsmclip_cli.py --help`, or `rsmclip --help` once installed.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import os
import re
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import ftfy
import numpy as np
import sentencepiece
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
from torch.utils.checkpoint import checkpoint

from files import ImageError, RsmclipError, atomic_save, display, file_sha256, open_image, to_rgb

__all__ = ["load", "CLIP", "Preprocess", "Tokenizer", "embed_images", "embed_texts", "save", "convert",
           "PRESETS", "CLIPConfig", "RsmclipError"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"}


class WeightsError(RsmclipError):
    pass


# ----------------------------------------------------------------------------- configs and presets

@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    head_width: int = 64  # open_clip's default: heads = width // 64
    mlp_ratio: float = 4.0


@dataclass
class TextConfig:
    vocab_size: int = 250002
    width: int = 768
    layers: int = 12
    head_width: int = 64
    intermediate: int = 3072
    max_positions: int = 514
    pad_id: int = 1
    dropout: float = 0.1  # XLM-R's hidden and attention dropout, active in train() as in open_clip
    proj_hidden: int = 640  # open_clip's "mlp" projection: (width + embed_dim) // 2


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    context_length: int = 77  # open_clip's tokenizer length (the text tower itself could take 512)
    tokenizer: str = "sentencepiece.bpe.model"  # file name, looked up next to the weights

    @classmethod
    def from_dict(cls, d, source: str = "config") -> "CLIPConfig":
        """A config read from a file, checked before anything is built from it: a 6 kB header that says
        layers=10**6 must not allocate (or loop) first and fail later."""
        if (not isinstance(d, dict) or not isinstance(d.get("vision"), dict)
                or not isinstance(d.get("text"), dict)):
            raise WeightsError(f"{source}: the config must be a JSON object with \"vision\" and \"text\" "
                               "objects")
        try:
            cfg = cls(**{**d, "vision": VisionConfig(**d["vision"]), "text": TextConfig(**d["text"])})
        except TypeError as e:  # an unknown or missing key
            raise WeightsError(f"{source}: config: "
                               f"{str(e).split('.', 1)[-1].replace('__init__()', '')}") from None
        if problems := cfg.problems():
            raise WeightsError(f"{source}: config values out of range: {'; '.join(problems)}")
        return cfg

    def problems(self) -> list[str]:
        """What is out of range, from the few rules a ViT + XLM-R CLIP must follow; generous bounds (about
        10x the largest public CLIP) keep a corrupt number from asking for terabytes."""
        v, t, out = self.vision, self.text, []

        def need(name, value, lo, hi, kind=int):
            if type(value) is not kind and not (kind is float and type(value) is int):
                out.append(f"{name} must be {'a whole number' if kind is int else 'a number'}, not {value!r}")
            elif not lo <= value <= hi:
                out.append(f"{name} {value} not in [{lo}, {hi}]")

        for name, value, lo, hi in (("embed_dim", self.embed_dim, 1, 16384),
                                    ("context_length", self.context_length, 3, 8192),
                                    ("vision.image_size", v.image_size, 1, 4096),
                                    ("vision.patch_size", v.patch_size, 1, 4096),
                                    ("vision.width", v.width, 1, 16384), ("vision.layers", v.layers, 1, 200),
                                    ("vision.head_width", v.head_width, 1, 16384),
                                    ("text.vocab_size", t.vocab_size, 4, 2 ** 22),
                                    ("text.width", t.width, 1, 16384), ("text.layers", t.layers, 1, 200),
                                    ("text.head_width", t.head_width, 1, 16384),
                                    ("text.intermediate", t.intermediate, 1, 2 ** 18),
                                    ("text.max_positions", t.max_positions, 3, 2 ** 16),
                                    ("text.pad_id", t.pad_id, 0, 2 ** 22),
                                    ("text.proj_hidden", t.proj_hidden, 1, 2 ** 18)):
            need(name, value, lo, hi)
        need("vision.mlp_ratio", v.mlp_ratio, 0.01, 64, float)
        need("text.dropout", t.dropout, 0.0, 0.99, float)
        if out:
            return out
        if v.patch_size > v.image_size:
            out.append(f"vision.patch_size {v.patch_size} above image_size {v.image_size}")
        for name, width, head in (("vision", v.width, v.head_width), ("text", t.width, t.head_width)):
            if width % head:
                out.append(f"{name}.width {width} is not a multiple of head_width {head}")
        if t.pad_id >= t.vocab_size:
            out.append(f"text.pad_id {t.pad_id} outside the vocabulary of {t.vocab_size}")
        if self.context_length + t.pad_id + 1 > t.max_positions:
            out.append(f"context_length {self.context_length} needs max_positions >= "
                       f"{self.context_length + t.pad_id + 1} (XLM-R positions start after the pad id)")
        if not isinstance(self.tokenizer, str) or Path(self.tokenizer).name != self.tokenizer or \
                self.tokenizer in ("", ".", ".."):
            out.append(f"tokenizer {self.tokenizer!r} must be a plain file name (it is looked up next to the "
                       "weights, never elsewhere)")
        return out


PRESETS = {
    "xlmr-b32": CLIPConfig(),
    # Same structure at toy size: unit tests and the built-in demo (64-px images, demo SentencePiece model).
    "tiny": CLIPConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=64, patch_size=8, width=128, layers=2, head_width=32),
        text=TextConfig(vocab_size=4002, width=128, layers=2, head_width=32, intermediate=512,
                        proj_hidden=96),
        tokenizer="spm.model",
    ),
}


# ----------------------------------------------------------------------------- model

class Attention(nn.Module):
    """Multi-head self-attention with one packed q/k/v projection, through SDPA."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(x.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """A transformer layer: pre-LN for the ViT (open_clip), post-LN for XLM-R (BERT)."""

    def __init__(self, width: int, heads: int, mlp_width: int, pre_norm: bool, dropout: float = 0.0):
        super().__init__()
        self.pre_norm = pre_norm
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(width, mlp_width))
        self.mlp.add_module("gelu", nn.GELU())  # exact erf GELU in both towers (no QuickGELU)
        self.mlp.add_module("fc2", nn.Linear(mlp_width, width))
        self.drop = nn.Dropout(dropout)
        self.drop_path = 0.0  # stochastic depth of the ViT's residual branches in training (set_drop_path)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.dropped(self.attn(self.ln_1(x), mask))
            return x + self.dropped(self.mlp(self.ln_2(x)))
        x = self.ln_1(x + self.drop(self.attn(x, mask)))
        return self.ln_2(x + self.drop(self.mlp(x)))

    def dropped(self, branch: torch.Tensor) -> torch.Tensor:
        """DINO's drop_path: in training, each sample's branch is dropped with probability drop_path and the
        kept ones scaled by 1 / (1 - drop_path); otherwise the branch as it is."""
        if not self.training or not self.drop_path:
            return branch
        keep = 1 - self.drop_path
        return branch * branch.new_empty(len(branch), 1, 1).bernoulli_(keep) / keep


def _run_blocks(blocks: nn.ModuleList, x, mask, use_checkpoint: bool):
    for block in blocks:
        if use_checkpoint and torch.is_grad_enabled():
            x = checkpoint(block, x, mask, use_reentrant=False)
        else:
            x = block(x, mask)
    return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        w, grid = cfg.width, cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, w, cfg.patch_size, cfg.patch_size, bias=False)
        self.cls_token = nn.Parameter(torch.zeros(w))
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.blocks = nn.ModuleList(
            Block(w, w // cfg.head_width, int(w * cfg.mlp_ratio), pre_norm=True) for _ in range(cfg.layers))
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Linear(w, embed_dim, bias=False)
        self.grad_checkpointing = False

    def pos_embed_for(self, gh: int, gw: int) -> torch.Tensor:
        """The positional table for a gh x gw patch grid: bicubic resize of the trained grid (as DINO does)
        so local crops (96 px -> 3x3 for ViT-B/32) run through the same tower. The class entry is kept."""
        g = math.isqrt(self.pos_embed.shape[0] - 1)
        if (gh, gw) == (g, g):
            return self.pos_embed
        grid = self.pos_embed[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([self.pos_embed[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])

    def set_drop_path(self, rate: float):
        """Stochastic depth for training, rising over the blocks from 0 to `rate` (DINO's drop_path_rate)."""
        for i, block in enumerate(self.blocks):
            block.drop_path = rate * i / max(len(self.blocks) - 1, 1)

    def forward_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Every token after the blocks, before ln_post: [B, 1 + patches, width]."""
        x = self.patch_embed(pixels)
        B, _, gh, gw = x.shape
        x = torch.cat([self.cls_token.expand(B, 1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        x = self.ln_pre(x + self.pos_embed_for(gh, gw))
        return _run_blocks(self.blocks, x, None, self.grad_checkpointing)

    def pool(self, tokens: torch.Tensor, patches: bool = False) -> torch.Tensor:
        """ln_post, then the class token, or the mean of the patch tokens (free of ln_pre's constant)."""
        # ln_post on the class token alone: open_clip normalises every token, then takes token 0, the same
        return self.ln_post(tokens[:, 1:]).mean(1) if patches else self.ln_post(tokens[:, 0])

    def forward_features(self, pixels: torch.Tensor, patches: bool = False) -> torch.Tensor:
        return self.pool(self.forward_tokens(pixels), patches)  # before the projection: the DINO head's input

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(self.forward_features(pixels))


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        w, self.pad_id = cfg.width, cfg.pad_id
        self.tok_embed = nn.Embedding(cfg.vocab_size, w, padding_idx=cfg.pad_id)
        self.pos_embed = nn.Embedding(cfg.max_positions, w, padding_idx=cfg.pad_id)
        self.type_embed = nn.Parameter(torch.zeros(1, w))  # one token type: its row is added everywhere
        self.ln_embed = nn.LayerNorm(w)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(w, w // cfg.head_width, cfg.intermediate, pre_norm=False, dropout=cfg.dropout)
            for _ in range(cfg.layers))
        self.proj = nn.Sequential(nn.Linear(w, cfg.proj_hidden, bias=False), nn.GELU(),
                                  nn.Linear(cfg.proj_hidden, embed_dim, bias=False))
        self.grad_checkpointing = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = ids != self.pad_id
        mask = keep[:, None, None, :]
        if ids.device.type == "cpu":
            # Cut the columns after the last real token: captions need ~25 of the 77 positions, and pads
            # change nothing (their keys are masked and the mean skips them); with no pad left, no mask
            # lets SDPA pick its fastest kernel. On an accelerator reading the lengths would make the host
            # wait for the device at every step: there the caller cuts (train.collate does, on the CPU).
            last = int(keep.any(0).nonzero().max()) + 1 if keep.any() else 1
            ids, keep = ids[:, :last], keep[:, :last]
            mask = None if bool(keep.all()) else keep[:, None, None, :]
        # XLM-R: 2, 3, ... for tokens, pad id for pads
        positions = torch.cumsum(keep, dim=1) * keep + self.pad_id
        x = self.tok_embed(ids) + self.pos_embed(positions) + self.type_embed
        x = self.drop(self.ln_embed(x))
        x = _run_blocks(self.blocks, x, mask, self.grad_checkpointing)
        weights = keep.unsqueeze(-1).to(x.dtype)
        return self.proj((x * weights).sum(1) / weights.sum(1))


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim)
        self.text = TextTransformer(cfg.text, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.precision = "amp"  # how it encodes: set_precision(); amp is fp32 weights, bf16 autocast on CUDA
        if not self.logit_scale.is_meta:
            self.reset_parameters()

    def reset_parameters(self):
        """Initialisation for training from scratch (the demo); loading weights overwrites all of it."""
        for name, p in self.named_parameters():
            if name == "logit_scale":
                continue
            if ".ln" in name:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.trunc_normal_(p, std=0.02)
        with torch.no_grad():
            self.text.tok_embed.weight[self.config.text.pad_id].zero_()
            self.text.pos_embed.weight[self.config.text.pad_id].zero_()

    def set_grad_checkpointing(self, enabled: bool = True):
        self.visual.grad_checkpointing = self.text.grad_checkpointing = enabled

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.finish(self.visual(pixels.to(self.visual.cls_token.dtype)), normalize)  # bf16 in, if held

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.finish(self.text(ids), normalize)

    def finish(self, x: torch.Tensor, normalize: bool) -> torch.Tensor:
        x = x.float() if self.precision == "bf16" else x  # bf16 weights: embeddings normalised in fp32
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor):
        return (self.encode_image(pixels, normalize=True), self.encode_text(ids, normalize=True),
                self.logit_scale.exp())


# ----------------------------------------------------------------------------- the CLIP loss

def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless a torch.distributed process group runs (torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class GatherWithGrad(torch.autograd.Function):
    """All ranks' rows, concatenated, with gradients: backward sums every rank's gradient and hands each
    rank its own rows. (torch.distributed.nn's all_gather does the same and is deprecated.)"""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world()[1])]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        torch.distributed.all_reduce(grad)
        rank, size = world()
        return grad.chunk(size)[rank]


def outside_autocast(enabled: bool, device_type: str):
    """Leave autocast for the small matmuls whose outputs are divided by a temperature (CLIP logits: x100,
    prototype cosines: /0.04): bf16 rounds a cosine near 1 by up to 0.004, 0.1 after the division."""
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              fp32: bool = True):
    """Symmetric InfoNCE over matching pairs: open_clip's ClipLoss. Under DDP the features of all ranks
    are gathered with gradients and each rank scores its own rows against all of them (open_clip's
    --local-loss --gather-with-grad): the averaged gradients equal one process on the global batch.
    The logits are fp32 also under autocast (fp32=False: in the autocast dtype, to measure the difference)."""
    if fp32:
        with outside_autocast(True, image_features.device.type):
            return clip_loss(image_features.float(), text_features.float(), logit_scale.float(), fp32=False)
    rank, size = world()
    if size == 1:
        logits = logit_scale * image_features @ text_features.T
        labels = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    all_images, all_texts = GatherWithGrad.apply(image_features), GatherWithGrad.apply(text_features)
    labels = torch.arange(len(image_features), device=image_features.device) + rank * len(image_features)
    return (F.cross_entropy(logit_scale * image_features @ all_texts.T, labels)
            + F.cross_entropy(logit_scale * text_features @ all_images.T, labels)) / 2


def count_parameters(model: CLIP) -> dict:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"visual": count(model.visual), "text": count(model.text), "total": count(model)}


# ----------------------------------------------------------------------------- tokenizer

BOS, PAD, EOS, UNK = 0, 1, 2, 3  # XLM-R (fairseq) special ids


def clean_text(text: str) -> str:
    """open_clip's 'whitespace' cleaning: ftfy, HTML unescaped twice, whitespace runs -> one space.
    No lower-casing: XLM-R is cased."""
    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())


class Tokenizer:
    """XLM-R ids from a SentencePiece model: <s> pieces </s> then pads, as open_clip's HF tokenizer.

    fairseq reserved ids 0-3 for <s>, <pad>, </s>, <unk>, so SentencePiece piece p becomes p + 1 and
    SentencePiece's own unknown (0) becomes 3."""

    def __init__(self, path: str | Path, context_length: int = 77):
        path = Path(path)
        if not path.is_file():
            raise RsmclipError(f"tokenizer {path}: no such file (the XLM-R vocabulary is fetched by "
                               "`python rsmclip_cli.py download tokenizer`)")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise RsmclipError(f"tokenizer {path}: not a SentencePiece model ({e})") from None
        self.path, self.context_length = path, context_length
        self.vocab_size = self.sp.get_piece_size() + 2  # + <pad> before the pieces and <mask> after them

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.full((len(texts), self.context_length), PAD, dtype=torch.long)
        for row, pieces in enumerate(self.sp.encode([clean_text(t) for t in texts])):
            ids = [BOS] + [p + 1 if p else UNK for p in pieces[: self.context_length - 2]] + [EOS]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def unknown(self, text: str) -> tuple[int, int]:
        """(pieces the vocabulary does not know, all pieces) of a text: unknown pieces all read as <unk>,
        so a text made mostly of them cannot be told from another. The bare word-start piece "▁" (its
        own piece before a word the vocabulary cannot start, as in "▁ 港口") carries nothing: not counted."""
        pieces = [p for p in self.sp.encode(clean_text(text)) if self.sp.id_to_piece(p) != "▁"]
        return sum(p == 0 for p in pieces), len(pieces)


# ----------------------------------------------------------------------------- images

class Preprocess:
    """open_clip's eval transform: resize the shorter side (bicubic, antialiased), centre crop, CLIP
    mean/std. Equal to open_clip on RGB images; other modes are converted to RGB first (PIL would
    resize a palette image with nearest neighbour)."""

    def __init__(self, image_size: int = 224):
        self.size = image_size
        self.mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def __call__(self, image: Image.Image | str | Path) -> torch.Tensor:
        image = open_image(image) if isinstance(image, (str, Path)) else to_rgb(image)
        s, (w, h) = self.size, image.size
        size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)  # (width, height), torchvision's rule
        image = image.resize(size, Image.BICUBIC)
        left, top = int(round((size[0] - s) / 2)), int(round((size[1] - s) / 2))
        image = image.crop((left, top, left + s, top + s))
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        return (x - self.mean) / self.std


# ----------------------------------------------------------------------------- weights: open_clip <-> ours

OPENCLIP_DROPPED = ("text.transformer.embeddings.position_ids", "text.transformer.embeddings.token_type_ids")


def _renames(cfg: CLIPConfig) -> list[tuple[str, str]]:
    """(our name, open_clip name) for every tensor that only changes name."""
    wb = ("weight", "bias")
    pairs = [("logit_scale", "logit_scale"), ("visual.patch_embed.weight", "visual.conv1.weight"),
             ("visual.cls_token", "visual.class_embedding"),
             ("visual.pos_embed", "visual.positional_embedding")]
    pairs += [(f"visual.{ln}.{p}",) * 2 for ln in ("ln_pre", "ln_post") for p in wb]
    vis = [("ln_1", "ln_1"), ("ln_2", "ln_2"), ("attn.qkv", "attn.in_proj"), ("attn.out", "attn.out_proj"),
           ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
    for i in range(cfg.vision.layers):
        for ours, theirs in vis:
            for p in wb:
                theirs_p = f"{theirs}_{p}" if theirs == "attn.in_proj" else f"{theirs}.{p}"
                pairs.append((f"visual.blocks.{i}.{ours}.{p}",
                              f"visual.transformer.resblocks.{i}.{theirs_p}"))
    emb = "text.transformer.embeddings."
    pairs += [("text.tok_embed.weight", emb + "word_embeddings.weight"),
              ("text.pos_embed.weight", emb + "position_embeddings.weight"),
              ("text.type_embed", emb + "token_type_embeddings.weight"),
              ("text.ln_embed.weight", emb + "LayerNorm.weight"),
              ("text.ln_embed.bias", emb + "LayerNorm.bias")]
    txt = [("attn.out", "attention.output.dense"), ("ln_1", "attention.output.LayerNorm"),
           ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"), ("ln_2", "output.LayerNorm")]
    for i in range(cfg.text.layers):
        pairs += [(f"text.blocks.{i}.{ours}.{p}", f"text.transformer.encoder.layer.{i}.{theirs}.{p}")
                  for ours, theirs in txt for p in wb]
    pairs += [("text.proj.0.weight",) * 2, ("text.proj.2.weight",) * 2]
    return pairs


def to_openclip_state_dict(sd: dict, cfg: CLIPConfig) -> dict:
    out = {theirs: sd[ours] for ours, theirs in _renames(cfg)}
    out["visual.proj"] = sd["visual.proj.weight"].T.contiguous()  # open_clip keeps x @ proj, not a Linear
    for i in range(cfg.text.layers):  # open_clip (HF) has separate q, k, v projections
        for p in ("weight", "bias"):
            for name, t in zip(("query", "key", "value"), sd[f"text.blocks.{i}.attn.qkv.{p}"].chunk(3)):
                out[f"text.transformer.encoder.layer.{i}.attention.self.{name}.{p}"] = t.contiguous()
    return out


def from_openclip_state_dict(sd: dict, cfg: CLIPConfig) -> dict:
    out = {ours: sd[theirs] for ours, theirs in _renames(cfg)}
    out["visual.proj.weight"] = sd["visual.proj"].T.contiguous()
    for i in range(cfg.text.layers):
        for p in ("weight", "bias"):
            out[f"text.blocks.{i}.attn.qkv.{p}"] = torch.cat(
                [sd[f"text.transformer.encoder.layer.{i}.attention.self.{n}.{p}"]
                 for n in ("query", "key", "value")])
    return out


def clean_openclip_state_dict(sd: dict) -> dict:
    """Undo the variations of real open_clip checkpoints: a {"state_dict": ...} wrapper, DDP's `module.`
    prefix, the stale `position_ids` buffer of old transformers, logit_scale saved as [1]."""
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in sd.items()
          if k.removeprefix("module.") not in OPENCLIP_DROPPED}
    if "logit_scale" in sd and sd["logit_scale"].numel() == 1:
        sd["logit_scale"] = sd["logit_scale"].reshape(())
    return sd


def infer_config(shapes: dict) -> CLIPConfig:
    """The architecture of an open_clip-named checkpoint, read from its tensor shapes (heads assume
    open_clip's head width 64, as every released checkpoint of this family has)."""
    need = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj",
            "text.transformer.embeddings.word_embeddings.weight",
            "text.transformer.embeddings.position_embeddings.weight", "text.proj.0.weight"]
    if missing := [k for k in need if k not in shapes]:
        raise WeightsError(f"not an xlm-roberta ViT CLIP checkpoint: no {', '.join(missing)}")
    width, _, patch, _ = shapes["visual.conv1.weight"]
    count = lambda prefix: len({m[1] for k in shapes if (m := re.match(prefix + r"\.(\d+)\.", k))})  # noqa: E731
    text_width = shapes["text.transformer.embeddings.word_embeddings.weight"][1]
    vision = VisionConfig(
        image_size=math.isqrt(shapes["visual.positional_embedding"][0] - 1) * patch, patch_size=patch,
        width=width, layers=count(r"visual\.transformer\.resblocks"),
        mlp_ratio=shapes.get("visual.transformer.resblocks.0.mlp.c_fc.weight", (4 * width,))[0] / width)
    text = TextConfig(
        vocab_size=shapes["text.transformer.embeddings.word_embeddings.weight"][0], width=text_width,
        layers=count(r"text\.transformer\.encoder\.layer"),
        intermediate=shapes.get("text.transformer.encoder.layer.0.intermediate.dense.weight", (0,))[0],
        max_positions=shapes["text.transformer.embeddings.position_embeddings.weight"][0],
        proj_hidden=shapes["text.proj.0.weight"][0])
    return CLIPConfig(embed_dim=shapes["visual.proj"][1], vision=vision, text=text)


def _expected_shapes(cfg: CLIPConfig, openclip_names: bool) -> dict:
    with torch.device("meta"):
        sd = CLIP(cfg).state_dict()
    sd = to_openclip_state_dict(sd, cfg) if openclip_names else sd
    return {k: tuple(v.shape) for k, v in sd.items()}


def check_keys(got: dict, cfg: CLIPConfig, openclip_names: bool, source: str):
    """Raise one WeightsError naming missing, unexpected and mis-shaped tensors: never a partial load."""
    want = _expected_shapes(cfg, openclip_names)
    got = {k: tuple(v) for k, v in got.items()}
    missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    shaped = [f"{k} {list(got[k])} (model {list(want[k])})" for k in sorted(want.keys() & got.keys())
              if got[k] != want[k]]
    problems = [f"{len(names)} {what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                for what, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped))
                if names]
    if problems:
        raise WeightsError(f"{source} does not fit the model ({'; '.join(problems)})")


def read_weights(path: str | Path) -> tuple[CLIPConfig, dict]:
    """Config and state dict (our names, float32) from our safetensors or an open_clip safetensors, given
    by path or by a known name (see weights_path)."""
    path = weights_path(path)
    if path.is_dir():
        found = ", ".join(p.name for p in sorted(path.glob("*.safetensors"))) or "none"
        raise WeightsError(f"{path}: is a directory; pass a weights file (safetensors files there: {found})")
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        raise WeightsError(f"{path}: a pickled checkpoint; convert it once with "
                           f"`python rsmclip_cli.py convert {path} {path.with_suffix('.safetensors')}`")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            ours = meta.get("format") == "rsmclip"  # else open_clip names, our config riding along or not
            text = meta.get("config") if ours else meta.get("rsmclip_config")
            cfg = config_from_json(text, path) if ours or text is not None else None  # checked before loading
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file, truncated or corrupt? ({e})") from None
    if ours:
        check_keys({k: v.shape for k, v in sd.items()}, cfg, openclip_names=False, source=str(path))
    else:
        cfg, sd = _from_openclip(sd, cfg, str(path))
    return cfg, {k: v.float() for k, v in sd.items()}


def config_from_json(text: Optional[str], path: Path) -> CLIPConfig:
    try:
        return CLIPConfig.from_dict(json.loads(text), f"{path}: metadata")
    except (TypeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: the config in the metadata is not valid JSON ({e})") from None


def _from_openclip(sd: dict, cfg: Optional[CLIPConfig], source: str) -> tuple[CLIPConfig, dict]:
    """A real open_clip state dict -> (config, inferred from the shapes unless given; our names), checked."""
    sd = clean_openclip_state_dict(sd)
    cfg = cfg or infer_config({k: tuple(v.shape) for k, v in sd.items()})
    check_keys({k: v.shape for k, v in sd.items()}, cfg, openclip_names=True, source=source)
    return cfg, from_openclip_state_dict(sd, cfg)


def build(cfg: CLIPConfig, sd: dict) -> CLIP:
    """The model holding exactly these tensors (our names)."""
    with torch.device("meta"):  # no random init of parameters that are overwritten at once
        model = CLIP(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def save(model: CLIP, path: str | Path, openclip_names: bool = False, tokenizer_sha256: Optional[str] = None):
    """Our format (config in the metadata) or, with openclip_names, tensors named as open_clip's
    state_dict (loadable there with strict=True; our config rides along in the metadata).
    tokenizer_sha256: of the SentencePiece file the weights belong to, recorded so that load() can tell
    another vocabulary of the same size, which would give wrong ids without a word."""
    cfg_json = json.dumps(asdict(model.config))
    sd = model.state_dict()
    extra = {"tokenizer_sha256": tokenizer_sha256} if tokenizer_sha256 else {}
    if openclip_names:
        atomic_save(to_openclip_state_dict(sd, model.config), Path(path),
                    {"format": "open_clip", "rsmclip_config": cfg_json} | extra)
    else:
        atomic_save(sd, Path(path), {"format": "rsmclip", "config": cfg_json} | extra)


def convert(src: str | Path, dst: str | Path, to_openclip: bool = False,
            tokenizer: Optional[Path] = None) -> CLIPConfig:
    """Any supported checkpoint -> our safetensors (or open_clip naming), recording `tokenizer`'s SHA-256
    when given (else the one the source recorded). Pickled .bin/.pt files are read here and only here,
    with torch.load(weights_only=True), which refuses arbitrary objects."""
    src = Path(src)
    if src.suffix in (".bin", ".pt", ".pth", ".ckpt") and src.is_file():
        try:
            sd = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for bad pickles; all mean "unreadable"
            raise WeightsError(f"{src}: not a loadable weights-only torch checkpoint ({e})") from None
        if not isinstance(sd, dict):
            raise WeightsError(f"{src}: holds a {type(sd).__name__}, not a state dict")
        cfg, sd = _from_openclip(sd, None, str(src))
        sd = {k: v.float() for k, v in sd.items()}
        recorded = None
    else:
        cfg, sd = read_weights(src)
        recorded = tokenizer_sha(src)
    if tokenizer:
        tokenizer_for(cfg, tokenizer)  # one that does not fit the model is refused, not recorded
    save(build(cfg, sd), dst, openclip_names=to_openclip,
         tokenizer_sha256=file_sha256(Path(tokenizer)) if tokenizer else recorded)
    return cfg


def tokenizer_sha(weights: Path) -> Optional[str]:
    """The SHA-256 of the tokenizer the weights were saved with (save(tokenizer_sha256=...)), if recorded."""
    try:
        with safe_open(str(weights), "pt") as f:
            return (f.metadata() or {}).get("tokenizer_sha256")
    except (SafetensorError, OSError):
        return None


def load(weights: str | Path, tokenizer: str | Path | None = None, device: str | torch.device = "cpu",
         precision: str = "fp32"):
    """-> (model in eval mode, preprocess, tokenizer). `weights` is a file or a known name (`rs-m-clip`,
    `laion`: the files `download` puts in the user cache). The tokenizer file defaults to the one the
    config names, next to the weights; when the weights record their tokenizer's SHA-256, another file
    there is refused, and one given on purpose is used with a warning. precision: resolve_precision's."""
    precision = resolve_precision(precision, device)  # a bad choice fails before the weights are read
    weights = weights_path(weights)
    cfg, sd = read_weights(weights)
    path = Path(tokenizer or weights.parent / cfg.tokenizer)
    tok = tokenizer_for(cfg, path)
    if (recorded := tokenizer_sha(weights)) and (actual := file_sha256(path)) != recorded:
        what = (f"tokenizer {display(path)} (SHA-256 {actual[:12]}) is not the one {display(weights)} was "
                f"saved with ({recorded[:12]}): its ids would mean other words")
        if not tokenizer:
            raise RsmclipError(f"{what}; put the right one there, or pass --tokenizer {display(path)} to use "
                               "it anyway")
        print(f"warning: {what}; used because --tokenizer names it", file=sys.stderr)
    model = build(cfg, sd).to(device).eval()
    sd.clear()  # the model holds the tensors now: set_precision frees each fp32 one as it converts it
    return set_precision(model, precision), Preprocess(cfg.vision.image_size), tok


XLMR_VOCAB = 250002


def tokenizer_for(cfg: CLIPConfig, path: str | Path) -> Tokenizer:
    """The tokenizer file, checked against the model: a model with XLM-R's vocabulary needs exactly
    XLM-R's; a smaller model trained here (the demo) needs one whose ids fit in its embedding table."""
    tok = Tokenizer(path, cfg.context_length)
    if (tok.vocab_size > cfg.text.vocab_size
            or (cfg.text.vocab_size == XLMR_VOCAB) != (tok.vocab_size == XLMR_VOCAB)):
        raise RsmclipError(f"tokenizer {tok.path} has {tok.vocab_size:,} ids but the model's vocabulary has "
                           f"{cfg.text.vocab_size:,}: it belongs to other weights")
    return tok


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- weights by name

HUB_FILES = {  # name -> (Hugging Face repo, candidate files in order of preference, saved as)
    "rs-m-clip": ("joaodaniel/RS-M-CLIP", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"],
                  "rs-m-clip.safetensors"),
    "laion": ("laion/CLIP-ViT-B-32-xlm-roberta-base-laion5B-s13B-b90k",
              ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"], "xlmr-b32-laion5b.safetensors"),
    "tokenizer": ("FacebookAI/xlm-roberta-base", ["sentencepiece.bpe.model"], "sentencepiece.bpe.model"),
}


def cache_dir(check: bool = False) -> Path:
    """Where rsmclip keeps downloaded weights and what it can recompute (search indexes, image features):
    $RSMCLIP_HOME, or ~/.cache/rsmclip. check: a command that will write there asks before its work
    whether it can (a file in the way, a folder it may not write), not after it."""
    path = Path(os.environ.get("RSMCLIP_HOME") or "~/.cache/rsmclip").expanduser()
    if check:
        where = "$RSMCLIP_HOME" if os.environ.get("RSMCLIP_HOME") else "the cache folder"
        found = next(d for d in (path, *path.absolute().parents) if d.exists())
        if not found.is_dir():
            raise RsmclipError(f"{where} {display(path)}: {display(found)} is a file, not a folder; set "
                               "$RSMCLIP_HOME to a folder")
        if not os.access(found, os.W_OK | os.X_OK):
            raise RsmclipError(f"{where} {display(path)}: {display(found)} is not writable; set "
                               "$RSMCLIP_HOME to a folder you can write")
    return path


def weights_dir() -> Path:
    """Where `download` puts weights and the vocabulary, as open_clip and Hugging Face keep theirs: in the
    user's cache, not in the working folder."""
    return cache_dir() / "weights"


def weights_path(spec: str | Path) -> Path:
    """A weights file given by its path, or by a known name (`rs-m-clip`, `laion`): the file `download`
    wrote for it into weights_dir(). A path that exists wins over a name."""
    path = Path(spec)
    name = str(spec)
    if name not in ("rs-m-clip", "laion") or path.exists():
        return path
    path = weights_dir() / HUB_FILES[name][2]
    if not path.is_file():
        raise WeightsError(f"{name}: not downloaded yet; `rsmclip download {name} tokenizer` fetches it into "
                           f"{path.parent} (offline: README, 'Weights by hand')")
    return path


def weights_fingerprint(path: Path) -> str:
    """The identity of a weights file: its size and the SHA-256 of every byte (a sampled hash missed edits
    to single tensors). Hashing runs at about disk speed, like the load that goes with it."""
    path = weights_path(path)
    return f"{path.stat().st_size}:{file_sha256(path)[:32]}"


# ----------------------------------------------------------------------------- precision

PRECISIONS = ("auto", "fp32", "bf16", "int8")
AUTO_WITHOUT_BF16 = "int8"  # auto on a CPU without bf16 units, measured: docs/internals.md, "Fast on a CPU"


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether Linux says the CPU multiplies bf16 in hardware (x86 amx_bf16 or avx512_bf16, Arm bf16)."""
    found = cpuinfo.is_file() and re.search(r"^(?:flags|Features)\s*:(.*)$", cpuinfo.read_text(), re.M)
    return bool(found and {"amx_bf16", "avx512_bf16", "bf16"} & set(found[1].split()))


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """fp32 (load's default: the reference), bf16, int8 (CPU only), or amp (fp32 weights, bf16 autocast on
    CUDA as before precisions: auto there). auto on a CPU: bf16 with bf16 units, else AUTO_WITHOUT_BF16."""
    if precision not in PRECISIONS:
        raise RsmclipError(f"precision {precision!r}: choose {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if kind != "cpu" and precision == "int8":
        raise RsmclipError(f"precision int8 runs on a CPU only (PyTorch's dynamic quantization has no {kind} "
                           f"kernels); on {kind} use auto, bf16 or fp32")
    if precision == "auto":
        return "amp" if kind != "cpu" else "bf16" if native_bf16() else AUTO_WITHOUT_BF16
    if precision == "bf16" and kind == "cpu" and not native_bf16():
        print("note: this CPU does not multiply bf16 natively (no AMX or AVX-512 BF16): bf16 is emulated and "
              "slower than fp32 here; --precision auto picks the fast one", file=sys.stderr)
    return precision


def set_precision(model: CLIP, precision: str) -> CLIP:
    """The model made once to encode at a resolved precision: bf16 casts every weight (torch's bf16 LayerNorm,
    softmax and GELU compute in fp32 inside); int8 makes every nn.Linear of both towers a dynamically
    quantized one (int8 weights per output channel, activations quantized per call from their range)."""
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    elif precision == "int8":
        with warnings.catch_warnings():  # silence torch.ao's notice of its move to torchao (torch is pinned)
            warnings.filterwarnings("ignore", "torch.ao.quantization is deprecated|.*quantized tensor")
            quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, torch.qint8, inplace=True)
    model.precision = precision  # tests/test_precision.py runs both routes against fp32
    return model


# ----------------------------------------------------------------------------- batch embedding

def encoding(model: CLIP, device: str | torch.device):
    """The context a batch is encoded in: bf16 autocast on CUDA for a model held in fp32 (amp, as before
    precisions); none for one made bf16 or int8, which computes at its own precision."""
    amp = torch.device(device).type == "cuda" and getattr(model, "precision", "amp") == "amp"
    return torch.autocast("cuda", torch.bfloat16, enabled=amp)


def check_finite(feats: torch.Tensor, what: str) -> torch.Tensor:
    """Embeddings with a NaN or inf would rank and score as numbers (nan scores, exit 0): an error."""
    if not torch.isfinite(feats).all():
        raise RsmclipError(f"the model gives non-finite {what} embeddings (NaN or inf): "
                           "its weights are damaged")
    return feats


class ImageFiles(torch.utils.data.Dataset):
    """Decoded, preprocessed images. A file that cannot be read gives a blank and its error message,
    reported by the main process (a worker's exception would arrive as a traceback)."""

    def __init__(self, paths: list[Path], preprocess: Preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return self.preprocess(self.paths[i]), ""
        except ImageError as e:
            return torch.zeros(3, self.preprocess.size, self.preprocess.size), str(e)


def image_batches(paths: list[Path], preprocess: Preprocess, batch_size: int, workers: int):
    workers = min(workers, len(paths) // batch_size)  # a worker pool costs more than it saves on small sets
    return torch.utils.data.DataLoader(ImageFiles(paths, preprocess), batch_size=batch_size,
                                       num_workers=workers, persistent_workers=False)


@torch.inference_mode()
def embed_images(model: CLIP, preprocess: Preprocess, paths: list[Path], batch_size: int = 64,
                 device: str = "cpu", workers: int = 0, skip_unreadable: bool = True,
                 progress: Optional[Callable[[int], None]] = None
                 ) -> tuple[torch.Tensor, list[Path], list[str]]:
    """(embeddings [N, D] L2-normalised float32 on `device`, the N readable paths, the error messages),
    decoded by `workers` processes, at the model's precision. An unreadable image is skipped and reported
    on stderr (a folder being searched), or, with skip_unreadable=False, stops the whole call with one
    message (an evaluation, whose numbers a silently smaller set would change). progress(n) is called
    after each batch of n images (the commands draw a bar with it)."""
    if not skip_unreadable and (missing := [display(p) for p in paths if not Path(p).is_file()]):
        raise ImageError(f"{len(missing)} of {len(paths)} images are missing: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
    feats, ok, failed = [], [], []
    for first, (pixels, messages) in zip(range(0, len(paths), batch_size),
                                         image_batches(paths, preprocess, batch_size, workers)):
        good = [i for i, m in enumerate(messages) if not m]
        failed += [m for m in messages if m]
        ok += [paths[first + i] for i in good]
        if good:
            with encoding(model, device):
                x = model.encode_image(pixels[good].to(device, non_blocking=True))
            feats.append(F.normalize(x.float(), dim=-1))
        if progress:
            progress(len(messages))
    if failed and not skip_unreadable:
        raise ImageError(f"{len(failed)} images cannot be read: {'; '.join(map(display, failed[:3]))}")
    for message in failed:
        print(f"skipped: {display(message)}", file=sys.stderr)
    out = torch.cat(feats) if feats else torch.zeros(0, model.config.embed_dim, device=device)
    return check_finite(out, "image"), ok, failed


@torch.inference_mode()
def embed_texts(model: CLIP, tokenizer: Tokenizer, texts: list[str], batch_size: int = 256,
                device: str = "cpu") -> torch.Tensor:
    """[M, D] L2-normalised float32 embeddings on the CPU, at the model's precision. Each distinct token
    sequence is encoded once, in a batch of sequences of its own length only (no padding, so no mask), and
    copied to every text that has it: identical texts get bit-identical vectors, and at fp32 a text's
    embedding depends on the text alone, not on the batch size or its neighbours (bf16, int8: nearly)."""
    ids = tokenizer(texts) if texts else torch.zeros(0, tokenizer.context_length, dtype=torch.long)
    unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
    lengths = (unique != PAD).sum(1)
    out = torch.empty(len(unique), model.config.embed_dim)
    for length in lengths.unique().tolist():
        rows = (lengths == length).nonzero().flatten()
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            with encoding(model, device):
                x = model.encode_text(unique[batch, :length].to(device))
            out[batch] = F.normalize(x.float(), dim=-1).cpu()
    return check_finite(out, "text")[inverse]


if __name__ == "__main__":  # the library runs nothing: point to the command instead of doing nothing
    sys.exit("rsmclip.py is the library; its command line is `python rsmclip_cli.py --help` (or `rsmclip` "
             "once installed)")
