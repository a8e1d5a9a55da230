"""The ablations of docs/internals.md, on real data: UCM-Captions (trained on `train`, measured on `val`) and
the built-in demo. Each command trains what is missing, measures, and prints one Markdown table (mean ± sd
over seeds, and each seed), also written to WORK/<command>.md.

    python -m bench.ablation recipe --ucm DIR      # the training recipe, row by row (300 steps)
    python -m bench.ablation selfdist --ucm DIR    # self-distillation alone: k-NN before and after
    python -m bench.ablation regime --ucm DIR      # the paper's regime: from a trained CLIP, with or without
    python -m bench.ablation languages             # claim (2): English only against ten languages (demo)
    python -m bench.ablation all --ucm DIR --quick # every table, 2 steps a run: the script, not the method

DIR holds UCM-Captions' Karpathy file and images/. The tiny model from scratch (64 px, 1.4M parameters:
minutes per run on one CPU core), one thread per run, the same steps, batch and seeds in every row. A
finished run (model.safetensors) is not trained again: a second call re-measures the saved models.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import typer

import cli
import eval as ev
import rsmclip
import train
from data import demo
from data.demo import make_demo, train_tokenizer
from data.manifest import LANGS, load_manifest, write_jsonl
from data.prepare import build_captions, ucm_class

ROOT = Path(__file__).resolve().parents[1]
UCM = ROOT / "datasets/ucm_captions_trainval"  # UCM-Captions' Karpathy file and images/

# The rs-m-clip recipe (DINO's augmentation, 2 global + 8 local crops) at the tiny model's scale: a head the
# size of the demo's.
COMMON = ["--arch", "tiny", "--langs", "en", "--batch-size", "32", "--lr", "5e-4", "--workers", "0",
          "--flip", "0.5", "--hue", "0.1", "--grayscale", "0.2", "--solarize", "0.2", "--global-scale", "0.4",
          "1.0", "--head-hidden", "512", "--head-bottleneck", "128", "--prototypes", "1024"]
HEAD_LR = "5e-3"  # 10x the backbone's lr
ROWS = {  # the recipe table: each row adds one change to the one above (the first is the baseline)
    "openclip": ("open_clip recipe (`--distill-weight 0`)", ["--distill-weight", "0"]),
    "today": ("CLIP + self-distillation, head lr = lr, bf16 logits",
              ["--head-lr", "5e-4", "--no-fp32-logits"]),
    "head-lr": (f"+ head lr {HEAD_LR} (10x)", ["--head-lr", HEAD_LR, "--no-fp32-logits"]),
    "fp32": ("+ fp32 logits", ["--head-lr", HEAD_LR]),
    "light": ("+ `--clip-view light`", ["--head-lr", HEAD_LR, "--clip-view", "light"]),
}
KNN = {"k": 20, "temperature": 0.07}  # DINO's k-NN settings


def prepare(work: Path, ucm: Path) -> tuple[Path, Path, Path]:
    """The UCM manifest (images linked in, nothing copied), a SentencePiece model of its train captions,
    and labels.jsonl of its classes for the k-NN: train images are the memory, val images its "test" split."""
    folder = work / "ucm"
    manifest, tokenizer, labels = folder / "captions.jsonl", folder / "spm.model", folder / "labels.jsonl"
    if not manifest.exists():
        annotations = next((ucm / n for n in ("dataset_ucm_trainval.json", "dataset.json", "dataset_ucm.json")
                            if (ucm / n).is_file()), None)
        if annotations is None or not (ucm / "images").is_dir():
            raise rsmclip.RsmclipError(f"{ucm}: expected UCM-Captions' Karpathy file (dataset_ucm_trainval"
                                       ".json, dataset.json or dataset_ucm.json) and images/")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "images").symlink_to((ucm / "images").resolve())
        build_captions(annotations, folder / "images", manifest, dataset="ucm")
    records = load_manifest(manifest)
    if not tokenizer.exists():
        train_captions = [c for r in records if r["split"] == "train" for c in r["captions"]["en"]]
        tokenizer.write_bytes(train_tokenizer(train_captions))
    if not labels.exists():
        write_jsonl([{"image": r["image"], "label": ucm_class(r["image"]),
                      "split": "train" if r["split"] == "train" else "test"}
                     for r in records if r["split"] in ("train", "val")], labels)
    return manifest, tokenizer, labels


def train_once(out: Path, args: list[str]) -> float:
    """One run in its own process on one thread (the machine's other cores stay free); -> seconds."""
    if (out / "model.safetensors").exists():
        return json.loads((out / "time.json").read_text())["seconds"]
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--out", str(out), *args],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise rsmclip.RsmclipError(f"training {out} failed:\n{result.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    (out / "time.json").write_text(json.dumps({"seconds": seconds}) + "\n")
    return seconds


def val_recall(weights: Path, manifest: Path, split: str = "val") -> dict:
    model, preprocess, tokenizer = rsmclip.load(weights)
    return ev.evaluate_retrieval(model, tokenizer, preprocess, manifest, split, ["en"], 128, "cpu",
                                 workers=0)["en"]


def knn_top1(model: rsmclip.CLIP, labels: Path) -> float:
    preprocess = rsmclip.Preprocess(model.config.vision.image_size)
    return ev.evaluate_knn(model.eval(), preprocess, labels, **KNN, workers=0)["top1"]


def last_logged(out: Path, key: str) -> float:
    """The last value of `key` in a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r][-1]


def markdown(title: str, header: list[str], rows: list[tuple[str, list[list[float]]]]) -> str:
    """A table: per row a name and, per column, its values over seeds as mean ± sd (per seed beside it)."""
    def cell(values):
        if all(math.isnan(v) for v in values):
            return "–"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {sd:.2f} ({', '.join(f'{v:.2f}' for v in values)})"
    lines = [title, "", "| " + " | ".join(["run", *header]) + " |", "|" + "---|" * (len(header) + 1)]
    lines += ["| " + " | ".join([name, *map(cell, columns)]) + " |" for name, columns in rows]
    return "\n".join(lines) + "\n"


def publish(work: Path, name: str, text: str):
    print("\n" + text, flush=True)
    cli.write_text(work / f"{name}.md", text)


def recipe_table(work: Path, ucm: Path, seeds: list[int], steps: int) -> str:
    """The training recipe, row by row: CLIP + self-distillation from scratch, val mR."""
    manifest, tokenizer, _ = prepare(work, ucm)
    common = [*COMMON, "--precision", "bf16", "--data", str(manifest), "--tokenizer", str(tokenizer),
              "--steps", str(steps), "--warmup", str(steps // 10), "--teacher-temp-steps",
              str(steps * 3 // 10), "--log-every", "50", "--ckpt-every", str(steps)]
    rows = []
    for key, (title, args) in ROWS.items():
        scores = []
        for seed in seeds:
            out = work / f"{key}-seed{seed}"
            train_once(out, [*common, *args, "--seed", str(seed)])
            scores.append(val_recall(out / "model.safetensors", manifest)["mR"])
            print(f"{key} seed {seed}: val mR {scores[-1]:.2f}", flush=True)
        rows.append((title, [scores]))
    return markdown(f"UCM-Captions val, tiny model from scratch, {steps} steps of 32, seeds {seeds}",
                    ["val mR"], rows)


def selfdist_table(work: Path, ucm: Path, seeds: list[int], steps: int) -> str:
    """Self-distillation alone (`--clip-weight 0`) from scratch: DINO's k-NN on val at init and after, and
    the teacher's entropy at the end as a share of ln(prototypes) (1: uniform)."""
    manifest, tokenizer, labels = prepare(work, ucm)
    common = [*COMMON, "--precision", "fp32", "--clip-weight", "0", "--data", str(manifest), "--tokenizer",
              str(tokenizer), "--steps", str(steps), "--warmup", str(max(1, steps // 10)), "--log-every",
              str(min(50, steps)), "--ckpt-every", str(min(500, steps))]
    before, after, entropy, seconds = [], [], [], []
    for seed in seeds:
        cfg = train.TrainConfig(arch="tiny", seed=seed)
        model, _ = train.build_model(cfg, tokenizer)  # the same init as the run's
        before.append(knn_top1(model, labels))
        out = work / f"selfdist-seed{seed}"
        seconds.append(train_once(out, [*common, "--seed", str(seed)]))
        after.append(knn_top1(rsmclip.load(out / "model.safetensors")[0], labels))
        entropy.append(last_logged(out, "teacher_entropy") / math.log(1024))
        print(f"selfdist seed {seed}: k-NN {before[-1]:.2f} -> {after[-1]:.2f}, teacher entropy "
              f"{entropy[-1]:.3f} ln K ({seconds[-1]:.0f} s)", flush=True)
    return markdown(f"Self-distillation alone on UCM-Captions train, tiny model from scratch, {steps} steps "
                    f"of 32, seeds {seeds}: DINO's weighted k-NN top-1 on val (k {KNN['k']}, T "
                    f"{KNN['temperature']}, 21 classes, chance 4.76%)",
                    ["k-NN top-1 %", "teacher entropy / ln K"],
                    [("at initialisation", [before, [math.nan] * len(seeds)]),
                     (f"after {steps} steps", [after, entropy]),
                     ("gain (points)", [[a - b for a, b in zip(after, before)], [math.nan] * len(seeds)])])


def regime_table(work: Path, ucm: Path, seeds: list[int], steps: int, base_steps: int) -> str:
    """The paper's regime: a CLIP-only run on UCM train stands in for a trained CLIP; from it, the same
    steps with the CLIP loss alone and with self-distillation added."""
    manifest, tokenizer, labels = prepare(work, ucm)
    data = ["--data", str(manifest), "--tokenizer", str(tokenizer), "--precision", "fp32"]
    base = work / "regime-base"
    train_once(base, [*COMMON, *data, "--distill-weight", "0", "--steps", str(base_steps), "--warmup",
                      str(max(1, base_steps // 10)), "--log-every", str(min(50, base_steps)), "--seed", "0"])
    cont = [*COMMON, *data, "--init", str(base / "model.safetensors"), "--steps", str(steps), "--warmup",
            str(max(1, steps // 10)), "--log-every", str(min(50, steps))]
    rows = []
    for key, title, args in (("clip", "CLIP loss alone (`--distill-weight 0`)", ["--distill-weight", "0"]),
                             ("selfdist", "CLIP + self-distillation", [])):
        mr, knn, entropy = [], [], []
        for seed in seeds:
            out = work / f"regime-{key}-seed{seed}"
            train_once(out, [*cont, *args, "--seed", str(seed)])
            model = rsmclip.load(out / "model.safetensors")[0]
            mr.append(val_recall(out / "model.safetensors", manifest)["mR"])
            knn.append(knn_top1(model, labels))
            entropy.append(last_logged(out, "teacher_entropy") / math.log(1024) if args == [] else math.nan)
            print(f"regime {key} seed {seed}: val mR {mr[-1]:.2f}, k-NN {knn[-1]:.2f}", flush=True)
        rows.append((title, [mr, knn, entropy]))
    start = rsmclip.load(base / "model.safetensors")[0]
    rows.insert(0, (f"the start: CLIP alone, {base_steps} steps from scratch (seed 0)",
                    [[val_recall(base / "model.safetensors", manifest)["mR"]], [knn_top1(start, labels)],
                     [math.nan]]))
    return markdown(f"The paper's regime on UCM-Captions: {steps} more steps of 32 from a CLIP-only run, "
                    f"seeds {seeds}", ["val mR", "k-NN top-1 %", "teacher entropy / ln K"], rows)


DEMO_ATTRIBUTES = {"colour": tuple(demo.COLOURS), "kind": demo.KINDS, "ground": demo.GROUNDS}


def attribute_captions(scene: dict, attribute: str) -> list[str]:
    """The scene's first English caption (the template naming count, colour, kind, corner and ground) once
    per value of `attribute`, everything else unchanged."""
    return [demo.captions(scene | {attribute: value}, "en")[0] for value in DEMO_ATTRIBUTES[attribute]]


def attribute_accuracy(image_feats: torch.Tensor, caption_feats: torch.Tensor, truth: torch.Tensor) -> float:
    """% of images whose best-scoring caption ([N, V, D] one per value) is the one of their true value."""
    scores = torch.einsum("nd,nvd->nv", image_feats, caption_feats)
    return 100 * (scores.argmax(1) == truth).double().mean().item()


def demo_attributes(weights: Path, manifest: Path, split: str = "test") -> dict:
    """{attribute: accuracy %} of a model on the demo's `split`: does it tell colours, kinds and grounds
    apart, one caption per value with only that attribute changed (chance 25, 33 and 33%)?"""
    model, preprocess, tokenizer = rsmclip.load(weights)
    records = [r for r in load_manifest(manifest) if r["split"] == split]
    images = rsmclip.embed_images(model, preprocess, [manifest.parent / r["image"] for r in records],
                                  skip_unreadable=False)[0]
    out = {}
    for attribute, values in DEMO_ATTRIBUTES.items():
        texts = [c for r in records for c in attribute_captions(r["scene"], attribute)]
        feats = rsmclip.embed_texts(model, tokenizer, texts).view(len(records), len(values), -1)
        truth = torch.tensor([values.index(r["scene"][attribute]) for r in records])
        out[attribute] = attribute_accuracy(images, feats, truth)
    return out


def languages_table(work: Path, seeds: list[int], steps: int) -> str:
    """Claim (2): the demo trained with English captions only and with all ten languages, the same steps;
    retrieval on the English test captions."""
    manifest = make_demo(work / "demo")
    common = ["--data", str(manifest), "--tokenizer", str(manifest.parent / "spm.model"), "--steps",
              str(steps), "--log-every", str(min(20, steps)), "--workers", "0"]
    rows = []
    for key, title, langs in (("en", "English captions only (`--langs en`)", "en"),
                              ("all", "all ten languages", ",".join(LANGS))):
        scores = []
        for seed in seeds:
            out = work / f"languages-{key}-seed{seed}"
            train_once(out, [*common, "--langs", langs, "--seed", str(seed)])
            scores.append(val_recall(out / "model.safetensors", manifest, "test")["mR"])
            print(f"languages {key} seed {seed}: English test mR {scores[-1]:.2f}", flush=True)
        rows.append((title, [scores]))
    return markdown(f"The demo, {steps} steps, seeds {seeds}: English test mR (200 images, 1,000 captions)",
                    ["English test mR"], rows)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="The ablations of docs/internals.md (README: what they show and do not).")
UCM_OPTION = typer.Option(UCM, "--ucm", help="UCM-Captions: its Karpathy file and images/")
WORK = typer.Option(ROOT / "runs/ablation", help="data, run directories and the tables")
SEEDS = typer.Option("0,1,2", help="seeds per row")
QUICK = typer.Option(False, help="2 steps a run, one seed: checks the script end to end, not the method")


def seed_list(seeds: str, quick: bool) -> list[int]:
    return [0] if quick else [int(s) for s in seeds.split(",") if s.strip()]


@app.command()
def recipe(ucm: Path = UCM_OPTION, work: Path = WORK, seeds: str = SEEDS, quick: bool = QUICK,
           steps: int = typer.Option(300, min=1, help="optimizer steps per run")):
    """The training recipe, row by row (val mR)."""
    publish(work, "recipe", recipe_table(work, ucm, seed_list(seeds, quick), 2 if quick else steps))


@app.command()
def selfdist(ucm: Path = UCM_OPTION, work: Path = WORK, seeds: str = SEEDS, quick: bool = QUICK,
             steps: int = typer.Option(3000, min=1, help="optimizer steps per run")):
    """Self-distillation alone: k-NN top-1 at initialisation and after, the teacher's entropy."""
    publish(work, "selfdist", selfdist_table(work, ucm, seed_list(seeds, quick), 2 if quick else steps))


@app.command()
def regime(ucm: Path = UCM_OPTION, work: Path = WORK, seeds: str = SEEDS, quick: bool = QUICK,
           steps: int = typer.Option(600, min=1, help="optimizer steps per continued run"),
           base_steps: int = typer.Option(1000, min=1, help="steps of the CLIP-only start")):
    """The paper's regime: from a trained CLIP, the CLIP loss alone against CLIP + self-distillation."""
    publish(work, "regime", regime_table(work, ucm, seed_list(seeds, quick), 2 if quick else steps,
                                         2 if quick else base_steps))


@app.command()
def languages(work: Path = WORK, seeds: str = SEEDS, quick: bool = QUICK,
              steps: int = typer.Option(train.RECIPES["demo"].steps, min=1,
                                        help="optimizer steps per run (the demo's)")):
    """Claim (2): English only against ten languages, English test mR on the demo."""
    publish(work, "languages", languages_table(work, seed_list(seeds, quick), 2 if quick else steps))


@app.command()
def attributes(weights: Path = typer.Argument(ROOT / "runs/demo/model.safetensors", help="a demo model"),
               data: Path = typer.Option(ROOT / "demo_data/captions.jsonl", help="the demo's manifest")):
    """What a demo model tells apart on the test images: colour, kind and ground accuracy."""
    result = demo_attributes(weights, data)
    print(" ".join(f"{k} {v:.1f}%" for k, v in result.items()) + " (chance 25.0, 33.3, 33.3)")


@app.command("all")
def all_tables(ucm: Path = UCM_OPTION, work: Path = WORK, seeds: str = SEEDS, quick: bool = QUICK):
    """Every table above with its default steps."""
    recipe(ucm, work, seeds, quick, 300)
    selfdist(ucm, work, seeds, quick, 3000)
    regime(ucm, work, seeds, quick, 600, 1000)
    languages(work, seeds, quick, 600)


if __name__ == "__main__":
    torch.set_num_threads(1)
    cli.run_cli(app)
