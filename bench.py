"""Speed and memory of rsmclip against open_clip on the same weights, in the same process.

    python bench.py model                      # tiny and xlmr-b32, CPU or the local GPU
    python bench.py model --presets xlmr-b32 --batch-sizes 32,128 --device cuda --precision bf16

Prints time per call for each side, the ratio ours / open_clip (below 1 = we are faster) and the peak
memory of each. open_clip is a benchmark peer only (pip install -r requirements-dev.txt).
"""
from __future__ import annotations

import ctypes
import json
import math
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import typer

import rsmclip
import train

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)


@app.callback()
def benchmarks():
    """Benchmarks against the real peers (ratios, never absolute times alone)."""


# ----------------------------------------------------------------------------- measuring

class PeakMemory:
    """Peak memory of a block in MiB (train.memory_mb): CUDA's allocator statistics, or on CPU the
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
        self.base = train.memory_mb(self.device, peak=False)
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.peak = train.memory_mb(self.device) - self.base


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
          device: str = typer.Option(rsmclip.default_device(), help="cpu or cuda"),
          precision: str = typer.Option("fp32", help="fp32, or bf16 / fp16 autocast (CUDA)"),
          repeats: int = typer.Option(5, help="timed calls per measurement (median reported)"),
          threads: int = typer.Option(0, help="CPU threads (0: torch's default)"),
          captions: Optional[Path] = CAPTIONS, tokenizer: Optional[Path] = VOCAB):
    """Image encoding, text encoding of real-length captions, and one forward+backward CLIP step."""
    import open_clip  # the peer, imported only by the commands that measure against it
    from openclip_oracle import paired_models

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
                device: str = typer.Option(rsmclip.default_device(), help="cpu or cuda"),
                precision: str = typer.Option("auto",
                                              help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16"),
                local_crops: int = typer.Option(8, help="local crops for the multi-crop measurement"),
                threads: int = typer.Option(0, help="CPU threads (0: torch's default)"),
                captions: Optional[Path] = CAPTIONS, tokenizer: Optional[Path] = VOCAB):
    """Training steps of our loop and of open_clip's (model + ClipLoss + the same AdamW, clipping and
    logit_scale clamp) on the same data, CLIP loss only so both do the same work; then the cost of
    our multi-crop self-distillation on top, reported separately."""
    import open_clip  # the peer, imported only by the commands that measure against it
    from openclip_oracle import paired_models

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
            group["lr"] = train.lr_at(step, run_cfg.lr, run_cfg.warmup, run_cfg.steps)
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


if __name__ == "__main__":
    app()
