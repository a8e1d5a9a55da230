"""Evaluation: image-text retrieval per language, zero-shot classification, benchmark reports.

    python eval.py                     # demo: an untrained tiny model on demo_data/ (made if absent): chance
    python eval.py retrieval --model W.safetensors --data captions.jsonl [--split test] [--langs en,pt] \
        --out r.json
    python eval.py zeroshot --model W.safetensors --data ROOT_OR_LABELS --classes RSSCN7 --lang en \
        --out z.json
    python eval.py report suite.json --model W1.safetensors [--model W2...] --out-json r.json --out-md r.md

The protocol is fixed (retrieval_protocol(), ZEROSHOT_PROTOCOL, LINEAR_PROBE_PROTOCOL) and printed under every
table and written into every JSON. train.py imports evaluate_retrieval() for periodic validation.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.table import Table
from safetensors import SafetensorError
from safetensors.torch import load_file

import cli
import files
import rsmclip
from data.demo import DEMO_DIR, make_demo
from data.manifest import (
    LANGS,
    SPLITS,
    data_files,
    load_labels,
    load_manifest,
    parse_langs,
    read_json,
    scan_image_folder,
)

ROOT = Path(__file__).resolve().parent
KS = (1, 5, 10)
TIE_RULES = ("expected", "against", "favour")
TIE_RULE_TEXT = {
    "expected": "tied scores in a uniformly random order, i.e. the mean over every tie-breaking (the bounds "
                "'against' and 'favour' are in the JSON)",
    "against": "a wrong candidate tied with the query's match ranks above it (the lower bound)",
    "favour": "the query's match ranks above the wrong candidates tied with it (the upper bound)"}


def retrieval_protocol(ties: str = "expected") -> str:
    return ("Retrieval protocol: every image of the split and all its captions, one language at a time; "
            "L2-normalised embeddings, cosine similarity. image->text R@K = % of images with at least one of "
            "their captions in the top K; text->image R@K = % of captions whose image is in the top K; mR = "
            f"mean of the six. Ties ({ties}): {TIE_RULE_TEXT[ties]}. Captions as given (no lower-casing or "
            "prefix); each distinct caption is encoded once, so identical captions tie exactly.")


def check_ties(ties: str) -> str:
    """The one check of a tie rule (the --ties option's and the library call's)."""
    if ties not in TIE_RULES:
        raise EvalError(f"--ties {ties!r}: choose one of {', '.join(TIE_RULES)}")
    return ties


ZEROSHOT_PROTOCOL = (
    "Zero-shot protocol: each class embedding is the mean of its normalised template embeddings, "
    "re-normalised; logits = 100 * image . class; top-1 accuracy in % over every image of the split. "
    "Class names, templates and split are stored with the result.")


class EvalError(rsmclip.RsmclipError):
    pass


# ----------------------------------------------------------------------------- metrics


def hit_probability(above: torch.Tensor, tied_wrong: torch.Tensor, tied_right: torch.Tensor,
                    k: int) -> torch.Tensor:
    """P(a right item in the top k) per query when the items tied at the best right item's score are put
    in a uniformly random order: `above` wrong items score strictly higher, `tied_wrong` wrong and
    `tied_right` (>= 1) right items score exactly that. 0 if above >= k, else 1 - C(tied_wrong, r) /
    C(tied_wrong + tied_right, r) with r = k - above: the chance that the first r tied items are all wrong,
    as a product of r fractions (a factor reaches 0 when r > tied_wrong: then a hit is certain)."""
    r = k - above
    miss = torch.ones_like(above, dtype=torch.float64)
    for j in range(k):
        fraction = (tied_wrong - j).clamp(min=0) / (tied_wrong + tied_right - j).clamp(min=1)
        miss = torch.where(j < r, miss * fraction, miss)
    return torch.where(above >= k, 0.0, 1.0 - miss)


def query_outcomes(sims: torch.Tensor, weight: torch.Tensor, best: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Candidates in the columns of sims [Q, C], each standing for `weight` [C] items with that exact
    score: (items scoring above best [Q, 1], items tying with it). Counted in float64: exact below 2**53."""
    above = (sims > best).double() @ weight
    tied = (sims == best).double() @ weight
    return above, tied


def retrieval_metrics(image_feats: torch.Tensor, text_feats: torch.Tensor, text_to_image: torch.Tensor,
                      chunk: Optional[int] = None) -> dict:
    """Multi-caption recall in percent under the three tie rules: {"expected": {"i2t": {"R@1", "R@5",
    "R@10"}, "t2i": {...}, "mR"}, "against": ..., "favour": ..., "tied_queries": {"i2t", "t2i"}}.

    image_feats [N, D] (one row per image, the queries of image->text) and text_feats [M, D] (one per
    caption) L2-normalised; text_to_image [M] the index of each caption's image. Bit-identical rows are
    merged into one candidate column standing for all of them, so identical captions (or images) tie
    exactly whatever the matrix-multiply kernel does. A query's outcome is (g, t_o, t_s): g wrong items
    strictly above its best right item, t_o wrong and t_s right items tied with it. "against" hits at K
    when g + t_o < K, "favour" when g < K, "expected" with hit_probability(). tied_queries counts the
    queries with t_o > 0. Chunked: [chunk, N or M] similarities at a time (default: 16M entries)."""
    n, m = len(image_feats), len(text_feats)
    owner = text_to_image.to(image_feats.device)
    counts = torch.bincount(owner, minlength=n)
    if counts.min() == 0:
        raise ValueError("every image needs at least one caption")
    images, image_col = torch.unique(image_feats, dim=0, return_inverse=True)
    texts, text_col = torch.unique(text_feats, dim=0, return_inverse=True)
    image_weight = torch.bincount(image_col, minlength=len(images)).double()
    text_weight = torch.bincount(text_col, minlength=len(texts)).double()
    chunk = chunk or max(1, 2 ** 24 // max(len(images), len(texts), 1))
    outcomes = {"i2t": [], "t2i": []}
    for s in range(0, m, chunk):  # text -> image: one right image per caption
        sims = text_feats[s:s + chunk] @ images.T
        best = sims.gather(1, image_col[owner[s:s + chunk], None])
        above, tied = query_outcomes(sims, image_weight, best)
        outcomes["t2i"].append((above, tied - 1, torch.ones_like(tied)))
    # image -> text: an image's right items are its captions; own[i] lists image i's caption rows, padded by
    # repeating its last one (masked by `real`).
    slot = torch.arange(int(counts.max()), device=owner.device)
    starts = torch.cumsum(counts, 0) - counts
    own = torch.argsort(owner, stable=True)[starts[:, None] + torch.minimum(slot, counts[:, None] - 1)]
    for s in range(0, n, chunk):
        sims = image_feats[s:s + chunk] @ texts.T
        own_sims = sims.gather(1, text_col[own[s:s + chunk]])
        best = own_sims.amax(1, keepdim=True)
        above, tied = query_outcomes(sims, text_weight, best)
        right = ((own_sims == best) & (slot < counts[s:s + chunk, None])).sum(1).double()
        outcomes["i2t"].append((above, tied - right, right))
    out = {rule: {} for rule in TIE_RULES} | {"tied_queries": {}}
    for d, parts in outcomes.items():
        above, tied_wrong, tied_right = (torch.cat(x) for x in zip(*parts))
        out["tied_queries"][d] = int((tied_wrong > 0).sum())
        for k in KS:
            hits = {"expected": hit_probability(above, tied_wrong, tied_right, k),
                    "against": (above + tied_wrong < k).double(), "favour": (above < k).double()}
            for rule, hit in hits.items():
                out[rule].setdefault(d, {})[f"R@{k}"] = 100 * hit.mean().item()
    for rule in TIE_RULES:
        out[rule]["mR"] = (sum(out[rule]["i2t"].values()) + sum(out[rule]["t2i"].values())) / (2 * len(KS))
    return out


def chance_mR(captions_per_image: list[int]) -> float:
    """mR of a random ranking, for reading a table: t2i R@K = K/N; i2t R@K = 1 - C(M-c, K) / C(M, K), with
    K capped at M (a top K that holds every caption always hits)."""
    n, m = len(captions_per_image), sum(captions_per_image)
    t2i = [min(1, k / n) for k in KS]
    i2t = [sum(1 - math.comb(m - c, min(k, m)) / math.comb(m, min(k, m)) for c in captions_per_image) / n
           for k in KS]
    return 100 * (sum(t2i) + sum(i2t)) / (2 * len(KS))


def mean_metrics(rows: list[dict]) -> dict:
    """The mean over languages of every recall (under each tie rule too) and of the chance level."""
    def mean(get):
        return sum(get(r) for r in rows) / len(rows)
    out = {d: {f"R@{k}": mean(lambda r: r[d][f"R@{k}"]) for k in KS} for d in ("i2t", "t2i")}
    out |= {"mR": mean(lambda r: r["mR"]), "chance_mR": mean(lambda r: r["chance_mR"]),
            "ties": rows[0]["ties"]}
    out["by_tie_rule"] = {rule: {d: {f"R@{k}": mean(lambda r: r["by_tie_rule"][rule][d][f"R@{k}"])
                                     for k in KS}
                                 for d in ("i2t", "t2i")}
                          | {"mR": mean(lambda r: r["by_tie_rule"][rule]["mR"])}
                          for rule in TIE_RULES}
    return out


# ----------------------------------------------------------------------------- encoding


def encode_images(model, preprocess, paths: list[Path], batch_size: int = 64, device: str = "cpu",
                  workers: int = 2) -> torch.Tensor:
    """[N, D] embeddings of every image, on `device`; an unreadable or missing image stops the evaluation."""
    with cli.image_progress(len(paths)) as progress:
        return rsmclip.embed_images(model, preprocess, paths, batch_size, device, workers,
                                    skip_unreadable=False, progress=progress)[0]


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
    return [lang for lang in LANGS if lang in found] + sorted(found - set(LANGS))


@in_eval_mode
def evaluate_retrieval(model, tokenizer, preprocess, manifest: Path, split: str = "test",
                       langs: Optional[list[str]] = None, batch_size: int = 64, device: str = "cpu",
                       workers: int = 2, ties: str = "expected") -> dict:
    """{lang: {"i2t": {"R@1", "R@5", "R@10"}, "t2i": {...}, "mR" under the tie rule `ties`, "ties",
    "by_tie_rule": {rule: the same three} for all three rules, "tied_queries": {"i2t", "t2i"}, "images",
    "captions", "distinct_captions", "chance_mR"}} plus "mean" over languages when there are several.
    Each unique image file and each distinct caption is encoded once; every split size works, down to
    one image."""
    check_ties(ties)
    manifest = Path(manifest)
    records = load_manifest(manifest)
    chosen = [r for r in records if r["split"] == split]
    if not chosen:
        raise EvalError(f"{manifest}: no {split!r} images (splits there: "
                        f"{', '.join(sorted({r['split'] for r in records})) or 'none'})")
    langs = langs or manifest_langs(chosen)
    if not langs:
        raise EvalError(f"{manifest}: the {split} images have no captions in any language")
    for lang in langs:
        lacking = [r["id"] for r in chosen if not r["captions"].get(lang)]
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
        metrics = retrieval_metrics(image_feats, text_feats, owner)
        results[lang] = metrics[ties] | {
            "ties": ties, "by_tie_rule": {rule: metrics[rule] for rule in TIE_RULES},
            "tied_queries": metrics["tied_queries"], "images": len(chosen), "captions": len(texts),
            "distinct_captions": len(set(texts)), "chance_mR": chance_mR(counts)}
    if len(langs) > 1:
        results["mean"] = mean_metrics([results[lang] for lang in langs])
    return results


def validate(model, tokenizer, manifest: Optional[str], split: str, langs: list[str],
             device: str) -> Optional[dict]:
    """Retrieval with this protocol on a manifest split, in those of `langs` that every image of the split
    has captions in (None if it has no such images, or there is no manifest): training's measurement
    before and after a run, and every --val-every steps."""
    if manifest is None:
        return None
    chosen = [r for r in load_manifest(Path(manifest)) if r["split"] == split]
    langs = [lang for lang in langs if all(r["captions"].get(lang) for r in chosen)]
    if not chosen or not langs:
        return None
    preprocess = rsmclip.Preprocess(model.config.vision.image_size)  # evaluate_retrieval: dropout off and on
    return evaluate_retrieval(model, tokenizer, preprocess, Path(manifest), split, langs, 128, device,
                              workers=0)


def recall(result: dict) -> float:
    """mR over languages (or of the only one)."""
    return result.get("mean", next(iter(result.values())))["mR"]


def mean_recall(result: Optional[dict]) -> str:
    return "n/a" if result is None else f"{recall(result):.2f}"


def retrieval_table(results: dict, title: str) -> Table:
    first = next(iter(results.values()))
    table = Table("lang", *(f"i2t@{k}" for k in KS), *(f"t2i@{k}" for k in KS), "mR", "chance",
                  title=f"{title}: {first['images']} images, {first['captions']} captions per language")
    for lang, r in results.items():
        if lang == "mean":
            table.add_section()
        table.add_row(lang, *(f"{r[d][f'R@{k}']:.2f}" for d in ("i2t", "t2i") for k in KS), f"{r['mR']:.2f}",
                      f"{r['chance_mR']:.2f}")
    return table


def ties_line(results: dict) -> str:
    """Under the table: how much the tie rule matters here (the mR bounds) and how often ties decide."""
    lang = "mean" if "mean" in results else next(iter(results))
    r, counts = results[lang], [v for k, v in results.items() if k != "mean"][0]
    return (f"ties: {r['ties']}; {lang} mR {r['by_tie_rule']['against']['mR']:.2f} if every tie lost, "
            f"{r['by_tie_rule']['favour']['mR']:.2f} if every tie won. {next(iter(results))}: "
            f"{counts['distinct_captions']} distinct captions of {counts['captions']}; queries whose match "
            f"ties with a wrong candidate: i2t {counts['tied_queries']['i2t']}, "
            f"t2i {counts['tied_queries']['t2i']}")


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
        raise EvalError(f"no {lang!r} class names; languages: {', '.join(LANGS)}")
    return {folder: en if lang == "en" else doc["names"][en][lang] for folder, en in mapping.items()}


def load_templates(lang: str, file: Optional[Path] = None) -> list[str]:
    templates = read_json(file or ROOT / "data" / "templates.json")
    templates = templates.get(lang) if isinstance(templates, dict) else templates
    if not templates:
        raise EvalError(f"no {lang!r} templates in {file or 'data/templates.json'}")
    if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
        raise EvalError(f"{file or 'data/templates.json'}: expected a list of template strings for {lang!r}")
    return [cli.check_template(t) for t in templates]


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
    """Top-1 on an ImageFolder tree or a labels.jsonl; classes in sorted folder/label order. Besides "top1":
    "chance" (100 / classes), "per_class" {label: {"classname", "images", "top1"}}, "confusion" {"labels",
    "classnames", "matrix": rows the true class, columns the predicted one, image counts} and "predictions",
    one per image: {"path", "true", "predicted", "top": [[label, probability], ...]} with the softmax over
    the classes of the logits, the best (up to) 5 classes."""
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
    logits = 100 * feats @ classifier
    predicted = logits.argmax(1)
    top1 = 100 * (predicted == target).float().mean().item()
    confusion = torch.zeros(len(labels), len(labels), dtype=torch.long)
    confusion.index_put_((target.cpu(), predicted.cpu()), torch.ones(len(items), dtype=torch.long),
                         accumulate=True)
    per_class = {label: {"classname": name, "images": sum(row), "top1": 100 * row[c] / sum(row)}
                 for c, (label, name, row) in enumerate(zip(labels, classnames, confusion.tolist()))}
    # stable: among tied logits the first class leads, as in argmax, so "top" starts with "predicted"
    best = logits.argsort(dim=1, descending=True, stable=True)[:, :5]
    probs = logits.softmax(1).gather(1, best)
    predictions = [{"path": str(path), "true": label, "predicted": labels[k[0]],
                    "top": [[labels[j], q] for j, q in zip(k, p)]}
                   for (path, label), k, p in zip(items, best.tolist(), probs.tolist())]
    return {"top1": top1, "chance": 100 / len(labels), "templates": templates, "classnames": classnames,
            "labels": labels, "images": len(items), "split": split or "all",
            "absent_classes": sorted(set(mapping) - set(labels)), "per_class": per_class,
            "confusion": {"labels": labels, "classnames": classnames, "matrix": confusion.tolist()},
            "predictions": predictions}


def zeroshot_table(result: dict, title: str) -> Table:
    """One row per class (its images, its top-1, the class its errors go to most), then every image with
    the chance level beside the accuracy."""
    table = Table("class", "images", "top-1 %", "chance %", "mistaken most for", title=title)
    matrix = result["confusion"]["matrix"]
    for c, (label, r) in enumerate(result["per_class"].items()):
        wrong = [(n, k) for k, n in enumerate(matrix[c]) if k != c and n]
        most = f"{result['classnames'][max(wrong)[1]]} ({max(wrong)[0]})" if wrong else ""
        table.add_row(r["classname"], str(r["images"]), f"{r['top1']:.2f}", "", most)
    table.add_section()
    table.add_row("all", str(result["images"]), f"{result['top1']:.2f}", f"{result['chance']:.2f}", "")
    return table


# ----------------------------------------------------------------------------- linear probe

SHOTS = (1, 2, 4, 8, 16)
PROBE_SEEDS = 5
VAL_FRACTION = 0.2
# What each setting of the classifiers may be: one definition for the command line's options and a suite's
# fields (check_suite), so that a flag and a suite accept the same values.
SETTINGS = {"k": cli.WHOLE, "temperature": cli.POSITIVE, "test_fraction": cli.Range(0.01, 0.99),
            "seeds": cli.WHOLE, "shots": cli.ListOf(cli.WHOLE)}
LINEAR_PROBE_PROTOCOL = (
    "Linear-probe protocol: multinomial logistic regression on frozen, L2-normalised image features "
    "(mean cross-entropy + lambda/2 |W|^2, bias not penalised; full-batch L-BFGS from zero). lambda is "
    "chosen on a validation part of the train split (the val split, else a stratified 20% of train): a grid "
    "10^-6 ... 10^2 by decades, then quarter-decades around the best; then refit on train (full) or on the "
    "k shots (few-shot). k-shot: k train images per class, never val or test images, drawn with seeds "
    "0 ... S-1 (S = 5 unless set); mean and standard deviation over the seeds. Top-1 accuracy in % on the "
    "test split.")


def classification_items(data: Path) -> list[tuple[Path, str, str]]:
    """[(image path, label, split)] of a class-folder tree (split "all") or of a labels.jsonl."""
    if data.is_dir():
        return [(data / rel, label, "all") for rel, label in scan_image_folder(data)[0]]
    return [(data.parent / r["image"], r["label"], r["split"]) for r in load_labels(data)]


def stratified_split(labels: list[int], fraction: float, seed: int, what: str) -> tuple[list[int], list[int]]:
    """(rest, part): round(fraction * n), at least 1, of each class's positions go to `part`, drawn with
    `seed`; each class keeps at least one in `rest`. Depends only on the labels and their order."""
    rest, part = [], []
    for c in sorted(set(labels)):
        rows = [i for i, label in enumerate(labels) if label == c]
        if len(rows) < 2:
            raise EvalError(f"class {c} has {len(rows)} image(s): a {what} needs at least 2 per class")
        order = np.random.default_rng([seed, c]).permutation(len(rows))
        take = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        part += [rows[j] for j in order[:take]]
        rest += [rows[j] for j in order[take:]]
    return sorted(rest), sorted(part)


def train_test(items: list, labels: list[int], test_fraction: float, what: str) -> dict[str, list[int]]:
    """{"train", "test"} positions, and "val" where the labels.jsonl has a val split. A labels.jsonl with
    train and test splits is used as it is; otherwise (a folder, or one split) a stratified, seeded
    `test_fraction` of each class is the test split."""
    splits = [split for _, _, split in items]
    if "train" in splits and "test" in splits:
        return {s: [i for i, x in enumerate(splits) if x == s]
                for s in ("train", "val", "test") if s in splits}
    if len(set(splits)) == 1:
        train, test = stratified_split(labels, test_fraction, 0, "train/test split")
        return {"train": train, "test": test}
    raise EvalError(f"splits {', '.join(sorted(set(splits)))}: a {what} needs train and test splits, or a "
                    "single split to divide with --test-fraction")


def probe_splits(items: list, labels: list[int], test_fraction: float) -> dict[str, list[int]]:
    """{"fit", "val", "test"} positions (train_test): the val split is the validation part when there is
    one, else a stratified 20% of train."""
    part = train_test(items, labels, test_fraction, "linear probe")
    if "val" in part:
        return {"fit": part["train"], "val": part["val"], "test": part["test"]}
    train = part["train"]
    fit, val = stratified_split([labels[i] for i in train], VAL_FRACTION, 0, "validation part of train")
    return {"fit": [train[i] for i in fit], "val": [train[i] for i in val], "test": part["test"]}


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, lam: float,
                 init: Optional[tuple] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy + lam/2 |W|^2 (bias free) with full-batch L-BFGS: (W [D, C], b [C]).
    The same optimum as scikit-learn's LogisticRegression with C = 1 / (lam * n). In float64: features of
    one model are often nearly parallel, so the class scores differ by little and float32 rounding in the
    optimiser flips predictions."""
    x = x.double()
    w = torch.zeros(x.shape[1], classes, dtype=x.dtype, device=x.device) if init is None else init[0].clone()
    b = torch.zeros(classes, dtype=x.dtype, device=x.device) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=1000, tolerance_grad=1e-7, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + lam / 2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def accuracy(model: tuple, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100 * ((x.double() @ model[0] + model[1]).argmax(1) == y).double().mean().item()


def choose_lambda(fit_x, fit_y, val_x, val_y, classes: int) -> float:
    """The lambda with the best validation accuracy (the larger on equal accuracy): decades from 10^2 down
    to 10^-6, each fit warm-started from the previous one, then quarter-decades around the best."""
    scores, init = {}, None
    for e in range(2, -7, -1):
        init = fit_logistic(fit_x, fit_y, classes, 10.0 ** e, init)
        scores[float(e)] = accuracy(init, val_x, val_y)
    best = max(scores, key=lambda e: (scores[e], e))
    for e in (best + 0.5, best + 0.25, best - 0.25, best - 0.5):
        scores[e] = accuracy(fit_logistic(fit_x, fit_y, classes, 10.0 ** e), val_x, val_y)
    return 10.0 ** max(scores, key=lambda e: (scores[e], e))


def sample_shots(labels: list[int], pool: list[int], k: int, seed: int, names: list[str]) -> list[int]:
    """k positions of each class from `pool`, drawn with `seed` (the same draw for the same pool)."""
    shots = []
    for c in sorted(set(labels[i] for i in pool)):
        rows = [i for i in pool if labels[i] == c]
        if k > len(rows):
            raise EvalError(f"{k}-shot: class {names[c]!r} has only {len(rows)} training images outside the "
                            f"validation part; choose --shots of at most {len(rows)}")
        shots += [rows[j] for j in np.random.default_rng([seed, k, c]).permutation(len(rows))[:k]]
    return sorted(shots)


def cached_image_features(model, preprocess, paths: list[Path], key: Optional[str], batch_size: int,
                          device: str, workers: int) -> torch.Tensor:
    """encode_images(), stored under the cache folder by `key` (the weights' fingerprint, the input size, the
    model's precision, and every image's path and stamp, files.file_stamp), so a second probe reads instead of
    encoding. A cache file is used only when it holds what encoding would give in form: float32, one finite
    row of the model's width per image; anything else is encoded again, with a warning."""
    if key is None:
        return encode_images(model, preprocess, paths, batch_size, device, workers)
    missing = [files.display(p) for p in paths if not p.is_file()]
    if missing:
        raise EvalError(f"{len(missing)} of {len(paths)} images are missing: {', '.join(missing[:5])}")
    digest = hashlib.sha256(json.dumps([key, preprocess.size, getattr(model, "precision", "amp")] + [
        [files.display(p.resolve()), *files.file_stamp(p)] for p in paths]).encode()).hexdigest()
    file = rsmclip.cache_dir() / "features" / f"{digest[:32]}.safetensors"
    if file.is_file():
        expected = (len(paths), model.config.embed_dim)
        try:
            feats = load_file(str(file))["features"]
            if feats.dtype != torch.float32 or tuple(feats.shape) != expected:
                raise ValueError(f"{feats.dtype} {tuple(feats.shape)}, expected float32 {expected}")
            if not torch.isfinite(feats).all():
                raise ValueError("non-finite features")
            return feats.to(device)
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            print(f"warning: {file}: unusable feature cache ({e}); encoding again", file=sys.stderr)
    feats = encode_images(model, preprocess, paths, batch_size, device, workers)
    files.atomic_save({"features": feats}, file, {"images": str(len(paths))})
    return feats


@in_eval_mode
def evaluate_linear_probe(model, preprocess, data: Path, shots: tuple = SHOTS, seeds: int = PROBE_SEEDS,
                          test_fraction: float = 0.5, cache_key: Optional[str] = None, batch_size: int = 64,
                          device: str = "cpu", workers: int = 2) -> dict:
    """Full-data and k-shot linear-probe top-1 (LINEAR_PROBE_PROTOCOL) on a class-folder tree or a
    labels.jsonl: {"full": {"top1", "lambda"}, "shots": {k: {"mean", "std", "runs", "lambdas"}}, ...}."""
    data = Path(data)
    items = classification_items(data)
    names = sorted({label for _, label, _ in items})
    if len(names) < 2:
        raise EvalError(f"{data}: {len(names)} class ({', '.join(names)}): a classifier needs at least 2")
    labels = [names.index(label) for _, label, _ in items]
    part = probe_splits(items, labels, test_fraction)
    for split in ("fit", "test"):
        if missing := sorted({names[labels[i]] for i in part["fit"]}
                             - {names[labels[i]] for i in part[split]}):
            raise EvalError(f"{data}: no {split} images of class {', '.join(missing[:5])}")
    feats = cached_image_features(model, preprocess, [p for p, _, _ in items], cache_key, batch_size, device,
                                  workers)
    y = torch.tensor(labels, device=feats.device)

    def rows(positions):
        index = torch.tensor(positions, device=feats.device)
        return feats[index], y[index]

    fit, val, test = rows(part["fit"]), rows(part["val"]), rows(part["test"])
    lam = choose_lambda(*fit, *val, len(names))
    train = rows(part["fit"] + part["val"])
    result = {"full": {"top1": accuracy(fit_logistic(*train, len(names), lam), *test), "lambda": lam}}
    result["shots"] = {}
    for k in shots:
        runs, lambdas = [], []
        for seed in range(seeds):
            shot = rows(sample_shots(labels, part["fit"], k, seed, names))
            lambdas.append(choose_lambda(*shot, *val, len(names)))
            runs.append(accuracy(fit_logistic(*shot, len(names), lambdas[-1]), *test))
        result["shots"][str(k)] = {"mean": float(np.mean(runs)), "std": float(np.std(runs)), "runs": runs,
                                   "lambdas": lambdas}
    return result | {"classes": names, "chance": 100 / len(names), "seeds": seeds,
                     "images": {s: len(part[s]) for s in ("fit", "val", "test")}, "test_fraction":
                     None if "train" in {s for _, _, s in items} else test_fraction}


def linear_probe_table(result: dict, title: str) -> Table:
    table = Table("training data", "top-1 %", "lambda", title=f"{title}: {len(result['classes'])} classes, "
                  f"{result['images']['test']} test images, chance {result['chance']:.2f}%")
    for k, r in result["shots"].items():
        table.add_row(f"{k} per class ({result['seeds']} seeds)", f"{r['mean']:.2f} ± {r['std']:.2f}",
                      f"{min(r['lambdas']):.0e}-{max(r['lambdas']):.0e}")
    n = result["images"]["fit"] + result["images"]["val"]
    table.add_row(f"all {n} train images", f"{result['full']['top1']:.2f}", f"{result['full']['lambda']:.0e}")
    return table


# ----------------------------------------------------------------------------- k-NN

KNN_K, KNN_TEMPERATURE = 20, 0.07
KNN_PROTOCOL = (
    "k-NN protocol (DINO's weighted k-NN): frozen, L2-normalised image features; the train images are the "
    "memory (train and val splits; or, for a folder or a single split, the images left after the "
    "stratified, seeded test part). Each test image's k most cosine-similar memory images (equal "
    "similarities: the earlier image first) vote for their class with weight exp(similarity / T); the "
    "class with the largest sum wins (equal sums: the first class in name order). Top-1 accuracy in % on "
    "the test split.")


def knn_predict(memory: torch.Tensor, memory_labels: torch.Tensor, queries: torch.Tensor, classes: int,
                k: int = KNN_K, temperature: float = KNN_TEMPERATURE, chunk: int = 1024) -> torch.Tensor:
    """Predicted class of each query row by KNN_PROTOCOL (features already L2-normalised), `chunk` queries
    at a time ([chunk, memory] similarities)."""
    out = []
    for start in range(0, len(queries), chunk):
        sims = queries[start:start + chunk].double() @ memory.double().T
        top, nearest = sims.sort(dim=1, descending=True, stable=True)  # ties: the earlier memory row first
        # The vote in log space: exp((s - s_max) / T) is exp(s / T) over one factor per query, which changes
        # no winner, and its exponents are <= 0, so no T overflows it (exp(s / T) does once s / T > 709)
        weights = ((top[:, :k] - top[:, :1]) / temperature).exp()
        votes = torch.zeros(len(sims), classes, dtype=torch.float64, device=sims.device)
        votes.scatter_add_(1, memory_labels[nearest[:, :k]], weights)
        out.append(votes.argmax(1))  # argmax: the first of equal sums
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@in_eval_mode
def evaluate_knn(model, preprocess, data: Path, k: int = KNN_K, temperature: float = KNN_TEMPERATURE,
                 test_fraction: float = 0.5, cache_key: Optional[str] = None, batch_size: int = 64,
                 device: str = "cpu", workers: int = 2) -> dict:
    """Weighted k-NN top-1 (KNN_PROTOCOL) on a class-folder tree or a labels.jsonl, with the image
    features the linear probe caches: {"top1", "per_class", "k", "temperature", "chance", ...}."""
    data = Path(data)
    for name, value in (("k", k), ("temperature", temperature)):
        if value not in SETTINGS[name]:
            raise EvalError(f"--{name} {value}: {SETTINGS[name]}")
    items = classification_items(data)
    names = sorted({label for _, label, _ in items})
    if len(names) < 2:
        raise EvalError(f"{data}: {len(names)} class ({', '.join(names)}): a classifier needs at least 2")
    labels = [names.index(label) for _, label, _ in items]
    part = train_test(items, labels, test_fraction, "k-NN classifier")
    memory_rows = part["train"] + part.get("val", [])
    if k > len(memory_rows):
        raise EvalError(f"--k {k}: more neighbours than the {len(memory_rows)} train images; choose at most "
                        f"{len(memory_rows)}")
    feats = cached_image_features(model, preprocess, [p for p, _, _ in items], cache_key, batch_size, device,
                                  workers)
    y = torch.tensor(labels, device=feats.device)
    memory, test = (torch.tensor(rows, device=feats.device) for rows in (memory_rows, part["test"]))
    predicted = knn_predict(feats[memory], y[memory], feats[test], len(names), k, temperature)
    correct = (predicted == y[test]).double()
    per_class = {name: {"images": int((y[test] == c).sum()),
                        "top1": 100 * correct[y[test] == c].mean().item()}
                 for c, name in enumerate(names) if (y[test] == c).any()}
    return {"top1": 100 * correct.mean().item(), "per_class": per_class, "k": k, "temperature": temperature,
            "classes": names, "chance": 100 / len(names),
            "images": {"memory": len(memory_rows), "test": len(part["test"])},
            "test_fraction": None if "train" in {s for _, _, s in items} else test_fraction}


def knn_table(result: dict, title: str) -> Table:
    table = Table("class", "test images", "top-1 %", title=f"{title}: k {result['k']}, "
                  f"T {result['temperature']:g}, {result['images']['memory']} train images as memory")
    for name, r in result["per_class"].items():
        table.add_row(name, str(r["images"]), f"{r['top1']:.2f}")
    table.add_section()
    table.add_row(f"all (chance {result['chance']:.2f})", str(result["images"]["test"]),
                  f"{result['top1']:.2f}")
    return table


# ----------------------------------------------------------------------------- reports


TASKS = ("retrieval", "zeroshot", "linear-probe", "knn")


# A suite file, field by field (cli's typed JSON); each task kind takes its own settings, in the ranges the
# command line's options take (SETTINGS). Paths are relative to the suite file.
SUITE = cli.Obj({"name": str, "tasks": cli.ListOf(dict, cli.WHOLE)}, optional=("name",))
COMMON = {"name": str, "task": TASKS, "data": str, "peers": cli.MapOf(cli.MapOf(float))}  # {peer: {key: n}}
LANG_LIST = cli.ListOf(str, cli.WHOLE)
TASK_SPECS = {
    "retrieval": cli.Obj(COMMON | {"split": SPLITS, "langs": LANG_LIST}, ("peers", "split", "langs")),
    "zeroshot": cli.Obj(COMMON | {"classes": str, "split": str, "langs": LANG_LIST,
                                  "templates": cli.MapOf(cli.ListOf(str, cli.WHOLE))},
                        ("peers", "split", "langs", "templates")),
    "linear-probe": cli.Obj(COMMON | {k: SETTINGS[k] for k in ("shots", "seeds", "test_fraction")},
                            ("peers", "shots", "seeds", "test_fraction")),
    "knn": cli.Obj(COMMON | {k: SETTINGS[k] for k in ("k", "temperature", "test_fraction")},
                   ("peers", "k", "temperature", "test_fraction"))}


def check_suite(suite, suite_path: Path):
    """Refuse a malformed suite before any evaluation runs (a late crash would lose every result): every
    field of its type and range (SUITE, TASK_SPECS), every template, every data path."""
    problems = cli.json_problems(suite, SUITE)
    for i, task in enumerate([] if problems else suite["tasks"]):
        spec = TASK_SPECS.get(task.get("task")) if isinstance(task.get("task"), str) else None
        problems += cli.json_problems(task, spec or cli.Obj(COMMON, ("peers",), extra=True), f"tasks[{i}]")
    if problems:
        raise EvalError(f"{suite_path}: {cli.say_problems(problems)}")
    for i, t in enumerate(suite["tasks"]):
        for lang, templates in t.get("templates", {}).items():
            try:
                [cli.check_template(template) for template in templates]
            except rsmclip.RsmclipError as e:
                raise EvalError(f"{suite_path}: tasks[{i}].templates.{lang}: {e}") from None
        if not (Path(suite_path).parent / t["data"]).exists():
            raise EvalError(f'{suite_path}: task {t["name"]!r}: data {t["data"]} not found (paths are '
                            "relative to the suite file)")
    return suite


class SuiteError(EvalError):
    """A task of a suite failed; `finished` holds the results of those before it, {model: {task: result}}."""

    def __init__(self, message: str, finished: dict):
        super().__init__(message)
        self.finished = finished


def run_task(task: dict, data: Path, model, preprocess, tok, w: Path, batch_size: int, device: str,
             workers: int, ties: str) -> tuple[dict, dict]:
    """One task of a suite with one model -> (its full result, {lang or setting: score})."""
    cli.warn_if_toy(model.config, w, [data])
    if task["task"] == "retrieval":
        result = evaluate_retrieval(model, tok, preprocess, data, task.get("split", "test"),
                                    task.get("langs"), batch_size, device, workers, ties)
        return result, {lang: r["mR"] for lang, r in result.items()}
    if task["task"] == "zeroshot":  # one result per language
        templates = task.get("templates") or {}
        result = {lang: evaluate_zeroshot(model, tok, preprocess, data, task["classes"], lang,
                                          templates.get(lang), task.get("split"), batch_size, device, workers)
                  for lang in task.get("langs", ["en"])}
        return result, {lang: r["top1"] for lang, r in result.items()}
    if task["task"] == "knn":
        result = evaluate_knn(model, preprocess, data, task.get("k", KNN_K),
                              task.get("temperature", KNN_TEMPERATURE), task.get("test_fraction", 0.5),
                              rsmclip.weights_fingerprint(w), batch_size, device, workers)
        return result, {f"k={result['k']}": result["top1"]}
    result = evaluate_linear_probe(model, preprocess, data, tuple(task.get("shots", SHOTS)),
                                   task.get("seeds", PROBE_SEEDS), task.get("test_fraction", 0.5),
                                   cache_key=rsmclip.weights_fingerprint(w), batch_size=batch_size,
                                   device=device, workers=workers)
    scores = {f"{k}-shot": r["mean"] for k, r in result["shots"].items()}
    return result, scores | {"full": result["full"]["top1"]}


def run_suite(suite_path: Path, weights: list[Path], tokenizer: Optional[Path], batch_size: int, device: str,
              workers: int, ties: str = "expected", precision: str = "fp32") -> dict:
    """Every task of a suite file against every checkpoint -> rows for the table and the full results.

    Suite file: {"name", "tasks": [{"name", "task": "retrieval"|"zeroshot"|"linear-probe"|"knn", "data",
    "split", "langs", "classes", "templates", "shots", "seeds", "test_fraction", "k", "temperature", "peers":
    {peer: {lang: number}}}]}; paths relative to the suite file. A linear-probe task gives one row per setting
    ("full", "16-shot", ...), a knn task one ("k=20"); their peers are keyed by setting."""
    suite = check_suite(read_json(Path(suite_path)), suite_path)
    names = [w.stem if [v.stem for v in weights].count(w.stem) == 1 else str(w) for w in weights]
    rows, details, scores = [], {name: {} for name in names}, {name: {} for name in names}
    for name, w in zip(names, weights):
        model, preprocess, tok = rsmclip.load(w, tokenizer, device, precision)
        for task in suite["tasks"]:
            try:
                details[name][task["name"]], scores[name][task["name"]] = run_task(
                    task, Path(suite_path).parent / task["data"], model, preprocess, tok, w, batch_size,
                    device, workers, ties)
            except rsmclip.RsmclipError as e:  # the tasks that finished are kept: the caller writes them
                raise SuiteError(f"task {task['name']!r} with {w}: {e}", details) from None
    for task in suite["tasks"]:
        metric = {"retrieval": "mR", "zeroshot": "top1", "linear-probe": "top1", "knn": "top1"}[task["task"]]
        for key in scores[names[0]][task["name"]]:
            rows.append({"task": task["task"], "name": task["name"], "lang": key, "metric": metric,
                         "values": {n: scores[n][task["name"]][key] for n in names},
                         "peers": {p: v.get(key) for p, v in task.get("peers", {}).items()}})
    return {"suite": suite.get("name", Path(suite_path).stem), "models": [str(w) for w in weights],
            "precision": model.precision,  # as resolved on this machine (every model is loaded alike)
            "protocol": {"retrieval": retrieval_protocol(ties), "zeroshot": ZEROSHOT_PROTOCOL,
                         "linear-probe": LINEAR_PROBE_PROTOCOL, "knn": KNN_PROTOCOL},
            "rows": rows, "details": details}


def report_markdown(report: dict) -> str:
    models = list(report["details"])
    peers = list(dict.fromkeys(p for row in report["rows"] for p in row["peers"]))
    head = ["task", "dataset", "lang or setting", "metric", *models, *(f"{p} (reported)" for p in peers)]
    lines = [f"## {report['suite']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        cells = [row["task"], row["name"], row["lang"], row["metric"],
                 *(f"{row['values'][m]:.2f}" for m in models),
                 *("" if row["peers"].get(p) is None else f"{row['peers'][p]:.2f}" for p in peers)]
        lines.append("| " + " | ".join(cells) + " |")
    used = dict.fromkeys(row["task"] for row in report["rows"])
    return "\n".join(lines + [x for task in used for x in ("", report["protocol"][task])] + [""])


# ----------------------------------------------------------------------------- command line

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Evaluate RS-M-CLIP checkpoints. Without a command: the demo (untrained tiny model).")


def write_json(obj: dict, path: Optional[Path]):
    if path:
        cli.write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


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
    print(ties_line(results))
    print(retrieval_protocol())
    print(f"mean mR {results['mean']['mR']:.2f} (random ranking: {results['mean']['chance_mR']:.2f}). "
          "Train with `python train.py`, then: python eval.py retrieval --model <weights> "
          "--data demo_data/captions.jsonl")


# Options shared by the commands (--model, --tokenizer, --device, --precision: those of every script; fp32 by
# default here, so that the numbers compare with the field's)
MODEL, TOKENIZER, DEVICE, PRECISION = cli.MODEL, cli.TOKENIZER, cli.DEVICE, cli.precision_option("fp32")
BATCH = typer.Option(64, min=1, help="images per batch (captions: 4x)")
WORKERS = typer.Option(min(4, os.cpu_count() or 1), help="image decoding processes")
TIES = typer.Option("expected", callback=check_ties,
                    help="tie rule for retrieval: expected (random order of tied scores), "
                    "against (ties lose: lower bound) or favour (ties win: upper bound)")


@app.command()
def retrieval(model_path: Path = MODEL, data: Path = typer.Option(..., help="captions.jsonl"),
              split: str = typer.Option("test", help="split to evaluate"),
              langs: Optional[str] = typer.Option(None, help="comma-separated languages (default: all)"),
              out: Optional[Path] = typer.Option(None, help="write the results as JSON"),
              tokenizer: Optional[Path] = TOKENIZER, batch_size: int = BATCH, workers: int = WORKERS,
              device: str = DEVICE, ties: str = TIES, precision: cli.Precision = PRECISION):
    """Image<->text retrieval R@1/5/10 and mR, one row per language plus their mean."""
    cli.refuse_overwrite(out, [model_path, *data_files(data), tokenizer])
    model, preprocess, tok = rsmclip.load(model_path, tokenizer, device, precision)
    cli.warn_if_toy(model.config, model_path, [data])
    results = evaluate_retrieval(model, tok, preprocess, data, split,
                                 parse_langs(langs) if langs else None, batch_size, device, workers,
                                 ties)
    Console().print(retrieval_table(results, f"{model_path.name} on {data}, split {split}"))
    print(ties_line(results))
    print(retrieval_protocol(ties))
    write_json(results | {"_meta": {"model": str(model_path), "data": str(data), "split": split,
                                    "precision": model.precision, "protocol": retrieval_protocol(ties)}}, out)


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
             device: str = DEVICE, precision: cli.Precision = PRECISION):
    """Zero-shot top-1 accuracy with per-language class names and templates."""
    cli.refuse_overwrite(out, [model_path, *data_files(data), templates, tokenizer, Path(classes)])
    model, preprocess, tok = rsmclip.load(model_path, tokenizer, device, precision)
    cli.warn_if_toy(model.config, model_path, [data])
    chosen = load_templates(lang, templates) if templates else None
    result = evaluate_zeroshot(model, tok, preprocess, data, classes, lang, chosen, split, batch_size, device,
                               workers)
    title = f"zero-shot, {model_path.name} on {data}, {len(result['templates'])} {lang} templates"
    Console().print(zeroshot_table(result, title))
    if result["absent_classes"]:
        print(f"note: {len(result['absent_classes'])} classes of {classes} have no images here and were not "
              f"scored: {', '.join(result['absent_classes'][:5])}")
    print(ZEROSHOT_PROTOCOL)
    meta = {"model": str(model_path), "data": str(data), "precision": model.precision,
            "protocol": ZEROSHOT_PROTOCOL}
    write_json(result | {"_meta": meta}, out)


def image_model(model_path: Path, data: Path, device: str,
                precision: str = "fp32") -> tuple[rsmclip.CLIP, rsmclip.Preprocess]:
    """A weights file's model for image features only (no tokenizer needed), and its preprocessing."""
    precision = rsmclip.resolve_precision(precision, device)
    cfg, state = rsmclip.read_weights(model_path)
    cli.warn_if_toy(cfg, model_path, [data])
    model = rsmclip.set_precision(rsmclip.build(cfg, state).to(device).eval(), precision)
    return model, rsmclip.Preprocess(cfg.vision.image_size)


def show(result: dict, table: Table, protocol: str, model_path: Path, data: Path, out: Optional[Path],
         precision: str):
    """A classifier's table, its protocol, and the JSON with both named."""
    Console().print(table)
    print(protocol)
    write_json(result | {"_meta": {"model": str(model_path), "data": str(data), "precision": precision,
                                   "protocol": protocol}}, out)


@app.command("linear-probe")
def linear_probe(model_path: Path = MODEL,
                 data: Path = typer.Option(..., help="class folders or labels.jsonl"),
                 shots: str = typer.Option(",".join(map(str, SHOTS)), help="comma-separated k of the k-shot "
                                           "probes, images per class (empty: full-data probe only)"),
                 seeds: int = typer.Option(PROBE_SEEDS, callback=cli.in_range(SETTINGS["seeds"]),
                                           help="k-shot draws averaged per k"),
                 test_fraction: float = typer.Option(0.5, callback=cli.in_range(SETTINGS["test_fraction"]),
                                                     help="share of each class held out for testing "
                                                          "when the data has no train/test splits"),
                 out: Optional[Path] = typer.Option(None, help="write the result as JSON"),
                 batch_size: int = BATCH, workers: int = WORKERS, device: str = DEVICE,
                 precision: cli.Precision = PRECISION):
    """Linear-probe and few-shot top-1 accuracy: logistic regression on frozen image features."""
    try:
        ks = tuple(int(k) for k in shots.split(",") if k.strip())
    except ValueError:
        raise EvalError(f"--shots {shots!r}: expected comma-separated whole numbers such as "
                        "1,2,4,8,16") from None
    if any(k < 1 for k in ks):
        raise EvalError(f"--shots {shots!r}: each k must be at least 1")
    cli.refuse_overwrite(out, [model_path, *data_files(data)])
    rsmclip.cache_dir(check=True)
    model, preprocess = image_model(model_path, data, device, precision)
    result = evaluate_linear_probe(model, preprocess, data, ks, seeds, test_fraction,
                                   rsmclip.weights_fingerprint(model_path), batch_size, device, workers)
    show(result, linear_probe_table(result, f"linear probe, {model_path.name} on {data}"),
         LINEAR_PROBE_PROTOCOL, model_path, data, out, model.precision)


@app.command()
def knn(model_path: Path = MODEL, data: Path = typer.Option(..., help="class folders or labels.jsonl"),
        k: int = typer.Option(KNN_K, "--k", callback=cli.in_range(SETTINGS["k"]),
                              help="neighbours that vote"),
        temperature: float = typer.Option(KNN_TEMPERATURE, callback=cli.in_range(SETTINGS["temperature"]),
                                          help="vote weight exp(similarity / T), computed in log space"),
        test_fraction: float = typer.Option(0.5, callback=cli.in_range(SETTINGS["test_fraction"]),
                                            help="share of each class held out for testing when the data has "
                                            "no train/test splits"),
        out: Optional[Path] = typer.Option(None, help="write the result as JSON"),
        batch_size: int = BATCH, workers: int = WORKERS, device: str = DEVICE,
        precision: cli.Precision = PRECISION):
    """Weighted k-NN top-1 accuracy on frozen image features (DINO's check of self-supervised features)."""
    cli.refuse_overwrite(out, [model_path, *data_files(data)])
    rsmclip.cache_dir(check=True)
    model, preprocess = image_model(model_path, data, device, precision)
    result = evaluate_knn(model, preprocess, data, k, temperature, test_fraction,
                          rsmclip.weights_fingerprint(model_path), batch_size, device, workers)
    show(result, knn_table(result, f"k-NN, {model_path.name} on {data}"), KNN_PROTOCOL, model_path, data, out,
         model.precision)


@app.command()
def report(suite: Path = typer.Argument(..., help="benchmark suite JSON"),
           model_paths: list[Path] = typer.Option(..., "--model", help="weights file (repeat for several)"),
           out_json: Path = typer.Option(Path("report.json"), help="every result, as JSON"),
           out_md: Path = typer.Option(Path("report.md"), help="the table, as Markdown"),
           tokenizer: Optional[Path] = TOKENIZER, batch_size: int = BATCH, workers: int = WORKERS,
           device: str = DEVICE, ties: str = TIES, precision: cli.Precision = PRECISION):
    """Run a benchmark suite against checkpoints: one JSON and one Markdown table, peers side by side."""
    tasks = check_suite(read_json(suite), suite)["tasks"]
    reads = [suite, tokenizer, *model_paths,
             *(f for t in tasks for f in data_files(suite.parent / t["data"]))]
    cli.refuse_overwrite(out_json, reads, "--out-json")
    cli.refuse_overwrite(out_md, [*reads, out_json], "--out-md")
    if any(t["task"] in ("linear-probe", "knn") for t in tasks):
        rsmclip.cache_dir(check=True)
    try:
        result = run_suite(suite, model_paths, tokenizer, batch_size, device, workers, ties, precision)
    except SuiteError as e:
        if not any(e.finished.values()):
            raise
        write_json({"suite": str(suite), "error": str(e), "finished": e.finished}, out_json)
        raise EvalError(f"{e}; the tasks that finished before it are in {out_json}") from None
    markdown = report_markdown(result)
    print(markdown)
    write_json(result, out_json)
    cli.write_text(out_md, markdown)


def main():
    cli.run_cli(app)


if __name__ == "__main__":
    main()
