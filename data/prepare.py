"""Public remote-sensing datasets -> rsmclip manifests, checked, and merged without test leakage.

    python data/prepare.py captions ANNOTATIONS --images DIR --out MANIFEST [--dataset NAME] [--drop-missing]
    python data/prepare.py classes ROOT --out LABELS
    python data/prepare.py merge MANIFEST... --exclude MANIFEST --out MANIFEST
    python data/prepare.py cache MANIFEST [--out FILE] [--split train] [--max-side 512]
    python data/prepare.py shards MANIFEST --out DIR [--split train] [--per-shard 1000] [--max-side 512]

Every image path in a manifest is relative to the manifest's own folder (POSIX, never absolute, never
`..`), so a manifest must be written in a folder that holds its images: usually the dataset folder.
Where each dataset comes from, its layout, counts and exact commands: data/README.md.
"""
from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np
import torch
import typer
from PIL import Image
from rich.progress import track

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the project is one level up
import cli  # noqa: E402  (the one exit-code rule of every script, the rule for outputs)
import files  # noqa: E402
import rsmclip  # noqa: E402  (its image reader defines "readable": what training can open, prepare accepts)
from data.loading import CACHE_FORMAT, CACHE_VERSION  # noqa: E402  (the cache this writes, training reads)
from data.manifest import (  # noqa: E402  (the format this writes)
    SPLITS,
    DataError,
    bad_relative,
    data_files,
    inside,
    load_manifest,
    not_utf8,
    read_json,
    scan_image_folder,
    write_jsonl,
)
from data.shards import write_shards  # noqa: E402
from files import listing  # noqa: E402  (the one way messages list offenders)

# Published sizes: (images, test images); None where the dataset publishes no standard split.
EXPECTED = {"rsicd": (10921, 1093), "rsitmd": (4743, 452), "ucm": (2100, 210), "sydney": (613, 58),
            "nwpu": (31500, None)}
# ----------------------------------------------------------------------------- reading and writing


def unreadable_images(paths: list[Path], what: str) -> dict[Path, str]:
    """Decode every image fully (a truncated file fails only there) -> {path: why} for the bad ones."""
    bad = {}
    for p in track(paths, description=f"checking {what}", transient=True, disable=len(paths) < 200):
        try:
            rsmclip.open_image(p)
        except rsmclip.ImageError as e:
            bad[p] = "missing" if not p.exists() else str(e).removeprefix(f"{p}: ")
    return bad


# ----------------------------------------------------------------------------- caption datasets


def parse_annotations(doc, source: Path) -> tuple[str, list[tuple[str, str, list[str]]]]:
    """-> (format, [(relative image path, split, raw captions)]) for the two public layouts.

    Karpathy style (RSICD, RSITMD, UCM, Sydney): {"images": [{"filename", "split", "sentences": [{"raw"}]}]},
    other fields ignored. NWPU-Captions: {category: [{"filename", "split", "raw", "raw_1" ... "raw_4"}]},
    images under <category>/<filename>."""
    if isinstance(doc, dict) and isinstance(doc.get("images"), list):
        items = []
        for n, im in enumerate(doc["images"]):
            im = im if isinstance(im, dict) else {}
            sentences = im.get("sentences")
            if not isinstance(im.get("filename"), str) or not isinstance(sentences, list) \
                    or not all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences):
                raise DataError(f"{source}: images[{n}] lacks filename/split/sentences[].raw (Karpathy)")
            items.append((im["filename"], im.get("split"), [s["raw"] for s in im["sentences"]]))
        return "karpathy", items
    if isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values()):
        items = []
        for category, records in doc.items():
            for n, r in enumerate(records):
                if not isinstance(r, dict) or not isinstance(r.get("filename"), str) or "raw" not in r:
                    raise DataError(f"{source}: {category}[{n}] lacks filename/raw (NWPU-Captions format)")
                raws = [r[k] for k in ["raw"] + [f"raw_{i}" for i in range(1, 10)] if k in r]
                if not all(isinstance(c, str) for c in raws):
                    raise DataError(f"{source}: {category}[{n}]: captions must be strings")
                items.append((f"{category}/{r['filename']}", r.get("split"), raws))
        return "nwpu", items
    raise DataError(f"{source}: unrecognised annotation format; expected Karpathy-style JSON "
                    "({\"images\": [...]}) or NWPU-Captions ({category: [records]})")


def count_report(name: str, splits: list[str]) -> list[str]:
    """Differences between an annotation file (the split of each image) and the published dataset, as
    report lines."""
    if name not in EXPECTED:
        return [f"no published counts known for {name!r} (known: {', '.join(EXPECTED)}): not checked"]
    images, test = EXPECTED[name]
    got_test = splits.count("test")
    diffs = [f"images {len(splits):,} (published {images:,})"] if len(splits) != images else []
    if test is not None and got_test != test:
        diffs.append(f"test images {got_test:,} (published {test:,})")
    if not diffs:
        return [f"counts match the published {name}: {images:,} images"
                + (f", {test:,} test" if test else "")]
    return [f"WARNING: this {name} annotation file differs from the published dataset: " + "; ".join(diffs)
            + ". Results on it are not comparable with published numbers."]


def build_captions(annotations: Path, images: Path, out: Path, dataset: Optional[str] = None,
                   drop_missing: bool = False, drop_empty: bool = False) -> list[str]:
    """Convert one annotation file; -> the report lines. DataError on anything not explicitly allowed."""
    cli.refuse_overwrite(out, [annotations])
    doc = read_json(annotations)
    fmt, items = parse_annotations(doc, annotations)
    if not items:  # an empty manifest would only fail later, in training
        raise DataError(f"{annotations}: lists no images: nothing to write")
    field = doc.get("dataset") if fmt == "karpathy" else "nwpu"
    if not dataset and field is not None and not isinstance(field, str):
        raise DataError(f'{annotations}: "dataset" is {field!r}, not a name: pass --dataset NAME')
    name = (dataset or field or annotations.stem).lower()
    prefix = inside(images, out.parent)
    if prefix is None:
        raise DataError(f"--images {images} is not inside {out.parent}, the folder of --out: image paths are "
                        "stored relative to the manifest. Write the manifest into the dataset folder (e.g. "
                        f"--out {images.parent / 'captions.jsonl'}) or link the images folder next to it.")
    if not images.is_dir():
        raise DataError(f"--images {images}: no such folder")
    report = [f"{annotations.name}: {fmt} format, dataset {name!r}"]
    report += count_report(name, [split for _, split, _ in items])

    unsafe = [f"{rel!r} ({bad_relative(rel)})" for rel, _, _ in items if bad_relative(rel)]
    if unsafe:
        raise DataError(f"{annotations}: {len(unsafe)} image paths are unsafe: {listing(unsafe)}")
    cli.refuse_overwrite(out, [images / rel for rel, _, _ in items])
    # ids are the image paths without their extension (NWPU's carry the category folder)
    items = [(str(PurePosixPath(rel).with_suffix("")), rel, split, caps) for rel, split, caps in items]
    dup = [i for i, n in Counter(i for i, _, _, _ in items).items() if n > 1]
    if dup:
        raise DataError(f"{annotations}: {len(dup)} images are listed more than once: {listing(dup)}")
    bad_split = [f"{rel} ({split!r})" for _, rel, split, _ in items if split not in SPLITS]
    if bad_split:
        raise DataError(f"{annotations}: {len(bad_split)} images have a split other than "
                        f"{'/'.join(SPLITS)}: {listing(bad_split)}")
    empty = [f"{rel} #{k}" for _, rel, _, caps in items for k, c in enumerate(caps) if not c.strip()]
    if empty and not drop_empty:
        raise DataError(f"{annotations}: {len(empty)} captions are empty: {listing(empty)}. "
                        "Pass --drop-empty to leave them out.")
    if empty:
        report.append(f"dropped {len(empty)} empty captions: {listing(empty)}")
    items = [(i, rel, split, [c.strip() for c in caps if c.strip()]) for i, rel, split, caps in items]
    captionless = [rel for _, rel, _, caps in items if not caps]
    if captionless and not drop_empty:
        raise DataError(f"{annotations}: {len(captionless)} images have no caption: {listing(captionless)}. "
                        "Pass --drop-empty to leave them out.")
    if captionless:
        report.append(f"dropped {len(captionless)} images left without captions: {listing(captionless)}")
        items = [it for it in items if it[3]]

    bad = unreadable_images([images / rel for _, rel, _, _ in items], f"{name} images")
    if bad:
        shown = listing([f"{p.relative_to(images).as_posix()} ({why})" for p, why in bad.items()])
        if not drop_missing:
            raise DataError(f"{len(bad)} of {len(items)} images are missing or unreadable under {images}: "
                            f"{shown}. Fix the paths, or pass --drop-missing to write a manifest without "
                            "them.")
        report.append(f"dropped {len(bad)} of {len(items)} images that are missing or unreadable: {shown}")
        items = [it for it in items if images / it[1] not in bad]
    if not items:
        raise DataError(f"{annotations}: no image left once the empty and the unreadable ones are dropped: "
                        "nothing to write")

    records = [{"id": f"{name}/{i}", "image": f"{prefix}/{rel}" if prefix != "." else rel, "split": split,
                "dataset": name, "captions": {"en": caps}} for i, rel, split, caps in items]
    write_jsonl(records, out)
    splits = Counter(r["split"] for r in records)
    report.append(f"wrote {out}: {len(records):,} images, {sum(len(r['captions']['en']) for r in records):,} "
                  f"captions (" + ", ".join(f"{s} {splits[s]:,}" for s in SPLITS) + ")")
    return report


# ----------------------------------------------------------------------------- classification trees


def build_labels(root: Path, out: Path, split: str = "test", drop_unreadable: bool = False) -> list[str]:
    """ImageFolder tree -> labels.jsonl ({"image", "label", "split"}); -> the report lines."""
    prefix = inside(root, out.parent)
    if prefix is None:
        raise DataError(f"{root} is not inside {out.parent}, the folder of --out: image paths are stored "
                        f"relative to it. Write them into the dataset folder (--out {root}/labels.jsonl).")
    if split not in SPLITS:
        raise DataError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    cli.refuse_overwrite(out, [])  # the images lie below the folder of --out: it cannot be one of them
    items, ignored = scan_image_folder(root)
    report = [f"{root}: {len(items):,} images in {len({lab for _, lab in items})} classes"]
    if ignored:
        report.append(f"ignored {len(ignored)} files that are not images: {listing(ignored)}")
    # a manifest is UTF-8 JSON: a name whose bytes are not UTF-8 cannot be stored in it, like an
    # unreadable image it stops the run unless --drop-unreadable
    misnamed = {root / rel: "file name not UTF-8: rename it" for rel, _ in items if not_utf8(rel)}
    bad = misnamed | unreadable_images([root / r for r, _ in items if root / r not in misnamed], "images")
    if bad:
        shown = listing([f"{p.relative_to(root).as_posix()} ({why})" for p, why in bad.items()])
        if not drop_unreadable:
            raise DataError(f"{len(bad)} of {len(items)} images are unreadable: {shown}. "
                            "Pass --drop-unreadable to leave them out.")
        report.append(f"dropped {len(bad)} unreadable images: {shown}")
        items = [(rel, lab) for rel, lab in items if root / rel not in bad]
        if not items:
            raise DataError(f"{root}: no readable image left: nothing to write")
    records = [{"image": rel if prefix == "." else f"{prefix}/{rel}", "label": lab, "split": split}
               for rel, lab in items]
    write_jsonl(records, out)
    per_class = Counter(r["label"] for r in records)
    report.append(f"wrote {out}: " + ", ".join(f"{lab} {n}" for lab, n in sorted(per_class.items())))
    return report


# ----------------------------------------------------------------------------- leakage: copies of test images

# A re-encoded or resized copy of an image keeps its low DCT frequencies. Measured on the UCM and RSSCN7
# samples: JPEG quality >= 50 and resizing to 0.5-2.3x changed at most 8 of the 64 hash bits and kept the
# 32x32 thumbnails' correlation >= 0.94, while different images differed in >= 14 bits and, among those
# within 16 bits, correlated <= 0.19. Both tests must pass, so a near-uniform tile (whose hash is noise)
# is never matched by chance; exact copies are caught by their bytes.
NEAR_BITS = 10
NEAR_CORR = 0.9
_k = np.arange(32)
DCT = np.cos(np.pi * (2 * _k[None, :] + 1) * _k[:, None] / 64)  # DCT-II basis, rows = frequencies


def fingerprint(path: Path) -> tuple[str, np.uint64, np.ndarray]:
    """-> (sha256 of the bytes, 64-bit perceptual hash, zero-mean unit-norm 32x32 grey thumbnail)."""
    try:
        image = rsmclip.open_image(path)
    except rsmclip.ImageError as e:
        raise DataError(f"{e} (re-run prepare on that dataset)") from None
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    low = (DCT @ grey @ DCT.T)[:8, :8].ravel()
    bits = np.packbits(low > np.median(low)).view(np.uint64)[0]
    thumb = grey.ravel() - grey.mean()
    norm = np.linalg.norm(thumb)
    return hashlib.sha256(path.read_bytes()).hexdigest(), bits, thumb / norm if norm > 1e-6 else thumb * 0


def merge(inputs: list[Path], excludes: list[Path], out: Path,
          exclude_splits: tuple = ("test",)) -> list[str]:
    """Train and val records of `inputs` -> one manifest at `out`, without any image that duplicates an
    image of the `exclude_splits` of `excludes`. Test records are never carried over: each dataset's test
    split is evaluated from its own manifest. -> the report lines."""
    cli.refuse_overwrite(out, [*inputs, *excludes])
    report = []
    test_ids, test_sha, hashes, thumbs = [], {}, [], []
    for m in excludes:
        recs = [r for r in load_manifest(m) if r["split"] in exclude_splits]
        for r in track(recs, description=f"hashing {m}", transient=True, disable=len(recs) < 200):
            sha, h, t = fingerprint(m.parent / r["image"])
            test_sha.setdefault(sha, r["id"])
            test_ids.append(r["id"])
            hashes.append(h)
            thumbs.append(t)
    if excludes and not test_ids:
        raise DataError(f"the --exclude manifests hold no {'/'.join(exclude_splits)} images: "
                        "nothing to check against")
    if not excludes:
        report.append("WARNING: no --exclude manifest given: no leakage check was made")
    hashes, thumbs = np.array(hashes, dtype=np.uint64), np.array(thumbs).reshape(len(test_ids), 32 * 32)

    merged, stats, pairs = [], defaultdict(Counter), []
    for m in inputs:
        prefix = inside(m.parent, out.parent)
        if prefix is None:
            raise DataError(f"{m} is not inside {out.parent}, the folder of --out: image paths are stored "
                            "relative to it. Write the merged manifest into a folder holding every dataset.")
        recs = load_manifest(m)
        captionless = [r["id"] for r in recs if not r["captions"]]
        if captionless:
            raise DataError(f"{m}: {len(captionless)} records have no captions: {listing(captionless)}")
        for r in track(recs, description=f"checking {m}", transient=True, disable=len(recs) < 200):
            name = r.get("dataset") or m.parent.name
            if r["split"] == "test":
                stats[name]["test (left out)"] += 1
                continue
            sha, h, t = fingerprint(m.parent / r["image"])
            if sha in test_sha:
                stats[name]["exact duplicates removed"] += 1
                pairs.append(f"{r['id']} = {test_sha[sha]}")
                continue
            near = np.flatnonzero(np.bitwise_count(hashes ^ h) <= NEAR_BITS)
            corr = thumbs[near] @ t
            if len(near) and corr.max() >= NEAR_CORR:
                stats[name]["near duplicates removed"] += 1
                pairs.append(f"{r['id']} ~ {test_ids[near[corr.argmax()]]} (correlation {corr.max():.3f})")
                continue
            stats[name][r["split"]] += 1
            merged.append({**r, "image": r["image"] if prefix == "." else f"{prefix}/{r['image']}"})
    dup = [i for i, n in Counter(r["id"] for r in merged).items() if n > 1]
    if dup:
        raise DataError(f"{len(dup)} ids occur in more than one input: {listing(dup)} (each dataset needs "
                        "its own --dataset name)")
    if not merged:
        raise DataError("no train or val records left to write")
    write_jsonl(merged, out)
    keys = ("train", "val", "exact duplicates removed", "near duplicates removed", "test (left out)")
    for name, c in stats.items():
        report.append(f"{name}: " + ", ".join(f"{k} {c[k]:,}" for k in keys))
    if pairs:
        report.append(f"removed as duplicates of test images: {listing(pairs)}")
    report.append(f"wrote {out}: {len(merged):,} records; checked against {len(test_ids):,} test images")
    return report


# ----------------------------------------------------------------------------- decoded image cache

MAX_SIDE = 512


def default_cache(manifest: Path, split: str = "train") -> Path:
    return manifest.with_name(f"{manifest.stem}.{split}.imagecache.safetensors")


def build_cache(manifest: Path, out: Optional[Path] = None, split: str = "train",
                max_side: int = MAX_SIDE) -> list[str]:
    """Decode every image of `split` once into one cache file (written atomically); -> the report lines."""
    if split not in SPLITS:
        raise DataError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    if max_side < 32:
        raise DataError(f"--max-side {max_side}: at least 32 pixels (the cache feeds 224-px crops)")
    out = out or default_cache(manifest, split)
    cli.refuse_overwrite(out, data_files(manifest))
    records = [r for r in load_manifest(manifest) if r["split"] == split]
    digest = files.file_sha256(manifest)
    if not records:
        raise DataError(f"{manifest}: no {split} images to cache")
    arrays, bad, resized, stamps, hashes = [], [], 0, [], []
    for r in track(records, description=f"decoding {split} images", transient=True,
                   disable=len(records) < 200):
        path = manifest.parent / r["image"]
        try:
            stamps.append(files.file_stamp(path))  # before reading: a change while it is read shows later
            hashes.append(files.file_sha256(path))
            image = rsmclip.open_image(path)
        except (rsmclip.ImageError, OSError) as e:
            bad.append(str(e) if isinstance(e, rsmclip.ImageError) else f"{path}: {e.strerror}")
            continue
        if max(image.size) > max_side:  # PIL's rule for the shorter side: round
            scale = max_side / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.BICUBIC)
            resized += 1
        arrays.append(np.asarray(image))
    if bad:
        raise DataError(f"{len(bad)} of {len(records)} {split} images are unreadable: {listing(bad)}. Fix "
                        "them or rewrite the manifest without them (prepare captions --drop-missing)")
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    tensors = {"pixels": torch.from_numpy(np.concatenate([a.ravel() for a in arrays])),
               "offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)])),
               "shapes": torch.tensor([a.shape[:2] for a in arrays], dtype=torch.int32)}
    meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "manifest_sha256": digest, "split": split,
            "max_side": str(max_side), "images": json.dumps([r["image"] for r in records]),
            "stamps": json.dumps(stamps), "sha256": json.dumps(hashes)}
    files.atomic_save(tensors, out, meta)
    return [f"wrote {out}: {len(arrays):,} {split} images of {manifest}, {sizes.sum() / 2 ** 20:,.0f} MiB "
            f"of pixels ({resized} downscaled to a longer side of {max_side})"]


# ----------------------------------------------------------------------------- command line

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert public remote-sensing datasets into rsmclip manifests (see data/README.md).")


@app.command()
def captions(annotations: Path = typer.Argument(..., help="dataset_*.json (Karpathy style or NWPU-Captions)"),
             images: Path = typer.Option(..., help="folder holding the images the annotations name"),
             out: Path = typer.Option(..., help="captions.jsonl to write, in a folder that holds --images"),
             dataset: Optional[str] = typer.Option(None, help="name for ids and count checks (default: the "
                                                   "file's 'dataset' field, 'nwpu', or the file name)"),
             drop_missing: bool = typer.Option(False, help="leave out missing/unreadable images, reported"),
             drop_empty: bool = typer.Option(False, help="leave out empty captions, with a report")):
    """Caption annotations -> captions.jsonl (English captions, text kept exactly)."""
    print("\n".join(build_captions(annotations, images, out, dataset, drop_missing, drop_empty)))


@app.command()
def classes(root: Path = typer.Argument(..., help="ImageFolder tree: ROOT/<class>/<image>"),
            out: Path = typer.Option(..., help="labels.jsonl to write, in a folder that holds ROOT"),
            split: str = typer.Option("test", help="split written for every image (zero-shot uses all)"),
            drop_unreadable: bool = typer.Option(False, help="leave out unreadable images, with a report")):
    """Classification tree -> labels.jsonl, labels = class folder names."""
    print("\n".join(build_labels(root, out, split, drop_unreadable)))


@app.command("merge")
def merge_cmd(manifests: list[Path] = typer.Argument(..., help="captions.jsonl files to merge"),
              exclude: list[Path] = typer.Option([], help="manifest whose test images must not appear "
                                                 "(repeat the option for several)"),
              out: Path = typer.Option(..., help="merged manifest, in a folder that holds every input"),
              exclude_splits: str = typer.Option("test", help="comma-separated splits of --exclude")):
    """Merge train/val records, removing exact and near duplicates of the excluded test images."""
    print("\n".join(merge(manifests, exclude, out, tuple(exclude_splits.split(",")))))


@app.command("cache")
def cache_cmd(manifest: Path = typer.Argument(..., help="captions.jsonl whose images to decode"),
              out: Optional[Path] = typer.Option(None, help="cache file (default: beside the manifest, "
                                                 "MANIFEST_STEM.SPLIT.imagecache.safetensors)"),
              split: str = typer.Option("train", help="the split to cache (training reads train)"),
              max_side: int = typer.Option(MAX_SIDE,
                                           help="longer sides above this are downscaled (bicubic)")):
    """Decode the images of one split once into a memory-mapped uint8 cache (train.py --image-cache)."""
    print("\n".join(build_cache(manifest, out, split, max_side)))


@app.command("shards")
def shards_cmd(manifest: Path = typer.Argument(..., help="captions.jsonl whose split to write"),
               out: Path = typer.Option(..., help="folder for NAME-000000.tar ... and shards.json"),
               split: str = typer.Option("train", help="the split to write"),
               per_shard: int = typer.Option(1000, help="samples per shard"),
               max_side: int = typer.Option(MAX_SIDE, help="longer sides above this are downscaled once "
                                            "(re-encoded); smaller images keep their own bytes"),
               name: Optional[str] = typer.Option(None, help="shard name prefix (default: the split)")):
    """Write one split as WebDataset tar shards (train.py --data 'DIR/NAME-{000000..000099}.tar'); a
    stopped run continues where it stopped."""
    print("\n".join(write_shards(manifest, out, split, per_shard, max_side, name)))


def main():
    cli.run_cli(app)


if __name__ == "__main__":
    main()
