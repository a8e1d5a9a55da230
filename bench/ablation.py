"""The ablations of docs/internals.md, on real data: UCM-Captions (trained on `train`, measured on `val`) and
the built-in demo. Each command trains what is missing, measures, and prints Markdown tables (mean ± sd
over seeds, and each seed), also written to WORK/<command>.md.

    python -m bench.ablation recipe --ucm DIR      # the training recipe, row by row (300 steps)
    python -m bench.ablation selfdist --ucm DIR    # self-distillation alone, DINO's parts one at a time
    python -m bench.ablation regime --ucm DIR      # claim (1): the teacher and the views, from trained bases
    python -m bench.ablation languages             # claim (2): a ten-language base fine-tuned four ways
    python -m bench.ablation demo                  # the demo recipe with and without its teacher
    python -m bench.ablation all --ucm DIR --quick # every table, 2 steps a run: the script, not the method

DIR holds UCM-Captions' Karpathy file and images/. The tiny model (64 px, 1.4M parameters: minutes per run
on one CPU core), the same steps, batch and seeds in every arm of a table. Runs train in this process, one
after another (pin it: `taskset -c 1`, OMP_NUM_THREADS=1).

Runs are keyed by what made them: a run directory is used again only when its config.json holds exactly
the settings the table asks for (steps, seed, every option, the paths); a finished one is measured again,
a killed one resumes where its last checkpoint stands, and one made by other settings is refused (another
--work, or delete it). So the same command, run again, continues a table.

The decision rule, written before any of these runs: an arm B beats an arm A on a metric when at least 5/6
of the paired differences B - A (same base, same seed) are positive (5 of 6 pairs, 3 of 3) and their mean
exceeds twice their standard deviation; "the opposite" by the same rule on A - B; else "not shown". Entropies
are in nats and as a share of ln K (K prototypes), each said once in its table's header.
"""
from __future__ import annotations

import json
import math
import signal
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import typer

import cli
import eval as ev
import rsmclip
import rundir
import train
from bench.peers import prepare_command
from data import demo, loading
from data.demo import make_demo, train_tokenizer
from data.manifest import LANGS, load_manifest, ucm_class, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
UCM = ROOT / "datasets/ucm_captions_trainval"  # UCM-Captions' Karpathy file and images/


class AblationError(rsmclip.RsmclipError):
    pass


# The rs-m-clip recipe (DINO's augmentation, 2 global + 8 local crops) at the tiny model's scale: a head the
# size of the demo's.
COMMON = ["--arch", "tiny", "--langs", "en", "--batch-size", "32", "--lr", "5e-4", "--workers", "0",
          "--flip", "0.5", "--hue", "0.1", "--grayscale", "0.2", "--solarize", "0.2", "--global-scale", "0.4",
          "1.0", "--head-hidden", "512", "--head-bottleneck", "128", "--prototypes", "1024"]
K = 1024  # prototypes of every UCM table (the demo's preset has as many)
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


# ----------------------------------------------------------------------------- runs, keyed by their config

def asked_config(args: list[str]) -> train.TrainConfig:
    """The settings train.py makes of these arguments (its own parser, presets and defaults)."""
    command = typer.main.get_command(train.app)
    with command.make_context("train.py", list(args)) as ctx:
        given = dict(ctx.params)
    return train.resolve_config(given.pop("preset"), given.pop("config"), given)


def train_once(out: Path, args: list[str]) -> float:
    """One run of train.py in this process, or the run already there if it was made by exactly these
    settings (finished: nothing to do; killed: it resumes). -> the seconds its training took (a resumed run:
    the part after the resume, marked in time.json)."""
    args = [*args, "--out", str(out)]
    asked = json.loads(json.dumps(asdict(asked_config(args))))
    if (out / "config.json").exists():
        saved = rundir.read_config_json(out / "config.json", train.TrainConfig)
        if differ := [k for k in asked if k != "out" and saved.get(k) != asked[k]]:
            raise AblationError(f"{out} holds a run made by other settings ({', '.join(differ)}): this table "
                                "asks for others; delete that folder or choose another --work")
    if (out / "summary.json").exists() and (out / "time.json").exists():
        return json.loads((out / "time.json").read_text())["seconds"]
    resumed = (out / "checkpoint.safetensors").exists()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # train.py sets its own
    start = time.perf_counter()
    try:
        cli.run_cli(train.app, args)
    except SystemExit as done:
        if done.code:
            raise AblationError(f"training {out} failed (its message is above); the same command resumes "
                                "it") from None
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    seconds = time.perf_counter() - start
    cli.write_text(out / "time.json", json.dumps({"seconds": seconds, "resumed": resumed}) + "\n")
    return seconds


def first_step(args: list[str]) -> dict:
    """The collapse metrics of a run's step 0, as the run computes them (the same model, head and batch),
    without training: for the head with or without batch norm, the teacher's cosine between images."""
    cfg = asked_config([*args, "--out", str(ROOT / "unused")])
    model, tokenizer = train.build_model(cfg, Path(cfg.tokenizer) if cfg.tokenizer else None)
    run = train.build_run(cfg, model, tokenizer, torch.device("cpu"))
    world = loading.World()
    data = loading.open_data(cfg, world)
    loader = loading.build_loader(data, cfg, world, model.config.vision.image_size, tokenizer, 0, 1)
    with torch.no_grad():
        logs = train.compute_loss(run, next(iter(loader)), 0)[1]
    return {k: float(v) for k, v in logs.items() if k in COLLAPSE + ("teacher_spread", "teacher_temp")}


# ----------------------------------------------------------------------------- measurements

def prepare(work: Path, ucm: Path) -> tuple[Path, Path, Path]:
    """The UCM manifest (images linked in, nothing copied), a SentencePiece model of its train captions,
    and labels.jsonl of its classes for the k-NN: train images are the memory, val images its "test" split."""
    folder = work / "ucm"
    manifest, tokenizer, labels = folder / "captions.jsonl", folder / "spm.model", folder / "labels.jsonl"
    if not manifest.exists():
        annotations = next((ucm / n for n in ("dataset_ucm_trainval.json", "dataset.json", "dataset_ucm.json")
                            if (ucm / n).is_file()), None)
        if annotations is None or not (ucm / "images").is_dir():
            raise AblationError(f"{ucm}: expected UCM-Captions' Karpathy file (dataset_ucm_trainval.json, "
                                "dataset.json or dataset_ucm.json) and images/")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "images").symlink_to((ucm / "images").resolve())
        prepare_command("captions", annotations, "--images", folder / "images", "--out", manifest,
                        "--dataset", "ucm")
    records = load_manifest(manifest)
    if not tokenizer.exists():
        train_captions = [c for r in records if r["split"] == "train" for c in r["captions"]["en"]]
        tokenizer.write_bytes(train_tokenizer(train_captions))
    if not labels.exists():
        write_labels(records, labels)
    return manifest, tokenizer, labels


def write_labels(records: list[dict], path: Path):
    write_jsonl([{"image": r["image"], "label": ucm_class(r["image"]),
                  "split": "train" if r["split"] == "train" else "test"}
                 for r in records if r["split"] in ("train", "val")], path)


def recall(weights: Path, manifest: Path, split: str = "val", langs: tuple = ("en",)) -> dict:
    model, preprocess, tokenizer = rsmclip.load(weights)
    return ev.evaluate_retrieval(model, tokenizer, preprocess, manifest, split, list(langs), 128, "cpu",
                                 workers=0)


def val_recall(weights: Path, manifest: Path, split: str = "val") -> dict:
    return recall(weights, manifest, split)["en"]


class PatchMean(torch.nn.Module):
    """A model whose image feature is the mean of its patch tokens after ln_post (what a `--head-input
    patches` head reads), for the k-NN."""

    def __init__(self, model: rsmclip.CLIP):
        super().__init__()
        self.visual, self.config = model.visual, model.config

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual.forward_features(pixels, patches=True)


def knn_top1(model: rsmclip.CLIP, labels: Path, patches: bool = False) -> float:
    """DINO's weighted k-NN top-1 on the image embedding (or the patch tokens' mean)."""
    preprocess = rsmclip.Preprocess(model.config.vision.image_size)
    found = ev.evaluate_knn(PatchMean(model) if patches else model, preprocess, labels, **KNN, workers=0)
    return found["top1"]


def zeroshot_top1(weights: Path, labels: Path) -> float:
    """Zero-shot top-1 on the "test" images of labels.jsonl, over the classes they hold (UCM's names,
    data/templates.json's English templates)."""
    model, preprocess, tokenizer = rsmclip.load(weights)
    return ev.evaluate_zeroshot(model, tokenizer, preprocess, labels, "UCM", split="test", workers=0)["top1"]


# The teacher as metrics.jsonl logs it: the mean entropy of its targets, the entropy of their batch mean
# (near 0: one prototype for every image), the prototypes some image's target peaks at, the KL to the student
COLLAPSE = ("teacher_entropy", "teacher_batch_entropy", "teacher_prototypes_used", "kl", "teacher_cosine")


def teacher_at_end(out: Path) -> dict:
    """The collapse metrics averaged over the logged steps of the run's last tenth (one batch a line)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = max(r["step"] for r in rows if "step" in r)
    tail = [r for r in rows if "teacher_entropy" in r and r["step"] > 0.9 * last] or \
        [r for r in rows if "teacher_entropy" in r][-1:]
    return {k: statistics.mean(r[k] for r in tail) for k in COLLAPSE}


TEACHER_HEADER = ["teacher entropy, nats", "/ ln K", "H(batch-mean target), nats", "/ ln K",
                  "prototypes used in a batch", "KL teacher-student"]


def teacher_columns(ends: list[dict], n: int) -> list[list[float]]:
    """The TEACHER_HEADER columns of an arm's runs (nan for the n runs of an arm without a teacher)."""
    if not ends:
        return [[math.nan] * n] * len(TEACHER_HEADER)
    entropies = [[e[key] / scale for e in ends] for key in ("teacher_entropy", "teacher_batch_entropy")
                 for scale in (1, math.log(K))]
    return entropies + [[e["teacher_prototypes_used"] for e in ends], [e["kl"] for e in ends]]


# ----------------------------------------------------------------------------- tables and the decision rule

def cell(values: list[float]) -> str:
    if all(math.isnan(v) for v in values):
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f} ({', '.join(f'{v:.2f}' for v in values)})"


def markdown(title: str, header: list[str], rows: list[tuple[str, list[list[float]]]]) -> str:
    """A table: per row a name and, per column, its values over seeds as mean ± sd (per seed beside it)."""
    lines = [title, "", "| " + " | ".join(["run", *header]) + " |", "|" + "---|" * (len(header) + 1)]
    lines += ["| " + " | ".join([name, *map(cell, columns)]) + " |" for name, columns in rows]
    return "\n".join(lines) + "\n"


def verdict(diffs: list[float]) -> str:
    """The decision rule (module docstring) on paired differences B - A."""
    need, sd = math.ceil(5 * len(diffs) / 6), statistics.stdev(diffs) if len(diffs) > 1 else math.inf
    mean = statistics.mean(diffs)
    if sum(d > 0 for d in diffs) >= need and mean > 2 * sd:
        return "shown"
    if sum(d < 0 for d in diffs) >= need and -mean > 2 * sd:
        return "the opposite"
    return "not shown"


def contrasts(title: str, arms: dict, pairs: list[tuple[str, str, str]], metrics: list[str]) -> str:
    """Paired differences B - A per contrast (A, B, what it isolates) and metric, with the rule's verdict.
    arms: {arm: {metric: [value per pair, in one pair order for every arm]}}."""
    lines = [title, "", "| B - A | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    for a, b, what in pairs:
        diffs = [[y - x for x, y in zip(arms[a][m], arms[b][m])] for m in metrics]
        lines.append(f"| {what} | " + " | ".join(f"{cell(d)}: **{verdict(d)}**" for d in diffs) + " |")
    return "\n".join(lines) + "\n"


def publish(work: Path, name: str, text: str):
    print("\n" + text, flush=True)
    cli.write_text(work / f"{name}.md", text)


# ----------------------------------------------------------------------------- the recipe, from scratch

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


# ----------------------------------------------------------------------------- self-distillation alone

# DINO's parts the first table left out, one at a time over today's self-distillation (1 seed each; the
# row with the largest gain then runs on every seed). Aim: +10 k-NN points over initialisation.
SELFDIST = {
    "today": ("today's settings (global clip 1.0, weight decay 0.2, fixed EMA 0.996, class token)", []),
    "clip": ("+ each parameter's gradient clipped at 3.0, before the freeze (DINO)",
             ["--grad-clip-mode", "parameter", "--grad-clip", "3.0"]),
    "wd": ("+ weight decay 0.04 -> 0.4, cosine (DINO)",
           ["--weight-decay", "0.04", "--weight-decay-schedule", "cosine", "--weight-decay-end", "0.4"]),
    "droppath": ("+ stochastic depth 0.1 in the student (DINO)", ["--drop-path", "0.1"]),
    "ema": ("+ EMA momentum 0.996 -> 1, cosine (DINO)", ["--ema-schedule", "cosine"]),
    "long": ("+ twice the steps", None),  # the flags depend on --steps
    "patches": ("+ the head on the patch tokens' mean (no ln_pre constant)", ["--head-input", "patches"]),
}


def selfdist_run(work: Path, common: list[str], labels: Path, key: str, args: list[str], seed: int,
                 init: dict) -> dict:
    """One self-distillation run: k-NN gains on both features, the teacher at the end, the time."""
    out = work / f"selfdist-{key}-seed{seed}"
    seconds = train_once(out, [*common, *args, "--seed", str(seed)])
    model = rsmclip.load(out / "model.safetensors")[0]
    after = {"embedding": knn_top1(model, labels), "patches": knn_top1(model, labels, patches=True)}
    result = {f"gain {f}": after[f] - init[seed][f] for f in after} | {"after": after, "seconds": seconds}
    result["gain"] = result["gain patches" if "patches" in args else "gain embedding"]  # what its head reads
    print(f"selfdist {key} seed {seed}: k-NN {init[seed]} -> {after} ({seconds:.0f} s)", flush=True)
    return result | teacher_at_end(out)


def selfdist_table(work: Path, ucm: Path, seeds: list[int], steps: int, only: list[str] | None = None) -> str:
    """Self-distillation alone (`--clip-weight 0`) from scratch: DINO's k-NN on val at init and after, on the
    image embedding and on the patch tokens' mean, one of DINO's parts added per row; then the row with the
    largest gain (on the feature its head reads) on every seed. `only`: those rows on the first seed, no
    winner (a share of the runs, for another core; the call without it gathers them)."""
    manifest, tokenizer, labels = prepare(work, ucm)
    common = [*COMMON, "--precision", "fp32", "--clip-weight", "0", "--data", str(manifest), "--tokenizer",
              str(tokenizer), "--steps", str(steps), "--warmup", str(max(1, steps // 10)), "--log-every",
              str(min(50, steps)), "--ckpt-every", str(min(500, steps))]
    init = {}
    for seed in seeds:
        model, _ = train.build_model(train.TrainConfig(arch="tiny", seed=seed), tokenizer)  # the run's init
        init[seed] = {"embedding": knn_top1(model, labels), "patches": knn_top1(model, labels, patches=True)}
    flags = {key: args if args is not None else ["--steps", str(2 * steps)] for key, (_, args) in
             SELFDIST.items()}
    first = {key: selfdist_run(work, common, labels, key, flags[key], seeds[0], init)
             for key in only or SELFDIST}
    rows = [(f"{SELFDIST[key][0]} ({2 * steps if key == 'long' else steps} steps, seed {seeds[0]})",
             [[r["after"]["embedding"]], [r["gain embedding"]], [r["after"]["patches"]], [r["gain patches"]],
              *teacher_columns([r], 1), [r["seconds"]]])
            for key, r in first.items()]
    header = ["k-NN after, embedding", "gain", "k-NN after, patch mean", "gain", *TEACHER_HEADER, "seconds"]
    inits = [[init[s]["embedding"] for s in seeds], [math.nan], [init[s]["patches"] for s in seeds]]
    table = markdown(f"Self-distillation alone on UCM-Captions train, tiny model from scratch, batch 32, "
                     f"fp32: DINO's weighted k-NN top-1 on val (k {KNN['k']}, T {KNN['temperature']}, 21 "
                     "classes, chance 4.76%) on the image embedding and on the mean of the patch tokens; the "
                     "teacher over the last tenth of the steps (entropies in nats and as shares of ln K, "
                     f"K = {K})",
                     header, [("at initialisation", inits + [[math.nan]] * (len(header) - 3))] + rows)
    if only:
        return table
    best = max(r["gain"] for r in first.values())
    # k-NN moves in steps of one val image: rows level to within rounding are a tie, and all go on
    winners = [key for key, r in first.items() if r["gain"] > best - 1e-6]
    runs = {key: [first[key]] + [selfdist_run(work, common, labels, key, flags[key], seed, init)
                                 for seed in seeds[1:]] for key in winners}
    gains = {key: [r["gain"] for r in results] for key, results in runs.items()}
    verdicts = "; ".join(f"{key} {verdict([g - 10 for g in gains[key]])}" for key in winners)
    return (table + "\n"
            + markdown(f"The largest gain on seed {seeds[0]} ({' and '.join(winners)}), on seeds {seeds} "
                       "(gain on the feature its head reads); the aim of +10 points by the rule (module "
                       f"docstring) on gain - 10: {verdicts}", ["gain (points)", "seconds"],
                       [(f"{key}: {SELFDIST[key][0]}", [gains[key], [r["seconds"] for r in runs[key]]])
                        for key in winners]))


# ----------------------------------------------------------------------------- claim (1): from trained bases

SOURCE, TARGET = range(0, 11), range(11, 21)  # UCM classes (alphabetical, the shared data notes' rule)
PLAIN = ["--global-scale", "0.9", "1.0", "--flip", "0", "--jitter-prob", "0", "--grayscale", "0",
         "--solarize", "0", "--no-blur"]  # global crops drawn as the light view is: no augmentation
REGIME_ARMS = {
    "light-off": ("CLIP on one light view, no teacher (open_clip's recipe)", ["--distill-weight", "0"]),
    "global-off": ("CLIP on the 2 global crops, no teacher",
                   ["--distill-weight", "0", "--clip-view", "global"]),
    "plain-off": ("CLIP on 2 global crops without augmentation, no teacher",
                  ["--distill-weight", "0", "--clip-view", "global", *PLAIN]),
    "light-on": ("CLIP on one light view + self-distillation", ["--clip-view", "light"]),
    "global-on": ("CLIP on the 2 global crops + self-distillation (the paper's)", []),
}
REGIME_CONTRASTS = [  # (A, B, what B - A isolates); the first is claim (1)
    ("global-off", "global-on", "the teacher, CLIP on the global crops (claim 1)"),
    ("light-off", "light-on", "the teacher, CLIP on one light view"),
    ("light-off", "global-on", "the paper's recipe against open_clip's"),
    ("light-off", "global-off", "the views: 2 augmented global crops with 2 captions, no teacher"),
    ("plain-off", "global-off", "the augmentation of the 2 crops, no teacher"),
    ("light-off", "plain-off", "2 unaugmented crops with 2 captions against 1 light view, no teacher"),
]
REGIME_METRICS = ["target val mR", "target k-NN", "target zero-shot", "source val mR"]


def split_classes(work: Path, manifest: Path) -> dict[str, tuple[Path, Path]]:
    """{source, target: (manifest, labels.jsonl)}: UCM-Captions' train and val images of classes 0-10 and
    of classes 11-20, beside the whole manifest (the same image paths)."""
    records = load_manifest(manifest)
    out = {}
    for name, classes in (("source", SOURCE), ("target", TARGET)):
        part = [r for r in records if (int(Path(r["image"]).stem) - 1) // 100 in classes]
        paths = (manifest.parent / f"{name}.jsonl", manifest.parent / f"{name}-labels.jsonl")
        if not paths[0].exists():
            write_jsonl(part, paths[0])
            write_labels(part, paths[1])
        out[name] = paths
    return out


def regime_measure(weights: Path, parts: dict) -> dict:
    (target, labels), (source, _) = parts["target"], parts["source"]
    model = rsmclip.load(weights)[0]
    return {"target val mR": val_recall(weights, target)["mR"], "target k-NN": knn_top1(model, labels),
            "target zero-shot": zeroshot_top1(weights, labels),
            "source val mR": val_recall(weights, source)["mR"]}


def needs_batch_norm(start: dict) -> bool:
    """The step-0 rule: the teacher's centred logits spread across images less than the temperature they are
    divided by, so its targets are near uniform whatever the head learns (the head needs batch norm)."""
    return start["teacher_spread"] < start["teacher_temp"]


def head_said(head: str, with_bn: dict[int, dict]) -> str:
    """What the self-distillation arms' head was, and why, for the table's header. with_bn: {base: its step-0
    metrics with batch norm} for the bases whose head takes it."""
    said = {"auto": "By that rule (`--head auto`) ", "bn": "As asked (`--head bn`) ",
            "plain": "As asked (`--head plain`) every head is without batch norm."}[head]
    if not with_bn:
        return said if head == "plain" else said + "every head is without batch norm."
    cosines = ", ".join(f"{s['teacher_cosine']:.3f}" for s in with_bn.values())
    spreads = ", ".join(f"{s['teacher_spread']:.4f}" for s in with_bn.values())
    return (f"{said}the heads of bases {', '.join(map(str, with_bn))} take batch norm; at step 0 with it: "
            f"teacher_cosine {cosines}, teacher_spread {spreads}.")


def regime_table(work: Path, ucm: Path, bases: list[int], seeds: list[int], steps: int,
                 base_steps: int, head: str = "auto") -> str:
    """Claim (1) as the paper states it: bases are CLIP-only runs (light view) on the source classes; each is
    fine-tuned on the target classes in every arm (REGIME_ARMS), on every seed, with the settings of a
    trained model (the rs-m-clip preset's: no batch norm in the head, teacher temperature 0.04 -> 0.07 over
    30% of the steps, prototypes frozen for the first 6%, backbone lr 1e-4 below the head's 5e-4). The head
    takes batch norm when `head` is "bn", or "auto" and the step-0 rule (needs_batch_norm) says so for the
    base."""
    manifest, tokenizer, _ = prepare(work, ucm)
    parts = split_classes(work, manifest)
    data = ["--tokenizer", str(tokenizer), "--precision", "fp32"]
    rows, starts, per_base, with_bn = [], [], [], {}
    arms, runs = {a: {m: [] for m in REGIME_METRICS} for a in REGIME_ARMS}, {a: [] for a in REGIME_ARMS}
    for b in bases:
        base = work / f"regime-base-seed{b}"
        seconds = train_once(base, [*COMMON, *data, "--data", str(parts["source"][0]), "--distill-weight",
                                    "0", "--steps", str(base_steps), "--warmup",
                                    str(max(1, base_steps // 10)), "--log-every", str(min(20, base_steps)),
                                    "--seed", str(b)])
        finetune = [*COMMON, *data, "--data", str(parts["target"][0]), "--init",
                    str(base / "model.safetensors"), "--steps", str(steps), "--warmup",
                    str(max(1, steps // 10)), "--lr", "1e-4", "--head-lr", "5e-4", "--no-head-bn",
                    "--warmup-teacher-temp", "0.04", "--teacher-temp", "0.07", "--teacher-temp-steps",
                    str(max(2, 3 * steps // 10)), "--freeze-last-layer", str(3 * steps // 50), "--log-every",
                    str(min(20, steps))]
        starts.append(first_step([*finetune, "--seed", str(seeds[0])]))
        bn = head == "bn" or (head == "auto" and needs_batch_norm(starts[-1]))
        # "--head-bn" after the preset's "--no-head-bn": the last flag wins. The "-off" arms build no head.
        head_args = ["--head-bn"] if bn else []
        if bn:
            with_bn[b] = first_step([*finetune, *head_args, "--seed", str(seeds[0])])
        per_base.append(regime_measure(base / "model.safetensors", parts) | {"seconds": seconds})
        for arm, (_, args) in REGIME_ARMS.items():
            for seed in seeds:
                out = work / f"regime-b{b}-{arm}-seed{seed}"
                seconds = train_once(out, [*finetune, *args, *(head_args if arm.endswith("-on") else []),
                                           "--seed", str(seed)])
                result = regime_measure(out / "model.safetensors", parts) | {"seconds": seconds}
                result |= teacher_at_end(out) if arm.endswith("-on") else {}
                for m, values in arms[arm].items():
                    values.append(result[m])
                runs[arm].append(result)
                print(f"regime base {b} {arm} seed {seed}: {result}", flush=True)
    n = len(bases) * len(seeds)
    for arm, (title, _) in REGIME_ARMS.items():
        ends = [r for r in runs[arm] if "teacher_entropy" in r]
        rows.append((title, [arms[arm][m] for m in REGIME_METRICS] + teacher_columns(ends, n)
                     + [[r["seconds"] for r in runs[arm]]]))
    rows.insert(0, (f"the bases: CLIP alone on the source classes, {base_steps} steps, seeds {bases}",
                    [[r[m] for r in per_base] for m in REGIME_METRICS] + [[math.nan]] * len(TEACHER_HEADER)
                    + [[r["seconds"] for r in per_base]]))
    header = (f"Claim (1) on UCM-Captions: bases trained on classes 0-10 (source), fine-tuned {steps} "
              f"steps of 32 on classes 11-20 (target); pairs: bases {bases} x seeds {seeds} ({n}, every "
              "value listed in that order); target val: mR (chance 2.5), k-NN top-1 and zero-shot top-1 "
              "over the 10 target classes (chance 10%); source val mR: what the base keeps. The teacher over "
              f"the last tenth of the steps, entropies in nats and as shares of ln K (K = {K}). At step 0 "
              "the head (no batch norm) sees the base's features with teacher_cosine "
              + ", ".join(f"{s['teacher_cosine']:.3f} (base {b})" for s, b in zip(starts, bases))
              + " and teacher_spread " + ", ".join(f"{s['teacher_spread']:.4f}" for s in starts)
              + " against the temperature 0.04 (a cosine near 1 with a spread below the temperature: the "
              "head needs batch norm). " + head_said(head, with_bn))
    return (markdown(header, [*REGIME_METRICS, *TEACHER_HEADER, "seconds"], rows) + "\n"
            + contrasts("Paired differences B - A (the decision rule of the module docstring); claim (1) is "
                        "the first row's target val mR", arms, REGIME_CONTRASTS, REGIME_METRICS))


# ----------------------------------------------------------------------------- the demo and claim (2)

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
    records = [r for r in load_manifest(manifest) if r["split"] == split]
    if not records or any("scene" not in r for r in records):
        raise AblationError(f"{manifest}: not the demo's manifest (its {split} images need the \"scene\" the "
                            "demo writes: kind, colour, count, position, ground, road)")
    model, preprocess, tokenizer = rsmclip.load(weights)
    images = rsmclip.embed_images(model, preprocess, [manifest.parent / r["image"] for r in records],
                                  skip_unreadable=False)[0]
    out = {}
    for attribute, values in DEMO_ATTRIBUTES.items():
        texts = [c for r in records for c in attribute_captions(r["scene"], attribute)]
        feats = rsmclip.embed_texts(model, tokenizer, texts).view(len(records), len(values), -1)
        truth = torch.tensor([values.index(r["scene"][attribute]) for r in records])
        out[attribute] = attribute_accuracy(images, feats, truth)
    return out


DEMO_ARMS = {
    "as-is": ("the demo recipe as it is (CLIP on the 2 global crops + self-distillation)", []),
    "global-off": ("the same views, no teacher (`--distill-weight 0 --clip-view global`)",
                   ["--distill-weight", "0", "--clip-view", "global"]),
    "light-on": ("CLIP on one light view + self-distillation (`--clip-view light`)",
                 ["--clip-view", "light"]),
    "light-off": ("CLIP alone on one light view (`--distill-weight 0`)", ["--distill-weight", "0"]),
}
DEMO_CONTRASTS = [
    ("global-off", "as-is", "the teacher, CLIP on the global crops"),
    ("light-off", "light-on", "the teacher, CLIP on one light view"),
    ("light-off", "as-is", "the demo as it is against CLIP alone on one light view"),
    ("light-off", "global-off", "the views, no teacher"),
]
DEMO_METRICS = ["test mR (10 languages)", "English test mR", "colour %", "kind %", "ground %"]


def demo_table(work: Path, demo_dir: Path, seeds: list[int], steps: int) -> str:
    """The demo recipe (train.py's default) as it is, without its teacher, and with the CLIP loss on one
    light view, with and without the teacher: does the teacher help the demo?"""
    manifest = make_demo(demo_dir)
    common = ["--data", str(manifest), "--val-data", str(without_test(manifest)), "--tokenizer",
              str(manifest.parent / "spm.model"), "--steps", str(steps), "--log-every", str(min(20, steps)),
              "--workers", "0"]
    arms, rows = {}, []
    for arm, (title, args) in DEMO_ARMS.items():
        runs = []
        for seed in seeds:
            out = work / f"demo-{arm}-seed{seed}"
            seconds = train_once(out, [*common, *args, "--seed", str(seed)])
            weights = out / "model.safetensors"
            found = recall(weights, manifest, "test", LANGS)
            attributes = demo_attributes(weights, manifest)
            runs.append({"test mR (10 languages)": found["mean"]["mR"], "English test mR": found["en"]["mR"]}
                        | {f"{a} %": v for a, v in attributes.items()} | {"seconds": seconds}
                        | (teacher_at_end(out) if "--distill-weight" not in args else {}))
            print(f"demo {arm} seed {seed}: {runs[-1]}", flush=True)
        arms[arm] = {m: [r[m] for r in runs] for m in DEMO_METRICS}
        ends = [r for r in runs if "teacher_entropy" in r]
        rows.append((title, [arms[arm][m] for m in DEMO_METRICS] + teacher_columns(ends, len(seeds))
                     + [[r["seconds"] for r in runs]]))
    header = (f"The demo (train.py's default recipe, {steps} steps), seeds {seeds}: test retrieval (200 "
              "images; mean over the ten languages, and English), the attributes a model tells apart "
              "(chance 25, 33, 33%), the teacher over the last tenth of the steps (entropies in nats and "
              f"as shares of ln K, K = {K}), seconds per run on one thread")
    return (markdown(header, [*DEMO_METRICS, *TEACHER_HEADER, "seconds"], rows) + "\n"
            + contrasts("Paired differences B - A (same seed), with the decision rule's verdict", arms,
                        DEMO_CONTRASTS, DEMO_METRICS))


# English paraphrases of the demo's captions, as many per image as the nine translations add (45): nine
# wordings ("voices") of the five templates, each saying what its template says: three frames per template
# times three sets of words for the counts, kinds, colours, corners, grounds and roads.
FRAMES = [("{np} {pos}, {ground}.", "An aerial view of {np} {pos}, {ground}.", "{ground}: {np} {pos}."),
          ("We can see {np} {pos}. {road}", "{np} {be} visible {pos}. {road}",
           "The image shows {np} {pos}. {road}"),
          ("From above: {np0} {ground}. {road}", "Overhead photo of {np0} {ground}. {road}",
           "Bird's-eye view: {np0} {ground}. {road}"),
          ("{np} {be} placed {pos}.", "{np} can be found {pos}.", "{pos}, there {be} {np}."),
          ("{np} {ground}.", "A picture of {np} {ground}.", "Satellite image: {np} {ground}.")]
WORDS = [
    dict(nums=["one", "two", "three", "four"],
         nouns={"building": "house", "tank": "tank", "airplane": "plane"},
         cols={"red": "crimson", "white": "snow-white", "blue": "navy", "yellow": "golden"},
         pos={"top left": "at the upper left", "top right": "at the upper right", "bottom left":
              "at the lower left", "bottom right": "at the lower right", "middle": "in the centre"},
         ground={"grass": "on a meadow", "farmland": "on cropland", "desert": "on sand"},
         road={"none": "There is no road.", "horizontal": "A road runs from west to east.",
               "vertical": "A road runs from north to south."}),
    dict(nums=["1", "2", "3", "4"],
         nouns={"building": "structure", "tank": "oil tank", "airplane": "aircraft"},
         cols={"red": "scarlet", "white": "pale", "blue": "azure", "yellow": "amber"},
         pos={"top left": "in the north-west corner", "top right": "in the north-east corner", "bottom left":
              "in the south-west corner", "bottom right": "in the south-east corner",
              "middle": "at the centre of the scene"},
         ground={"grass": "on green grass", "farmland": "among crop fields", "desert": "on arid land"},
         road={"none": "No street can be seen.", "horizontal": "A street crosses horizontally.",
               "vertical": "A street crosses vertically."}),
    dict(nums=["a single", "a pair of", "a group of three", "a group of four"],
         nouns={"building": "roof", "tank": "silo", "airplane": "jet"},
         cols={"red": "reddish", "white": "whitish", "blue": "bluish", "yellow": "yellowish"},
         pos={"top left": "near the top left", "top right": "near the top right", "bottom left": "near the "
              "bottom left", "bottom right": "near the bottom right", "middle": "near the middle"},
         ground={"grass": "over pasture", "farmland": "over farm fields", "desert": "over dunes"},
         road={"none": "The scene has no road.", "horizontal": "A horizontal road cuts through the scene.",
               "vertical": "A vertical road cuts through the scene."})]


def paraphrases(scene: dict) -> list[str]:
    """The 45 English paraphrases of a demo scene's five captions (FRAMES x WORDS), in voice order."""
    out = []
    for voice in range(9):
        w, n = WORDS[voice // 3], scene["count"]
        noun = w["nouns"][scene["kind"]] + ("s" if n > 1 and w["nouns"][scene["kind"]] != "aircraft" else "")
        number = w["nums"][n - 1]
        slots = dict(np=f"{number} {w['cols'][scene['colour']]} {noun}", np0=f"{number} {noun}",
                     pos=w["pos"][scene["position"]], ground=w["ground"][scene["ground"]],
                     road=w["road"][scene["road"]], be="is" if n == 1 else "are")
        for frames in FRAMES:
            text = frames[voice % 3].format(**slots)
            out.append(text[0].upper() + text[1:])
    return out


def without_test(manifest: Path) -> Path:
    """The manifest without its test split, beside it: a run's --val-data, so that train.py does not measure
    test retrieval before and after (this script measures it, in every language)."""
    out = manifest.with_name(f"{manifest.stem}-no-test.jsonl")
    if not out.exists():
        write_jsonl([r for r in load_manifest(manifest) if r["split"] != "test"], out)
    return out


def paraphrased(manifest: Path) -> Path:
    """The demo's manifest with each train image's English captions followed by their 45 paraphrases (the
    other splits as they are), beside it."""
    out = manifest.with_name("captions-paraphrased.jsonl")
    if not out.exists():
        write_jsonl([r | {"captions": r["captions"] | {"en": r["captions"]["en"] + paraphrases(r["scene"])}}
                     if r["split"] == "train" else r for r in load_manifest(manifest)], out)
    return out


def text_to_text(weights: Path, manifest: Path, split: str = "test") -> float:
    """Cross-language text retrieval: each caption in one of the nine other languages against the English
    captions of the split (the translation of template j of an image is its English template j), both
    ways, tie-aware mR over distinct texts, averaged over the nine languages."""
    model, _, tokenizer = rsmclip.load(weights)
    records = [r for r in load_manifest(manifest) if r["split"] == split]
    english = sorted({c for r in records for c in r["captions"]["en"]})
    row = {c: i for i, c in enumerate(english)}
    en_feats = rsmclip.embed_texts(model, tokenizer, english)
    scores = []
    for lang in LANGS[1:]:
        pairs = sorted({(c, e) for r in records for c, e in zip(r["captions"][lang], r["captions"]["en"])})
        feats = rsmclip.embed_texts(model, tokenizer, [c for c, _ in pairs])
        found = ev.retrieval_metrics(en_feats, feats, torch.tensor([row[e] for _, e in pairs]))
        scores.append(found["expected"]["mR"])
    return statistics.mean(scores)


LANGUAGE_ARMS = {
    "en": ("English captions only (`--langs en`)", ["--langs", "en"]),
    "all": ("all ten languages, drawn alike", []),
    "en-half": ("English half of the time, the nine others sharing the rest (`--lang-weights en=0.5`)",
                ["--lang-weights", "en=0.5"]),
    "paraphrases": ("English only, with 45 English paraphrases per train image (as many as the translations)",
                    ["--langs", "en"]),
}
LANGUAGE_CONTRASTS = [
    ("en", "all", "ten languages against English only (claim 2)"),
    ("en", "en-half", "English half of the time against English only"),
    ("en", "paraphrases", "as many English paraphrases as translations, against English only"),
    ("paraphrases", "all", "translations against as many English paraphrases"),
]
LANGUAGE_METRICS = ["English test mR", "test mR, mean of 10 languages", "text-to-text mR"]
VARIANT_SEED = 1  # the demo generator's seed for the base's variant (the demo itself: seed 0)


def languages_table(work: Path, demo_dir: Path, seeds: list[int], steps: int, base_steps: int) -> str:
    """Claim (2) as the paper states it: a base pretrained with all ten languages on a variant of the demo
    (other scenes: the generator's seed 1), then fine-tuned on the demo, CLIP loss only, four ways."""
    variant, manifest = make_demo(work / "demo-variant", seed=VARIANT_SEED), make_demo(demo_dir)
    base = work / "languages-base"
    base_seconds = train_once(base, ["--data", str(variant), "--val-data", str(without_test(variant)),
                                     "--tokenizer", str(variant.parent / "spm.model"), "--distill-weight",
                                     "0", "--steps", str(base_steps), "--workers", "0", "--log-every",
                                     str(min(50, base_steps)), "--seed", "0"])
    common = ["--init", str(base / "model.safetensors"), "--val-data", str(without_test(manifest)),
              "--distill-weight", "0", "--steps", str(steps), "--lr", "2e-4", "--warmup",
              str(max(1, steps // 10)), "--log-every", str(min(50, steps)), "--workers", "0"]
    arms, rows, per_lang = {}, [], {}
    for arm, (title, args) in LANGUAGE_ARMS.items():
        data = paraphrased(manifest) if arm == "paraphrases" else manifest
        runs = []
        for seed in seeds:
            out = work / f"languages-{arm}-seed{seed}"
            seconds = train_once(out, [*common, "--data", str(data), *args, "--seed", str(seed)])
            found = recall(out / "model.safetensors", manifest, "test", LANGS)
            runs.append({"English test mR": found["en"]["mR"],
                         "test mR, mean of 10 languages": found["mean"]["mR"],
                         "text-to-text mR": text_to_text(out / "model.safetensors", manifest),
                         "seconds": seconds, "per language": {lang: found[lang]["mR"] for lang in LANGS}})
            print(f"languages {arm} seed {seed}: {runs[-1]}", flush=True)
        arms[arm] = {m: [r[m] for r in runs] for m in LANGUAGE_METRICS}
        per_lang[title] = [[r["per language"][lang] for r in runs] for lang in LANGS]
        rows.append((title, [arms[arm][m] for m in LANGUAGE_METRICS] + [[r["seconds"] for r in runs]]))
    start = recall(base / "model.safetensors", manifest, "test", LANGS)
    between = text_to_text(base / "model.safetensors", manifest)
    rows.insert(0, (f"the base before fine-tuning ({base_steps} steps, ten languages, the variant)",
                    [[start["en"]["mR"]], [start["mean"]["mR"]], [between], [base_seconds]]))
    header = (f"Claim (2) on the demo: a base pretrained {base_steps} steps with all ten languages on the "
              f"demo generator's seed {VARIANT_SEED} (other scenes), fine-tuned {steps} steps (lr 2e-4, CLIP "
              f"loss only) on the demo; seeds {seeds}; test retrieval (200 images, chance 2.65) and "
              "text-to-text retrieval between each language and English (tie-aware mR over distinct texts, "
              "both ways)")
    return (markdown(header, [*LANGUAGE_METRICS, "seconds"], rows) + "\n"
            + markdown("Test mR per language", list(LANGS), list(per_lang.items())) + "\n"
            + contrasts("Paired differences B - A (same seed), with the decision rule's verdict", arms,
                        LANGUAGE_CONTRASTS, LANGUAGE_METRICS))


# ----------------------------------------------------------------------------- the command line

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="The ablations of docs/internals.md (README: what they show and do not).")


def seed_list(text: str, option: str = "--seeds") -> list[int]:
    """--seeds 0,1,2: distinct whole numbers >= 0, at least one; else a usage error (exit 2)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: comma-separated whole numbers, e.g. 0,1,2", param_hint=option) \
            from None
    if not seeds or min(seeds) < 0:
        raise typer.BadParameter(f"{text!r}: at least one seed, each a whole number >= 0", param_hint=option)
    if len(set(seeds)) < len(seeds):
        raise typer.BadParameter(f"{text!r}: a seed given twice would pair a run with itself",
                                 param_hint=option)
    return seeds


UCM_OPTION = typer.Option(UCM, "--ucm", help="UCM-Captions: its Karpathy file and images/")
WORK = typer.Option(ROOT / "runs/ablation", help="data, run directories and the tables")
DEMO_OPTION = typer.Option(None, "--demo", help="the demo's folder (made if missing; default: WORK/demo)")
SEEDS = typer.Option("0,1,2", help="seeds per arm, distinct (regime: the fine-tuning seeds)")
QUICK = typer.Option(False, help="2 steps a run, the first seed (and base) only: checks the script end to "
                     "end, not the method")


def settings(work: Path, seeds: str, quick: bool) -> tuple[Path, list[int]]:
    """The work folder as an absolute path (runs are keyed by absolute paths) and the seeds to run."""
    chosen = seed_list(seeds)
    return work.resolve(), chosen[:1] if quick else chosen


@app.command()
def recipe(ucm: Path = UCM_OPTION, work: Path = WORK, seeds: str = SEEDS, quick: bool = QUICK,
           steps: int = typer.Option(300, min=1, help="optimizer steps per run")):
    """The training recipe, row by row (val mR)."""
    work, chosen = settings(work, seeds, quick)
    publish(work, "recipe", recipe_table(work, ucm, chosen, 2 if quick else steps))


@app.command()
def selfdist(ucm: Path = UCM_OPTION, work: Path = WORK, seeds: str = SEEDS, quick: bool = QUICK,
             steps: int = typer.Option(3000, min=1, help="optimizer steps per run"),
             only: str = typer.Option("", help="comma-separated rows (" + ", ".join(SELFDIST) + ") to run on "
                                      "the first seed, without the winner: share the runs between cores, "
                                      "then call without it to gather")):
    """Self-distillation alone: DINO's parts one at a time (k-NN gains), the largest on every seed."""
    rows = [key.strip() for key in only.split(",") if key.strip()]
    if unknown := [key for key in rows if key not in SELFDIST]:
        raise typer.BadParameter(f"{', '.join(unknown)}: rows are {', '.join(SELFDIST)}", param_hint="--only")
    work, chosen = settings(work, seeds, quick)
    publish(work, "selfdist-" + "-".join(rows) if rows else "selfdist",
            selfdist_table(work, ucm, chosen, 2 if quick else steps, rows or None))


@app.command()
def regime(ucm: Path = UCM_OPTION, work: Path = WORK, seeds: str = SEEDS, quick: bool = QUICK,
           bases: str = typer.Option("0,1", help="seeds of the bases, distinct"),
           steps: int = typer.Option(300, min=1, help="fine-tuning steps per run"),
           base_steps: int = typer.Option(1000, min=1, help="steps of each CLIP-only base"),
           head: str = typer.Option("auto", help="the self-distillation arms' head: auto (batch norm where "
                                    "the step-0 rule asks for it), bn or plain (none)")):
    """Claim (1): the teacher and the views, fine-tuning bases trained on other classes."""
    if head not in ("auto", "bn", "plain"):
        raise typer.BadParameter(f"{head!r}: one of auto, bn, plain", param_hint="--head")
    work, chosen = settings(work, seeds, quick)
    base_seeds = seed_list(bases, "--bases")
    publish(work, "regime", regime_table(work, ucm, base_seeds[:1] if quick else base_seeds, chosen,
                                         2 if quick else steps, 2 if quick else base_steps, head))


@app.command()
def languages(work: Path = WORK, demo_dir: Optional[Path] = DEMO_OPTION, seeds: str = SEEDS,
              quick: bool = QUICK,
              steps: int = typer.Option(train.RECIPES["demo"].steps, min=1, help="fine-tuning steps per run"),
              base_steps: int = typer.Option(3000, min=1, help="steps of the ten-language base")):
    """Claim (2): a ten-language base fine-tuned with English, ten languages, English half, paraphrases."""
    work, chosen = settings(work, seeds, quick)
    publish(work, "languages", languages_table(work, (demo_dir or work / "demo").resolve(), chosen,
                                               2 if quick else steps, 2 if quick else base_steps))


@app.command("demo")
def demo_command(work: Path = WORK, demo_dir: Optional[Path] = DEMO_OPTION, seeds: str = SEEDS,
                 quick: bool = QUICK,
                 steps: int = typer.Option(train.RECIPES["demo"].steps, min=1, help="steps per run")):
    """The demo recipe with and without its teacher, on the collapse metrics."""
    work, chosen = settings(work, seeds, quick)
    folder = (demo_dir or work / "demo").resolve()
    publish(work, "demo", demo_table(work, folder, chosen, 2 if quick else steps))


@app.command()
def attributes(weights: Path = typer.Argument(ROOT / "runs/demo/model.safetensors", help="a demo model"),
               data: Path = typer.Option(ROOT / "demo_data/captions.jsonl", help="the demo's manifest")):
    """What a demo model tells apart on the test images: colour, kind and ground accuracy."""
    result = demo_attributes(weights, data)
    print(" ".join(f"{k} {v:.1f}%" for k, v in result.items()) + " (chance 25.0, 33.3, 33.3)")


@app.command("all")
def all_tables(ucm: Path = UCM_OPTION, work: Path = WORK, seeds: str = SEEDS, quick: bool = QUICK):
    """Every table above with its default steps, in the order the lead asked for (the demo first)."""
    demo_steps = train.RECIPES["demo"].steps
    demo_command(work, None, seeds, quick, demo_steps)
    regime(ucm, work, seeds, quick, "0,1", 300, 1000, "auto")
    languages(work, None, seeds, quick, demo_steps, 3000)
    selfdist(ucm, work, seeds, quick, 3000, "")
    recipe(ucm, work, seeds, quick, 300)


if __name__ == "__main__":
    torch.set_num_threads(1)
    cli.run_cli(app)
