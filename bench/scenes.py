"""Scene search at scale: the end-to-end speed of indexing a large scene, and the index at millions of tiles.

    python -m bench.scenes speed --model tiny --work /tmp/scenes              # the 20,000 x 20,000 scene
    python -m bench.scenes speed --model xlmr-b32 --rows 10 --work /tmp/scenes  # 10 rows of tiles of it
    python -m bench.scenes index --rows 1000000,5000000 --work /tmp/index      # exact vs FAISS

`speed` writes (once, into WORK) an 8-bit RGB GeoTIFF of --size x --size pixels, tiled 512 x 512, deflate,
with overviews, its texture the demo's drawings; then, in a process of its own (so that its peak memory is
its own), indexes its tiles as `rsmclip search` does (windowed reads, the model on seeded noise weights of
the preset, float16 rows written to a part): tiles/s and the peak resident memory of that process and of
its loader processes, and the CPU time it took (tiles per CPU second: what a busy machine does not
change). The share of each stage (read and resample, preprocess, encode, write) is timed on
the first tiles, one stage after the other in one process. `--rows N` indexes the first N rows of tiles
only (all columns: the access pattern of the whole scene), for a model too slow for all of it.

`index` writes --dim-wide float16 embeddings drawn around 10,000 random centres (cosine about 0.85 to their
centre, as tiles of one kind of ground are to each other), and measures, each size in a process of its
own: the exact chunked search (time for --queries queries at once), FAISS (build time, query time at two
nprobe values, recall@10 against exact), and the peak resident memory (which counts the memory-mapped
embeddings the search has touched). Queries are rows of the data with noise added.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import typer
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402
import rsmclip  # noqa: E402
from bench.openclip_oracle import fill_with_noise  # noqa: E402
from data import demo  # noqa: E402
from search import index as ixlib  # noqa: E402
from search import scenes  # noqa: E402
from search.scenes import Tiling  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def peak_mb() -> dict:
    """Peak resident memory (MiB) of this process and of the largest of its finished children: the
    loader's workers, and a probe `import torch` runs (about 430 MiB on the machine of the figures)."""
    return {"process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "largest_child": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def cpu_seconds() -> float:
    """CPU time of this process and its finished children: on a shared machine, what the work cost."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# ----------------------------------------------------------------------------- speed end to end

def make_scene(path: Path, size: int) -> Path:
    """A size x size RGB GeoTIFF (UTM 29N, 0.5 m), tiled 512, deflate, overviews 2-16; written once."""
    if path.exists():
        return path
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(0)
    texture = np.zeros((2048, 2048, 3), np.uint8)  # 32 x 32 of the demo's 64-px drawings
    for i in range(1024):
        texture[i // 32 * 64:(i // 32 + 1) * 64, i % 32 * 64:(i % 32 + 1) * 64] = np.asarray(
            demo.render(demo.random_scene(np.random.default_rng([7, i])), np.random.default_rng([8, i])))
    tmp = path.with_suffix(".part.tif")
    with rasterio.open(tmp, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32629", transform=from_origin(487000.0, 4290000.0, 0.5, 0.5), tiled=True,
                       blockxsize=512, blockysize=512, compress="deflate", photometric="RGB",
                       BIGTIFF="IF_SAFER") as dst:
        for top in range(0, size, 2048):
            rows = min(2048, size - top)
            strip = np.zeros((rows, size, 3), np.uint8)
            for left in range(0, size, 2048):
                block = np.rot90(texture, rng.integers(4))[:rows, :min(2048, size - left)]
                strip[:, left:left + block.shape[1]] = block
            dst.write(strip.transpose(2, 0, 1), window=Window(0, top, size, rows))
        dst.build_overviews([2, 4, 8, 16], Resampling.average)
    tmp.rename(path)
    return path


def model_for(preset: str):
    cfg = rsmclip.PRESETS[preset]
    return fill_with_noise(rsmclip.CLIP(cfg), seed=0).eval(), rsmclip.Preprocess(cfg.vision.image_size)


@app.command()
def run(scene: Path = typer.Argument(..., help="the scene to index"),
        model: str = typer.Option("tiny", help="preset: tiny or xlmr-b32 (seeded noise weights)"),
        rows: int = typer.Option(0, help="rows of tiles to index (0: all)"),
        workers: int = typer.Option(0, help="loader processes"),
        batch_size: int = typer.Option(64, help="tiles per forward pass"),
        out: Path = typer.Option(..., help="JSON file for the result")):
    """One measurement, in its own process: index the scene's tiles and time each stage."""
    net, preprocess = model_for(model)
    tiling = Tiling(preprocess.size)
    info = scenes.describe(scene, tiling)
    windows = scenes.grid(info)
    per_row = len({w[0] for w in windows})
    windows = windows[:rows * per_row] if rows else windows
    items = [("", scene, info, w) for w in windows]
    folder = out.with_suffix(".index")
    folder.mkdir(exist_ok=True)
    begin, cpu = time.perf_counter(), cpu_seconds()
    ixlib.embed_part(net, preprocess, folder, "p", [], items, tiling, batch_size, "cpu", workers)
    total, cpu = time.perf_counter() - begin, cpu_seconds() - cpu
    memory = peak_mb()
    stages = {"read_resample": 0.0, "preprocess": 0.0, "encode": 0.0, "write": 0.0}
    sample = windows[:min(len(windows), 4 * batch_size)]
    with scenes.open_raster(scene) as ds, open(folder / "stage.f16", "wb") as f, torch.inference_mode():
        for start in range(0, len(sample), batch_size):
            t0 = time.perf_counter()
            tiles = [scenes.read_tile(ds, info, w, tiling.tile)[0] for w in sample[start:start + batch_size]]
            t1 = time.perf_counter()
            pixels = torch.stack([preprocess(Image.fromarray(t, "RGB")) for t in tiles])
            t2 = time.perf_counter()
            x = torch.nn.functional.normalize(net.encode_image(pixels).float(), dim=-1)
            t3 = time.perf_counter()
            f.write(x.half().numpy().tobytes())
            f.flush()
            t4 = time.perf_counter()
            for k, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                stages[k] += dt
    spent = sum(stages.values())
    result = {"model": model, "tile": tiling.tile, "scene": [info["width"], info["height"]],
              "tiles": len(windows), "grid_tiles": len(scenes.grid(info)), "workers": workers,
              "batch_size": batch_size, "seconds": round(total, 1), "cpu_seconds": round(cpu, 1),
              "tiles_per_s": round(len(windows) / total, 2), "tiles_per_cpu_s": round(len(windows) / cpu, 2),
              "peak_rss_mb": {k: round(v) for k, v in memory.items()},
              "stage_share_pct": {k: round(100 * v / spent, 1) for k, v in stages.items()},
              "stage_ms_per_tile": {k: round(1000 * v / len(sample), 2) for k, v in stages.items()}}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


@app.command()
def speed(model: str = typer.Option("tiny", help="preset: tiny or xlmr-b32"),
          size: int = typer.Option(20000, help="the scene's side in pixels"),
          rows: int = typer.Option(0, help="rows of tiles to index (0: all)"),
          workers: int = typer.Option(0, help="loader processes"),
          work: Path = typer.Option(Path("/tmp/rsmclip-scenes"), help="folder for the scene and results"),
          quick: bool = typer.Option(False, help="a 512-px scene: checks the script, measures nothing")):
    """The end-to-end speed of indexing a large 8-bit scene (its own process: its own peak memory)."""
    size = 512 if quick else size
    work.mkdir(parents=True, exist_ok=True)
    scene = make_scene(work / f"scene{size}.tif", size)
    out = work / f"speed-{model}-{size}-{rows}-{workers}.json"
    subprocess.run([sys.executable, "-m", "bench.scenes", "run", str(scene), "--model", model, "--rows",
                    str(rows), "--workers", str(workers), "--out", str(out)], check=True, cwd=ROOT)


# ----------------------------------------------------------------------------- the index at scale

def make_index(folder: Path, n: int, dim: int) -> Path:
    """An index folder of n synthetic rows (one part), written in chunks; kept for later calls."""
    if (folder / "index.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((10_000, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    with open(folder / "p.f16", "wb") as f:
        for start in range(0, n, 1 << 17):
            m = min(1 << 17, n - start)
            x = centres[rng.integers(len(centres), size=m)] + rng.standard_normal((m, dim), np.float32) * (
                0.62 / dim ** 0.5)
            f.write((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).tobytes())
    ixlib.save_table(folder / "p.npy", np.zeros(n, ixlib.TABLE))
    manifest = {"format": ixlib.FORMAT, "model": "synthetic", "dim": dim, "tiling": Tiling(224).as_json(),
                "root": "/", "sources": {"x": {"kind": "picture"}},
                "parts": [{"name": "p", "rows": n, "sources": ["x"]}]}
    (folder / "index.json").write_text(json.dumps(manifest))
    return folder


@app.command()
def measure(folder: Path = typer.Argument(..., help="an index folder made by make_index"),
            queries: int = typer.Option(100, help="queries searched at once"),
            reuse: bool = typer.Option(False, help="keep the ann.faiss an earlier run built (no build time)"),
            out: Path = typer.Option(..., help="JSON file for the result")):
    """One index size, in its own process: exact search, FAISS build, load and search, recall@10."""
    manifest = json.loads((folder / "index.json").read_text())
    ix = ixlib.read_index(folder, "synthetic", manifest["dim"], Tiling(224))
    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(ix.rows, queries, replace=False))
    noise = rng.standard_normal((queries, ix.manifest["dim"]), np.float32) * 0.03
    q = np.asarray(ix.feats[0][rows], np.float32) + noise
    q = torch.from_numpy(q / np.linalg.norm(q, axis=1, keepdims=True))
    for f in ix.folder.glob("ann.*") if not reuse else []:
        f.unlink()  # FAISS is built in this run, timed
    begin = time.perf_counter()
    _, exact = ixlib.exact_top(ix, q, 10)
    exact_s = time.perf_counter() - begin
    exact_mb = peak_mb()["process"]
    begin = time.perf_counter()
    ixlib.load_ann(ix)  # builds and writes ann.faiss (with --reuse: reads it)
    build_s = time.perf_counter() - begin
    ix.ann = None
    begin = time.perf_counter()
    ixlib.load_ann(ix)  # what every later search process pays once
    load_s = time.perf_counter() - begin
    result = {"rows": ix.rows, "dim": ix.manifest["dim"], "queries": queries,
              "exact": {"seconds": round(exact_s, 2), "ms_per_query": round(1000 * exact_s / queries, 1),
                        "peak_rss_mb_after": round(exact_mb)},
              "faiss": {"build_s": None if reuse else round(build_s, 1), "load_s": round(load_s, 2),
                        "index_mb": round((folder / "ann.faiss").stat().st_size / 2 ** 20),
                        "peak_rss_mb_after_build": round(peak_mb()["process"])}}
    for nprobe in (16, 64):
        begin = time.perf_counter()
        _, found = ixlib.ann_top(ix, q, 10, nprobe)
        seconds = time.perf_counter() - begin
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), exact.tolist())])
        result["faiss"][f"nprobe_{nprobe}"] = {"seconds": round(seconds, 3),
                                               "ms_per_query": round(1000 * seconds / queries, 2),
                                               "recall_at_10": round(float(recall), 3)}
    result["peak_rss_mb"] = round(peak_mb()["process"])
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


@app.command("index")
def index_cmd(rows: str = typer.Option("1000000,5000000", help="comma-separated index sizes"),
              dim: int = typer.Option(512, help="embedding width (xlmr-b32: 512)"),
              queries: int = typer.Option(100, help="queries searched at once"),
              work: Path = typer.Option(Path("/tmp/rsmclip-index"), help="folder for indexes and results"),
              quick: bool = typer.Option(False, help="20,000 rows of width 64: checks the script")):
    """Exact chunked search against FAISS at each size (each in a process of its own)."""
    sizes, dim = ([20_000], 64) if quick else ([int(n) for n in rows.split(",")], dim)
    for n in sizes:
        folder = make_index(work / f"ix-{n}-{dim}", n, dim)
        subprocess.run([sys.executable, "-m", "bench.scenes", "measure", str(folder), "--queries",
                        str(queries), "--out", str(work / f"index-{n}-{dim}.json")], check=True, cwd=ROOT)


if __name__ == "__main__":
    cli.run_cli(app)
