"""The training-recipe ablation of docs/internals.md: real UCM-Captions, trained on `train`, measured on
`val`.

    python -m bench.ablation --ucm datasets/ucm_captions_trainval   # runs under runs/ablation
    python -m bench.ablation --seeds 0,1,2 --steps 300

The tiny model from scratch (64 px, 1.4M parameters: minutes per run on one CPU core), bf16 autocast as
on GPUs, the same steps, batch and seeds in every row. A finished run (model.safetensors) is not trained
again: a second call re-measures the saved models, e.g. after a change of the retrieval metric.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import typer

import eval as ev
import rsmclip
import rsmclip_cli
from data.demo import train_tokenizer
from data.prepare import build_captions, load_manifest

ROOT = Path(__file__).resolve().parents[1]
UCM = ROOT / "datasets/ucm_captions_trainval"  # UCM-Captions' Karpathy file and images/

# The rs-m-clip recipe (DINO's augmentation, 2 global + 8 local crops) at the tiny model's scale: a head the
# size of the demo's, teacher temperature warm-up over 30% of the steps as in the rs-m-clip preset.
COMMON = ["--arch", "tiny", "--langs", "en", "--batch-size", "32", "--lr", "5e-4", "--precision", "bf16",
          "--workers", "0", "--flip", "0.5", "--hue", "0.1", "--grayscale", "0.2", "--solarize", "0.2",
          "--global-scale", "0.4", "1.0", "--head-hidden", "512", "--head-bottleneck", "128",
          "--prototypes", "1024"]
HEAD_LR = "5e-3"  # 10x the backbone's lr
ROWS = {  # each row adds one change to the one above (the first is the baseline)
    "openclip": ("open_clip recipe (`--distill-weight 0`)", ["--distill-weight", "0"]),
    "today": ("CLIP + self-distillation, head lr = lr, bf16 logits",
              ["--head-lr", "5e-4", "--no-fp32-logits"]),
    "head-lr": (f"+ head lr {HEAD_LR} (10x)", ["--head-lr", HEAD_LR, "--no-fp32-logits"]),
    "fp32": ("+ fp32 logits", ["--head-lr", HEAD_LR]),
    "light": ("+ `--clip-view light`", ["--head-lr", HEAD_LR, "--clip-view", "light"]),
}


def prepare(work: Path, ucm: Path) -> tuple[Path, Path]:
    """The UCM manifest (images linked in, nothing copied) and a SentencePiece model of its train captions."""
    folder = work / "ucm"
    manifest, tokenizer = folder / "captions.jsonl", folder / "spm.model"
    if not manifest.exists():
        annotations = next((ucm / n for n in ("dataset_ucm_trainval.json", "dataset.json", "dataset_ucm.json")
                            if (ucm / n).is_file()), None)
        if annotations is None or not (ucm / "images").is_dir():
            raise rsmclip.RsmclipError(f"{ucm}: expected UCM-Captions' Karpathy file (dataset_ucm_trainval"
                                       ".json, dataset.json or dataset_ucm.json) and images/")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "images").symlink_to((ucm / "images").resolve())
        build_captions(annotations, folder / "images", manifest, dataset="ucm")
    if not tokenizer.exists():
        train = [r for r in load_manifest(manifest) if r["split"] == "train"]
        tokenizer.write_bytes(train_tokenizer([c for r in train for c in r["captions"]["en"]]))
    return manifest, tokenizer


def train_once(out: Path, args: list[str]) -> float:
    """One run in its own process on one thread (the machine's other cores stay free); -> seconds."""
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--out", str(out), *args],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise rsmclip.RsmclipError(f"training {out} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def val_recall(out: Path, manifest: Path) -> dict:
    model, preprocess, tokenizer = rsmclip.load(out / "model.safetensors")
    return ev.evaluate_retrieval(model, tokenizer, preprocess, manifest, "val", ["en"], 128, "cpu",
                                 workers=0)["en"]


def main(ucm: Path = typer.Option(UCM, help="UCM-Captions: its Karpathy file and images/"),
         work: Path = typer.Option(ROOT / "runs/ablation", help="data and run directories"),
         seeds: str = typer.Option("0,1,2", help="seeds per row"),
         steps: int = typer.Option(300, help="optimizer steps per run")):
    """Train every row with every seed (missing runs only), measure val mR, print the table."""
    torch.set_num_threads(1)
    manifest, tokenizer = prepare(work, ucm)
    common = [*COMMON, "--data", str(manifest), "--tokenizer", str(tokenizer), "--steps", str(steps),
              "--warmup", str(steps // 10), "--teacher-temp-steps", str(steps * 3 // 10), "--log-every", "50",
              "--ckpt-every", str(steps)]
    table = []
    for key, (title, args) in ROWS.items():
        scores = []
        for seed in map(int, seeds.split(",")):
            out = work / f"{key}-seed{seed}"
            if not (out / "model.safetensors").exists():
                seconds = train_once(out, [*common, *args, "--seed", str(seed)])
                (out / "time.json").write_text(json.dumps({"seconds": seconds}) + "\n")
            result = val_recall(out, manifest)
            (out / "val.json").write_text(json.dumps(result, indent=2) + "\n")
            seconds = json.loads((out / "time.json").read_text())["seconds"]
            scores.append(result["mR"])
            print(f"{key} seed {seed}: val mR {result['mR']:.2f} ({seconds:.0f} s)", flush=True)
        table.append((title, scores))
    print(f"\nUCM-Captions val ({result['images']} images, {result['captions']:,} captions, chance mR "
          f"{result['chance_mR']:.2f}); tiny model from scratch, {steps} steps of 32, seeds {seeds}\n")
    print("| run | val mR (mean ± sd) | per seed |\n|---|---|---|")
    for title, scores in table:
        sd = statistics.stdev(scores) if len(scores) > 1 else 0.0
        each = ", ".join(f"{s:.2f}" for s in scores)
        print(f"| {title} | {statistics.mean(scores):.2f} ± {sd:.2f} | {each} |")


if __name__ == "__main__":
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(main)
    rsmclip_cli.run_cli(app)
