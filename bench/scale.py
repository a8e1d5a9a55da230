"""Loader memory at scale: the demo generator's scenes (64 px, captions in ten languages) as loose files with
a manifest and as tar shards, at two sizes; train.py's loader (its dataset, sampler and DataLoader, PIL
multi-crop views of the demo recipe, no model) streams the same steps from each; the peak resident memory
(VmHWM) and private memory of the main process and of each loader process are printed and written as JSON.

    python -m bench.scale run --sizes 20000,200000 --work /tmp/scale   # time and disk: README, "Memory"
    python -m bench.scale fingerprint --size 200000 --work /tmp/scale  # the cost of a resume's shard check

The data are generated once into WORK and reused by later calls. Each measurement runs in a process of its
own, so every peak is that measurement's. Memory that grows with the number of samples is what the
manifest path keeps per image (the records, held by the main process and seen by every loader process);
the shard path keeps the shard list and, per loader process, one or two blocks of --shuffle-buffer samples.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402
import files  # noqa: E402
import rsmclip  # noqa: E402
import train  # noqa: E402
from data import demo, loading  # noqa: E402
from data import shards as shardlib  # noqa: E402
from data.manifest import LANGS  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def make_data(folder: Path, n: int) -> Path:
    """folder/captions.jsonl with n train scenes (the demo's generator, images as PNG files) and its
    tokenizer; skipped when already complete."""
    manifest = folder / "captions.jsonl"
    if manifest.is_file():
        return manifest
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        rng = np.random.default_rng([demo.SEED, 10 ** 7 + i])
        scene = demo.random_scene(rng)
        path = folder / "images" / f"{i:07d}.png"
        if not path.exists():
            demo.render(scene, rng).save(path, format="PNG")
        records.append({"id": f"scale/{i:07d}", "image": f"images/{i:07d}.png", "split": "train",
                        "dataset": "scale",
                        "captions": {lang: demo.captions(scene, lang) for lang in demo.TEXT}})
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    files.atomic_write(manifest, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return manifest


def memory(pid: int) -> dict:
    """Peak resident (VmHWM) and, now, private (not shared with another process) memory of a process, MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    private = sum(int(line.split()[1]) for line in rollup
                  if line.startswith(("Private_Clean", "Private_Dirty")))
    return {"peak_rss_mib": round(peak / 1024, 1), "private_mib": round(private / 1024, 1)}


def ready(folder: Path, n: int) -> Path:
    """folder/captions.jsonl (make_data), its tokenizer and its shards (1,000 a shard), each made once."""
    start = time.perf_counter()
    manifest = make_data(folder, n)
    if not (folder / "spm.model").is_file():
        sentences = [c for line in open(manifest, encoding="utf-8")
                     for caps in json.loads(line)["captions"].values() for c in caps][:200000]
        (folder / "spm.model").write_bytes(demo.train_tokenizer(sentences))
    if not (folder / "shards" / shardlib.INDEX).is_file() or not json.loads(
            (folder / "shards" / shardlib.INDEX).read_text()).get("complete"):
        shardlib.write_shards(manifest, folder / "shards", per_shard=1000)
    print(f"{n:,} samples ready in {folder} ({time.perf_counter() - start:.0f} s)", flush=True)
    return manifest


@app.command(hidden=True)
def measure(kind: str, data: str, tokenizer: Path, steps: int, workers: int, batch: int):
    """One measurement in this process: train.py's loader for `steps` steps; prints one JSON line."""
    torch.set_num_threads(1)
    cfg = replace(train.RECIPES["demo"], data=[data], langs=",".join(LANGS), workers=workers,
                  batch_size=batch)
    data = loading.open_data(cfg, loading.World())
    loader = loading.build_loader(data, cfg, loading.World(), 64, rsmclip.Tokenizer(tokenizer), 0, steps)
    samples = data.size
    start = time.perf_counter()
    it = iter(loader)
    for step in range(steps):
        batch_ = next(it)
        assert "fatal" not in batch_ and not batch_["failures"]
        if step == steps - 1:  # the loader processes are alive until the iterator ends
            children = [int(c) for t in Path(f"/proc/{os.getpid()}/task").iterdir()
                        for c in (t / "children").read_text().split()]
            per_worker = [memory(pid) for pid in children]
    seconds = time.perf_counter() - start
    print(json.dumps({"kind": kind, "samples": samples, "steps": steps, "batch": batch, "workers": workers,
                      "samples_per_s": round(steps * batch / seconds, 1), "main": memory(os.getpid()),
                      "loader_processes": per_worker}))


@app.command()
def run(sizes: str = typer.Option("20000,200000", help="dataset sizes (samples), comma-separated"),
        work: Path = typer.Option(Path("/tmp/rsmclip-scale"), help="folder for the generated data"),
        steps: int = typer.Option(300, help="loader steps per measurement"),
        workers: int = typer.Option(2, help="loader processes"),
        batch: int = typer.Option(32, help="samples per step"),
        out: Path = typer.Option(Path("scale.json"), help="the results, as JSON")):
    """Generate (once), write shards (once), measure each path at each size."""
    rows = []
    for n in map(int, sizes.split(",")):
        folder = work / f"n{n}"
        manifest = ready(folder, n)
        for kind, data in (("manifest", str(manifest)), ("shards", str(folder / "shards"))):
            result = subprocess.run([sys.executable, "-m", "bench.scale", "measure", kind, data,
                                     str(folder / "spm.model"), str(steps), str(workers), str(batch)],
                                    capture_output=True, text=True, cwd=ROOT)
            if result.returncode:
                raise rsmclip.RsmclipError(f"measurement {kind} at {n} failed: {result.stderr[-2000:]}")
            row = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append(row)
            loaders = ", ".join(f"{w['peak_rss_mib']:.0f} / {w['private_mib']:.0f}"
                                for w in row["loader_processes"])
            print(f"{kind:9} {n:>8,} samples: main {row['main']['peak_rss_mib']:.0f} MiB peak RSS / "
                  f"{row['main']['private_mib']:.0f} private; loader processes (peak RSS / private, MiB) "
                  f"{loaders}; {row['samples_per_s']:.0f} samples/s", flush=True)
    text = json.dumps({"cpu_cores": os.cpu_count(), "torch": torch.__version__, "rows": rows}, indent=1)
    out.write_text(text + "\n")
    print(f"wrote {out}")


@app.command()
def fingerprint(size: int = typer.Option(200000, help="samples"),
                work: Path = typer.Option(Path("/tmp/rsmclip-scale"), help="folder for the generated data"),
                out: Path = typer.Option(Path("fingerprint.json"), help="the results, as JSON")):
    """What a resume's check of the shards' bytes costs (data/shards.py: check_same_shards, content_digest),
    beside what opening the shards costs anyway: the same files as ours (shards.json beside them) and as
    another's (hard links without it: their headers are read). Page-cached files, one thread, best of 3."""
    torch.set_num_threads(1)
    folder = work / f"n{size}"
    ready(folder, size)
    others = folder / "others"
    if not others.is_dir():
        others.mkdir()
        for path in sorted((folder / "shards").glob("*.tar")):
            os.link(path, others / path.name)
    ours = shardlib.open_shards([str(folder / "shards")])
    state = shardlib.stream_state(ours, shardlib.Streams(ours.counts, 1, 0, 1000), 1, 32, 0)
    copied = state | {"files": [f | {"stamp": [0, 0, 0, 0]} for f in state["files"]]}
    theirs = sorted(others.glob("*.tar"))
    scans = [shardlib.scan(p) for p in theirs]
    steps = {  # what each costs; the first two are what a start does anyway
        "ours: open (shards.json, file sizes)": lambda: shardlib.open_shards([str(folder / "shards")]),
        "others': open, headers read (scan)": lambda: [shardlib.scan(p) for p in theirs],
        "others': content digests (the fingerprint)": lambda: [
            shardlib.content_digest(p, s) for p, s in zip(theirs, scans)],
        "ours: resume check, stamps unchanged": lambda: shardlib.check_same_shards(ours, state),
        "ours: resume check, every stamp new (all hashed)": lambda: shardlib.check_same_shards(ours, copied),
        "whole SHA-256 of every shard (for comparison)": lambda: [files.file_sha256(p) for p in ours.paths]}
    [files.file_sha256(p) for p in ours.paths]  # into the page cache
    rows = []
    for name, step in steps.items():
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):  # the check's note on hashed files
                step()
            seconds.append(time.perf_counter() - start)
        rows.append({"step": name, "seconds": round(min(seconds), 4)})
    scan = rows[1]["seconds"]
    for row in rows:
        row["vs_header_scan"] = round(row["seconds"] / scan, 4)
        print(f"{row['step']:58} {row['seconds']:9.4f} s  {row['vs_header_scan']:8.4f} x the header scan")
    total = sum(p.stat().st_size for p in ours.paths)
    text = json.dumps({"samples": size, "shards": len(ours.paths), "bytes": total,
                       "cpu_cores": os.cpu_count(), "torch": torch.__version__, "rows": rows}, indent=1)
    out.write_text(text + "\n")
    print(f"{size:,} samples in {len(ours.paths)} shards, {total / 2 ** 30:.2f} GiB; wrote {out}")


if __name__ == "__main__":
    cli.run_cli(app)
