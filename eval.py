"""Evaluation: image-text retrieval per language, zero-shot classification, benchmark reports.

    python eval.py                     # demo: an untrained tiny model on demo_data/ (made if absent): chance
    python eval.py retrieval --model W.safetensors --data captions.jsonl [--split test] [--langs en,pt] \
        --out r.json
    python eval.py zeroshot --model W.safetensors --data ROOT_OR_LABELS --classes RSSCN7 --lang en \
        --out z.json
    python eval.py report suite.json --model W1.safetensors [--model W2...] --out-json r.json --out-md r.md

The protocol is fixed (RETRIEVAL_PROTOCOL, ZEROSHOT_PROTOCOL) and printed under every table and
written into every JSON. train.py imports evaluate_retrieval() for periodic validation.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

import rsmclip
from data.demo import make_demo
from data.prepare import DataError, load_labels, load_manifest, read_json, scan_image_folder

ROOT = Path(__file__).resolve().parent
DEMO_DIR = ROOT / "demo_data"
KS = (1, 5, 10)
RETRIEVAL_PROTOCOL = (
    "Retrieval protocol: every image of the split and all its captions, one language at a time; "
    "L2-normalised embeddings, cosine similarity. image->text R@K = % of images with at least one of their "
    "captions in the top K; text->image R@K = % of captions whose image is in the top K; mR = mean of the "
    "six. Ties count against the query. Captions as given: no lower-casing, prefix or de-duplication.")
ZEROSHOT_PROTOCOL = (
    "Zero-shot protocol: each class embedding is the mean of its normalised template embeddings, "
    "re-normalised; logits = 100 * image . class; top-1 accuracy in % over every image of the split. "
    "Class names, templates and split are stored with the result.")


class EvalError(rsmclip.RsmclipError):
    pass


# ----------------------------------------------------------------------------- metrics


def retrieval_metrics(image_feats: torch.Tensor, text_feats: torch.Tensor, text_to_image: torch.Tensor,
                      chunk: Optional[int] = None) -> dict:
    """Multi-caption recall in percent. image_feats [N, D] and text_feats [M, D] L2-normalised,
    text_to_image [M] the index of each caption's image. A candidate that ties with the query's match
    ranks above it, so a model that embeds everything alike scores 0, not 100. Chunked: [chunk, N or M]
    similarities at a time (default: 16M), so 10,000 images x 50,000 captions fit in memory."""
    n, m = len(image_feats), len(text_feats)
    owner = text_to_image.to(image_feats.device)
    counts = torch.bincount(owner, minlength=n)
    if counts.min() == 0:
        raise ValueError("every image needs at least one caption")
    chunk = chunk or max(1, 2 ** 24 // max(n, m, 1))
    t2i = torch.empty(m, dtype=torch.long, device=owner.device)
    for s in range(0, m, chunk):  # text -> image: images scoring at least as high as the caption's own
        sims = text_feats[s:s + chunk] @ image_feats.T
        t2i[s:s + chunk] = (sims >= sims.gather(1, owner[s:s + chunk, None])).sum(1) - 1
    # image -> text: captions scoring at least as high as the image's best own caption, minus its own ones.
    # own[i] lists image i's caption columns, padded by repeating its last one (harmless for the max).
    slot = torch.arange(int(counts.max()), device=owner.device)
    starts = torch.cumsum(counts, 0) - counts
    own = torch.argsort(owner, stable=True)[starts[:, None] + torch.minimum(slot, counts[:, None] - 1)]
    i2t = torch.empty(n, dtype=torch.long, device=owner.device)
    for s in range(0, n, chunk):
        sims = image_feats[s:s + chunk] @ text_feats.T
        own_sims = sims.gather(1, own[s:s + chunk])
        best = own_sims.amax(1, keepdim=True)
        real = slot < counts[s:s + chunk, None]
        i2t[s:s + chunk] = (sims >= best).sum(1) - ((own_sims >= best) & real).sum(1)
    out = {d: {f"R@{k}": 100 * (ranks < k).sum().item() / len(ranks) for k in KS}
           for d, ranks in (("i2t", i2t), ("t2i", t2i))}
    out["mR"] = sum(out["i2t"].values()) / len(KS) / 2 + sum(out["t2i"].values()) / len(KS) / 2
    return out


def chance_mR(captions_per_image: list[int]) -> float:
    """mR of a random ranking, for reading a table: t2i R@K = K/N; i2t R@K = 1 - C(M-c, K) / C(M, K)."""
    n, m = len(captions_per_image), sum(captions_per_image)
    t2i = [min(1, k / n) for k in KS]
    i2t = [sum(1 - math.comb(m - c, k) / math.comb(m, k) for c in captions_per_image) / n for k in KS]
    return 100 * (sum(t2i) + sum(i2t)) / (2 * len(KS))


def mean_metrics(rows: list[dict]) -> dict:
    mean = {d: {f"R@{k}": sum(r[d][f"R@{k}"] for r in rows) / len(rows) for k in KS} for d in ("i2t", "t2i")}
    return mean | {"mR": sum(r["mR"] for r in rows) / len(rows)}


# ----------------------------------------------------------------------------- encoding


class ImageFiles(torch.utils.data.Dataset):
    """Decoded, preprocessed images. A file that cannot be read gives a blank and its error message,
    raised as one report in the main process (a worker's exception would arrive as a traceback)."""

    def __init__(self, paths: list[Path], preprocess: rsmclip.Preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return self.preprocess(self.paths[i]), ""
        except rsmclip.ImageError as e:
            return torch.zeros(3, self.preprocess.size, self.preprocess.size), str(e)


def image_batches(paths: list[Path], preprocess, batch_size: int, workers: int):
    workers = min(workers, len(paths) // batch_size)  # a worker pool costs more than it saves on small sets
    return torch.utils.data.DataLoader(ImageFiles(paths, preprocess), batch_size=batch_size,
                                       num_workers=workers, persistent_workers=False)


def progress(what: str) -> Progress:
    return Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                    TimeRemainingColumn(), transient=True, console=Console(stderr=True))


@torch.inference_mode()
def encode_images(model, preprocess, paths: list[Path], batch_size: int = 64, device: str = "cpu",
                  workers: int = 2) -> torch.Tensor:
    """[N, D] L2-normalised float32 image embeddings, on `device`; bf16 autocast on CUDA."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise EvalError(f"{len(missing)} of {len(paths)} images are missing: {', '.join(missing[:5])}"
                        + (" ..." if len(missing) > 5 else ""))
    feats, errors, done, start = [], [], 0, time.perf_counter()
    with progress("images") as bar:
        task = bar.add_task("", total=len(paths), rate="")
        for pixels, messages in image_batches(paths, preprocess, batch_size, workers):
            errors += [m for m in messages if m]
            with torch.autocast("cuda", torch.bfloat16, enabled=str(device).startswith("cuda")):
                x = model.encode_image(pixels.to(device, non_blocking=True))
            feats.append(F.normalize(x.float(), dim=-1))
            done += len(pixels)
            bar.update(task, advance=len(pixels), rate=f"{done / (time.perf_counter() - start):.0f} img/s")
    if errors:
        raise EvalError(f"{len(errors)} images cannot be read: {'; '.join(errors[:3])}")
    return torch.cat(feats)


def in_eval_mode(evaluate):
    """Dropout off while evaluating; a model handed over by train.py goes back to training mode after."""
    @functools.wraps(evaluate)
    def wrapper(model, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            return evaluate(model, *args, **kwargs)
        finally:
            model.train(was_training)
    return wrapper


# ----------------------------------------------------------------------------- retrieval


def manifest_langs(records: list[dict]) -> list[str]:
    found = {lang for r in records for lang in r["captions"]}
    return [lang for lang in rsmclip.LANGS if lang in found] + sorted(found - set(rsmclip.LANGS))


@in_eval_mode
def evaluate_retrieval(model, tokenizer, preprocess, manifest: Path, split: str = "test",
                       langs: Optional[list[str]] = None, batch_size: int = 64, device: str = "cpu",
                       workers: int = 2) -> dict:
    """{lang: {"i2t": {"R@1", "R@5", "R@10"}, "t2i": {...}, "mR", "images", "captions", "chance_mR"}} plus
    "mean" over languages when there are several. Each unique image file is encoded once."""
    manifest = Path(manifest)
    records = load_manifest(manifest)
    chosen = [r for r in records if r["split"] == split]
    if not chosen:
        raise EvalError(f"{manifest}: no {split!r} images (splits there: "
                        f"{', '.join(sorted({r['split'] for r in records})) or 'none'})")
    langs = langs or manifest_langs(chosen)
    for lang in langs:
        lacking = [r["id"] for r in chosen if lang not in r["captions"]]
        if lacking:
            raise EvalError(f"{manifest}: {len(lacking)} {split} images have no {lang!r} captions (e.g. "
                            f"{', '.join(lacking[:3])}); available: {', '.join(manifest_langs(chosen))}")
    paths = [manifest.parent / r["image"] for r in chosen]
    unique = list(dict.fromkeys(paths))
    row_of = {p: i for i, p in enumerate(unique)}
    image_feats = encode_images(model, preprocess, unique, batch_size, device, workers)
    image_feats = image_feats[torch.tensor([row_of[p] for p in paths], device=image_feats.device)]
    results = {}
    for lang in langs:
        texts = [c for r in chosen for c in r["captions"][lang]]
        owner = torch.tensor([i for i, r in enumerate(chosen) for _ in r["captions"][lang]])
        counts = [len(r["captions"][lang]) for r in chosen]
        text_feats = rsmclip.embed_texts(model, tokenizer, texts, 4 * batch_size, device).to(device)
        results[lang] = retrieval_metrics(image_feats, text_feats, owner) | {
            "images": len(chosen), "captions": len(texts), "chance_mR": chance_mR(counts)}
    if len(langs) > 1:
        results["mean"] = mean_metrics([results[lang] for lang in langs])
    return results


def retrieval_table(results: dict, title: str) -> Table:
    first = next(iter(results.values()))
    table = Table("lang", *(f"i2t@{k}" for k in KS), *(f"t2i@{k}" for k in KS), "mR", "chance",
                  title=f"{title}: {first['images']} images, {first['captions']} captions per language")
    for lang, r in results.items():
        if lang == "mean":
            table.add_section()
        table.add_row(lang, *(f"{r[d][f'R@{k}']:.2f}" for d in ("i2t", "t2i") for k in KS), f"{r['mR']:.2f}",
                      f"{r['chance_mR']:.2f}" if "chance_mR" in r else "")
    return table


# ----------------------------------------------------------------------------- zero-shot


def load_classes(name_or_file: str, lang: str) -> dict:
    """{folder or label: class name in `lang`} from data/classnames.json (by dataset name) or from a JSON
    file {folder: {lang: name}}."""
    path = Path(name_or_file)
    if path.is_file():
        doc = read_json(path)
        if not isinstance(doc, dict):
            raise EvalError(f"{path}: expected {{folder: {{lang: class name}}}}")
        lacking = [f for f, names in doc.items() if not isinstance(names, dict) or lang not in names]
        if lacking:
            raise EvalError(f"{path}: no {lang!r} name for {', '.join(lacking[:5])}")
        return {folder: names[lang] for folder, names in doc.items()}
    doc = read_json(ROOT / "data" / "classnames.json")
    known = {k.lower(): k for k in doc["datasets"]}
    if name_or_file.lower() not in known:
        raise EvalError(f"--classes {name_or_file!r}: neither a file nor a known dataset "
                        f"({', '.join(doc['datasets'])})")
    mapping = doc["datasets"][known[name_or_file.lower()]]
    if lang != "en" and any(lang not in doc["names"][en] for en in mapping.values()):
        raise EvalError(f"no {lang!r} class names; languages: {', '.join(rsmclip.LANGS)}")
    return {folder: en if lang == "en" else doc["names"][en][lang] for folder, en in mapping.items()}


def load_templates(lang: str, file: Optional[Path] = None) -> list[str]:
    templates = read_json(file or ROOT / "data" / "templates.json")
    templates = templates.get(lang) if isinstance(templates, dict) else templates
    if not templates:
        raise EvalError(f"no {lang!r} templates in {file or 'data/templates.json'}")
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise EvalError(f"templates need exactly one {{}}: {bad[:3]}")
    return templates


@torch.inference_mode()
def zeroshot_classifier(model, tokenizer, classnames: list[str], templates: list[str], device: str = "cpu",
                        batch_size: int = 256) -> torch.Tensor:
    """[D, C]: per class, the mean of its normalised template embeddings, re-normalised (open_clip's
    build_zero_shot_classifier)."""
    texts = [t.format(c) for c in classnames for t in templates]
    feats = rsmclip.embed_texts(model, tokenizer, texts, batch_size, device).to(device)
    return F.normalize(feats.view(len(classnames), len(templates), -1).mean(1), dim=-1).T


@in_eval_mode
def evaluate_zeroshot(model, tokenizer, preprocess, data: Path, classes: str, lang: str = "en",
                      templates: Optional[list[str]] = None, split: Optional[str] = None,
                      batch_size: int = 64, device: str = "cpu", workers: int = 2) -> dict:
    """Top-1 on an ImageFolder tree or a labels.jsonl; classes in sorted folder/label order."""
    data = Path(data)
    if data.is_dir():
        items = [(data / rel, label) for rel, label in scan_image_folder(data)[0]]
    else:
        items = [(data.parent / r["image"], r["label"]) for r in load_labels(data)
                 if split is None or r["split"] == split]
        if not items:
            raise EvalError(f"{data}: no {split!r} images")
    mapping = load_classes(classes, lang)
    labels = sorted({label for _, label in items})
    unknown = [label for label in labels if label not in mapping]
    if unknown:
        raise EvalError(f"{data}: labels {', '.join(unknown[:5])} are not in --classes {classes} "
                        f"(it has: {', '.join(list(mapping)[:8])} ...)")
    classnames = [mapping[label] for label in labels]
    templates = templates or load_templates(lang)
    classifier = zeroshot_classifier(model, tokenizer, classnames, templates, device)
    feats = encode_images(model, preprocess, [p for p, _ in items], batch_size, device, workers)
    target = torch.tensor([labels.index(label) for _, label in items], device=feats.device)
    top1 = 100 * ((feats @ classifier).argmax(1) == target).float().mean().item()
    return {"top1": top1, "templates": templates, "classnames": classnames, "labels": labels,
            "images": len(items), "split": split or "all",
            "absent_classes": sorted(set(mapping) - set(labels))}


# ----------------------------------------------------------------------------- reports


def run_suite(suite_path: Path, weights: list[Path], tokenizer: Optional[Path], batch_size: int, device: str,
              workers: int) -> dict:
    """Every task of a suite file against every checkpoint -> rows for the table and the full results.

    Suite file: {"name", "tasks": [{"name", "task": "retrieval"|"zeroshot", "data", "split", "langs",
    "classes", "templates", "peers": {peer: {lang: number}}}]}; paths relative to the suite file."""
    suite = read_json(Path(suite_path))
    if not isinstance(suite, dict) or not isinstance(suite.get("tasks"), list) or not suite["tasks"]:
        raise EvalError(f"{suite_path}: expected {{\"name\", \"tasks\": [...]}}")
    bad = [i for i, t in enumerate(suite["tasks"])
           if not isinstance(t, dict) or not all(isinstance(t.get(k), str) for k in ("name", "task", "data"))
           or t["task"] not in ("retrieval", "zeroshot")]
    if bad:
        raise EvalError(f'{suite_path}: tasks {bad} need "name", "data" and "task": retrieval or zeroshot')
    names = [w.stem if [v.stem for v in weights].count(w.stem) == 1 else str(w) for w in weights]
    rows, details = [], {name: {} for name in names}
    for name, w in zip(names, weights):
        model, preprocess, tok = rsmclip.load(w, tokenizer, device)
        for task in suite["tasks"]:
            data = Path(suite_path).parent / task["data"]
            if task["task"] == "retrieval":
                details[name][task["name"]] = evaluate_retrieval(
                    model, tok, preprocess, data, task.get("split", "test"), task.get("langs"), batch_size,
                    device, workers)
            else:  # zero-shot: one result per language
                templates = task.get("templates") or {}
                details[name][task["name"]] = {lang: evaluate_zeroshot(
                    model, tok, preprocess, data, task["classes"], lang, templates.get(lang),
                    task.get("split"), batch_size, device, workers) for lang in task.get("langs", ["en"])}
    for task in suite["tasks"]:
        metric = "mR" if task["task"] == "retrieval" else "top1"
        for lang in details[names[0]][task["name"]]:
            rows.append({"task": task["task"], "name": task["name"], "lang": lang, "metric": metric,
                         "values": {n: details[n][task["name"]][lang][metric] for n in names},
                         "peers": {p: v.get(lang) for p, v in task.get("peers", {}).items()}})
    return {"suite": suite.get("name", Path(suite_path).stem), "models": [str(w) for w in weights],
            "protocol": {"retrieval": RETRIEVAL_PROTOCOL, "zeroshot": ZEROSHOT_PROTOCOL},
            "rows": rows, "details": details}


def report_markdown(report: dict) -> str:
    models = list(report["details"])
    peers = list(dict.fromkeys(p for row in report["rows"] for p in row["peers"]))
    head = ["task", "dataset", "lang", "metric", *models, *(f"{p} (reported)" for p in peers)]
    lines = [f"## {report['suite']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        cells = [row["task"], row["name"], row["lang"], row["metric"],
                 *(f"{row['values'][m]:.2f}" for m in models),
                 *("" if row["peers"].get(p) is None else f"{row['peers'][p]:.2f}" for p in peers)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", report["protocol"]["retrieval"], "", report["protocol"]["zeroshot"], ""])


# ----------------------------------------------------------------------------- command line

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Evaluate RS-M-CLIP checkpoints. Without a command: the demo (untrained tiny model).")


def write_json(obj: dict, path: Optional[Path]):
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {path}")


@app.callback(invoke_without_command=True)
def demo(ctx: typer.Context):
    """Without a command: evaluate an untrained, seeded tiny model on the demo test split."""
    if ctx.invoked_subcommand:
        return
    manifest = make_demo(DEMO_DIR)
    cfg = rsmclip.PRESETS["tiny"]
    torch.manual_seed(0)
    model = rsmclip.CLIP(cfg).eval()
    tok = rsmclip.Tokenizer(manifest.parent / cfg.tokenizer, cfg.context_length)
    results = evaluate_retrieval(model, tok, rsmclip.Preprocess(cfg.vision.image_size), manifest, workers=0)
    Console().print(retrieval_table(results, f"untrained tiny model (seed 0) on {manifest}, split test"))
    print(RETRIEVAL_PROTOCOL)
    chance = sum(results[lang]["chance_mR"] for lang in results if lang != "mean") / (len(results) - 1)
    print(f"mean mR {results['mean']['mR']:.2f} (random ranking: {chance:.2f}). "
          "Train with `python train.py`, then: python eval.py retrieval --model <weights> "
          "--data demo_data/captions.jsonl")


# Options shared by the commands
MODEL = typer.Option(..., "--model", help="weights file (ours, or open_clip's safetensors)")
TOKENIZER = typer.Option(None, help="SentencePiece model (default: the one the weights name, next to them)")
BATCH = typer.Option(64, min=1, help="images per batch (captions: 4x)")
WORKERS = typer.Option(min(4, os.cpu_count() or 1), help="image decoding processes")
DEVICE = typer.Option(rsmclip.default_device(), help="cpu, cuda, cuda:1, ...")


@app.command()
def retrieval(model_path: Path = MODEL, data: Path = typer.Option(..., help="captions.jsonl"),
              split: str = typer.Option("test", help="split to evaluate"),
              langs: Optional[str] = typer.Option(None, help="comma-separated languages (default: all)"),
              out: Optional[Path] = typer.Option(None, help="write the results as JSON"),
              tokenizer: Optional[Path] = TOKENIZER, batch_size: int = BATCH, workers: int = WORKERS,
              device: str = DEVICE):
    """Image<->text retrieval R@1/5/10 and mR, one row per language plus their mean."""
    model, preprocess, tok = rsmclip.load(model_path, tokenizer, device)
    results = evaluate_retrieval(model, tok, preprocess, data, split,
                                 langs.split(",") if langs else None, batch_size, device, workers)
    Console().print(retrieval_table(results, f"{model_path.name} on {data}, split {split}"))
    print(RETRIEVAL_PROTOCOL)
    write_json(results | {"_meta": {"model": str(model_path), "data": str(data), "split": split,
                                    "protocol": RETRIEVAL_PROTOCOL}}, out)


@app.command()
def zeroshot(model_path: Path = MODEL, data: Path = typer.Option(..., help="class folders or labels.jsonl"),
             classes: str = typer.Option(..., help="dataset name in data/classnames.json, or a JSON file "
                                         "{folder: {lang: name}}"),
             lang: str = typer.Option("en", help="language of class names and templates"),
             templates: Optional[Path] = typer.Option(None, help="JSON list of templates (default: "
                                                      "data/templates.json)"),
             split: Optional[str] = typer.Option(None, help="labels.jsonl split (default: every image)"),
             out: Optional[Path] = typer.Option(None, help="write the result as JSON"),
             tokenizer: Optional[Path] = TOKENIZER, batch_size: int = BATCH, workers: int = WORKERS,
             device: str = DEVICE):
    """Zero-shot top-1 accuracy with per-language class names and templates."""
    model, preprocess, tok = rsmclip.load(model_path, tokenizer, device)
    chosen = load_templates(lang, templates) if templates else None
    result = evaluate_zeroshot(model, tok, preprocess, data, classes, lang, chosen, split, batch_size, device,
                               workers)
    print(f"zero-shot top-1 {result['top1']:.2f}% on {result['images']} images, {len(result['labels'])} "
          f"classes, {len(result['templates'])} {lang} templates ({model_path.name}, {data})")
    if result["absent_classes"]:
        print(f"note: {len(result['absent_classes'])} classes of {classes} have no images here and were not "
              f"scored: {', '.join(result['absent_classes'][:5])}")
    print(ZEROSHOT_PROTOCOL)
    meta = {"model": str(model_path), "data": str(data), "protocol": ZEROSHOT_PROTOCOL}
    write_json(result | {"_meta": meta}, out)


@app.command()
def report(suite: Path = typer.Argument(..., help="benchmark suite JSON"),
           model_paths: list[Path] = typer.Option(..., "--model", help="weights file (repeat for several)"),
           out_json: Path = typer.Option(Path("report.json")), out_md: Path = typer.Option(Path("report.md")),
           tokenizer: Optional[Path] = TOKENIZER, batch_size: int = BATCH, workers: int = WORKERS,
           device: str = DEVICE):
    """Run a benchmark suite against checkpoints: one JSON and one Markdown table, peers side by side."""
    result = run_suite(suite, model_paths, tokenizer, batch_size, device, workers)
    markdown = report_markdown(result)
    print(markdown)
    write_json(result, out_json)
    out_md.write_text(markdown, encoding="utf-8")
    print(f"wrote {out_md}")


def main():
    try:
        app()
    except (rsmclip.RsmclipError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
