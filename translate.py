"""Translate caption manifests into the nine other RS-M-CLIP languages with a Tower model.

    python translate.py captions.jsonl --langs pt,es,fr,de,nl,it,zh,ko,ru \
        --model TowerInstruct-7B-v0.2 --out captions.10lang.jsonl
    python translate.py captions.jsonl --langs pt --backend http \
        --base-url http://localhost:8000 --api-model Unbabel/TowerInstruct-7B-v0.2 --out out.jsonl

Backend `local` runs a Llama/Mistral decoder written here in plain PyTorch (safetensors weights,
sentencepiece tokenizer); `http` calls any OpenAI-compatible /v1/chat/completions server (vLLM,
llama.cpp, TGI). Every translated string is appended to a JSONL cache, so a killed run resumes where
it stopped and writes the same output as an uninterrupted one.

Prompt: ChatML with one user turn and no system turn, as on Tower's model card:
    <s><|im_start|>user\\nTranslate the following text from English into Portuguese.\\nEnglish:
    {caption}\\nPortuguese:<|im_end|>\\n<|im_start|>assistant\\n
<s> is added by the tokenizer (`add_bos_token`), as when the card's pipeline tokenizes the rendered
chat template. Greedy decoding, stopping on <|im_end|> or the tokenizer's EOS.
"""
from __future__ import annotations

import hashlib
import http.client
import inspect
import json
import math
import os
import re
import time
import unicodedata
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import sentencepiece as spm
import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from safetensors import SafetensorError, safe_open
from torch import nn

import cli  # the CLI error wrapper
import files  # the atomic writer
import rsmclip  # its output checks
from data import manifest  # the language list and its parser
from data.manifest import load_manifest, read_json
from files import listing

LANGS = {code: name for code, name in manifest.LANGUAGES.items() if code != "en"}  # English is the source
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class TranslateError(rsmclip.RsmclipError):
    """A problem the user can fix (bad input, wrong folder, server refused): one line `error: ...`, exit 1."""


def user_prompt(text: str, lang: str) -> str:
    name = LANGS[lang]
    return f"Translate the following text from English into {name}.\nEnglish: {text}\n{name}:"


def chatml(user: str) -> str:
    return f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"


# ----- model config -----

# Bounds far above any Llama/Mistral translation model (Tower: 32,007 tokens, 4,096 wide, 32 layers, 4,096
# positions), low enough that nothing sized by a wrong number can exhaust memory. The weights' own sizes
# are checked against their safetensors headers before anything is allocated (load_model).
SIZES = {"vocab_size": 1 << 20, "hidden_size": 1 << 15, "intermediate_size": 1 << 17,
         "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 512,
         "max_position_embeddings": 1 << 18,  # the rotary table, positions x head_dim, is held in memory
         "sliding_window": 1 << 30}


@dataclass
class ModelConfig:
    arch: str
    vocab_size: int
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    max_positions: int
    tie_embeddings: bool
    sliding_window: int | None  # Mistral: we attend to all tokens, so sequences must be shorter than it

    @classmethod
    def from_hf(cls, c: dict, where: str = "config.json") -> ModelConfig:
        archs = c.get("architectures") or []
        arch = next((a for a in archs if a in ("LlamaForCausalLM", "MistralForCausalLM")), None)
        if arch is None:
            raise TranslateError(f"{where}: unsupported architecture {archs or c.get('model_type')!r} "
                                 "(translate.py runs LlamaForCausalLM and MistralForCausalLM)")
        if c.get("hidden_act", "silu") != "silu" or c.get("attention_bias") or c.get("mlp_bias"):
            raise TranslateError(f"{where}: only SiLU MLPs without biases are supported")
        # transformers <5 writes rope_theta and rope_scaling (often null); >=5 writes rope_parameters
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if (kind := rope.get("rope_type", rope.get("type", "default"))) != "default":
            raise TranslateError(f"{where}: rope scaling {kind!r} is not supported (plain RoPE only)")
        for key, most in SIZES.items():
            if c.get(key) is not None and not (type(c[key]) is int and 1 <= c[key] <= most):
                raise TranslateError(f"{where}: {key} is {c[key]!r}, expected a whole number from 1 to "
                                     f"{most:,}")
        try:
            heads = c["num_attention_heads"]
            cfg = cls(arch=arch, vocab_size=c["vocab_size"], dim=c["hidden_size"],
                      hidden_dim=c["intermediate_size"], n_layers=c["num_hidden_layers"], n_heads=heads,
                      n_kv_heads=c.get("num_key_value_heads") or heads,
                      head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                      norm_eps=c.get("rms_norm_eps", 1e-6),
                      rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
                      max_positions=c.get("max_position_embeddings", 4096),
                      tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                      sliding_window=c.get("sliding_window") if arch == "MistralForCausalLM" else None)
        except KeyError as e:
            raise TranslateError(f"{where}: no {e.args[0]!r}") from None
        if cfg.n_heads % cfg.n_kv_heads or cfg.head_dim % 2:
            raise TranslateError(f"{where}: num_attention_heads ({cfg.n_heads}) must be a multiple of "
                                 f"num_key_value_heads ({cfg.n_kv_heads}), head_dim ({cfg.head_dim}) even")
        for key, v in (("rms_norm_eps", cfg.norm_eps), ("rope_theta", cfg.rope_theta)):
            if type(v) not in (int, float) or not 0 < v < math.inf:
                raise TranslateError(f"{where}: {key} is {v!r}, expected a positive number")
        return cfg


# ----- model -----

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        h = x.float()  # statistics in fp32 even under bf16, as in the reference implementation
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotate(x, cos, sin):
    # HF checkpoints order q/k rows so that rotary pairs are (i, i + d/2), not interleaved
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Linear(nn.Linear):
    """Bias-free nn.Linear that can hand its weight to oneDNN (Llama.pack_for_cpu). On CPUs, torch's oneDNN
    kernel with the weight reordered once into its blocked layout does decoding's few-row products
    2-3x faster than F.linear's MKL call (100M model, 2-core AVX-512, fp32: 16 rows 19 ms against 50 ms
    for all its matrices, 64 rows 54 against 107, a 640-token prefill 495 against 626). They are the ops
    torch.compile's CPU backend puts in place of frozen linears, callable without compiling."""
    packed: torch.Tensor | None = None

    def __init__(self, n_in: int, n_out: int):
        super().__init__(n_in, n_out, bias=False)

    def forward(self, x):
        if self.packed is None:
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.attn_norm, self.mlp_norm = RMSNorm(c.dim, c.norm_eps), RMSNorm(c.dim, c.norm_eps)
        # q, k, v (and gate, up) fused into one matmul each: fewer, larger GEMMs per decoding step
        self.qkv = Linear(c.dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim)
        self.o = Linear(c.n_heads * c.head_dim, c.dim)
        self.gate_up = Linear(c.dim, 2 * c.hidden_dim)
        self.down = Linear(c.hidden_dim, c.dim)

    def forward(self, x, cos, sin, mask, k_cache, v_cache, start: int):
        c, (B, T, _) = self.c, x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(
            [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim], dim=-1)
        q = rotate(q.view(B, T, c.n_heads, c.head_dim).transpose(1, 2), cos, sin)
        # write into the preallocated cache and attend over its filled part: a view, never a concat
        k = rotate(k.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2), cos, sin)
        k_cache[:, :, start:start + T] = k
        v_cache[:, :, start:start + T] = v.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k_cache[:, :, :start + T], v_cache[:, :, :start + T],
                                           attn_mask=mask, enable_gqa=c.n_kv_heads != c.n_heads)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, -1))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Llama(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.lm_head = Linear(c.dim, c.vocab_size)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def init_rope(self):
        # cos/sin of every position, computed once in fp32 as the reference does, then cast
        c, w = self.c, self.embed.weight
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, device=w.device).float() / c.head_dim))
        f = torch.arange(c.max_positions, device=w.device).float()[:, None] * inv[None]
        f = torch.cat((f, f), dim=-1)
        self.cos, self.sin = f.cos().to(w.dtype), f.sin().to(w.dtype)

    def pack_for_cpu(self):
        """Reorder every matrix for oneDNN (see Linear) and free the dense copies, so memory stays one copy of
        the weights (a tied lm_head keeps its matrix: the embedding reads it). fp32 CPU models only; a no-op
        where this torch build has no oneDNN."""
        w = self.embed.weight
        if w.device.type != "cpu" or w.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return
        for m in self.modules():
            if isinstance(m, Linear):
                m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), None)
                if m.weight is not w:
                    m.weight = None

    def new_cache(self, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (batch, self.c.n_kv_heads, length, self.c.head_dim)
        return [(self.embed.weight.new_empty(shape), self.embed.weight.new_empty(shape)) for _ in self.layers]

    def forward(self, ids, pos, mask, cache, start: int = 0, last_only: bool = False):
        """ids, pos [B, T]; mask [B, 1, T, start+T] (True: may attend); returns fp32 logits."""
        x = self.embed(ids)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        for layer, (k, v) in zip(self.layers, cache):
            x = layer(x, cos, sin, mask, k, v, start)
        if last_only:  # generation needs only the next-token logits: skips a [B, T, vocab] matmul
            x = x[:, -1]
        return self.lm_head(self.norm(x)).float()


# ----- weights -----

def hf_layout(c: ModelConfig) -> dict[str, tuple[str, int, tuple[int, ...]]]:
    """HF tensor name -> (our parameter, first row inside it, expected shape)."""
    q, kv, d, h = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.dim, c.hidden_dim
    out = {"model.embed_tokens.weight": ("embed.weight", 0, (c.vocab_size, d)),
           "model.norm.weight": ("norm.weight", 0, (d,))}
    if not c.tie_embeddings:
        out["lm_head.weight"] = ("lm_head.weight", 0, (c.vocab_size, d))
    for i in range(c.n_layers):
        hf, us = f"model.layers.{i}.", f"layers.{i}."
        out |= {hf + "input_layernorm.weight": (us + "attn_norm.weight", 0, (d,)),
                hf + "self_attn.q_proj.weight": (us + "qkv.weight", 0, (q, d)),
                hf + "self_attn.k_proj.weight": (us + "qkv.weight", q, (kv, d)),
                hf + "self_attn.v_proj.weight": (us + "qkv.weight", q + kv, (kv, d)),
                hf + "self_attn.o_proj.weight": (us + "o.weight", 0, (d, q)),
                hf + "post_attention_layernorm.weight": (us + "mlp_norm.weight", 0, (d,)),
                hf + "mlp.gate_proj.weight": (us + "gate_up.weight", 0, (h, d)),
                hf + "mlp.up_proj.weight": (us + "gate_up.weight", h, (h, d)),
                hf + "mlp.down_proj.weight": (us + "down.weight", 0, (d, h))}
    return out


def weight_files(model_dir: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """shard file -> {tensor name: shape}, from model.safetensors.index.json or a single model.safetensors;
    the shapes come from the safetensors headers, nothing is loaded."""
    index, single = model_dir / "model.safetensors.index.json", model_dir / "model.safetensors"
    if index.is_file():
        shards: dict[str, list[str]] = {}
        for name, shard in read_json(index, "safetensors index")["weight_map"].items():
            shards.setdefault(shard, []).append(name)
        for shard in shards:
            if not (model_dir / shard).is_file():
                raise TranslateError(f"{model_dir}: shard {shard} listed in {index.name} is missing")
    elif single.is_file():
        shards = {single.name: None}
    else:
        raise TranslateError(f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                             "(a Hugging Face model folder with safetensors weights is needed)")
    out = {}
    for shard, names in shards.items():
        with safe_open(model_dir / shard, framework="pt") as f:
            out[shard] = {n: tuple(f.get_slice(n).get_shape()) for n in (names or f.keys())}
    return out


def load_model(model_dir: Path, device: torch.device, pack: bool = True) -> Llama:
    where = model_dir / "config.json"
    c = ModelConfig.from_hf(read_json(where, "model config"), str(where))
    layout = hf_layout(c)

    def tensors():  # one tensor in host memory at a time
        for shard, shard_names in shards.items():
            with safe_open(model_dir / shard, framework="pt", device="cpu") as f:
                yield from ((n, f.get_tensor(n), model_dir / shard) for n in shard_names if n in layout)

    try:
        shards = weight_files(model_dir)
        # rotary inverse frequencies are derived, not learned; some old checkpoints carry them
        shapes = {n: s for ns in shards.values() for n, s in ns.items()
                  if not n.endswith("rotary_emb.inv_freq")}
        missing, unexpected = sorted(layout.keys() - shapes.keys()), sorted(shapes.keys() - layout.keys())
        if missing or unexpected:
            raise TranslateError(f"{model_dir}: weights do not match config.json ({c.n_layers} layers):"
                                 f" missing {missing[:3]}{'...' * (len(missing) > 3)}, "
                                 f"unexpected {unexpected[:3]}{'...' * (len(unexpected) > 3)}")
        # before the model is allocated: a config that does not describe these files must not size it
        if wrong := [f"{n} {shapes[n]} (config.json implies {shape})" for n, (_, _, shape) in layout.items()
                     if shapes[n] != shape]:
            raise TranslateError(f"{model_dir}: weights do not match config.json: {listing(wrong, 3)}")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return from_tensors(c, tensors(), device, dtype, pack)
    except SafetensorError as e:
        raise TranslateError(f"{model_dir}: unreadable safetensors file ({e})") from None


def from_tensors(c: ModelConfig, tensors, device: torch.device, dtype: torch.dtype,
                 pack: bool = True) -> Llama:
    """The model filled from (HF name, tensor, where it came from), each shape checked against the config.
    pack: reorder the matrices for oneDNN on CPUs (Llama.pack_for_cpu)."""
    layout = hf_layout(c)
    with torch.device("meta"):  # no memory until the real tensors arrive
        model = Llama(c).to(dtype)
    model.to_empty(device=device)
    if c.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    params = dict(model.named_parameters())
    for name, t, where in tensors:
        ours, row, shape = layout[name]
        if tuple(t.shape) != shape:
            raise TranslateError(f"{where}: {name} has shape {tuple(t.shape)}, config.json implies {shape}")
        with torch.no_grad():
            params[ours][row:row + shape[0]].copy_(t)
    model.init_rope()
    if pack:
        model.pack_for_cpu()
    return model.eval()


# ----- tokenizer -----

def _proto_fields(buf: bytes):
    """(field number, raw bytes, payload) for each field of a serialized protobuf message."""
    i = 0
    while i < len(buf):
        start, (key, i) = i, _varint(buf, i)
        payload = None
        if key & 7 == 0:
            i = _varint(buf, i)[1]
        elif key & 7 == 2:
            n, i = _varint(buf, i)
            payload, i = buf[i:i + n], i + n
        else:
            i += {1: 8, 5: 4}[key & 7]
        yield key >> 3, buf[start:i], payload


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while buf[i] & 0x80:
        n, i, shift = n | (buf[i] & 0x7F) << shift, i + 1, shift + 7
    return n | buf[i] << shift, i + 1


def spm_without_dummy_prefix(model: bytes) -> bytes:
    """The SentencePiece model with NormalizerSpec.add_dummy_prefix and remove_extra_whitespaces off
    (fields 3 and 4 of ModelProto field 3), so we decide where a leading space goes, as transformers'
    Metaspace pre-tokenizer does. protobuf is not a dependency; the wire format is simple."""
    fields = list(_proto_fields(model))
    spec = b"".join(p for f, _, p in fields if f == 3)
    spec = b"".join(r for f, r, _ in _proto_fields(spec) if f not in (3, 4)) + b"\x18\x00\x20\x00"
    n, size = len(spec), bytearray()
    while n > 0x7F:
        size, n = size + bytes([n & 0x7F | 0x80]), n >> 7
    return b"".join(r for f, r, _ in fields if f != 3) + b"\x1a" + bytes(size) + bytes([n]) + spec


class Tokenizer:
    """SentencePiece plus the added chat tokens, with transformers' ids for the same folder: added and
    special tokens split the text first; each piece left is encoded with a leading space on the first
    piece only (`legacy: false`, transformers 5's default), on every piece (`legacy: true`) or never
    (`add_prefix_space: false`)."""

    def __init__(self, model_dir: Path):
        path = model_dir / "tokenizer.model"
        if not path.is_file():
            raise TranslateError(f"{model_dir}: no tokenizer.model (the SentencePiece file of the model)")
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=path.read_bytes())
            self.sp_raw = spm.SentencePieceProcessor(model_proto=spm_without_dummy_prefix(path.read_bytes()))
        except (RuntimeError, KeyError, IndexError):
            raise TranslateError(f"{path}: not a SentencePiece model") from None
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = read_json(cfg_path, "tokenizer config") if cfg_path.is_file() else {}
        # added tokens are listed in one or more of three files, depending on the transformers version
        added: dict[str, dict] = {}
        if (model_dir / "tokenizer.json").is_file():
            for t in read_json(model_dir / "tokenizer.json", "tokenizer").get("added_tokens", []):
                added[t["content"]] = t
        for i, t in (cfg.get("added_tokens_decoder") or {}).items():
            added[t["content"]] = {**t, "id": int(i)}
        if (model_dir / "added_tokens.json").is_file():
            for s, i in read_json(model_dir / "added_tokens.json", "added tokens").items():
                added.setdefault(s, {"content": s, "id": i})

        def special(key: str, default: str) -> str:
            tok = cfg.get(key) or default
            tok = tok["content"] if isinstance(tok, dict) else tok
            if tok not in added and self.sp.id_to_piece(self.sp.piece_to_id(tok)) == tok:
                added[tok] = {"content": tok, "id": self.sp.piece_to_id(tok)}  # never split, as in HF
            return tok
        bos, eos, _ = special("bos_token", "<s>"), special("eos_token", "</s>"), special("unk_token", "<unk>")
        for tok in (IM_START, IM_END, bos, eos):
            if tok not in added:
                raise TranslateError(f"{model_dir}: tokenizer has no {tok} token (translate.py prompts "
                                     "Tower's ChatML; looked in tokenizer_config.json, added_tokens.json and "
                                     "tokenizer.json)")
        template = cfg.get("chat_template") or ""
        if (model_dir / "chat_template.jinja").is_file():
            template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
        if template and IM_START not in str(template):
            raise TranslateError(f"{model_dir}: the model's chat template is not ChatML (no {IM_START})")
        self.added = {s: t["id"] for s, t in added.items()}
        longest_first = sorted(added.values(), key=lambda t: -len(t["content"]))
        ws = {True: r"\s*", False: ""}  # lstrip/rstrip tokens swallow the whitespace beside them
        self.split_re = re.compile("|".join(f"({ws[bool(t.get('lstrip'))]}{re.escape(t['content'])}"
                                            f"{ws[bool(t.get('rstrip'))]})" for t in longest_first))
        self.split_ids = [t["id"] for t in longest_first]
        self.prefix = ("never" if cfg.get("add_prefix_space") is False
                       else "always" if cfg.get("legacy") else "first")
        self.bos_id = self.added[bos] if cfg.get("add_bos_token", True) else None
        self.stop_ids = {self.added[IM_END], self.added[eos]}

    def encode(self, text: str) -> list[int]:
        ids, pos = ([] if self.bos_id is None else [self.bos_id]), 0
        for m in self.split_re.finditer(text):
            ids += self._encode_piece(text[pos:m.start()], first=pos == 0)
            ids.append(self.split_ids[m.lastindex - 1])
            pos = m.end()
        return ids + self._encode_piece(text[pos:], first=pos == 0)

    def _encode_piece(self, s: str, first: bool) -> list[int]:
        wanted = self.prefix == "always" or self.prefix == "first" and first
        if s and wanted and not s.startswith((" ", "▁")):
            s = " " + s
        return self.sp_raw.encode(s) if s else []

    def decode(self, ids: list[int]) -> str:
        # chat tokens and ids past the SentencePiece vocabulary (padding rows) carry no text
        n = self.sp.get_piece_size()
        return self.sp.decode([i for i in ids if i < n and not self.sp.is_control(i)])

    def prompt(self, text: str, lang: str) -> list[int]:
        return self.encode(chatml(user_prompt(text, lang)))


# ----- generation -----

@torch.inference_mode()
def generate(model: Llama, prompts: list[list[int]], max_new_tokens: int | list[int], stop_ids: set[int],
             repetition_penalty: float = 1.0, min_new_tokens: int = 0) -> list[list[int]]:
    """Batched greedy decoding; returns each prompt's new tokens, stop token included. max_new_tokens is
    one bound or one per row.

    Cache columns: [prefix shared by all prompts | left-padded rest of each prompt | new tokens].
    Translation prompts share their instruction, so its keys/values are computed once for the batch.
    Left padding makes all rows write their next token into the same column; masks hide the pads and
    positions count only a row's own tokens, so padding changes no result. Finished rows are dropped."""
    c, dev = model.c, model.embed.weight.device
    B, shortest = len(prompts), min(map(len, prompts))
    P = 0  # shared prefix; every row keeps at least one token of its own for the logits
    while B > 1 and P < shortest - 1 and all(p[P] == prompts[0][P] for p in prompts):
        P += 1
    rest = [p[P:] for p in prompts]
    M = max(map(len, rest))
    budget = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    total = P + M + max(budget)
    for limit, what in ((c.max_positions, "context"), (c.sliding_window, "sliding window")):
        if limit and total > limit:
            raise TranslateError(f"prompt ({P + M}) + --max-new-tokens ({max(budget)}) exceeds the {what} "
                                 f"of the model ({limit})")
    pad = torch.tensor([M - len(r) for r in rest], device=dev)[:, None]
    col = torch.arange(total, device=dev)
    valid = (col < P) | (col >= P + pad)  # [B, total]: the column holds a real token of the row
    pos = torch.where(col < P, col, col - pad).clamp(min=0)  # rotary position of each column, per row
    cache = model.new_cache(B, total)
    if P:
        shared, causal = model.new_cache(1, P), col[:P, None] >= col[None, :P]
        model(torch.tensor([prompts[0][:P]], device=dev), col[None, :P], causal[None, None], shared, 0, True)
        for (k, v), (sk, sv) in zip(cache, shared):
            k[:, :, :P], v[:, :, :P] = sk, sv
    ids = torch.zeros(B, M, dtype=torch.long, device=dev)
    for b, r in enumerate(rest):
        ids[b, M - len(r):] = torch.tensor(r, device=dev)
    q = col[P:P + M, None]
    # causal over the row's real keys; a pad query may see itself, so no softmax row is empty
    mask = (q >= col[None, :P + M]) & valid[:, None, :P + M] | (q == col[None, :P + M])
    logits = model(ids, pos[:, P:P + M], mask[:, None], cache, P, last_only=True)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=dev)
    seen = None
    if repetition_penalty != 1.0:  # transformers' semantics, over prompt and output, never on stop tokens
        seen = torch.zeros(B, c.vocab_size, dtype=torch.bool, device=dev)
        for b, p in enumerate(prompts):
            seen[b, p] = True
        seen[:, stop] = False
    out: list[list[int]] = [[] for _ in range(B)]
    rows, live = list(range(B)), [True] * B  # batch row -> prompt index; prompts still generating
    for t in range(max(budget)):
        if not torch.isfinite(logits).all():  # NaN weights would decode as '⁇ ⁇', which is no translation
            raise TranslateError("the model's logits are not finite (NaN or inf): its weights are broken, or "
                                 "overflow in this precision")
        if seen is not None:
            logits = torch.where(seen, torch.where(logits > 0, logits / repetition_penalty,
                                                   logits * repetition_penalty), logits)
        if t < min_new_tokens:
            logits[:, stop] = float("-inf")
        nxt = logits.argmax(-1)
        for r, tok in zip(rows, nxt.tolist()):
            if live[r]:
                out[r].append(tok)
                live[r] = tok not in stop_ids and len(out[r]) < budget[r]
        keep = [i for i, r in enumerate(rows) if live[r]]
        if not keep:
            break
        if len(keep) <= 0.875 * len(rows):  # drop finished rows once they are an eighth of the batch
            k = torch.tensor(keep, device=dev)
            cache, nxt, valid, pos = [(a[k], b[k]) for a, b in cache], nxt[k], valid[k], pos[k]
            seen, rows = None if seen is None else seen[k], [rows[i] for i in keep]
        if seen is not None:
            seen[torch.arange(len(rows), device=dev), nxt] = True
            seen[:, stop] = False
        j = P + M + t  # the cache column of the token just chosen
        logits = model(nxt[:, None], pos[:, j:j + 1], valid[:, None, None, :j + 1], cache, j, last_only=True)
    return out


# ----- backends -----

RETRY_PENALTY = 1.2  # --retry-flagged decodes greedily with this repetition penalty: less copying, no loops


@dataclass
class Result:
    text: str
    tokens: int
    finished: bool  # ended by itself, not cut by --max-new-tokens


class LocalBackend:
    workers = 1

    def __init__(self, model_dir: Path, device: str, batch_size: int, max_new_tokens: int):
        if not model_dir.is_dir():
            raise TranslateError(f"--model {model_dir}: not a folder")
        self.tok = Tokenizer(model_dir)
        dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.model = load_model(model_dir, dev)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        files = [model_dir / n for n in ("config.json", "tokenizer_config.json") if (model_dir / n).is_file()]
        digest = hashlib.sha1(b"".join(f.read_bytes() for f in files)).hexdigest()
        self.model_id = f"local:{model_dir.resolve().name}@{digest[:8]}"

    def plan(self, items: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
        # longest prompts first (memory peak early, little padding); batches are fixed by the whole work
        # list, so a resumed run computes every string in the same batch as an uninterrupted run
        lens = {it: len(self.tok.prompt(*it)) for it in items}
        items = sorted(items, key=lambda it: (-lens[it], it[1], it[0]))
        return [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]

    def translate(self, batch: list[tuple[str, str]], retry: bool) -> list[Result]:
        prompts = [self.tok.prompt(*it) for it in batch]
        outs = generate(self.model, prompts, self.max_new_tokens, self.tok.stop_ids,
                        repetition_penalty=RETRY_PENALTY if retry else 1.0, min_new_tokens=int(retry))
        return [Result(self.tok.decode(o).strip(), len(o), o[-1] in self.tok.stop_ids) for o in outs]


class HttpBackend:
    """OpenAI-compatible chat completions over http.client (stdlib; proxy variables are not read, so
    requests go to --base-url and nowhere else). Retries 5xx, 429, timeouts and connection errors
    with exponential back-off; other 4xx answers mean a wrong request and stop the run at once."""

    def __init__(self, base_url: str, api_model: str, max_new_tokens: int, concurrency: int,
                 timeout: float, max_retries: int, api_key: str | None = None, backoff: float = 1.0):
        u = urllib.parse.urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise TranslateError(f"--base-url {base_url!r}: expected http(s)://host[:port][/v1]")
        self.conn = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        self.host, self.port, prefix = u.hostname, u.port, u.path.rstrip("/")
        self.path = prefix + ("/chat/completions" if prefix.endswith("/v1") else "/v1/chat/completions")
        self.url = f"{u.scheme}://{u.netloc}{self.path}"
        self.api_model, self.max_new_tokens, self.workers = api_model, max_new_tokens, concurrency
        self.timeout, self.max_retries, self.api_key, self.backoff = timeout, max_retries, api_key, backoff
        self.model_id = f"http:{api_model}"

    def plan(self, items):
        return [[it] for it in items]  # one request per string; the server batches

    def translate(self, batch: list[tuple[str, str]], retry: bool) -> list[Result]:
        (text, lang), = batch
        body = {"model": self.api_model, "messages": [{"role": "user", "content": user_prompt(text, lang)}],
                "max_tokens": self.max_new_tokens, "temperature": 0.0, "stop": [IM_END]}
        if retry:  # vLLM/TGI extensions, the same decoding as the local backend's retry
            body |= {"repetition_penalty": RETRY_PENALTY, "min_tokens": 1}
        r = self.post(body)
        try:
            choice = r["choices"][0]
            text = (choice["message"]["content"] or "").strip()  # null: the server generated nothing
            finished = choice.get("finish_reason") != "length"
        except (KeyError, IndexError, TypeError, AttributeError):
            raise TranslateError(f"{self.url}: unexpected response {json.dumps(r)[:200]}") from None
        return [Result(text, (r.get("usage") or {}).get("completion_tokens") or 0, finished)]

    def post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {self.api_key}"}
                                                          if self.api_key else {})
        for attempt in range(self.max_retries + 1):
            conn = self.conn(self.host, self.port, timeout=self.timeout)
            try:
                conn.request("POST", self.path, body=json.dumps(body).encode(), headers=headers)
                resp = conn.getresponse()
                status, reply = resp.status, resp.read()
            except (OSError, http.client.HTTPException) as e:  # timeouts, refused or reset connections
                problem = f"{type(e).__name__}: {e}"
            else:
                text = reply.decode("utf-8", "replace")[:300]
                if status == 200:
                    try:
                        return json.loads(reply)
                    except json.JSONDecodeError:
                        raise TranslateError(f"{self.url}: the reply is not JSON: {text!r}") from None
                hint = {401: ", the server refused the request (API key? see --api-key-env)", 403:
                        ", the server refused the request", 404: f", wrong --base-url or unknown --api-model "
                        f"{self.api_model!r}"}.get(status, "")
                if status < 500 and status != 429:  # the request itself is wrong: retrying cannot help
                    raise TranslateError(f"{self.url}: HTTP {status}{hint}: {text}")
                problem = f"HTTP {status}: {text}"
            finally:
                conn.close()
            if attempt == self.max_retries:
                raise TranslateError(f"{self.url}: gave up after {attempt + 1} attempts, last error "
                                     f"{problem}")
            time.sleep(self.backoff * 2 ** attempt)


# ----- cache and quality guards -----

CACHE_FIELDS = {"model": str, "lang": str, "attempt": int, "src": str, "out": str, "tokens": int,
                "finished": bool}


def cache_record(line: bytes) -> dict | None:
    """A cache line as written by Cache.add, or None if it is not one (bad UTF-8, bad JSON, a field
    missing or of another type, an empty answer, which is never a translation)."""
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(rec, dict) or not all(isinstance(rec.get(k), t) for k, t in CACHE_FIELDS.items()):
        return None
    return rec if rec["attempt"] in (0, 1) and rec["out"].strip() else None


class Cache:
    """Append-only JSONL, one line per translated string, keyed by (source, language, model id) and the
    attempt (0, or 1 for the retry decoding). Each line is flushed as it is written, so a kill loses at
    most the line being written; that torn last line is cut off when the cache is opened again. Lines
    that are not translations (corrupt, or an empty answer written by an older version) are skipped and
    counted, so their strings are translated again and every good line is kept."""

    def __init__(self, path: Path, model_id: str):
        self.path, self.model_id, self.entries, self.dropped, self.skipped = path, model_id, {}, 0, []
        raw = path.read_bytes() if path.is_file() else b""
        if raw and not raw.endswith(b"\n"):
            self.dropped = len(raw) - (raw.rfind(b"\n") + 1)
            raw = raw[:len(raw) - self.dropped]
            with open(path, "r+b") as f:
                f.truncate(len(raw))
        for n, line in enumerate(raw.splitlines(), 1):
            if (rec := cache_record(line)) is None:
                self.skipped.append(n)
            elif rec["model"] == model_id:  # other models' lines stay in the file, unused
                self.entries.setdefault((rec["src"], rec["lang"]), {})[rec["attempt"]] = rec
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def has(self, key: tuple[str, str], attempt: int) -> bool:
        return attempt in self.entries.get(key, {})

    def add(self, key: tuple[str, str], attempt: int, r: Result):
        rec = {"model": self.model_id, "lang": key[1], "attempt": attempt, "src": key[0], "out": r.text,
               "tokens": r.tokens, "finished": r.finished}
        try:
            self.file.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk: name the file; a torn last line is cut off on the next run
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        self.entries.setdefault(key, {})[attempt] = rec

    def best(self, key: tuple[str, str]) -> dict:
        # the retry replaces the first attempt unless it is flagged for more reasons (or there is no first:
        # its answer was empty)
        e, (src, lang) = self.entries[key], key
        if 1 in e and (0 not in e or len(flags(src, e[1], lang)) <= len(flags(src, e[0], lang))):
            return e[1]
        return e[0]


SCRIPTS = {"zh": ("CJK",), "ko": ("HANGUL",), "ru": ("CYRILLIC",)}  # the other six write in Latin letters
FLAGS = ("same_as_source", "wrong_script", "too_long", "truncated")  # empty answers are never kept


def flags(src: str, rec: dict, lang: str) -> list[str]:
    out = rec["out"]
    letters = [ch for ch in out if ch.isalpha()]
    in_script = sum(unicodedata.name(ch, "").startswith(SCRIPTS.get(lang, ("LATIN",))) for ch in letters)
    found = []
    if out.strip().casefold() == src.strip().casefold():
        found.append("same_as_source")
    if letters and in_script < 0.5 * len(letters):
        found.append("wrong_script")
    if len(out) > 3 * len(src) + 10:  # zh/ko translations are shorter than English, the others longer
        found.append("too_long")
    return found + ([] if rec["finished"] else ["truncated"])


# ----- manifest -----

def read_manifest(path: Path) -> list[dict]:
    """The input, read by the one captions.jsonl reader (data/manifest.py's load_manifest); the caption
    lists are checked here: every record needs non-empty English captions, the source of the translation,
    while damaged translations are reported later (--overwrite redoes them)."""
    records, empty = load_manifest(path, check_captions=False), []
    for rec in records:
        en = rec["captions"].get("en")
        if not (isinstance(en, list) and en and all(isinstance(s, str) for s in en)):
            raise TranslateError(f"{path}: record {rec['id']!r} has no English captions "
                                 '(expected "captions": {"en": [...]})')
        empty += [f"{rec['id']!r} #{k}" for k, s in enumerate(en) if not s.strip()]
    if empty:  # there is nothing to translate, and an empty translation would be no caption either
        raise TranslateError(f"{path}: {len(empty)} English captions are empty: {listing(empty)}. None was "
                             "sent for translation: remove them (prepare captions --drop-empty does)")
    return records


def parse_langs(s: str) -> list[str]:
    return manifest.parse_langs(s, "--langs (target languages; English is the source)", tuple(LANGS))


# ----- driver -----

@dataclass
class TranslateConfig:
    """Everything a run depends on; the fields are the command line (see `main`)."""
    manifest: Annotated[Path, typer.Argument(help="input captions.jsonl")]
    langs: Annotated[str, typer.Option(help="target languages, comma-separated: " + ",".join(LANGS))]
    out: Annotated[Path, typer.Option(help="output manifest (written atomically)")]
    model: Annotated[Path | None, typer.Option(help="Hugging Face model folder (local backend)")] = None
    backend: Annotated[str, typer.Option(help="local (PyTorch) or http (OpenAI-compatible server)")] = "local"
    base_url: Annotated[str | None, typer.Option(help="http: server URL, e.g. http://localhost:8000")] = None
    api_model: Annotated[str | None, typer.Option(help="http: model name the server serves")] = None
    api_key_env: Annotated[str | None, typer.Option(help="http: environment variable with an API key")] = None
    batch_size: Annotated[int, typer.Option(min=1, help="local: sequences per batch")] = 16
    concurrency: Annotated[int, typer.Option(min=1, help="http: requests in flight")] = 8
    max_new_tokens: Annotated[int, typer.Option(min=1, help="most tokens per translation")] = 256
    cache: Annotated[Path | None, typer.Option(help="cache file (default: OUT.cache.jsonl)")] = None
    report: Annotated[Path | None, typer.Option(help="quality report (default: OUT.report.json)")] = None
    retry_flagged: Annotated[bool, typer.Option(help="translate flagged strings again")] = False
    overwrite: Annotated[bool, typer.Option(help="translate anew the --langs a record already has "
                                                 "(default: keep them)")] = False
    timeout: Annotated[float, typer.Option(help="http: seconds per request")] = 120.0
    max_retries: Annotated[int, typer.Option(min=0, help="http: retries on 5xx, 429, timeouts")] = 5
    device: Annotated[str, typer.Option(help="local: auto, cpu, cuda, cuda:1, ...")] = "auto"


def make_backend(cfg: TranslateConfig):
    if cfg.backend == "local":
        if cfg.model is None:
            raise TranslateError("--model DIR is needed with --backend local")
        return LocalBackend(cfg.model, cfg.device, cfg.batch_size, cfg.max_new_tokens)
    if cfg.backend != "http":
        raise TranslateError(f"--backend {cfg.backend!r}: choose local or http")
    if not (cfg.base_url and cfg.api_model):
        raise TranslateError("--base-url and --api-model are needed with --backend http")
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    if cfg.api_key_env and not key:
        raise TranslateError(f"--api-key-env: the environment variable {cfg.api_key_env} is not set")
    return HttpBackend(cfg.base_url, cfg.api_model, cfg.max_new_tokens, cfg.concurrency, cfg.timeout,
                       cfg.max_retries, key)


def run_pass(backend, items, cache: Cache, attempt: int, progress: Progress, label: str):
    batches = [b for b in backend.plan(items) if any(not cache.has(it, attempt) for it in b)]
    task = progress.add_task(label, total=sum(not cache.has(it, attempt) for b in batches for it in b),
                             cps=0.0, tps=0.0)
    t0, done, tokens = time.perf_counter(), 0, 0

    def record(batch, results):
        nonlocal done, tokens
        for it, r in zip(batch, results):
            # a batch may hold strings cached before a kill; an empty answer is never a translation
            if r.text and not cache.has(it, attempt):
                cache.add(it, attempt, r)
                done, tokens = done + 1, tokens + r.tokens
        dt = time.perf_counter() - t0
        progress.update(task, completed=done, cps=done / dt, tps=tokens / dt)

    if backend.workers == 1:
        for b in batches:
            record(b, backend.translate(b, attempt == 1))
        return
    with ThreadPoolExecutor(backend.workers) as pool:
        futures = [(b, pool.submit(backend.translate, b, attempt == 1)) for b in batches]
        try:
            for b, fut in futures:  # in submission order, so the cache order does not depend on timing
                record(b, fut.result())
        finally:
            for _, fut in futures:
                fut.cancel()


def output_paths(cfg: TranslateConfig) -> tuple[Path, Path]:
    """-> (cache, report). Refused before any work: an output that is a folder, or the same file as the
    manifest or as another output (one write would destroy the other file)."""
    cache = cfg.cache or cfg.out.with_name(cfg.out.name + ".cache.jsonl")
    report = cfg.report or cfg.out.with_name(cfg.out.name + ".report.json")
    earlier = []
    for what, path in (("--out", cfg.out), ("--cache", cache), ("--report", report)):
        cli.refuse_overwrite(path, [cfg.manifest], what, "the input manifest")
        cli.refuse_overwrite(path, earlier, what, "also the output")
        earlier.append(path)
    return cache, report


def run(cfg: TranslateConfig, console: Console) -> dict:
    langs, records = parse_langs(cfg.langs), read_manifest(cfg.manifest)
    cache_path, report_path = output_paths(cfg)
    # a language a record already has is kept unless --overwrite; an empty or malformed one is no
    # translation to keep, and replacing it unasked could lose what the user meant to write there
    todo, kept, broken = [], dict.fromkeys(langs, 0), []
    for rec in records:
        for lang in langs:
            have = rec["captions"].get(lang)
            if cfg.overwrite or have is None:
                todo.append((rec, lang))
            elif isinstance(have, list) and have and all(isinstance(s, str) and s.strip() for s in have):
                kept[lang] += 1
            else:
                broken.append(f"{rec.get('id')!r} {lang}")
    if broken:
        raise TranslateError(f"{cfg.manifest}: {len(broken)} existing translations are empty or not lists of "
                             f"text: {listing(broken)}. Fix or remove them, or pass --overwrite to translate "
                             "every record anew")
    backend = make_backend(cfg)
    cache = Cache(cache_path, backend.model_id)
    if cache.dropped:
        console.print(f"cache: dropped a truncated last line ({cache.dropped} bytes) of an interrupted run")
    if cache.skipped:
        console.print(f"cache: skipped {len(cache.skipped)} lines that hold no translation (corrupt, or an "
                      f"empty answer): line {listing(cache.skipped)}; their strings are translated again",
                      markup=False, highlight=False)
    for lang, n in kept.items():
        if n:
            console.print(f"{lang}: kept the existing captions of {n} records (--overwrite: translate anew)")
    # identical captions are translated once: remote-sensing caption sets repeat many sentences
    wanted = {(s, lang) for rec, lang in todo for s in rec["captions"]["en"]}
    sources = list(dict.fromkeys(s for rec in records for s in rec["captions"]["en"]))
    items = [(s, lang) for lang in langs for s in sources if (s, lang) in wanted]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[cps]:.1f} captions/s {task.fields[tps]:.0f} tokens/s"))
    try:
        with Progress(*columns, console=console) as progress:
            # a string whose first answer was empty but whose retry was not is done
            run_pass(backend, [it for it in items if not cache.has(it, 1)], cache, 0, progress, "translate")
            # an empty answer is never kept: its string gets the retry decoding at once (a repetition penalty,
            # at least one token), and so does every flagged string with --retry-flagged
            retry = [it for it in items if not cache.has(it, 0)
                     or cfg.retry_flagged and flags(it[0], cache.entries[it][0], it[1])]
            if retry:
                run_pass(backend, retry, cache, 1, progress, "retry")
    finally:
        cache.file.close()
    if missing := [f"{lang} {src!r}" for src, lang in items if (src, lang) not in cache.entries]:
        raise TranslateError(f"{len(missing)} of {len(items)} strings got only empty answers, from the retry "
                             f"decoding too: {listing(missing)}. Nothing was written; the cache keeps the "
                             "finished translations: run the same command again, or try another model")
    for rec, lang in todo:
        rec["captions"][lang] = [cache.best((s, lang))["out"] for s in rec["captions"]["en"]]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    files.atomic_write(cfg.out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    # report: counts per language and flag, and every flagged string
    counts = {lang: dict.fromkeys(("strings", *FLAGS), 0) for lang in langs}
    flagged_list = []
    for src, lang in items:
        best = cache.best((src, lang))
        counts[lang]["strings"] += 1
        for f in (found := flags(src, best, lang)):
            counts[lang][f] += 1
        if found:
            flagged_list.append({"lang": lang, "src": src, "out": best["out"], "flags": found,
                                 "retried": best["attempt"] == 1})
    report = {"model": backend.model_id, "config": {k: v if not isinstance(v, Path) else str(v)
                                                    for k, v in vars(cfg).items()},
              "records": len(records), "unique_sources": len(sources), "kept": kept, "counts": counts,
              "flagged": flagged_list}
    text = json.dumps(report, ensure_ascii=False, indent=1) + "\n"
    files.atomic_write(report_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    table = Table(title=f"{cfg.out}: {len(records)} records, {len(sources)} unique English captions")
    for name in ("lang", "strings", *FLAGS):
        table.add_column(name.replace("_", " "), justify="left" if name == "lang" else "right")
    for lang in langs:
        table.add_row(lang, *(str(n) for n in counts[lang].values()))
    console.print(table)
    console.print(f"wrote {files.display(cfg.out)} and the report {files.display(report_path)}")
    return report


# ----- CLI -----

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def main(**options):
    cfg, console = TranslateConfig(**options), Console(stderr=True)
    try:
        run(cfg, console)
    except KeyboardInterrupt:
        console.print("interrupted: the cache keeps every finished translation; the same command goes on")
        raise typer.Exit(130) from None


main.__signature__ = inspect.signature(TranslateConfig, eval_str=True)  # the options are the config's fields
app.command(help="Translate the English captions of a captions.jsonl manifest into --langs.")(main)

if __name__ == "__main__":
    cli.run_cli(app)
