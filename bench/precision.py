"""Precision on a CPU: our fp32, bf16 and int8 encoders against open_clip's fp32 and bf16 autocast on the same
weights, what each precision changes in the results, and the end-to-end jobs it shortens (docs/internals.md,
"Fast on a CPU").

    python -m bench.precision speed       # img/s and captions/s side by side, interleaved; peak memory
    python -m bench.precision equality    # cosines to fp32 (1,890 UCM images, seeded full-size weights);
                                          # top-10 overlap and mR (tiny model trained on UCM train, val)
    python -m bench.precision endtoend    # a 2,000-image search and eval.py retrieval, fp32 against auto

Pin a measurement to one core (`taskset -c 0`) when the machine is shared: every line says which cores and
threads it ran on, the CPU and its flags, and the load average around it.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import typer

import cli
import eval as ev
import rsmclip
from bench.ablation import COMMON, prepare, train_once
from bench.openclip_oracle import fill_with_noise, make_openclip_model, paired_models
from bench.peers import PeakMemory, caption_lengths, make_ids
from data.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
UCM = SHARED / "datasets/ucm_captions_trainval"
XLMR = SHARED / "assets/xlmr/sentencepiece.bpe.model"
VARIANTS = ("open_clip fp32", "open_clip bf16 autocast", "rsmclip fp32", "rsmclip bf16", "rsmclip int8")
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")  # what decides the kernels

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)


@app.callback()
def benchmarks():
    """Precision on a CPU against open_clip (docs/internals.md, 'Fast on a CPU')."""


# ----------------------------------------------------------------------------- the machine

def machine() -> dict:
    """The CPU as Linux names it, the flags that decide the bf16 and int8 kernels, the cores this process
    may use, the threads torch uses, and the load average (other processes on the same cores)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    flags = (re.search(r"^flags\s*:(.*)$", text, re.M) or [""] * 2)[1].split()
    return {"cpu": name[1] if name else "unknown", "cores": os.cpu_count(),
            "native_bf16": rsmclip.native_bf16(), "flags": [f for f in FLAGS if f in flags],
            "affinity": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__}


def machine_line(m: dict) -> str:
    return (f"{m['cpu']}, {m['cores']} cores; flags {' '.join(m['flags']) or 'none of ' + ' '.join(FLAGS)}; "
            f"native bf16 {m['native_bf16']}; this process on cores {m['affinity']}, {m['threads']} threads; "
            f"load average {m['load_average']}; torch {m['torch']}")


# ----------------------------------------------------------------------------- the encoders

def encoders(name: str, ours: Optional[rsmclip.CLIP], theirs, keep: bool = True) -> tuple:
    """(encode images, encode texts, seconds set_precision took) of one variant: open_clip's model as a peer
    user runs it (fp32, or under torch.autocast("cpu", bf16), its best without work), ours made by
    set_precision from fp32 (from a copy of `ours` if keep)."""
    if name.startswith("open_clip"):
        autocast = torch.autocast("cpu", torch.bfloat16, enabled=name.endswith("autocast"))

        def run(fn):
            def call(x):
                with torch.inference_mode(), autocast:
                    return fn(x)
            return call
        return run(theirs.encode_image), run(theirs.encode_text), 0.0
    model = copy.deepcopy(ours) if keep and name != "rsmclip fp32" else ours
    start = time.perf_counter()
    model = rsmclip.set_precision(model, name.split()[1])
    made = time.perf_counter() - start
    return torch.inference_mode()(model.encode_image), torch.inference_mode()(model.encode_text), made


def inputs(cfg: rsmclip.CLIPConfig, batch: int, captions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (seeded noise: speed does not depend on the values) and token ids of real UCM-Captions
    lengths in the XLM-R vocabulary (5-30-word lengths where ../shared is absent)."""
    g = torch.Generator().manual_seed(0)
    size = cfg.vision.image_size
    real = UCM.is_dir() and XLMR.is_file()
    lengths = caption_lengths(captions, 0, UCM / "dataset_ucm_trainval.json" if real else None,
                              XLMR if real else None)
    return torch.randn(batch, 3, size, size, generator=g), make_ids(lengths, cfg.text.vocab_size)


def memory_of(name: str, preset: str, batch: int, captions: int, threads: int) -> dict:
    """A variant's memory in a process of its own: resident once built (its weights, Python and torch), and
    the peak while it encodes one batch of images and one of captions."""
    command = [sys.executable, "-m", "bench.precision", "speed", "--only", name, "--preset", preset,
               "--batch-size", str(batch), "--captions", str(captions), "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise rsmclip.RsmclipError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def one_variant(name: str, cfg: rsmclip.CLIPConfig, batch: int, captions: int) -> dict:
    """What memory_of runs in its own process: build `name` alone (ours from fp32, cast in place), encode."""
    if name.startswith("open_clip"):
        ours, theirs = None, make_openclip_model(cfg).eval()
    else:
        ours, theirs = fill_with_noise(rsmclip.CLIP(cfg)).eval(), None
    image, text, _ = encoders(name, ours, theirs, keep=False)
    ours = theirs = None
    pixels, ids = inputs(cfg, batch, captions)
    with PeakMemory("cpu") as mem:
        image(pixels)
        text(ids)
    return {"resident_mib": mem.base, "peak_mib": mem.base + mem.peak}


# ----------------------------------------------------------------------------- speed

def interleaved(calls: dict, arg, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions taken in turn (the first one of each round moves
    on), so that a busy neighbour slows every variant alike; one warm-up call each."""
    for fn in calls.values():
        fn(arg)
    times = {name: [] for name in calls}
    names = list(calls)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            calls[name](arg)
            times[name].append(time.perf_counter() - start)
    return times


def rates(times: dict[str, list[float]], n: int, peers: tuple[str, str]) -> dict:
    """Per variant: median items/s, the slowest and fastest call's rate, each call's seconds, and its time as
    a share of each peer's (below 1: faster): the median over rounds of the two calls' ratio in one round,
    which a load that changes from round to round moves less than a ratio of medians."""
    return {name: {"per_s": n / statistics.median(t), "slowest": n / max(t), "fastest": n / min(t),
                   "seconds": t, **{f"time_vs_{p}": statistics.median(a / b for a, b in zip(t, times[p]))
                                    for p in peers if p in times}}
            for name, t in times.items()}


@app.command()
def speed(preset: str = typer.Option("xlmr-b32", help="model preset (tiny for a quick check)"),
          batch_size: int = typer.Option(64, min=1, help="images per call (224 px for xlmr-b32)"),
          captions: int = typer.Option(256, min=1, help="captions per call (real UCM-Captions lengths)"),
          repeats: int = typer.Option(7, min=1, help="timed calls per variant (interleaved)"),
          threads: int = typer.Option(0, min=0, help="torch threads (0: torch's default)"),
          memory: bool = typer.Option(True, help="peak memory of each variant, each in its own process"),
          compiled: bool = typer.Option(False, "--compile", help="also our bf16 image tower under "
                                        "torch.compile (its compile time is reported)"),
          sweep: str = typer.Option("", help="comma-separated batch sizes: our bf16 and int8 image encoding "
                                    "at each, for each thread count from 1 to the cores"),
          variants: str = typer.Option(",".join(VARIANTS), help="comma-separated variants to run"),
          quick: bool = typer.Option(False, help="the tiny preset, 8 images, 16 captions, 2 calls: checks "
                                     "the script, not the speed"),
          only: Optional[str] = typer.Option(None, help="(internal) build this variant alone and print its "
                                             "memory as JSON"),
          out: Optional[Path] = typer.Option(None, help="also write the results as JSON")):
    """Image encoding img/s and text encoding captions/s: open_clip fp32 and bf16 autocast, ours in fp32,
    bf16, int8; same seeded weights, one process, interleaved repeats; then peak memory per variant."""
    if threads:
        torch.set_num_threads(threads)
    if quick:
        preset, batch_size, captions, repeats = "tiny", 8, 16, 2
    cfg = rsmclip.PRESETS[preset]
    if only:
        print(json.dumps(one_variant(only, cfg, batch_size, captions)))
        return
    cli.refuse_overwrite(out, [])
    report = {"machine": machine(), "preset": preset, "batch": batch_size, "captions": captions,
              "repeats": repeats}
    print(machine_line(report["machine"]), flush=True)
    ours, theirs = paired_models(cfg)
    calls, report["made_s"] = {}, {}
    chosen = [v.strip() for v in variants.split(",")]
    if unknown := set(chosen) - set(VARIANTS):
        raise rsmclip.RsmclipError(f"--variants: unknown {', '.join(sorted(unknown))}; choose from "
                                   f"{', '.join(VARIANTS)}")
    for name in chosen:
        *calls[name], report["made_s"][name] = encoders(name, ours, theirs)
    pixels, ids = inputs(cfg, batch_size, captions)
    if compiled:
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # its CUDA_HOME notice
        import torch._inductor.config as inductor  # torch's own compiler, needed here only

        inductor.freezing = True  # inference: the weights become constants, prepacked for oneDNN
        bf16 = rsmclip.set_precision(copy.deepcopy(ours), "bf16")
        tower = torch.compile(bf16.visual, dynamic=False)
        start = time.perf_counter()
        with torch.inference_mode():
            tower(pixels.bfloat16())  # the compilation, at this batch size
        report["compile_s"] = time.perf_counter() - start
        print(f"torch.compile of our bf16 image tower: {report['compile_s']:.1f} s", flush=True)
        calls["rsmclip bf16 compiled"] = [torch.inference_mode()(lambda x: tower(x.bfloat16())), None]
    peers = ("open_clip fp32", "open_clip bf16 autocast")
    report["image"] = rates(interleaved({k: v[0] for k, v in calls.items()}, pixels, repeats), batch_size,
                            peers)
    report["text"] = rates(interleaved({k: v[1] for k, v in calls.items() if v[1]}, ids, repeats), captions,
                           peers)
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if sweep:
        report["sweep"] = sweep_rows(calls, pixels, [int(b) for b in sweep.split(",")], repeats)
    calls = ours = theirs = None
    if memory:
        report["memory"] = {name: memory_of(name, preset, batch_size, captions, threads) for name in chosen}
    print(speed_table(report))
    if out:
        cli.write_text(out, json.dumps(report, indent=2) + "\n")


def sweep_rows(calls: dict, pixels: torch.Tensor, sizes: list[int], repeats: int) -> list[dict]:
    """Our bf16 and int8 image rates at each batch size and thread count (the same images, cut or tiled)."""
    rows = []
    for threads in range(1, len(os.sched_getaffinity(0)) + 1):
        torch.set_num_threads(threads)
        for size in sizes:
            batch = pixels.repeat(-(-size // len(pixels)), 1, 1, 1)[:size]
            times = interleaved({k: calls[k][0] for k in ("rsmclip bf16", "rsmclip int8")}, batch, repeats)
            rows += [{"variant": k, "threads": threads, "batch": size, "per_s": size / statistics.median(t)}
                     for k, t in times.items()]
            print(f"sweep: {threads} threads, batch {size}: " + ", ".join(
                f"{r['variant']} {r['per_s']:.1f} img/s" for r in rows[-2:]), flush=True)
    return rows


def speed_table(report: dict) -> str:
    def cell(row: Optional[dict], key: str, form: str = ".3f") -> str:
        return format(row[key], form) if row and key in row else "–"

    def rate(row: Optional[dict]) -> str:
        return f"{row['per_s']:.1f} [{row['slowest']:.1f}, {row['fastest']:.1f}]" if row else "–"

    lines = [f"{report['preset']}, images: batch {report['batch']}; captions: batch {report['captions']} of "
             f"real lengths; median of {report['repeats']} interleaved calls [slowest, fastest]; time "
             "shares: median of the ratios within a round",
             "| variant | img/s | time / open_clip fp32 | time / open_clip bf16 autocast | captions/s | "
             "time / open_clip fp32 | peak MiB | resident MiB |", "|---|" + "---|" * 7]
    for name, img in report["image"].items():
        txt, mem = report["text"].get(name), report.get("memory", {}).get(name)
        lines.append(f"| {name} | {rate(img)} | {cell(img, 'time_vs_open_clip fp32')} | "
                     f"{cell(img, 'time_vs_open_clip bf16 autocast')} | {rate(txt)} | "
                     f"{cell(txt, 'time_vs_open_clip fp32')} | {cell(mem, 'peak_mib', '.0f')} | "
                     f"{cell(mem, 'resident_mib', '.0f')} |")
    if "compile_s" in report:
        lines.append(f"torch.compile of the bf16 image tower: {report['compile_s']:.1f} s")
    made = ", ".join(f"{k.split()[1]} {v:.1f} s" for k, v in report["made_s"].items() if "rsmclip" in k)
    lines.append(f"set_precision from fp32: {made}; load average after: {report['load_average_after']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- equality

PRECISIONS = ("fp32", "bf16", "int8")


def cosines(a: torch.Tensor, b: torch.Tensor) -> dict:
    c = F.cosine_similarity(a.double(), b.double(), dim=-1)
    return {"min": c.min().item(), "mean": c.mean().item()}


def encode_each(model: rsmclip.CLIP, pixels: torch.Tensor, texts: list[str], tokenizer) -> tuple:
    """[N, D] image and [M, D] text embeddings (normalised, fp32) of the decoded images and the texts."""
    with torch.inference_mode():
        images = torch.cat([model.encode_image(pixels[i:i + 64], normalize=True).float()
                            for i in range(0, len(pixels), 64)])
    return images, rsmclip.embed_texts(model, tokenizer, texts)


def top10_overlap(ref_images, ref_texts, images, texts) -> float:
    """Mean share of text->image top-10 lists kept: |top10_fp32 & top10_precision| / 10 over captions."""
    a = (ref_texts @ ref_images.T).topk(10, dim=1).indices
    b = (texts @ images.T).topk(10, dim=1).indices
    return (a[:, :, None] == b[:, None, :]).any(2).double().mean().item() * 100


@app.command()
def equality(ucm: Path = typer.Option(UCM, help="UCM-Captions train/val: its Karpathy file and images/"),
             work: Path = typer.Option(ROOT / "runs/precision", help="the tiny model's data and run"),
             steps: int = typer.Option(1000, min=1, help="training steps of the tiny model (CLIP loss)"),
             quick: bool = typer.Option(False, help="16 images and the tiny preset for the seeded part, 2 "
                                        "training steps: checks the script, not the precisions"),
             out: Optional[Path] = typer.Option(None, help="also write the results as JSON")):
    """Each precision against fp32 on the same inputs: image and caption cosines of seeded full-size
    xlmr-b32 weights on the UCM-Captions train and val images (1,890) and val captions; then a tiny model
    trained on UCM train by train.py: its cosines, the text->image top-10 overlap and the mR on val."""
    cli.refuse_overwrite(out, [])
    manifest, tokenizer, _ = prepare(work, ucm)
    records = load_manifest(manifest)
    val = [r for r in records if r["split"] == "val"]
    captions = [c for r in val for c in r["captions"]["en"]]
    steps = 2 if quick else steps
    report = {"machine": machine(), "seeded": {}, "tiny": {}, "captions": len(captions), "val": len(val)}
    print(machine_line(report["machine"]), flush=True)

    # seeded full-size weights (real RS-M-CLIP weights cannot be had here), the XLM-R vocabulary
    report["preset"] = preset = "tiny" if quick else "xlmr-b32"
    paths = [manifest.parent / r["image"] for r in records][:16 if quick else None]
    pixels = torch.stack([rsmclip.Preprocess(rsmclip.PRESETS[preset].vision.image_size)(p) for p in paths])
    report["images"] = len(paths)
    seeded = fill_with_noise(rsmclip.CLIP(rsmclip.PRESETS[preset])).eval()
    words = rsmclip.Tokenizer(tokenizer if quick else XLMR)
    compare(report["seeded"], lambda p: rsmclip.set_precision(copy.deepcopy(seeded), p), pixels, captions,
            words)
    seeded = None

    # the tiny model trained on UCM train (CLIP loss, fp32), measured on val
    run = work / f"tiny-clip-{steps}"
    train_once(run, [*COMMON, "--data", str(manifest), "--tokenizer", str(tokenizer), "--precision", "fp32",
                     "--distill-weight", "0", "--steps", str(steps), "--warmup", str(max(1, steps // 10)),
                     "--log-every", "50", "--seed", "0"])
    loaded = {p: rsmclip.load(run / "model.safetensors", precision=p) for p in PRECISIONS}
    pixels = torch.stack([loaded["fp32"][1](manifest.parent / r["image"]) for r in val])
    compare(report["tiny"], lambda p: loaded[p][0], pixels, captions, loaded["fp32"][2])
    for p, (model, preprocess, tok) in loaded.items():
        report["tiny"][p]["mR"] = ev.evaluate_retrieval(model, tok, preprocess, manifest, "val", ["en"], 64,
                                                        "cpu", workers=0)["en"]["mR"]
    print(equality_table(report))
    if out:
        cli.write_text(out, json.dumps(report, indent=2) + "\n")


def compare(into: dict, model_at, pixels: torch.Tensor, captions: list[str], tokenizer):
    """For each precision, the model_at(precision)'s embeddings against fp32's: cosines, top-10 overlap."""
    for precision in PRECISIONS:
        start = time.perf_counter()
        images, texts = encode_each(model_at(precision), pixels, captions, tokenizer)
        if precision == "fp32":
            ref_images, ref_texts = images, texts
        into[precision] = {"images": cosines(images, ref_images), "texts": cosines(texts, ref_texts),
                           "top10_overlap": top10_overlap(ref_images, ref_texts, images, texts),
                           "seconds": time.perf_counter() - start}
        print(f"{precision}: {into[precision]}", flush=True)


def equality_table(report: dict) -> str:
    fp32 = report["tiny"]["fp32"]["mR"]
    lines = [f"cosine to fp32, min / mean: seeded {report['preset']} weights on {report['images']} "
             f"UCM-Captions images and {report['captions']} val captions; the tiny model trained on UCM "
             f"train, on the {report['val']} val images and their captions; text->image top-10 overlap with "
             "fp32's",
             "| precision | seeded: images | seeded: captions | seeded: top-10 % | tiny: images | tiny: "
             "captions | tiny: top-10 % | tiny: val mR | mR - fp32 |", "|---|" + "---|" * 8]

    def pair(c):
        return f"{c['min']:.5f} / {c['mean']:.5f}"
    for p in PRECISIONS:
        s, t = report["seeded"][p], report["tiny"][p]
        lines.append(f"| {p} | {pair(s['images'])} | {pair(s['texts'])} | {s['top10_overlap']:.1f} | "
                     f"{pair(t['images'])} | {pair(t['texts'])} | {t['top10_overlap']:.1f} | {t['mR']:.2f} | "
                     f"{t['mR'] - fp32:+.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- end to end

def timed_process(command: list[str]) -> dict:
    """Wall seconds and peak resident MiB of one command in its own process. The peak is read by a small
    Python process that starts the command: a child's ru_maxrss also holds the resident size of the process
    it was forked from, which would be this one's."""
    run = subprocess.run([sys.executable, "-c", MEASURE, *command], cwd=ROOT, capture_output=True, text=True)
    if run.returncode != 0:
        raise rsmclip.RsmclipError(f"{' '.join(command)} failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.splitlines()[-1])


MEASURE = """import json, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
seconds, peak = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_mib": peak}))
sys.exit(code)"""


@app.command()
def endtoend(ucm: Path = typer.Option(UCM, help="UCM-Captions train/val: its Karpathy file and images/"),
             work: Path = typer.Option(ROOT / "runs/precision", help="the weights, folder and outputs"),
             images: int = typer.Option(2000, min=1, help="images in the searched folder"),
             quick: bool = typer.Option(False, help="the tiny preset and 16 images: checks the script"),
             out: Optional[Path] = typer.Option(None, help="also write the results as JSON")):
    """What a user waits for, fp32 against auto, each run in its own process: the first search of a folder
    (its index built from nothing) and eval.py retrieval on UCM val, seeded full-size weights; wall time
    and the process' peak memory."""
    cli.refuse_overwrite(out, [])
    manifest, tokenizer, _ = prepare(work, ucm)
    preset, images = ("tiny", 16) if quick else ("xlmr-b32", images)
    weights = work / f"seeded-{preset}" / "model.safetensors"
    if not weights.exists():
        weights.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tokenizer if quick else XLMR, weights.parent / rsmclip.PRESETS[preset].tokenizer)
        rsmclip.save(fill_with_noise(rsmclip.CLIP(rsmclip.PRESETS[preset])), weights)
    folder = work / f"folder-{images}"
    if not folder.exists():  # the UCM images, taken again from the first when there are fewer
        sources = sorted((manifest.parent / "images").glob("*.jpg"))
        folder.mkdir()
        for i in range(images):
            (folder / f"{i:05d}.jpg").symlink_to(sources[i % len(sources)].resolve())
    report = {"machine": machine(), "preset": preset, "images": images, "runs": {}}
    print(machine_line(report["machine"]), flush=True)
    for precision in ("fp32", "auto"):
        index = work / f"index-{precision}"  # a folder (search/index.py), built from nothing each time
        shutil.rmtree(index, ignore_errors=True)
        search = [sys.executable, "rsmclip_cli.py", "search", str(folder), "a river next to farmland",
                  "--model", str(weights), "--index", str(index), "--precision", precision]
        retrieval = [sys.executable, "eval.py", "retrieval", "--model", str(weights), "--data", str(manifest),
                     "--split", "val", "--workers", "0", "--precision", precision, "--out",
                     str(work / f"retrieval-{precision}.json")]
        report["runs"][precision] = {"search": timed_process(search), "retrieval": timed_process(retrieval)}
        print(f"{precision}: " + ", ".join(f"{job} {r['seconds']:.1f} s, {r['peak_mib']:.0f} MiB"
                                           for job, r in report["runs"][precision].items()), flush=True)
    print(endtoend_table(report))
    if out:
        cli.write_text(out, json.dumps(report, indent=2) + "\n")


def endtoend_table(report: dict) -> str:
    runs = report["runs"]
    lines = [f"seeded {report['preset']} weights: the first search of {report['images']} images, and eval.py "
             "retrieval on UCM-Captions val (210 images, 1,050 captions)",
             "| job | fp32 s | auto s | auto / fp32 | fp32 peak MiB | auto peak MiB |", "|---|" + "---|" * 5]
    for job in ("search", "retrieval"):
        a, b = runs["fp32"][job], runs["auto"][job]
        lines.append(f"| {job} | {a['seconds']:.1f} | {b['seconds']:.1f} | {b['seconds'] / a['seconds']:.2f} "
                     f"| {a['peak_mib']:.0f} | {b['peak_mib']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run_cli(app)
