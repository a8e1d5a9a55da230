"""Speed and memory of rsmclip against open_clip on the same weights, in the same process.

    python bench.py model                      # tiny and xlmr-b32, CPU or the local GPU
    python bench.py model --presets xlmr-b32 --batch-sizes 32,128 --device cuda --precision bf16

Prints time per call for each side, the ratio ours / open_clip (below 1 = we are faster) and the peak
memory of each. open_clip is a benchmark peer only (pip install -r requirements-dev.txt).
"""
from __future__ import annotations

import ctypes
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import typer

import rsmclip

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
SHARED = Path(__file__).resolve().parent.parent / "shared"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)


@app.callback()
def benchmarks():
    """Benchmarks against the real peers (ratios, never absolute times alone)."""


# ----------------------------------------------------------------------------- measuring

class PeakMemory:
    """Peak memory of a block: CUDA's allocator statistics, or on CPU the process' peak resident set
    (Linux VmHWM, reset through /proc/self/clear_refs) above what was resident before."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the baseline is what is live
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = self._status("VmHWM") - self.base

    @staticmethod
    def _status(field: str) -> int:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
        return int(line.split()[1]) * 1024


def timed(fn, device: str, repeats: int, warmup: int = 2) -> tuple[float, int]:
    """Median seconds per call over `repeats` calls after `warmup`, and the peak memory of one call."""
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


def caption_lengths(n: int, seed: int = 0) -> list[int]:
    """Token counts of real remote-sensing captions (UCM sample in ../shared with the real XLM-R
    vocabulary) or, without them, of 5-30-word captions at 1.3 pieces a word; <s> and </s> included."""
    g = torch.Generator().manual_seed(seed)
    ucm, spm = SHARED / "datasets/ucm_captions_sample/dataset_ucm.json", SHARED / "assets/xlmr/sentencepiece.bpe.model"
    if ucm.exists() and spm.exists():
        import json
        captions = [s["raw"] for im in json.loads(ucm.read_text())["images"] for s in im["sentences"]]
        ids = rsmclip.Tokenizer(spm)(captions)
        pool = (ids != rsmclip.PAD).sum(1)
        return pool[torch.randint(len(pool), (n,), generator=g)].tolist()
    words = torch.randint(5, 31, (n,), generator=g)
    return [min(77, int(w * 1.3) + 2) for w in words]


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
          threads: int = typer.Option(0, help="CPU threads (0: torch's default)")):
    """Image encoding, text encoding of real-length captions, and one forward+backward CLIP step."""
    import open_clip
    from openclip_oracle import paired_models

    if threads:
        torch.set_num_threads(threads)
    autocast = (torch.autocast(device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
                if precision != "fp32" else nullcontext())
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; precision {precision}; torch {torch.__version__}; open_clip {open_clip.__version__}")
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
            ids = make_ids(caption_lengths(batch), cfg.text.vocab_size).to(device)

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
                "encode_image": (infer(lambda: ours.encode_image(pixels)), infer(lambda: theirs.encode_image(pixels))),
                "encode_text": (infer(lambda: ours.encode_text(ids)), infer(lambda: theirs.encode_text(ids))),
                "fwd+bwd": (step(ours.train(), rsmclip.clip_loss), step(theirs.train(), loss_ref)),
            }
            for task, (a, b) in tasks.items():
                ours.train(task == "fwd+bwd")
                theirs.train(task == "fwd+bwd")
                (ta, ma), (tb, mb) = timed(a, device, repeats), timed(b, device, repeats)
                print(f"{preset:9} {batch:5d} {task:12} {ta * 1e3:9.1f} {tb * 1e3:12.1f} {ta / tb:6.2f} "
                      f"{ma / 2**20:9.0f} {mb / 2**20:13.0f}", flush=True)
        del ours, theirs


if __name__ == "__main__":
    app()
