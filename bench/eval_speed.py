"""Benchmark of retrieval evaluation: 10,000 images x 5 captions with the tiny model, broken down into
image decoding, image encoding, text encoding and scoring, then end to end; and how much the tie rule
moves recall on a real caption set.

    python -m bench.eval_speed speed [--images 10000] [--workers 2] [--device cpu] [--out bench_eval.json]
    python -m bench.eval_speed ties --data datasets/ucm/captions.jsonl --split val \
        --tokenizer weights/sentencepiece.bpe.model

The images are 256x256 JPEGs (the size of UCM/RSITMD; RSICD's are 224), made once from the demo's
renderer into --workdir: 200 distinct scenes written round-robin, as decoding cost does not depend on
content. The model is the untrained tiny preset (speed does not depend on the weights).
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import typer
from PIL import Image

import cli
import eval as ev
import rsmclip
from bench.openclip_oracle import fill_with_noise  # the tests' seeded-noise weights
from data import demo
from data.manifest import load_manifest, write_jsonl


def make_bench_set(folder: Path, n: int) -> Path:
    manifest = folder / f"captions-{n}.jsonl"
    if manifest.is_file():
        return manifest
    (folder / "images").mkdir(parents=True, exist_ok=True)
    scenes, blobs = [], []
    for i in range(200):
        rng = np.random.default_rng([11, i])
        scene = demo.random_scene(rng)
        buf = io.BytesIO()
        image = demo.render(scene, rng).resize((256, 256), Image.Resampling.BICUBIC)
        image.save(buf, format="JPEG", quality=90)
        scenes.append(scene)
        blobs.append(buf.getvalue())
    records = []
    for i in range(n):
        (folder / "images" / f"{i:05d}.jpg").write_bytes(blobs[i % 200])
        records.append({"id": f"bench/{i}", "image": f"images/{i:05d}.jpg", "split": "test",
                        "captions": {"en": demo.captions(scenes[i % 200], "en")}})
    write_jsonl(records, manifest)
    return manifest


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def speed(images: int = typer.Option(10000, help="number of images (5 captions each)"),
          batch_size: int = typer.Option(64, help="images per forward pass"),
          workers: int = typer.Option(2, help="decoding processes, end to end"),
          device: str = cli.DEVICE,
          workdir: Path = typer.Option(Path(tempfile.gettempdir()) / "rsmclip-bench-eval",
                                       help="folder for the generated images (kept for the next run)"),
          out: Path = typer.Option(None, help="also write the numbers as JSON")):
    manifest = make_bench_set(workdir, images)
    spm = demo.make_demo(ev.DEMO_DIR).parent / "spm.model"
    cfg = rsmclip.PRESETS["tiny"]
    torch.manual_seed(0)
    model = rsmclip.CLIP(cfg).to(device).eval()
    tok, pp = rsmclip.Tokenizer(spm, cfg.context_length), rsmclip.Preprocess(cfg.vision.image_size)
    records = load_manifest(manifest)
    paths = [manifest.parent / r["image"] for r in records]
    texts = [c for r in records for c in r["captions"]["en"]]
    owner = torch.tensor([i for i, r in enumerate(records) for _ in r["captions"]["en"]])
    print(f"{len(paths):,} images, {len(texts):,} captions, tiny model, device {device}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")

    rows = {}
    # stage by stage, one process: each number is that stage's own cost
    _, rows["decode + preprocess (1 process)"] = timed(
        lambda: [None for _ in rsmclip.image_batches(paths, pp, batch_size, workers=0)])
    pixels = torch.stack([pp(p) for p in paths[:batch_size]]).to(device)
    with torch.inference_mode():
        batches = range(len(paths) // batch_size)
        _, rows["encode images"] = timed(lambda: [model.encode_image(pixels) for _ in batches])
        starts = range(0, len(texts), 256)
        _, rows["tokenize captions"] = timed(lambda: [tok(texts[i:i + 256]) for i in starts])
    text_feats, rows["tokenize + encode captions"] = timed(
        lambda: rsmclip.embed_texts(model, tok, texts, 256, device))
    image_feats = torch.nn.functional.normalize(torch.randn(len(paths), cfg.embed_dim, device=device), dim=-1)
    _, rows["scoring (R@K both ways)"] = timed(lambda: ev.retrieval_metrics(image_feats, text_feats, owner))
    # end to end, as `python eval.py retrieval` runs it
    for w in sorted({0, workers}):
        _, rows[f"end to end, {w} decoding workers"] = timed(
            lambda: ev.evaluate_retrieval(model, tok, pp, manifest, "test", ["en"], batch_size, device, w))

    for name, seconds in rows.items():
        print(f"{name:<36} {seconds:8.2f} s")
    if out:
        cli.write_text(out, json.dumps({"images": len(paths), "captions": len(texts), "device": device,
                                        "seconds": rows}, indent=2) + "\n")


@app.command()
def ties(data: Path = typer.Option(..., help="captions.jsonl"),
         split: str = typer.Option("val", help="the split to measure (never tune on test)"),
         tokenizer: Path = typer.Option(..., help="the XLM-R SentencePiece model"),
         seed: int = typer.Option(0, help="seed of the noise written into every parameter"),
         device: str = cli.DEVICE):
    """Repeated captions and the three tie rules, on one split, with seeded-noise xlmr-b32 weights (what a
    checkpoint sees before it learns anything; trained checkpoints tie on the same repeated captions)."""
    records = [r for r in load_manifest(data) if r["split"] == split]
    texts = [c for r in records for c in r["captions"]["en"]]
    owners = {}
    for i, r in enumerate(records):
        for c in set(r["captions"]["en"]):
            owners.setdefault(c, set()).add(i)
    shared = sum(1 for c in texts if len(owners[c]) > 1)
    widest = max(owners, key=lambda c: len(owners[c]))
    print(f"{data} {split}: {len(records)} images, {len(texts)} captions, {len(owners)} distinct; {shared} "
          f"captions are shared with another image; the widest, {widest!r}, belongs to {len(owners[widest])}")
    cfg = rsmclip.PRESETS["xlmr-b32"]
    model = fill_with_noise(rsmclip.CLIP(cfg), seed).to(device).eval()
    tok = rsmclip.Tokenizer(tokenizer, cfg.context_length)
    result = ev.evaluate_retrieval(model, tok, rsmclip.Preprocess(cfg.vision.image_size), data, split, ["en"],
                                   device=device, workers=0)["en"]
    print(f"queries whose match ties with a wrong candidate: i2t {result['tied_queries']['i2t']}, "
          f"t2i {result['tied_queries']['t2i']}")
    print("| tie rule | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | mR |\n"
          "|---|---|---|---|---|---|---|---|")
    for rule in ev.TIE_RULES:
        r = result["by_tie_rule"][rule]
        print(f"| {rule} | " + " | ".join(f"{r[d][f'R@{k}']:.2f}" for d in ("i2t", "t2i") for k in ev.KS)
              + f" | {r['mR']:.2f} |")
    print(f"chance mR {result['chance_mR']:.2f}")


if __name__ == "__main__":
    cli.run_cli(app)
