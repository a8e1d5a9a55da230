"""Speed and memory of rsmclip against open_clip on the same weights, in the same process.

    python -m bench.peers model                      # tiny and xlmr-b32, CPU or the local GPU
    python -m bench.peers model --presets xlmr-b32 --batch-sizes 32,128 --device cuda --precision bf16

Prints time per call for each side, the ratio ours / open_clip (below 1 = we are faster) and the peak
memory of each. open_clip is a benchmark peer only (pip install -r requirements-dev.txt).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import typer

import cli
import files
import optimization as opt
import rsmclip
import rundir
import train
from bench.openclip_oracle import paired_models
from data import augment, loading
from data import shards as shardlib
from data.demo import make_demo
from data.loading import ImageCache

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)


@app.callback()
def benchmarks():
    """Benchmarks against the real peers (ratios, never absolute times alone)."""


# ----------------------------------------------------------------------------- measuring

class PeakMemory:
    """Peak memory of a block in MiB (rundir.memory_mb): CUDA's allocator statistics, or on CPU the
    process' peak resident set (reset through /proc/self/clear_refs) above what was resident before."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the baseline is what is live
            Path("/proc/self/clear_refs").write_text("5")
        self.base = rundir.memory_mb(self.device, peak=False)
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.peak = rundir.memory_mb(self.device) - self.base


def timed(fn, device: str, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median seconds per call over `repeats` calls after `warmup`, and the peak MiB of one call."""
    for _ in range(warmup):
        fn()
    with PeakMemory(device) as mem:
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), mem.peak


def caption_lengths(n: int, seed: int = 0, captions: Optional[Path] = None,
                    tokenizer: Optional[Path] = None) -> list[int]:
    """Token counts of real remote-sensing captions (a Karpathy-style file such as UCM-Captions'
    dataset_ucm.json, tokenised with the XLM-R vocabulary) or, without them, of 5-30-word captions at 1.3
    pieces a word; <s> and </s> included."""
    g = torch.Generator().manual_seed(seed)
    if captions and tokenizer:
        texts = [s["raw"] for im in json.loads(captions.read_text())["images"] for s in im["sentences"]]
        pool = (rsmclip.Tokenizer(tokenizer)(texts) != rsmclip.PAD).sum(1)
        return pool[torch.randint(len(pool), (n,), generator=g)].tolist()
    words = torch.randint(5, 31, (n,), generator=g)
    return [min(77, int(w * 1.3) + 2) for w in words]


CAPTIONS = typer.Option(None, help="Karpathy-style caption file (e.g. dataset_ucm.json): real lengths")
VOCAB = typer.Option(None, help="the XLM-R SentencePiece model to count their tokens")


def make_ids(lengths: list[int], vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), 77), rsmclip.PAD)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(4, vocab, (n,), generator=g)
        ids[row, 0], ids[row, n - 1] = rsmclip.BOS, rsmclip.EOS
    return ids


# ----------------------------------------------------------------------------- model benchmark

@app.command()
def model(presets: str = typer.Option("tiny,xlmr-b32", help="comma-separated presets"),
          batch_sizes: str = typer.Option("8,32", help="comma-separated batch sizes"),
          device: str = cli.DEVICE,
          precision: str = typer.Option("fp32", help="fp32, or bf16 / fp16 autocast (CUDA)"),
          repeats: int = typer.Option(5, help="timed calls per measurement (median reported)"),
          threads: int = typer.Option(0, help="CPU threads (0: torch's default)"),
          captions: Optional[Path] = CAPTIONS, tokenizer: Optional[Path] = VOCAB):
    """Image encoding, text encoding of real-length captions, and one forward+backward CLIP step."""
    import open_clip  # the peer, imported only by the commands that measure against it

    if threads:
        torch.set_num_threads(threads)
    autocast = (torch.autocast(device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
                if precision != "fp32" else nullcontext())
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; precision {precision}; torch {torch.__version__}; "
          f"open_clip {open_clip.__version__}")
    print(f"{'preset':9} {'batch':>5} {'task':12} {'ours ms':>9} {'open_clip ms':>12} {'ratio':>6} "
          f"{'ours MiB':>9} {'open_clip MiB':>13}")
    for preset in presets.split(","):
        cfg = rsmclip.PRESETS[preset]
        ours, theirs = paired_models(cfg)
        ours, theirs = ours.to(device), theirs.to(device)
        loss_ref = open_clip.ClipLoss()
        for batch in map(int, batch_sizes.split(",")):
            size = cfg.vision.image_size
            pixels = torch.randn(batch, 3, size, size, device=device)
            ids = make_ids(caption_lengths(batch, 0, captions, tokenizer), cfg.text.vocab_size).to(device)

            def step(m, loss_fn):
                def run():
                    m.zero_grad(set_to_none=True)
                    with autocast:
                        loss = loss_fn(*m(pixels, ids))
                    loss.backward()
                return run

            def infer(fn):
                def run():
                    with torch.inference_mode(), autocast:
                        fn()
                return run

            tasks = {
                "encode_image": (infer(lambda: ours.encode_image(pixels)),
                                 infer(lambda: theirs.encode_image(pixels))),
                "encode_text": (infer(lambda: ours.encode_text(ids)), infer(lambda: theirs.encode_text(ids))),
                "fwd+bwd": (step(ours.train(), rsmclip.clip_loss), step(theirs.train(), loss_ref)),
            }
            for task, (a, b) in tasks.items():
                ours.train(task == "fwd+bwd")
                theirs.train(task == "fwd+bwd")
                (ta, ma), (tb, mb) = timed(a, device, repeats), timed(b, device, repeats)
                print(f"{preset:9} {batch:5d} {task:12} {ta * 1e3:9.1f} {tb * 1e3:12.1f} {ta / tb:6.2f} "
                      f"{ma:9.0f} {mb:13.0f}", flush=True)
        ours = theirs = None  # free both before the next preset (not del: the timed closures refer to them)


# ----------------------------------------------------------------------------- training-step benchmark

@app.command("train")
def train_bench(preset: str = typer.Option("tiny", help="model preset"),
                batch_size: int = typer.Option(32, help="images per step"),
                steps: int = typer.Option(6, help="timed steps per side (median reported)"),
                device: str = cli.DEVICE,
                precision: str = typer.Option("auto",
                                              help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16"),
                local_crops: int = typer.Option(8, help="local crops for the multi-crop measurement"),
                threads: int = typer.Option(0, help="CPU threads (0: torch's default)"),
                captions: Optional[Path] = CAPTIONS, tokenizer: Optional[Path] = VOCAB):
    """Training steps of our loop and of open_clip's (model + ClipLoss + the same AdamW, clipping and
    logit_scale clamp) on the same data, CLIP loss only so both do the same work; then the cost of
    our multi-crop self-distillation on top, reported separately."""
    import open_clip  # the peer, imported only by the commands that measure against it

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    precision, dtype = train.resolve_precision(precision, dev.type)
    cfg = rsmclip.PRESETS[preset]
    size = cfg.vision.image_size
    g = torch.Generator().manual_seed(0)
    batches = [{"views": torch.randn(batch_size, 3, size, size, generator=g),
                "ids": make_ids(caption_lengths(batch_size, i, captions, tokenizer), cfg.text.vocab_size,
                                seed=i),
                "locals": None}
               for i in range(steps + 2)]
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; precision {precision}; preset {preset}; batch {batch_size}; "
          f"torch {torch.__version__}")

    ours, theirs = paired_models(cfg)
    ours.train(), theirs.train()
    run_cfg = train.TrainConfig(distill_weight=0, batch_size=batch_size, steps=10_000, warmup=100,
                                precision=precision)
    run = train.build_run(run_cfg, ours, None, dev)

    # open_clip_train's step: lr, zero_grad, autocast forward, ClipLoss, backward, (unscale), global-norm
    # clip, AdamW with its weight-decay groups and betas, logit_scale clamp
    theirs = theirs.to(dev)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(theirs.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": run_cfg.weight_decay}],
        lr=run_cfg.lr, betas=(run_cfg.beta1, run_cfg.beta2), eps=run_cfg.eps, fused=dev.type == "cuda")
    scaler = torch.amp.GradScaler(dev.type) if precision == "fp16" else None
    loss_fn = open_clip.ClipLoss()

    def openclip_step(batch, step):
        for group in optimizer.param_groups:
            group["lr"] = opt.lr_at(step, run_cfg.lr, run_cfg.warmup, run_cfg.steps)
        optimizer.zero_grad()
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(*theirs(batch["views"].to(dev), batch["ids"].to(dev)))
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), run_cfg.grad_clip)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        with torch.no_grad():
            theirs.logit_scale.clamp_(0, math.log(100))

    def timed_steps(step_fn, batches):
        for i in range(2):
            step_fn(batches[i], i)  # warm-up (optimizer state allocation)
        with PeakMemory(dev.type) as mem:
            step_fn(batches[2], 2)
        times = []
        for i in range(3, steps + 2):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step_fn(batches[i], i)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times), mem.peak

    t_ours, m_ours = timed_steps(lambda b, i: train.train_step(run, b, i), batches)
    del run
    t_theirs, m_theirs = timed_steps(openclip_step, batches)
    print(f"{'loop':34} {'ms/step':>9} {'images/s':>9} {'peak MiB':>9}")
    print(f"{'rsmclip train_step (CLIP only)':34} {t_ours * 1e3:9.1f} {batch_size / t_ours:9.1f} "
          f"{m_ours:9.0f}")
    print(f"{'open_clip model + ClipLoss':34} {t_theirs * 1e3:9.1f} {batch_size / t_theirs:9.1f} "
          f"{m_theirs:9.0f}")
    print(f"step-time ratio ours / open_clip: {t_ours / t_theirs:.2f}")
    theirs = optimizer = None  # freed before the multi-crop part (not del: openclip_step refers to them)

    # the method's own cost: 2 global + N local crops, EMA teacher, DINO head and loss
    ours = paired_models(cfg)[0].train()
    crop_cfg = train.TrainConfig(batch_size=batch_size, steps=10_000, warmup=100, precision=precision,
                                 local_crops=local_crops, local_size=size * 3 // 7,
                                 prototypes=65536 if preset != "tiny" else 1024)
    run = train.build_run(crop_cfg, ours, None, dev)
    local = crop_cfg.local_size
    crop_batches = [{"views": torch.randn(2 * batch_size, 3, size, size, generator=g),
                     "locals": torch.randn(local_crops * batch_size, 3, local, local, generator=g),
                     "ids": torch.cat([b["ids"], b["ids"]])} for b in batches]
    t_crop, m_crop = timed_steps(lambda b, i: train.train_step(run, b, i), crop_batches)
    print(f"{f'rsmclip multi-crop (2x{size} + {local_crops}x{local} px)':34} {t_crop * 1e3:9.1f} "
          f"{batch_size / t_crop:9.1f} {m_crop:9.0f}")
    print(f"multi-crop cost: {t_crop / t_ours:.2f}x our CLIP-only step")
    return {"ours_ms": t_ours * 1e3, "open_clip_ms": t_theirs * 1e3, "ratio": t_ours / t_theirs,
            "multicrop_ms": t_crop * 1e3}


# ----------------------------------------------------------------------------- data pipeline benchmark

SHARED_UCM = Path(__file__).resolve().parents[2] / "shared/datasets/ucm_captions_trainval"


def dino_transform(cfg: train.TrainConfig, size: int):
    """DINO's DataAugmentationDINO (main_dino.py), built from torchvision.transforms: 2 global crops (blur
    p 1; blur p 0.1 + solarisation p 0.2) and the local crops (blur p 0.5), each flipped, jittered and
    greyed; with our crop sizes and scales. DINO blurs and solarises with PIL, as here."""
    import torchvision.transforms as T
    from PIL import ImageFilter

    def blur(p):
        return T.RandomApply([T.Lambda(lambda im: im.filter(ImageFilter.GaussianBlur(
            radius=torch.empty(()).uniform_(0.1, 2.0).item())))], p=p)

    colour = [T.RandomHorizontalFlip(0.5), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
              T.RandomGrayscale(0.2)]
    tensor = [T.ToTensor(), T.Normalize(rsmclip.CLIP_MEAN, rsmclip.CLIP_STD)]
    bicubic = T.InterpolationMode.BICUBIC
    global1 = T.Compose([T.RandomResizedCrop(size, cfg.global_scale, interpolation=bicubic), *colour,
                         blur(1.0), *tensor])
    global2 = T.Compose([T.RandomResizedCrop(size, cfg.global_scale, interpolation=bicubic), *colour,
                         blur(0.1), T.RandomSolarize(128, 0.2), *tensor])
    local = T.Compose([T.RandomResizedCrop(cfg.local_size, cfg.local_scale, interpolation=bicubic), *colour,
                       blur(0.5), *tensor])
    return lambda image: [global1(image), global2(image)] + [local(image) for _ in range(cfg.local_crops)]


def ucm_manifest(folder: Path) -> Path:
    """UCM-Captions train/val from ../shared as a manifest in `folder` (its images linked there)."""

    if not SHARED_UCM.is_dir():
        raise rsmclip.RsmclipError(f"{SHARED_UCM}: not found; pass --manifest")
    (folder / "images").symlink_to(SHARED_UCM / "images")
    prepare_command("captions", SHARED_UCM / "dataset_ucm_trainval.json", "--images", folder / "images",
                    "--out", folder / "captions.jsonl", "--dataset", "ucm")
    return folder / "captions.jsonl"


def prepare_command(*args) -> str:
    """`python data/prepare.py ARGS` run as a user runs it (it is a command: no module imports it); -> what
    it printed. Its one-line error, when it fails, is the message."""
    run = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "data/prepare.py"),
                          *map(str, args)], capture_output=True, text=True)
    if run.returncode:
        command = " ".join(map(str, args))
        raise rsmclip.RsmclipError(f"data/prepare.py {command}: {run.stderr.strip()[-2000:]}")
    return run.stdout


@app.command()
def data(manifest: Optional[Path] = typer.Option(None, help="captions.jsonl (default: UCM-Captions from "
                                                 "../shared, train split)"),
         tokenizer: Optional[Path] = typer.Option(None, help="SentencePiece model (default: ../shared's "
                                                  "XLM-R vocabulary)"),
         samples: int = typer.Option(96, help="samples per measurement"),
         workers: int = typer.Option(0, help="loader processes for the N-worker line (0: every core)"),
         batch_size: int = typer.Option(32, help="samples per batch of the tensor path"),
         shards: bool = typer.Option(False, help="also the same images from tar shards (data/shards.py), "
                                     "and what reading and decoding alone cost on each path")):
    """Samples/s of the paper-shaped multi-crop pipeline (2 x 224 + 8 x 96 px), each side in one process
    with one thread unless said: ours with PIL (files, 1 and N loader processes), ours from the decoded
    cache with tensor ops on the CPU (and on CUDA when present), DINO's torchvision pipeline; with --shards
    the same from tar shards, and read + decode alone from files and from shards, whose share of the PIL
    pipeline's time is the loader's own share per worker. Ratio: a line's samples/s (all its processes) /
    our PIL pipeline's in one process, all measured in this run."""

    cfg = replace(train.RECIPES["rs-m-clip"], langs="en")
    size = 224
    workers = workers or os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = manifest or ucm_manifest(Path(tmp))
        tokenizer = rsmclip.Tokenizer(
            tokenizer or SHARED_UCM.parents[1] / "assets/xlmr/sentencepiece.bpe.model")
        items = loading.read_manifests([str(manifest)], "train")
        start = time.perf_counter()
        cache_file = Path(tmp) / "cache.safetensors"
        prepare_command("cache", manifest, "--out", cache_file)
        built = time.perf_counter() - start
        cache = ImageCache(cache_file, manifest)
        torch.set_num_threads(1)
        keys = [(i % len(items), 1000 + i) for i in range(samples)]
        rows = []

        def measure(name, fn, processes=1):
            fn(keys[:4])  # warm-up: page cache, lazy imports
            start = time.perf_counter()
            fn(keys)
            rate = samples / (time.perf_counter() - start)
            rows.append((name, processes, rate))
            print(f"{name:52} {processes:>9} {rate:9.1f} {rate / processes:9.1f} "
                  f"{rate / rows[0][2]:7.2f}", flush=True)

        pil = loading.MultiCropDataset(items, cfg, size, tokenizer)

        def loader(ks, n):
            run = replace(cfg, data=[str(manifest)], workers=n, batch_size=batch_size, augment="pil")
            for _ in loading.build_loader(loading.open_data(run, loading.World()), run, loading.World(), size,
                                          tokenizer, 0, math.ceil(len(ks) / batch_size)):
                pass

        radius = augment.blur_taps(size)

        def tensor_path(device):
            ds = loading.MultiCropDataset(items, cfg, size, tokenizer, cache, tensor=True)

            def run(ks):
                for i in range(0, len(ks), batch_size):
                    batch = loading.collate([ds[k] for k in ks[i:i + batch_size]])
                    if device is None:  # what a GPU host's loader processes do: read, draw, collate
                        continue
                    pixels = batch["pixels"].to(device)
                    augment.views(pixels, batch["view_plan"], size, radius)
                    augment.views(pixels, batch["local_plan"], cfg.local_size, radius)
                if device == "cuda":
                    torch.cuda.synchronize()
            return run

        dino = dino_transform(cfg, size)

        def dino_run(ks):
            for index, seed in ks:
                torch.manual_seed(seed)
                random.seed(seed)
                dino(rsmclip.open_image(items[index]["path"]))

        print(f"multi-crop samples (2 x {size} + {cfg.local_crops} x {cfg.local_size} px) of {len(items)} "
              f"images from {manifest}; CPU {os.cpu_count()} cores, torch {torch.__version__}; cache built "
              f"in {built:.1f} s, {cache_file.stat().st_size / 2 ** 20:.0f} MiB")
        print(f"{'pipeline':52} {'processes':>9} {'samples/s':>9} {'per proc':>9} {'ratio':>7}")
        measure("ours, PIL from files (MultiCropDataset)", lambda ks: [pil[k] for k in ks])
        measure(f"ours, PIL from files, {workers} loader processes", lambda ks: loader(ks, workers), workers)
        measure("ours, cache + tensor ops on CPU (1 thread)", tensor_path("cpu"))
        measure("ours, cache, loader's share only (device augments)", tensor_path(None))
        measure("DINO's torchvision pipeline (DataAugmentationDINO)", dino_run)
        if torch.cuda.is_available():
            measure(f"ours, cache + tensor ops on {torch.cuda.get_device_name()}", tensor_path("cuda"))
        if shards:
            shard_rows(manifest, Path(tmp), cfg, size, tokenizer, samples, batch_size, workers, measure, rows)


def shard_rows(manifest: Path, tmp: Path, cfg, size: int, tokenizer, samples: int, batch: int, workers: int,
               measure, rows: list):
    """The data benchmark's shard lines: the same train images written as shards (100 a shard: enough
    for every loader process), streamed by train.py's ShardDataset; and reading + decoding alone, from
    files and from shards (no augmentation)."""

    start = time.perf_counter()
    shardlib.write_shards(manifest, tmp / "shards", per_shard=100)
    found = shardlib.open_shards([str(tmp / "shards")])
    print(f"{sum(found.counts)} train images written as {len(found.paths)} shards in "
          f"{time.perf_counter() - start:.1f} s", flush=True)

    def from_shards(n):
        run_cfg = replace(cfg, data=[str(tmp / "shards")], workers=n, batch_size=batch, augment="pil")
        data = loading.open_data(run_cfg, loading.World())

        def run(ks):
            for _ in loading.build_loader(data, run_cfg, loading.World(), size, tokenizer, 0,
                                          math.ceil(len(ks) / batch)):
                pass
        return run

    items = loading.read_manifests([str(manifest)], "train")
    streams = loading.open_data(replace(cfg, data=[str(tmp / "shards")], workers=0), loading.World()).streams
    reader = shardlib.ShardReader(found, streams)

    def decode_shards(ks):
        for i, _ in enumerate(ks):
            captions, name, data = shardlib.parse_sample(*reader.get(0, i))
            rsmclip.open_image(name, data)

    measure("ours, PIL from shards (ShardDataset)", from_shards(0))
    measure(f"ours, PIL from shards, {workers} loader processes", from_shards(workers), workers)
    measure("read + decode only, files", lambda ks: [rsmclip.open_image(items[i]["path"]) for i, _ in ks])
    measure("read + decode only, shards", decode_shards)
    full, files, shard = rows[0][2], rows[-2][2], rows[-1][2]
    print(f"the loader's own share of a worker's time (read + decode / whole PIL pipeline): files "
          f"{full / files:.0%}, shards {full / shard:.0%}")


# ----------------------------------------------------------------------------- one-shot GPU check

# Dense bf16 tensor-core peaks (vendor data sheets, without sparsity), for MFU
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}


def transformer_flops(layers: int, width: int, hidden: int, tokens: int) -> float:
    """Forward FLOPs of one sequence: per layer and token 2 x (4 w^2 attention projections + 2 w hidden MLP
    weights), plus 2 x 2 n w for the scores and the weighted sum (multiply-add = 2 FLOPs)."""
    return layers * (2 * tokens * (4 * width ** 2 + 2 * width * hidden) + 4 * tokens ** 2 * width)


def sample_flops(model: rsmclip.CLIPConfig, cfg: train.TrainConfig, text_tokens: int) -> float:
    """Training FLOPs of one sample, counted on paper: backward = 2 x forward, so the student (every view,
    its captions, the head) costs 3 x its forward, the EMA teacher (2 global crops + head) 1 x."""
    v, t = model.vision, model.text

    def vit(size):
        patches = (size // v.patch_size) ** 2
        return (transformer_flops(v.layers, v.width, int(v.width * v.mlp_ratio), patches + 1)
                + 2 * patches * 3 * v.patch_size ** 2 * v.width)

    n_views, n_clip = augment.view_layout(cfg.recipe())
    local = cfg.local_crops if cfg.distill_weight > 0 else 0
    head = 2 * (v.width * cfg.head_hidden + cfg.head_hidden ** 2 + cfg.head_hidden * cfg.head_bottleneck
                + cfg.head_bottleneck * cfg.prototypes) if cfg.distill_weight > 0 else 0
    student = (n_views * vit(v.image_size) + local * vit(cfg.local_size)
               + n_clip * transformer_flops(t.layers, t.width, t.intermediate, text_tokens)
               + (2 + local) * head)
    teacher = 2 * (vit(v.image_size) + head) if cfg.distill_weight > 0 else 0
    return 3 * student + teacher


@app.command()
def gpu(device: str = typer.Option("cuda", help="the device to check (cpu only for the quick smoke run)"),
        quick: bool = typer.Option(False, help="tiny model, batch 4, 3 steps: a smoke run of this script"),
        steps: int = typer.Option(50, help="timed steps per configuration"),
        out: Optional[Path] = typer.Option(None, help="also write the JSON here")):
    """One-shot GPU check (meant to take at most 5 minutes on one H100/H200), one JSON: bf16 vs fp32
    parity of the model; the demo step and the paper-shaped multi-crop step (batch 256: 2 x 224 + 8 x 96
    px) with AMP and fused AdamW, with and without torch.compile: images/s, MFU, peak memory; whether
    training from the image cache with tensor augmentation is data-bound; bench.peers train's ratio against
    open_clip. Not yet run on a GPU: README says which figures are calculated."""

    if device == "cuda" and not torch.cuda.is_available():
        raise rsmclip.RsmclipError("bench.peers gpu: CUDA is not available on this machine (torch "
                                   f"{torch.__version__}); run it where a GPU is, or --device cpu --quick "
                                   "for a smoke run")
    dev = torch.device(device)
    steps = 3 if quick else steps
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    peak = next((p for key, p in PEAK_BF16.items() if key in name), None)
    report = {"device": name, "torch": torch.__version__, "peak_bf16_flops": peak, "steps": steps}
    arch = "tiny" if quick else "xlmr-b32"
    model_cfg = rsmclip.PRESETS[arch]

    # ----- bf16 vs fp32 parity on the device -----
    torch.manual_seed(0)
    model = rsmclip.CLIP(model_cfg).to(dev).eval()
    size = model_cfg.vision.image_size
    pixels = torch.randn(16, 3, size, size, device=dev)
    ids = make_ids(caption_lengths(16), model_cfg.text.vocab_size).to(dev)
    with torch.no_grad():
        fp32 = model(pixels, ids)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            bf16 = model(pixels, ids)
    cos = [float(F.cosine_similarity(a.float(), b.float(), dim=-1).min()) for a, b in zip(fp32[:2], bf16[:2])]
    logits = [f[2] * f[0].float() @ f[1].float().T for f in (fp32, bf16)]
    report["parity_bf16_vs_fp32"] = {"image_cosine_min": cos[0], "text_cosine_min": cos[1],
                                     "logits_max_abs_diff": float((logits[0] - logits[1]).abs().max())}
    del model

    # ----- model steps on batches already on the device -----
    demo = replace(train.RECIPES["demo"], batch_size=4 if quick else 32, local_crops=2 if quick else 8)
    paper = replace(train.RECIPES["rs-m-clip"], batch_size=4 if quick else 256, arch=arch,
                    local_size=24 if quick else 96, prototypes=1024 if quick else 65536)
    lengths = caption_lengths(paper.batch_size * 2)
    report["text_tokens"] = max(lengths)
    for label, cfg, preset in (("demo", demo, "tiny"), ("paper", paper, arch)):
        mc = rsmclip.PRESETS[preset]
        n_views, n_clip = augment.view_layout(cfg.recipe())
        g = torch.Generator().manual_seed(0)
        batch = {"views": torch.randn(n_views * cfg.batch_size, 3, mc.vision.image_size, mc.vision.image_size,
                                      generator=g).to(dev),
                 "locals": torch.randn(cfg.local_crops * cfg.batch_size, 3, cfg.local_size, cfg.local_size,
                                       generator=g).to(dev),
                 "ids": make_ids(lengths[:n_clip * cfg.batch_size], mc.text.vocab_size).to(dev)}
        flops = sample_flops(mc, cfg, max(lengths))
        for compiled in (False, True):
            if compiled and quick:  # compiling takes minutes on a CPU: not for a smoke run
                report[f"{label}_compiled"] = {"skipped": "--quick"}
                continue
            cfg_run = replace(cfg, precision="bf16", compile=compiled, steps=10_000)
            torch.manual_seed(0)
            run = train.build_run(cfg_run, rsmclip.CLIP(mc), None, dev)
            start = time.perf_counter()
            for i in range(3):  # warm-up: compilation, optimizer state
                train.train_step(run, batch, i)
            rundir.read_logs(train.train_step(run, batch, 3))
            warmup = time.perf_counter() - start
            with PeakMemory(dev.type) as mem:
                start = time.perf_counter()
                for i in range(steps):
                    logs = train.train_step(run, batch, 4 + i)
                loss = rundir.read_logs(logs)["loss"]  # waits for the device
                elapsed = time.perf_counter() - start
            rate = steps * cfg.batch_size / elapsed
            report[f"{label}{'_compiled' if compiled else ''}"] = {
                "batch": cfg.batch_size, "images_per_s": rate, "ms_per_step": 1e3 * elapsed / steps,
                "warmup_s": warmup, "flops_per_sample": flops, "mfu": rate * flops / peak if peak else None,
                "peak_memory_mb": mem.peak, "loss": loss}
            del run
            print(json.dumps({label: report[f"{label}{'_compiled' if compiled else ''}"]}), file=sys.stderr)

    # ----- is training from the cache with tensor augmentation data-bound? -----
    with tempfile.TemporaryDirectory() as tmp:
        if quick or not SHARED_UCM.is_dir():
            manifest, mc = make_demo(Path(tmp) / "demo"), rsmclip.PRESETS["tiny"]
            cfg, tokenizer = replace(demo, langs="en"), manifest.parent / "spm.model"
        else:
            manifest, cfg, mc = ucm_manifest(Path(tmp)), replace(paper, langs="en"), model_cfg
            tokenizer = SHARED_UCM.parents[1] / "assets/xlmr/sentencepiece.bpe.model"
        prepare_command("cache", manifest, "--out", Path(tmp) / "cache.safetensors")
        workers = 0 if quick else min(8, os.cpu_count())
        cfg = replace(cfg, data=[str(manifest)], image_cache=str(Path(tmp) / "cache.safetensors"),
                      augment="tensor", workers=workers)
        world = loading.World(device=dev)
        loader = iter(loading.build_loader(loading.open_data(cfg, world), cfg, world, mc.vision.image_size,
                                           rsmclip.Tokenizer(tokenizer), 0, steps + 3))
        torch.manual_seed(0)
        run = train.build_run(replace(cfg, precision="bf16", steps=10_000), rsmclip.CLIP(mc), None, dev)
        waiting = computing = 0.0
        for i in range(steps + 3):
            start = time.perf_counter()
            batch = next(loader)
            middle = time.perf_counter()
            rundir.read_logs(train.train_step(run, batch, i))  # waits for the device: times the step
            if i >= 3:
                waiting, computing = waiting + middle - start, computing + time.perf_counter() - middle
        source = "demo" if mc.vision.image_size == 64 else "UCM-Captions train"
        report["data_bound"] = {"data": source, "workers": workers, "batch": cfg.batch_size,
                                "waiting_for_loader_s": waiting, "computing_s": computing,
                                "data_bound": waiting > 0.1 * computing}
        del run

    # ----- bench.peers train: ours against open_clip -----
    with contextlib.redirect_stdout(sys.stderr):  # its table joins the progress lines; stdout: the JSON
        report["train_vs_open_clip"] = train_bench(
            preset=arch, batch_size=4 if quick else 128, steps=3 if quick else 10, device=device,
            precision="auto", local_crops=2 if quick else 8, threads=0, captions=None, tokenizer=None)
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        files.atomic_write(out, lambda tmp: tmp.write_text(text + "\n"))
        print(f"wrote {out}", file=sys.stderr)  # stdout stays the one JSON


if __name__ == "__main__":
    cli.run_cli(app)
