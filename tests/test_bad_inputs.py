"""Bad input, table-driven: one row per class of fault found by trying every entry point as a new user
would. Each row names the entry point, its arguments, the fixture that makes the input in a temporary
folder, and what must happen: the exit code, words the one-line message must hold, the files that must
be left byte-identical, and nothing else (no traceback). Adding a case is one row plus, if needed, a
fixture function.

The entry points run in this process (their Typer apps through rsmclip.run_cli, as the scripts do), so
the whole table costs seconds, not a Python start per row."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import sentencepiece
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file

import cli
import eval as ev
import files
import rsmclip
import rsmclip_cli
from data import prepare
from data.manifest import load_manifest, write_jsonl

TINY = rsmclip.PRESETS["tiny"]


# ----------------------------------------------------------------------------- fixtures: inputs made in tmp


def weights(tmp: Path, spm: Path) -> Path:
    """A seeded tiny checkpoint with its tokenizer next to it."""
    torch.manual_seed(0)
    path = tmp / "w.safetensors"
    rsmclip.save(rsmclip.CLIP(TINY), path)
    shutil.copy(spm, tmp / TINY.tokenizer)
    return path


def images(tmp: Path, n: int = 3) -> Path:
    folder = tmp / "imgs"
    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.new("RGB", (32, 32), (60 * i, 90, 200 - 50 * i)).save(folder / f"{i}.png")
    return folder


def config_file(tmp: Path, config: str, name: str = "bad.safetensors") -> Path:
    """Tiny weights whose metadata config is `config` (a JSON text, edited by the row)."""
    torch.manual_seed(0)
    tensors = {k: v.contiguous() for k, v in rsmclip.CLIP(TINY).state_dict().items()}
    save_file(tensors, tmp / name, {"format": "rsmclip", "config": config})
    return tmp / name


def tiny_config(**changes) -> str:
    """The tiny preset's config as JSON, with top-level or "vision.x"/"text.x" keys changed."""
    d = rsmclip.asdict(TINY)
    for key, value in changes.items():
        part, _, name = key.rpartition("__")
        (d[part] if part else d)[name] = value
    return json.dumps(d)


def nan_weights(tmp: Path) -> Path:
    torch.manual_seed(0)
    model = rsmclip.CLIP(TINY)
    with torch.no_grad():
        model.visual.proj.weight.fill_(float("nan"))
    rsmclip.save(model, tmp / "nan.safetensors")
    return tmp / "nan.safetensors"


def sixteen_bit(tmp: Path):
    """12-bit sensor data in a deflate-compressed 16-bit RGB TIFF (PIL reads only the top byte of those)."""
    from test_model import write_tiff

    data = np.random.default_rng(0).integers(0, 4096, (20, 20, 3)).astype(np.uint16)
    write_tiff(images(tmp) / "s.tif", data, deflate=True)


def damaged_index(tmp: Path):
    images(tmp)
    (tmp / "ix").mkdir()
    (tmp / "ix" / "index.json").write_text('{"format": "rsmclip-index 2", "model":')  # cut short


def odd_names(tmp: Path):
    folder = images(tmp)
    os.rename(folder / "0.png", os.fsencode(folder) + b"/caf\xe9.png")  # a Latin-1 file name


def manifest(tmp: Path, captions: dict, n: int = 2) -> Path:
    """A captions.jsonl of n test images, each with `captions`."""
    folder = images(tmp, n)
    records = [{"id": f"d/{i}", "image": f"imgs/{i}.png", "split": "test", "dataset": "d",
                "captions": captions} for i in range(n)]
    (tmp / "ds").mkdir(exist_ok=True)
    shutil.move(str(folder), tmp / "ds" / "imgs")
    write_jsonl(records, tmp / "ds" / "captions.jsonl")
    return tmp / "ds" / "captions.jsonl"


def annotations(tmp: Path, filenames=("0.png", "1.png"), **fields) -> Path:
    """ds/ann.json, Karpathy style, naming `filenames` as test images, beside the images in ds/imgs."""
    (tmp / "ds").mkdir(exist_ok=True)
    shutil.move(str(images(tmp)), tmp / "ds" / "imgs")
    doc = {"images": [{"filename": f, "split": "test", "sentences": [{"raw": "a photo"}]} for f in filenames],
           **fields}
    (tmp / "ds" / "ann.json").write_text(json.dumps(doc))
    return tmp / "ds" / "ann.json"


def latin1_tree(tmp: Path) -> Path:
    """tree/beach/ with three images, one of them named in Latin-1 bytes (caf\xe9.png), not UTF-8."""
    (tmp / "tree").mkdir()
    shutil.move(str(images(tmp)), tmp / "tree" / "beach")
    os.rename(tmp / "tree" / "beach" / "2.png", os.fsencode(tmp / "tree" / "beach") + b"/caf\xe9.png")
    return tmp / "tree"


def tower(tmp: Path, fill: str = "random", **config) -> Path:
    """ds/captions.jsonl to translate and tower/, a tiny Tower-shaped model folder (Llama weights, a
    SentencePiece model, the ChatML tokens). fill: "random" (seeded), "nan" (one NaN weight) or "empty":
    every layer zero, so the model answers <|im_end|> at once, and <s>, which decodes to no text, when
    that is forbidden (the retry decoding). config: entries written over config.json's."""
    from conftest import CORPUS, train_spm

    import translate

    manifest(tmp, {"en": ["many planes at the airport"]})
    folder = tmp / "tower"
    folder.mkdir()
    n = sentencepiece.SentencePieceProcessor(
        model_file=str(train_spm(folder / "tokenizer.model", CORPUS[:17] * 20))).get_piece_size()
    im_end = n + 1
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(n): {"content": "<|im_start|>"}, str(im_end): {"content": "<|im_end|>"}}}))
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": n + 2, "hidden_size": 8,
           "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    (folder / "config.json").write_text(json.dumps({**cfg, **config}))
    torch.manual_seed(0)
    layout = translate.hf_layout(translate.ModelConfig.from_hf(cfg))
    w = {name: torch.randn(shape) * (fill != "empty") for name, (_, _, shape) in layout.items()}
    if fill == "nan":
        w["model.norm.weight"][0] = float("nan")
    if fill == "empty":  # the last hidden state is all ones: each logit is its lm_head row's sum
        w["model.embed_tokens.weight"][:], w["model.norm.weight"][:] = 1, 1
        w["lm_head.weight"][im_end], w["lm_head.weight"][1] = 0.25, 0.125
    save_file(w, str(folder / "model.safetensors"))
    return folder


# ----------------------------------------------------------------------------- fixtures: scenes


def scene(tmp: Path, name: str = "s.tif", data: Optional[np.ndarray] = None, crs: str = "EPSG:32618",
          transform=None, **profile) -> Path:
    """A GeoTIFF written with rasterio: data [bands, rows, cols] (default 3 x 96 x 128 random uint8), UTM
    18N with 0.5 m pixels unless given."""
    import rasterio
    from rasterio.transform import from_origin

    data = np.random.default_rng(0).integers(1, 256, (3, 96, 128), dtype=np.uint8) if data is None else data
    with rasterio.open(tmp / name, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
                       count=data.shape[0], dtype=data.dtype, crs=crs, **profile,
                       transform=transform or from_origin(583000.0, 4507000.0, 0.5, 0.5)) as dst:
        dst.write(data)
    return tmp / name


def huge_scene(tmp: Path):
    """10,001 x 10,001 pixels (above the 100-megapixel limit of a picture), one band, tiled and deflated."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    with rasterio.open(tmp / "huge.tif", "w", driver="GTiff", width=10001, height=10001, count=1,
                       dtype="uint8", crs="EPSG:32618", transform=from_origin(0, 0, 1, 1),
                       tiled=True, compress="deflate") as dst:
        for top in range(0, 10001, 2048):
            rows = min(2048, 10001 - top)
            dst.write(np.full((1, rows, 10001), 90, np.uint8), window=Window(0, top, 10001, rows))


def rotated(tmp: Path):
    from rasterio.transform import Affine

    grid = Affine.translation(583000.0, 4507000.0) @ Affine.rotation(20) @ Affine.scale(0.5, -0.5)
    scene(tmp, transform=grid)


def features(tmp: Path) -> list[dict]:
    return json.loads((tmp / "hits.geojson").read_text())["features"]


def footprint_is_rotated(tmp: Path):
    """The footprint of a rotated grid is a rotated quadrilateral: its edges are not north-south."""
    ring = features(tmp)[0]["geometry"]["coordinates"][0]
    assert ring[0][0] != ring[16][0] and ring[0][1] != ring[16][1]


def two_scenes(tmp: Path):
    """s.tif in UTM 18N, g.tif in EPSG:4326 (1e-5 degree pixels at 60 N)."""
    from rasterio.transform import from_origin

    scene(tmp)
    scene(tmp, "g.tif", crs="EPSG:4326", transform=from_origin(10, 60, 1e-5, 1e-5))


def two_crs(tmp: Path):
    """Hits of a UTM scene and a geographic one: each its own crs, one EPSG:4326 file, one file per CRS."""
    assert {f["properties"]["crs"] for f in features(tmp)} == {"EPSG:32618", "EPSG:4326"}
    assert (tmp / "hits.EPSG_32618.geojson").exists() and (tmp / "hits.EPSG_4326.geojson").exists()


def index_of_another_tiling(tmp: Path):
    scene(tmp)
    with pytest.raises(SystemExit):
        cli.run_cli(rsmclip_cli.app, ["search", str(tmp / "s.tif"), "roads", "--model",
                                      str(tmp / "w.safetensors"), "--index", str(tmp / "ix"), "--tile", "32"])


# ----------------------------------------------------------------------------- the table


@dataclass
class Case:
    name: str
    entry: str  # rsmclip | eval | prepare | train | translate | ablation (bench.ablation)
    args: list[str]  # "{tmp}" is the case's folder, "{w}" the tiny weights made there
    make: Callable[[Path], None] = lambda tmp: None
    code: int = 1
    words: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()  # files under tmp that must keep their bytes
    absent: tuple[str, ...] = ()  # globs under tmp that must match nothing afterwards
    stdout: tuple[str, ...] = ()  # words the normal output must hold (a rebuilt cache says so there)
    check: Callable[[Path], None] = lambda tmp: None  # what must hold of the files afterwards


CAPTIONS = ["captions", "{tmp}/ds/ann.json", "--images", "{tmp}/ds/imgs", "--out"]  # + the output
MANIFEST = "{tmp}/ds/captions.jsonl"  # made by manifest()
TRANSLATE = [MANIFEST, "--langs", "pt", "--out", "{tmp}/out.jsonl", "--max-new-tokens", "4"]
LOCAL = TRANSLATE + ["--model", "{tmp}/tower", "--device", "cpu"]  # the model made by tower()
NOWHERE = TRANSLATE + ["--backend", "http", "--base-url", "http://127.0.0.1:9", "--api-model", "x"]  # unasked
TRAIN = ["--data", MANIFEST, "--tokenizer", "{spm}", "--out", "{tmp}/run"]


def run_dir(tmp: Path, config: Optional[str]):
    """A run directory with a checkpoint and the given config.json text (None: no config.json)."""
    (tmp / "run").mkdir()
    (tmp / "run" / "checkpoint.safetensors").write_bytes(b"a checkpoint")
    if config is not None:
        (tmp / "run" / "config.json").write_text(config)


def cache(tmp: Path, split: str = "test", edit: bool = False):
    """A manifest (test split) and its image cache c.safetensors; edit: the manifest changed afterwards."""
    path = manifest(tmp, {"en": ["a road"]})
    prepare.build_cache(path, tmp / "c.safetensors", split)
    if edit:
        records = load_manifest(path)
        write_jsonl([r | {"captions": {"en": ["a river"]}} for r in records], path)


def two_classes(tmp: Path):
    """tree/fields and tree/water, 3 images each: a k-NN memory of 2 (1 per class) after the test half."""
    (tmp / "tree").mkdir()
    for label in ("fields", "water"):
        shutil.move(str(images(tmp)), tmp / "tree" / label)


def train_split(tmp: Path, missing: bool = False):
    """A manifest of 2 train images (missing: one of them absent)."""
    path = manifest(tmp, {"en": ["a road"]})
    records = [r | {"split": "train"} for r in load_manifest(path)]
    if missing:
        records[1]["image"] = "imgs/gone.png"
    write_jsonl(records, path)


def image_cache_then_replace(tmp: Path):
    """A train-split manifest and its image cache c.safetensors; then one image is replaced by another of
    the same size, its modification time set back: the manifest's bytes are unchanged."""
    train_split(tmp)
    path = tmp / "ds" / "captions.jsonl"
    prepare.build_cache(path, tmp / "c.safetensors", "train")
    replace_keeping_size_and_mtime(tmp / "ds" / "imgs" / "1.png")


def replace_keeping_size_and_mtime(image: Path):
    """Another picture in the same file name, of exactly the same size, with the old mtime put back."""
    st = image.stat()
    for green in range(256):  # another colour whose PNG has the same number of bytes
        Image.new("RGB", (32, 32), (7, green, 99)).save(image.with_name("other.png"))
        if image.with_name("other.png").stat().st_size == st.st_size:
            break
    os.replace(image.with_name("other.png"), image)  # a new file (new inode), as a copy or an editor gives
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert image.stat().st_size == st.st_size and image.stat().st_mtime_ns == st.st_mtime_ns


def planted_feature_cache(damage: str) -> Callable[[Path], None]:
    """A row's make: the features the k-NN row will cache, already there but damaged (`damage`: "nan",
    "width", "rows"), found where the command looks (the same key)."""
    def make(tmp: Path):
        two_classes(tmp)
        model = rsmclip.load(tmp / "w.safetensors")[0]
        paths = [p for p, _, _ in ev.classification_items(tmp / "tree")]
        feats = ev.cached_image_features(model, rsmclip.Preprocess(64), paths,
                                         rsmclip.weights_fingerprint(tmp / "w.safetensors"), 8, "cpu", 0)
        file = next((tmp / "home" / "features").glob("*.safetensors"))
        bad = {"nan": feats.clone().index_fill_(0, torch.tensor([0]), float("nan")),
               "width": feats[:, :3].contiguous(), "rows": feats[:-1].contiguous()}[damage]
        save_file({"features": bad}, str(file))
    return make


def cache_is_whole(tmp: Path):
    """The feature cache was written again: finite, one 64-wide row per image of the tree."""
    feats = load_features(next((tmp / "home" / "features").glob("*.safetensors")))
    assert feats.shape == (6, TINY.embed_dim) and torch.isfinite(feats).all()


def load_features(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["features"]


def index_then_replace(tmp: Path):
    """A search index of imgs/ built, then imgs/1.png replaced at the same size and mtime."""
    images(tmp)
    search = ["search", str(tmp / "imgs"), "roads", "--model", str(tmp / "w.safetensors"), "--index",
              str(tmp / "i.safetensors")]
    with pytest.raises(SystemExit):
        cli.run_cli(rsmclip_cli.app, search)
    replace_keeping_size_and_mtime(tmp / "imgs" / "1.png")


def index_in_fp32(tmp: Path):
    """A search index of imgs/ built at --precision fp32 (the row then searches at bf16)."""
    images(tmp)
    with pytest.raises(SystemExit):
        cli.run_cli(rsmclip_cli.app, ["search", str(tmp / "imgs"), "roads", "--model",
                                      str(tmp / "w.safetensors"), "--index", str(tmp / "i.safetensors"),
                                      "--precision", "fp32"])


def two_writers(tmp: Path):
    """A metrics.jsonl written by two runs at once: steps 2, 4, 2, 6, 4 (both runs' lines interleaved)."""
    (tmp / "run").mkdir()
    lines = [{"step": s, "loss": v} for s, v in ((2, 5.0), (4, 4.0), (2, 5.1), (6, 3.0), (4, 4.2))]
    (tmp / "run" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def blow_up(tmp: Path):
    """A metrics.jsonl whose loss goes to 1e308 and then inf (json writes Infinity), logit scale with it."""
    (tmp / "run").mkdir()
    lines = [{"step": 2, "loss": 5.0, "logit_scale": 14.3}, {"step": 4, "loss": 4.0, "logit_scale": 14.2},
             {"step": 6, "loss": 1e308, "logit_scale": 1e308}, {"step": 8, "loss": float("inf")}]
    (tmp / "run" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def html_names(page: Path, name: str):
    assert name in page.read_text(encoding="utf-8")


def svg_is_finite(tmp: Path):
    """curves.svg has no inf/nan coordinate, and says what it did not draw."""
    svg = (tmp / "run" / "curves.svg").read_text()
    coords = re.findall(r' (?:x|y|x1|y1|x2|y2|cx|cy|points)="([^"]*)"', svg)
    numbers = [float(v) for c in coords for v in re.split(r"[ ,]", c)]
    assert len(numbers) > 100 and all(math.isfinite(v) and abs(v) < 1e4 for v in numbers)
    assert "not drawn: step 6: 1e+308, step 8: inf" in svg and "not drawn: step 6: 1e+308" in svg


def foreign_tokenizer(tmp: Path):
    """Weights that record their tokenizer's SHA-256, and another SentencePiece model in its place (as
    many pieces: only the hash tells them apart)."""
    from conftest import CORPUS, train_spm

    torch.manual_seed(0)
    (tmp / "m").mkdir()
    own = train_spm(tmp / "own.model", CORPUS[:17] * 20)
    rsmclip.save(rsmclip.CLIP(TINY), tmp / "m" / "w.safetensors", tokenizer_sha256=files.file_sha256(own))
    train_spm(tmp / "m" / TINY.tokenizer, CORPUS[:9] * 40)
    images(tmp)


def read_only(folder: Path):
    """A folder that cannot be written, for root too: a read-only tmpfs mounted there (the test's
    teardown unmounts it), else mode 0555 (which binds every other user)."""
    folder.mkdir()
    if os.geteuid() == 0 and os.system(f"mount -t tmpfs -o ro,size=64k tmpfs {folder} 2>/dev/null") == 0:
        MOUNTS.append(folder)
    else:
        folder.chmod(0o555)


MOUNTS: list[Path] = []


# shards: 2-step runs on the tiny model, batch 2, no loader process (a row's training takes seconds)
STREAM = ["--tokenizer", "{spm}", "--out", "{tmp}/run", "--steps", "2", "--batch-size", "2", "--workers", "0",
          "--local-crops", "2", "--prototypes", "64", "--langs", "en", "--log-every", "1"]
OURS = ["--data", "{tmp}/sh/train-{000000..000001}.tar"]
OURS3 = ["--data", "{tmp}/sh/train-{000000..000002}.tar"]
RESUME = STREAM[:5] + ["4"] + STREAM[6:]  # --steps 4: a finished 2-step run resumes


def our_shards(tmp: Path, n: int = 4, per_shard: int = 2) -> Path:
    """sh/: a manifest's n train images written as shards of per_shard samples."""
    from data.shards import write_shards

    path = manifest(tmp, {"en": ["a road"]}, n)
    write_jsonl([r | {"split": "train"} for r in load_manifest(path)], path)
    write_shards(path, tmp / "sh", per_shard=per_shard)
    return tmp / "sh"


def png(colour: int = 90) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (colour, 120, 200)).save(out, "PNG")
    return out.getvalue()


def other_shards(tmp: Path, *shards: list[tuple[str, bytes]]):
    """other/00000.tar, 00001.tar ...: shards as other tools write them, each a list of (member, bytes)."""
    (tmp / "other").mkdir()
    for n, members in enumerate(shards):
        with tarfile.open(tmp / "other" / f"{n:05d}.tar", "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def sample(key: str, colour: int = 90) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", png(colour)), (f"{key}.txt", f"a road {key}".encode())]


def faulty_samples(tmp: Path):
    """Two shards of 8 good samples and 3 faulty ones: an image without caption, a caption without image,
    JPEG bytes that do not decode."""
    good = [sample(f"g{i}", 20 * i) for i in range(8)]
    first = [m for s in good[:4] for m in s] + [("x1.png", png()), ("x2.txt", b"a lone caption")]
    second = [m for s in good[4:] for m in s] + [("x3.jpg", b"\xff\xd8 not a jpeg"), ("x3.txt", b"a road")]
    other_shards(tmp, first, second)


def three_skipped(tmp: Path):
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert summary["skipped_images"] >= 3, summary


def truncate(path: Path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def finished_run(tmp: Path, data: list[str]):
    """A 2-step run on `data` (no loader process), finished: --steps 4 resumes it."""
    args = [a.replace("{tmp}", str(tmp)).replace("{spm}", str(tmp / TINY.tokenizer)) for a in data + STREAM]
    with pytest.raises(SystemExit) as done:
        cli.run_cli(entry_app("train"), args)
    assert done.value.code == 0


def shard_run(tmp: Path):
    """A 2-step run on our shards, then the shards written again from the same manifest, 3 to a shard."""
    our_shards(tmp)
    finished_run(tmp, OURS)
    index = json.loads((tmp / "sh" / "shards.json").read_text())
    shutil.rmtree(tmp / "sh")
    from data.shards import write_shards
    write_shards(tmp / "ds" / "captions.jsonl", tmp / "sh", per_shard=3)  # 3 + 1 samples, not 2 + 2
    assert json.loads((tmp / "sh" / "shards.json").read_text())["shards"] != index["shards"]


def swap_bytes(a: Path, b: Path):
    """Two shards' bytes swapped, each file rewritten in place: the same names, sizes and sample counts."""
    first, second = a.read_bytes(), b.read_bytes()
    a.write_bytes(second)
    b.write_bytes(first)


def ours_then(tmp: Path, alter: str):
    """A finished run on three of our shards (2 samples, 10,240 bytes each), then shards 1 and 2 swapped
    ("swap"), or shard 1 replaced by a byte copy of shard 0 ("copy"); shards.json untouched."""
    our_shards(tmp, 6)
    finished_run(tmp, OURS3)
    folder = tmp / "sh"
    if alter == "swap":
        swap_bytes(folder / "train-000001.tar", folder / "train-000002.tar")
    else:
        (folder / "train-000001.tar").write_bytes((folder / "train-000000.tar").read_bytes())


def others_then_swap(tmp: Path):
    """A finished run on three of another's shards, then shards 1 and 2 swapped (same names and sizes)."""
    other_shards(tmp, sample("a") + sample("b"), sample("c") + sample("d"), sample("e") + sample("f"))
    finished_run(tmp, ["--data", "{tmp}/other"])
    swap_bytes(tmp / "other" / "00001.tar", tmp / "other" / "00002.tar")


def rewrite_captions(path: Path):
    write_jsonl([r | {"captions": {"en": ["a river"]}} for r in load_manifest(path)], path)


def edit_index(tmp: Path, edit: Callable[[dict], object]):
    """Our shards (2 of 2 samples), then shards.json changed by `edit`."""
    our_shards(tmp)
    index = json.loads((tmp / "sh" / "shards.json").read_text())
    edit(index)
    (tmp / "sh" / "shards.json").write_text(json.dumps(index))


def miscount(index: dict):
    """shards.json's first shard said to hold 3 samples (its total raised to match): found when it is read."""
    index["shards"][0]["samples"], index["samples"] = 3, 5


def with_lone_surrogate(tmp: Path, field: str):
    """A train-split manifest whose first record's id or first caption holds a lone surrogate, as JSON can
    write one (the escape \\ud800)."""
    train_split(tmp)
    path = tmp / "ds" / "captions.jsonl"
    records = load_manifest(path)
    if field == "id":
        records[0]["id"] += "\ud800"
    else:
        records[0]["captions"]["en"][0] += " \ud800"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))  # ensure_ascii: the escape, valid JSON


def annotation_with_lone_surrogate(tmp: Path):
    ann = annotations(tmp)
    doc = json.loads(ann.read_text())
    doc["images"][1]["sentences"][0]["raw"] = "a \ud800 photo"
    ann.write_text(json.dumps(doc))


def sparse_shard(tmp: Path):
    """other/00000.tar written by GNU tar --sparse: its image, a file with a 1 MiB hole, a sparse member;
    00001.tar plain."""
    (tmp / "files").mkdir()
    with open(tmp / "files" / "s.png", "wb") as f:
        f.seek(1 << 20)
        f.write(b"x")
    (tmp / "files" / "s.txt").write_text("a road")
    (tmp / "other").mkdir()
    subprocess.run(["tar", "-C", str(tmp / "files"), "--sparse", "-cf", str(tmp / "other" / "00000.tar"),
                    "s.png", "s.txt"], check=True)
    with tarfile.open(tmp / "other" / "00001.tar", "w") as tar:
        for name, data in sample("b"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def a_large_member(tmp: Path):
    """Another's shards of 8 samples, one of whose images is 2 MiB (the run says --max-member 1)."""
    large = [("big.png", png() + bytes(2 << 20)), ("big.txt", b"a road")]
    other_shards(tmp, [m for k in "abc" for m in sample(k)] + large, [m for k in "defg" for m in sample(k)])


def skipped(n: int) -> Callable[[Path], None]:
    def check(tmp: Path):
        assert json.loads((tmp / "run" / "summary.json").read_text())["skipped_images"] >= n
    return check


def knn_suite(tmp: Path, **settings):
    """A suite of a k-NN task that runs, then one with `settings`."""
    two_classes(tmp)
    (tmp / "suite.json").write_text(json.dumps({"name": "s", "tasks": [
        {"name": "a", "task": "knn", "data": "tree", "k": 1},
        {"name": "b", "task": "knn", "data": "tree", "k": 1} | settings]}))


def colour_classes(tmp: Path):
    """tree/blue and tree/red, three shades of their colour each: classes a random model's features tell
    apart (two_classes holds the same three images in both)."""
    for label in ("blue", "red"):
        (tmp / "tree" / label).mkdir(parents=True)
        for i in range(3):
            rgb = (30 * i, 60, 230 - 30 * i) if label == "blue" else (230 - 30 * i, 60, 0)
            Image.new("RGB", (32, 32), rgb).save(tmp / "tree" / label / f"{i}.png")


def voted_by_the_nearest(tmp: Path):
    """At a tiny temperature the weighted vote is the nearest neighbour's: per class, the --k 1 result (at
    T 0.07), which does not put every test image in the first class."""
    model, preprocess = ev.image_model(tmp / "w.safetensors", tmp / "tree", "cpu")
    nearest = ev.evaluate_knn(model, preprocess, tmp / "tree", 1, 0.07, 0.5,
                              rsmclip.weights_fingerprint(tmp / "w.safetensors"), 8, "cpu", 0)
    assert json.loads((tmp / "r.json").read_text())["per_class"] == nearest["per_class"]
    assert nearest["per_class"]["red"]["top1"] > 0, nearest


def resumable_checkpoint(tmp: Path, **meta):
    """A finished run on our shards whose checkpoint's metadata is then changed (`meta` over its state)."""
    from safetensors import safe_open

    our_shards(tmp)
    finished_run(tmp, OURS)
    path = tmp / "run" / "checkpoint.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors, state = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["state"])
    save_file(tensors, str(path), {"state": json.dumps(state | meta)})


def zeroshot_suite(tmp: Path):
    """A suite whose first task (k-NN) runs and whose second (zeroshot) lacks "classes"."""
    two_classes(tmp)
    (tmp / "suite.json").write_text(json.dumps({"name": "s", "tasks": [
        {"name": "a", "task": "knn", "data": "tree", "k": 1},
        {"name": "b", "task": "zeroshot", "data": "tree"}]}))


def failing_suite(tmp: Path):
    """A suite whose first task runs and whose second fails only when it runs (k above the memory)."""
    two_classes(tmp)
    (tmp / "suite.json").write_text(json.dumps({"name": "s", "tasks": [
        {"name": "a", "task": "knn", "data": "tree", "k": 1},
        {"name": "b", "task": "knn", "data": "tree", "k": 5}]}))


def partial_report(tmp: Path):
    report = json.loads((tmp / "report.json").read_text())
    assert "task 'b'" in report["error"] and report["finished"]["w"]["a"]["top1"] >= 0


CASES = [
    # --- rsmclip.py
    Case("weights file missing", "rsmclip", ["info", "{tmp}/none.safetensors"],
         words=("no such weights file",)),
    Case("config: bad JSON", "rsmclip", ["info", "{tmp}/bad.safetensors"],
         make=lambda tmp: config_file(tmp, "{not json"), words=("config in the metadata is not valid JSON",)),
    Case("config: an unknown key", "rsmclip", ["info", "{tmp}/bad.safetensors"],
         make=lambda tmp: config_file(tmp, tiny_config(colour="red")),
         words=("unexpected keyword argument",)),
    Case("config: head_width 0", "rsmclip", ["info", "{tmp}/bad.safetensors"],
         make=lambda tmp: config_file(tmp, tiny_config(vision__head_width=0)),
         words=("vision.head_width 0 not in [1, 16384]",)),
    Case("config: a million layers, checked before any allocation", "rsmclip",
         ["info", "{tmp}/bad.safetensors"],
         make=lambda tmp: config_file(tmp, tiny_config(text__layers=10 ** 6)),
         words=("text.layers 1000000",)),
    Case("config: a tokenizer path outside the weights' folder", "rsmclip", ["info", "{tmp}/bad.safetensors"],
         make=lambda tmp: config_file(tmp, tiny_config(tokenizer="../../etc/passwd")),
         words=("must be a plain file name",)),
    Case("classify: template {x}", "rsmclip", ["classify", "{tmp}/imgs", "--labels", "a,b", "--model", "{w}",
                                               "--template", "a {x}"], make=images, words=("KeyError",)),
    Case("classify: template {0} {1}", "rsmclip", ["classify", "{tmp}/imgs", "--labels", "a,b", "--model",
                                                   "{w}", "--template", "{0} {1}"], make=images,
         words=("IndexError",)),
    Case("classify: template {}}", "rsmclip", ["classify", "{tmp}/imgs", "--labels", "a,b", "--model", "{w}",
                                               "--template", "{}}"], make=images, words=("ValueError",)),
    Case("classify: template without {}", "rsmclip", ["classify", "{tmp}/imgs", "--labels", "a,b", "--model",
                                                      "{w}", "--template", "a photo"], make=images,
         words=("needs exactly one {} for the class name",)),
    Case("classify: a folder named x.jpg without images", "rsmclip",
         ["classify", "{tmp}/x.jpg", "--labels", "a,b", "--model", "{w}"],
         make=lambda tmp: (tmp / "x.jpg").mkdir(), words=("no readable images",)),
    Case("classify: NaN weights", "rsmclip", ["classify", "{tmp}/imgs", "--labels", "a,b", "--model",
                                              "{tmp}/nan.safetensors", "--tokenizer", "{spm}"],
         make=lambda tmp: (images(tmp), nan_weights(tmp)), words=("non-finite image embeddings",)),
    Case("embed: Latin-1 --texts", "rsmclip", ["embed", "--model", "{w}", "--texts", "{tmp}/t.txt", "--out",
                                               "{tmp}/e.safetensors"],
         make=lambda tmp: (tmp / "t.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1")),
         words=("not UTF-8 text",), absent=("e.safetensors",)),
    Case("embed: --out is the --texts file", "rsmclip", ["embed", "--model", "{w}", "--texts", "{tmp}/t.txt",
                                                         "--out", "{tmp}/t.txt"],
         make=lambda tmp: (tmp / "t.txt").write_text("a road\n"), words=("is the input",),
         unchanged=("t.txt",)),
    Case("embed: --out under a file", "rsmclip", ["embed", "--model", "{w}", "--texts", "{tmp}/t.txt",
                                                  "--out", "{tmp}/t.txt/e.safetensors"],
         make=lambda tmp: (tmp / "t.txt").write_text("a road\n"), words=("is a file, not a folder",)),
    Case("embed: a 1 x 10000 image is skipped, not 2.6 GB", "rsmclip",
         ["embed", "--model", "{w}", "--images", "{tmp}/imgs", "--out", "{tmp}/e.safetensors"], code=0,
         make=lambda tmp: (images(tmp), Image.new("1", (1, 10000)).save(tmp / "imgs" / "thin.png")),
         words=("skipped:", "aspect ratio above 20:1")),
    Case("embed: a compressed 16-bit RGB TIFF is skipped, not read nearly black", "rsmclip",
         ["embed", "--model", "{w}", "--images", "{tmp}/imgs", "--out", "{tmp}/e.safetensors"], code=0,
         make=sixteen_bit, words=("skipped:", "compressed or band-separated TIFF with 16-bit")),
    Case("search: a damaged index is rebuilt", "rsmclip",
         ["search", "{tmp}/imgs", "roads", "--model", "{w}", "--index", "{tmp}/ix"], code=0,
         make=damaged_index, words=("damaged search index", "rebuilding it")),
    Case("search: a file name not UTF-8, written to --out", "rsmclip",
         ["search", "{tmp}/imgs", "roads", "--model", "{w}", "--index", "{tmp}/i.safetensors", "--out",
          "{tmp}/hits.json"], code=0, make=odd_names),
    Case("embed: --out e.npy, a format it does not write", "rsmclip",
         ["embed", "--model", "{w}", "--texts", "{tmp}/t.txt", "--out", "{tmp}/e.npy"],
         make=lambda tmp: (tmp / "t.txt").write_text("a road\n"),
         words=("unknown format '.npy'", ".safetensors or .npz"), absent=("e.npy",)),
    Case("search: --model rs-m-clip before it is downloaded", "rsmclip",
         ["search", "{tmp}/imgs", "roads", "--model", "rs-m-clip"], make=images,
         words=("rs-m-clip: not downloaded yet", "rsmclip download rs-m-clip tokenizer", "Weights by hand")),
    Case("search: --html is the --out file", "rsmclip",
         ["search", "{tmp}/imgs", "roads", "--model", "{w}", "--out", "{tmp}/h.json",
          "--html", "{tmp}/h.json"],
         make=images, words=("--html", "is the input"), absent=("h.json",)),
    Case("classify: --html names a folder", "rsmclip",
         ["classify", "{tmp}/imgs", "--labels", "a,b", "--model", "{w}", "--html", "{tmp}/imgs"],
         make=images, words=("--html", "is a folder")),
    Case("classify: --out under a file", "rsmclip",
         ["classify", "{tmp}/imgs", "--labels", "a,b", "--model", "{w}", "--out", "{tmp}/imgs/0.png/c.json"],
         make=images, words=("is a file, not a folder",)),
    Case("convert --tokenizer that is not a SentencePiece model", "rsmclip",
         ["convert", "{w}", "{tmp}/o.safetensors", "--tokenizer", "{tmp}/t.model"],
         make=lambda tmp: (tmp / "t.model").write_text("not a model"),
         words=("t.model: not a SentencePiece model",), absent=("o.safetensors",)),
    Case("convert --tokenizer that does not exist", "rsmclip",
         ["convert", "{w}", "{tmp}/o.safetensors", "--tokenizer", "{tmp}/none.model"],
         words=("none.model: no such file",), absent=("o.safetensors",)),
    Case("download: --endpoint notaurl", "rsmclip", ["download", "tokenizer", "--out", "{tmp}/w",
                                                     "--endpoint", "notaurl"], words=("not an http(s) URL",)),
    # outputs onto what the command reads: an image inside a folder argument (issue: 8 data losses)
    *(Case(f"search: {option} is an image of the searched folder", "rsmclip",
           ["search", "{tmp}/imgs", "roads", "--model", "{w}", option, "{tmp}/imgs/1.png"]
           + (["--index", "{tmp}/i.safetensors"] if option != "--index" else []),
           make=images, words=(option, "imgs/1.png is an image of the input", "would destroy that image"),
           unchanged=("imgs/1.png",), absent=("i.safetensors",))
      for option in ("--html", "--out", "--index")),
    Case("search: --html a symlink to an image of the folder", "rsmclip",
         ["search", "{tmp}/imgs", "roads", "--model", "{w}", "--html", "{tmp}/page.html"],
         make=lambda tmp: (images(tmp), (tmp / "page.html").symlink_to(tmp / "imgs" / "0.png")),
         words=("would destroy that image",), unchanged=("imgs/0.png",)),
    Case("classify: --out an image of the folder argument", "rsmclip",
         ["classify", "{tmp}/imgs", "--labels", "a,b", "--model", "{w}", "--out", "{tmp}/imgs/2.png"],
         make=images, words=("imgs/2.png is an image of the input",), unchanged=("imgs/2.png",)),
    Case("search: a file name not UTF-8 on the --html page", "rsmclip",
         ["search", "{tmp}/imgs", "roads", "--model", "{w}", "--index", "{tmp}/i.safetensors", "--html",
          "{tmp}/hits.html"], code=0, make=odd_names,
         check=lambda tmp: html_names(tmp / "hits.html", "caf\\xe9.png")),
    Case("search: an image replaced at the same size and mtime is embedded again", "rsmclip",
         ["search", "{tmp}/imgs", "roads", "--model", "{w}", "--index", "{tmp}/i.safetensors"], code=0,
         make=index_then_replace, stdout=("3 images (1 added, 1 removed or changed",)),
    Case("search: $RSMCLIP_HOME is a file", "rsmclip", ["search", "{tmp}/imgs", "roads", "--model", "{w}"],
         make=lambda tmp: (images(tmp), (tmp / "home").write_text("x")),
         words=("$RSMCLIP_HOME", "is a file, not a folder"), unchanged=("home",)),
    Case("search: weights that name another tokenizer", "rsmclip",
         ["search", "{tmp}/imgs", "roads", "--model", "{tmp}/m/w.safetensors", "--index",
          "{tmp}/i.safetensors"],
         make=foreign_tokenizer, words=("is not the one", "was saved with", "--tokenizer"),
         absent=("i.safetensors",)),
    Case("search: another tokenizer given on purpose is used, with a warning", "rsmclip",
         ["search", "{tmp}/imgs", "roads", "--model", "{tmp}/m/w.safetensors", "--index",
          "{tmp}/i.safetensors", "--tokenizer", "{tmp}/m/spm.model"], code=0, make=foreign_tokenizer,
         words=("warning: tokenizer", "used because --tokenizer names it")),
    # --- precision
    *(Case(f"{entry} {command}: --precision fp8", entry, [command, *args, "--precision", "fp8"], code=2,
           words=("Invalid value for '--precision'", "'auto', 'fp32', 'bf16', 'int8'"))
      for entry, command, args in (
          ("rsmclip", "search", ["{tmp}/imgs", "roads", "--model", "{w}"]),
          ("rsmclip", "classify", ["{tmp}/imgs", "--labels", "a,b", "--model", "{w}"]),
          ("rsmclip", "embed", ["--model", "{w}", "--images", "{tmp}/imgs", "--out", "{tmp}/e.npz"]),
          ("eval", "retrieval", ["--model", "{w}", "--data", MANIFEST]),
          ("eval", "knn", ["--model", "{w}", "--data", "{tmp}/tree"]))),
    *(Case(f"{entry} {command}: --precision int8 on CUDA, refused before anything is read", entry,
           [command, *args, "--device", "cuda", "--precision", "int8"], make=make,
           words=("precision int8 runs on a CPU only", "on cuda use auto, bf16 or fp32"), absent=("e.npz",))
      for entry, command, args, make in (
          ("rsmclip", "embed", ["--model", "{w}", "--images", "{tmp}/imgs", "--out", "{tmp}/e.npz"], images),
          ("eval", "retrieval", ["--model", "{w}", "--data", MANIFEST],
           lambda tmp: manifest(tmp, {"en": ["a road"]})),
          ("eval", "linear-probe", ["--model", "{w}", "--data", "{tmp}/tree"], two_classes))),
    Case("search: an index built at another precision is rebuilt, saying why", "rsmclip",
         ["search", "{tmp}/imgs", "roads", "--model", "{w}", "--index", "{tmp}/i.safetensors", "--precision",
          "bf16"], code=0, make=index_in_fp32, words=("built at another precision, rebuilding",),
         stdout=("3 images (3 added, 0 removed",)),
    # --- eval.py
    *(Case(f"{command}: --out an image of the evaluated data", "eval",
           [command, "--model", "{w}", "--data", data, "--out", target, "--workers", "0", *extra],
           make=make, words=("is an image of the input" if data.endswith("tree") else "is the input",),
           unchanged=(target.replace("{tmp}/", ""),))
      for command, data, target, extra, make in (
          ("retrieval", MANIFEST, "{tmp}/ds/imgs/0.png", [], lambda tmp: manifest(tmp, {"en": ["a road"]})),
          ("zeroshot", "{tmp}/tree", "{tmp}/tree/water/1.png", ["--classes", "RSSCN7"], two_classes),
          ("linear-probe", "{tmp}/tree", "{tmp}/tree/fields/0.png", [], two_classes),
          ("knn", "{tmp}/tree", "{tmp}/tree/fields/2.png", ["--k", "1"], two_classes))),
    Case("retrieval: --out a manifest image through a symlinked folder", "eval",
         ["retrieval", "--model", "{w}", "--data", MANIFEST, "--out", "{tmp}/link/0.png"],
         make=lambda tmp: (manifest(tmp, {"en": ["a road"]}), (tmp / "link").symlink_to(tmp / "ds" / "imgs")),
         words=("is the input",), unchanged=("ds/imgs/0.png",)),
    *(Case(f"knn: a feature cache with {what} is not trusted", "eval",
           ["knn", "--model", "{w}", "--data", "{tmp}/tree", "--k", "1", "--workers", "0"], code=0,
           make=planted_feature_cache(damage), words=("unusable feature cache", why, "encoding again"),
           check=cache_is_whole)
      for damage, what, why in (("nan", "a NaN", "non-finite features"),
                                ("width", "features of the wrong width", "(6, 3), expected float32 (6, 64)"),
                                ("rows", "a row too few", "(5, 64), expected float32 (6, 64)"))),
    Case("linear-probe: $RSMCLIP_HOME is a file", "eval",
         ["linear-probe", "--model", "{w}", "--data", "{tmp}/tree", "--workers", "0"],
         make=lambda tmp: (two_classes(tmp), (tmp / "home").write_text("x")),
         words=("$RSMCLIP_HOME", "is a file, not a folder")),
    Case("linear-probe: --test-fraction nan", "eval",
         ["linear-probe", "--model", "{w}", "--data", "{tmp}/tree", "--test-fraction", "nan"], code=2,
         make=two_classes, words=("nan is not a number in [0.01, 0.99]",)),
    Case("retrieval: --out in a read-only folder, before any work", "eval",
         ["retrieval", "--model", "{w}", "--data", MANIFEST, "--out", "{tmp}/ro/r.json"],
         make=lambda tmp: (manifest(tmp, {"en": ["a road"]}), read_only(tmp / "ro")),
         words=("cannot write in", "not writable")),
    Case("report: a zeroshot task without classes, found before any task runs", "eval",
         ["report", "{tmp}/suite.json", "--model", "{w}", "--workers", "0"], make=zeroshot_suite,
         words=("suite.json: tasks[1].classes: missing (text)",), absent=("report.*",)),
    # a suite's settings are the command line's, of the same type and range: refused before any task runs
    *(Case(f"report: a k-NN task with {json.dumps(settings)}", "eval",
           ["report", "{tmp}/suite.json", "--model", "{w}", "--workers", "0"],
           make=lambda tmp, settings=settings: knn_suite(tmp, **settings), words=(words,),
           absent=("report.*",))
      for settings, words in (
          ({"k": "5"}, 'suite.json: tasks[1].k: "5" is not a whole number >= 1'),
          ({"k": 2.5}, "tasks[1].k: 2.5 is not a whole number >= 1"),
          ({"temperature": None}, "tasks[1].temperature: null is not a number in (0, inf)"),
          ({"temperature": "0.07"}, 'tasks[1].temperature: "0.07" is not a number in (0, inf)'),
          ({"test_fraction": 5}, "tasks[1].test_fraction: 5 is not a number in [0.01, 0.99]"),
          ({"temprature": 0.1}, "tasks[1].temprature: not a field here (did you mean temperature?)"))),
    Case("report: a zero-shot template {x} in a suite, found before any task runs", "eval",
         ["report", "{tmp}/suite.json", "--model", "{w}", "--workers", "0"],
         make=lambda tmp: (two_classes(tmp), (tmp / "suite.json").write_text(json.dumps({"tasks": [
             {"name": "a", "task": "knn", "data": "tree", "k": 1},
             {"name": "b", "task": "zeroshot", "data": "tree", "classes": "classes.json",
              "templates": {"en": ["a {x} from above"]}}]})), (tmp / "classes.json").write_text(json.dumps(
                  {"fields": {"en": "fields"}, "water": {"en": "water"}}))),
         words=("tasks[1].templates.en: template 'a {x} from above': KeyError",), absent=("report.*",)),
    Case("report: a task that fails late keeps the results of those before it", "eval",
         ["report", "{tmp}/suite.json", "--model", "{w}", "--workers", "0"], make=failing_suite,
         words=("task 'b'", "--k 5: more neighbours", "the tasks that finished before it are in report.json"),
         absent=("report.md",), check=partial_report),
    Case("retrieval: --out under a file", "eval",
         ["retrieval", "--model", "{w}", "--data", MANIFEST, "--workers", "0", "--out", MANIFEST + "/r.json"],
         make=lambda tmp: manifest(tmp, {"en": ["a road"]}), words=("is a file, not a folder",)),
    Case("zeroshot: a template {x}", "eval",
         ["zeroshot", "--model", "{w}", "--data", "{tmp}/tree", "--classes", "RSSCN7", "--templates",
          "{tmp}/t.json", "--workers", "0"],
         make=lambda tmp: (tmp / "t.json").write_text('["a {x} from above"]'), words=("KeyError",)),
    Case("retrieval: --ties bogus", "eval",
         ["retrieval", "--model", "{w}", "--data", MANIFEST, "--ties", "bogus"],
         make=lambda tmp: manifest(tmp, {"en": ["a road"]}),
         words=("--ties 'bogus': choose one of expected",)),
    Case("linear-probe: --shots not numbers", "eval",
         ["linear-probe", "--model", "{w}", "--data", "{tmp}/imgs", "--shots", "1,two"], make=images,
         words=("--shots '1,two': expected comma-separated whole numbers",)),
    Case("linear-probe: a folder of one class", "eval",
         ["linear-probe", "--model", "{w}", "--data", "{tmp}/tree", "--workers", "0"],
         make=lambda tmp: (tmp / "tree").mkdir() or shutil.move(str(images(tmp)), tmp / "tree" / "fields"),
         words=("a classifier needs at least 2",)),
    Case("knn: --k 0", "eval", ["knn", "--model", "{w}", "--data", "{tmp}/tree", "--k", "0"],
         make=two_classes, code=2, words=("Invalid value for '--k'",)),
    Case("knn: --k above the train images", "eval",
         ["knn", "--model", "{w}", "--data", "{tmp}/tree", "--k", "3", "--workers", "0"], make=two_classes,
         words=("--k 3: more neighbours than the 2 train images",)),
    *(Case(f"knn: --temperature {t}", "eval",
           ["knn", "--model", "{w}", "--data", "{tmp}/tree", "--temperature", t], make=two_classes, code=2,
           words=(f"'--temperature': {t} is not a number in (0, inf)",))
      for t in ("0.0", "nan", "inf")),
    # exp(similarity / T) overflows below T = 1/709: the vote is in log space, right at any temperature
    *(Case(f"knn: --temperature {t} votes as the nearest neighbour does", "eval",
           ["knn", "--model", "{w}", "--data", "{tmp}/tree", "--k", "2", "--temperature", t, "--workers", "0",
            "--out", "{tmp}/r.json"], code=0, make=colour_classes, check=voted_by_the_nearest)
      for t in ("1e-3", "1e-300", "5e-324")),
    Case("knn: no classes in the data (images without class folders)", "eval",
         ["knn", "--model", "{w}", "--data", "{tmp}/imgs", "--workers", "0"], make=images,
         words=("class folders",)),
    Case("knn: --out is the --model file", "eval",
         ["knn", "--model", "{w}", "--data", "{tmp}/tree", "--out", "{w}"], make=two_classes,
         words=("is the input",), unchanged=("w.safetensors",)),
    Case("retrieval without captions in any language", "eval",
         ["retrieval", "--model", "{w}", "--data", "{tmp}/ds/captions.jsonl", "--workers", "0"],
         make=lambda tmp: manifest(tmp, captions={}), words=("no captions in any language",)),
    # --- data/prepare.py
    Case("captions --out the annotation file", "prepare", CAPTIONS + ["{tmp}/ds/ann.json"], make=annotations,
         words=("is the input", "ann.json"), unchanged=("ds/ann.json",)),
    Case("captions --out a folder", "prepare", CAPTIONS + ["{tmp}/ds/imgs"], make=annotations,
         words=("is a folder",), absent=("**/.*tmp*",)),
    Case('annotations with "dataset": 5', "prepare", CAPTIONS + ["{tmp}/ds/c.jsonl"],
         make=lambda tmp: annotations(tmp, dataset=5), words=('"dataset" is 5',), absent=("ds/c.jsonl",)),
    Case("annotations naming the file '.'", "prepare", CAPTIONS + ["{tmp}/ds/c.jsonl"],
         make=lambda tmp: annotations(tmp, ["0.png", "."]), words=("'.' (names a folder",),
         absent=("ds/c.jsonl",)),
    Case("annotations with a lone surrogate in a caption", "prepare", CAPTIONS + ["{tmp}/ds/c.jsonl"],
         make=annotation_with_lone_surrogate,
         words=('ann.json: images[1].sentences[0].raw: "a \\ud800 photo" is not text (it holds a lone '
                "surrogate",), absent=("ds/c.jsonl",)),
    Case("annotations listing no image", "prepare", CAPTIONS + ["{tmp}/ds/c.jsonl"],
         make=lambda tmp: annotations(tmp, []), words=("lists no images",), absent=("ds/c.jsonl",)),
    Case("classes: a file name not UTF-8", "prepare", ["classes", "{tmp}/tree", "--out", "{tmp}/l.jsonl"],
         make=latin1_tree, words=("caf\\xe9.png (file name not UTF-8", "--drop-unreadable"),
         absent=("l.jsonl",)),
    Case("merge x --exclude x --out x", "prepare",
         ["merge", MANIFEST, "--exclude", MANIFEST, "--out", MANIFEST],
         make=lambda tmp: manifest(tmp, {"en": ["x"]}), words=("is the input",),
         unchanged=("ds/captions.jsonl",)),
    Case("merge records without captions", "prepare", ["merge", MANIFEST, "--out", "{tmp}/train.jsonl"],
         make=lambda tmp: manifest(tmp, {}), words=("2 records have no captions: d/0, d/1",),
         absent=("train.jsonl",)),
    # --- translate.py
    Case("cache: no such manifest", "prepare", ["cache", "{tmp}/none.jsonl"],
         words=("none.jsonl: no such file",)),
    Case("cache: a split without images", "prepare", ["cache", MANIFEST],
         make=lambda tmp: manifest(tmp, {"en": ["a"]}), words=("no train images to cache",),
         absent=("ds/*.safetensors",)),
    Case("cache --split bogus", "prepare", ["cache", MANIFEST, "--split", "bogus"],
         make=lambda tmp: manifest(tmp, {"en": ["a"]}), words=("--split 'bogus': choose one of train",)),
    Case("cache --max-side 8", "prepare", ["cache", MANIFEST, "--max-side", "8"],
         make=train_split, words=("--max-side 8: at least 32",)),
    Case("cache --out the manifest", "prepare", ["cache", MANIFEST, "--out", MANIFEST],
         make=train_split, words=("captions.jsonl",), unchanged=("ds/captions.jsonl",)),
    Case("cache --out an image the manifest lists", "prepare",
         ["cache", MANIFEST, "--out", "{tmp}/ds/imgs/1.png"],
         make=train_split, words=("imgs/1.png is the input",), unchanged=("ds/imgs/1.png",)),
    Case("cache: an image missing", "prepare", ["cache", MANIFEST, "--out", "{tmp}/c.safetensors"],
         make=lambda tmp: train_split(tmp, missing=True),
         words=("1 of 2 train images are unreadable", "gone.png"), absent=("c.safetensors",)),
    Case("translate: an empty English caption", "translate", NOWHERE,
         make=lambda tmp: manifest(tmp, {"en": ["a", " "]}), words=("2 English captions are empty",),
         absent=("out.jsonl*",)),
    Case("translate: --cache is the input manifest", "translate", NOWHERE + ["--cache", MANIFEST],
         make=lambda tmp: manifest(tmp, {"en": ["a"]}), words=("is the input manifest",),
         unchanged=("ds/captions.jsonl",)),
    Case("translate: a language the manifest has", "translate", NOWHERE, code=0,
         make=lambda tmp: manifest(tmp, {"en": ["a"], "pt": ["b"]}),
         words=("pt: kept the existing captions of 2 records",), unchanged=("ds/captions.jsonl",)),
    Case("translate: config.json vocab_size 4e9", "translate", LOCAL,
         make=lambda tmp: tower(tmp, vocab_size=4e9), words=("vocab_size is 4000000000.0",),
         absent=("out*",)),
    Case("translate: NaN weights", "translate", LOCAL, make=lambda tmp: tower(tmp, "nan"),
         words=("logits are not finite",), absent=("out.jsonl",)),
    Case("translate: the model answers nothing", "translate", LOCAL, make=lambda tmp: tower(tmp, "empty"),
         words=("1 of 1 strings got only empty answers", "pt 'many planes at the airport'"),
         absent=("out.jsonl",)),
    Case("translate: cache lines of bad UTF-8 or a non-string out", "translate", LOCAL, code=0,
         make=lambda tmp: (tower(tmp), (tmp / "out.jsonl.cache.jsonl").write_bytes(b'\xff\n{"out": 5}\n')),
         words=("skipped 2 lines that hold no translation",)),
    # --- train.py (every setting is checked before any work: these rows take milliseconds)
    Case("train: --data without --tokenizer", "train", ["--data", MANIFEST, "--out", "{tmp}/run"],
         make=lambda tmp: manifest(tmp, {"en": ["a road"]}), words=("needs --tokenizer",)),
    *(Case(f"train: {' '.join(flag)}", "train", TRAIN + list(flag),
           make=lambda tmp: manifest(tmp, {"en": ["a"]}), words=(words,), absent=("run",))
      for flag, words in ((("--ckpt-every", "0"), "--ckpt-every 0: a whole number >= 1"),
                          (("--log-every", "0"), "--log-every 0: a whole number >= 1"),
                          (("--batch-size", "-3"), "--batch-size -3: a whole number >= 1"),
                          (("--steps", "-5"), "--steps -5: a whole number >= 1"),
                          (("--workers", "-1"), "--workers -1: a whole number >= 0"),
                          (("--local-crops", "-1"), "--local-crops -1: a whole number >= 0"),
                          (("--lr", "nan"), "--lr nan: a number in (0, inf)"),
                          (("--global-scale", "0", "0"), "--global-scale (0.0, 0.0): two area fractions"),
                          (("--precision", "bogus"), "--precision 'bogus': choose auto, fp32, bf16, fp16"),
                          (("--ema-schedule", "bogus"), "--ema-schedule 'bogus': choose fixed, cosine"),
                          (("--arch", "bogus"), "--arch 'bogus': choose xlmr-b32, tiny"),
                          (("--val-data", "{tmp}/none.jsonl"), "--val-data '"),
                          (("--langs", "en,xx"), "unknown language xx"),
                          (("--clip-weight", "-1"), "--clip-weight -1.0: a number in [0, inf)"),
                          (("--teacher-temp", "1e-31"), "--teacher-temp 1e-31: a number in [1e-30, inf)"),
                          (("--max-member", "0"), "--max-member 0: a whole number >= 1"),
                          (("--clip-weight", "0", "--distill-weight", "0"), "no loss is left to train"))),
    Case("train: --augment bogus", "train", TRAIN + ["--augment", "bogus"], make=train_split,
         words=("--augment 'bogus': choose auto, pil, tensor",), absent=("run",)),
    Case("train: --image-cache that does not exist", "train", TRAIN + ["--image-cache", "{tmp}/none"],
         make=train_split, words=("none: no such image cache", "python data/prepare.py cache"),
         absent=("run",)),
    Case("train: --image-cache that is not a cache", "train",
         TRAIN + ["--image-cache", "{tmp}/w.safetensors"],
         make=lambda tmp: (train_split(tmp), rsmclip.save(rsmclip.CLIP(TINY), tmp / "w.safetensors")),
         words=("w.safetensors: not an rsmclip image cache",), absent=("run",)),
    Case("train: --image-cache of an edited manifest", "train",
         TRAIN + ["--image-cache", "{tmp}/c.safetensors"],
         make=lambda tmp: cache(tmp, edit=True), words=("made from another manifest", "rebuild it"),
         absent=("run",)),
    Case("train: --image-cache of another split", "train", TRAIN + ["--image-cache", "{tmp}/c.safetensors"],
         make=cache, words=("holds the test split, training reads train",), absent=("run",)),
    Case("train: --image-cache with two --data", "train",
         TRAIN + ["--data", MANIFEST, "--image-cache", "{tmp}/c.safetensors"], make=cache,
         words=("one cache holds one manifest",), absent=("run",)),
    Case("train: a --config that is not JSON", "train", TRAIN + ["--config", "{tmp}/c.json"],
         make=lambda tmp: (manifest(tmp, {"en": ["a"]}), (tmp / "c.json").write_text('{"steps": 3')),
         words=("c.json: not valid JSON (line 1",), absent=("run",)),
    # a --config file's settings are the command line's, of the same type and range (a bool only true/false)
    *(Case(f"train: a --config with {text}", "train", TRAIN + ["--config", "{tmp}/c.json"],
           make=lambda tmp, text=text: (train_split(tmp), (tmp / "c.json").write_text(text)),
           words=(words,), absent=("run",))
      for text, words in (('{"head_bn": "false"}', 'c.json: head_bn: "false" is not true or false'),
                          ('{"steps": "5"}', 'c.json: steps: "5" is not a whole number >= 1'),
                          ('{"lr": true}', "c.json: lr: true is not a number in (0, inf)"),
                          ('{"global_scale": [0.4]}', "c.json: global_scale: [0.4] is not a list of 2 items"),
                          ('{"config": {"arch": "big"}}', 'config.arch: "big" is not one of "xlmr-b32"'),
                          ('{"stpes": 5}', "c.json: stpes: not a field here (did you mean steps?)"))),
    Case("train: resuming a run whose config.json is cut", "train", TRAIN,
         make=lambda tmp: (manifest(tmp, {"en": ["a"]}), run_dir(tmp, '{"config": {"steps"')),
         words=("config.json: not valid JSON", "use another --out"), unchanged=("run/config.json",)),
    Case("train: resuming a checkpoint whose metadata holds a step as text", "train", OURS + RESUME,
         make=lambda tmp: resumable_checkpoint(tmp, step="2"),
         words=('checkpoint.safetensors, metadata "state": step: "2" is not a whole number >= 0',),
         unchanged=("run/checkpoint.safetensors",)),
    Case("train: resuming a run without its config.json", "train", TRAIN + ["--batch-size", "7"],
         make=lambda tmp: (manifest(tmp, {"en": ["a"]}), run_dir(tmp, None)),
         words=("no config.json", "use another --out"), unchanged=("run/checkpoint.safetensors",)),
    Case("train: --image-cache whose images changed (same manifest bytes)", "train",
         TRAIN + ["--langs", "en", "--image-cache", "{tmp}/c.safetensors"], make=image_cache_then_replace,
         words=("1 of 2 cached images changed since the cache was made: imgs/1.png", "rebuild it"),
         absent=("run",)),
    Case("train: --out an existing file", "train", TRAIN[:-1] + ["{tmp}/afile", "--langs", "en"],
         make=lambda tmp: (train_split(tmp), (tmp / "afile").write_text("mine")),
         words=("--out", "a file; a run directory is a folder"), unchanged=("afile",)),
    # --- tar shards (data/shards.py): prepare.py shards and train.py --data SHARDS
    Case("prepare shards: --per-shard 0", "prepare",
         ["shards", MANIFEST, "--out", "{tmp}/sh", "--per-shard", "0"], make=train_split,
         words=("--per-shard 0: at least 1",), absent=("sh",)),
    *(Case(f"prepare shards: {' '.join(flag)}", "prepare", ["shards", MANIFEST, "--out", "{tmp}/sh", *flag],
           make=train_split, words=(words,), absent=("sh",))
      for flag, words in ((("--max-side", "16"), "--max-side 16: at least 32 pixels"),
                          (("--split", "dev"), "--split 'dev': choose one of train, val, test"),
                          (("--name", "a.b"), "--name 'a.b': letters, digits, '-' and '_' only"))),
    *(Case(f"prepare shards: a lone surrogate in a record's {field}", "prepare",
           ["shards", MANIFEST, "--out", "{tmp}/sh"],
           make=lambda tmp, field=field: with_lone_surrogate(tmp, field),
           words=(words, "(it holds a lone surrogate, which no UTF-8 file can)"), absent=("sh",))
      for field, words in (("id", 'captions.jsonl, line 1: id: "d/0\\ud800" is not text'),
                           ("caption", 'captions.jsonl, line 1: captions.en[0]: "a road \\ud800" is not '
                                       "non-blank text"))),
    Case("prepare shards: --out holds shards of another manifest", "prepare",
         ["shards", MANIFEST, "--out", "{tmp}/sh"],
         make=lambda tmp: (our_shards(tmp), rewrite_captions(tmp / "ds" / "captions.jsonl")),
         words=("holds shards of another manifest or settings (manifest_sha256, per_shard differ)",),
         unchanged=("sh/shards.json", "sh/train-000000.tar")),
    Case("train: a truncated shard (ours: its size disagrees with shards.json)", "train", OURS + STREAM,
         make=lambda tmp: (our_shards(tmp), truncate(tmp / "sh" / "train-000001.tar")),
         words=("train-000001.tar: 5,120 bytes, ", "shards.json says 10,240", "truncated or replaced"),
         absent=("run",)),
    Case("train: a truncated shard (another's)", "train", ["--data", "{tmp}/other"] + STREAM,
         make=lambda tmp: (other_shards(tmp, sample("a") + sample("b"), sample("c") + sample("d")),
                           truncate(tmp / "other" / "00001.tar", 0.3)),
         words=("00001.tar: ", "truncated"), absent=("run",)),
    Case("train: a shard cut between two samples (another's: no end-of-archive blocks)", "train",
         ["--data", "{tmp}/other"] + STREAM,
         make=lambda tmp: (other_shards(tmp, sample("a") + sample("b"), sample("c") + sample("d")),
                           truncate(tmp / "other" / "00001.tar", 2048 / 10240)),
         words=("00001.tar: truncated (it ends after 1 samples without the end of the archive)",),
         absent=("run",)),
    Case("train: a shard missing from a brace range", "train",
         ["--data", "{tmp}/sh/train-{000000..000002}.tar"] + STREAM,
         make=lambda tmp: (our_shards(tmp, 6), (tmp / "sh" / "train-000001.tar").unlink()),
         words=("1 of 3 shards are missing", "train-000001.tar"), absent=("run",)),
    Case("train: a brace range that runs backwards", "train",
         ["--data", "{tmp}/sh/train-{000001..000000}.tar"] + STREAM, make=our_shards,
         words=("the range {000001..000000} is empty",), absent=("run",)),
    Case("train: samples without caption, without image, with bytes that do not decode: counted skips",
         "train", ["--data", "{tmp}/other", *STREAM[:5], "6", *STREAM[6:]], code=0, make=faulty_samples,
         stdout=("2 of 11 samples lack an image or a caption", "warning: skipped", "x1: no caption",
                 "x2: no image (txt only)", "x3.jpg: cannot read image"),
         check=three_skipped),
    Case("train: a key in two shards", "train", ["--data", "{tmp}/other"] + STREAM,
         make=lambda tmp: other_shards(tmp, sample("a") + sample("b"), sample("c") + sample("a")),
         words=("the key a is in", "00000.tar and in", "00001.tar"), absent=("run",)),
    Case("train: fewer shards than processes x loader workers", "train",
         OURS + STREAM + ["--workers", "3"], make=our_shards,
         words=("2 shards for 3 streams (processes x loader workers)",), absent=("run",)),
    Case("train: ours and another's shards in one --data", "train",
         OURS + ["--data", "{tmp}/other/00000.tar"] + STREAM,
         make=lambda tmp: (our_shards(tmp), other_shards(tmp, sample("a") + sample("b"))),
         words=("--data mixes shards written by data/prepare.py shards",
                "00000.tar: no shards.json lists it"),
         absent=("run",)),
    Case("train: shards.json's sample count disagrees with its shard", "train", OURS + STREAM,
         make=lambda tmp: edit_index(tmp, miscount),
         words=("train-000000.tar: 2 samples, its shards.json says 3",)),
    Case("train: an unfinished shards.json (a stopped prepare.py shards)", "train", OURS + STREAM,
         make=lambda tmp: (our_shards(tmp), (tmp / "sh" / "shards.json").write_text(
             (tmp / "sh" / "shards.json").read_text().replace('"complete": true', '"complete": false'))),
         words=("the shards were not all written", "run the same data/prepare.py shards command again"),
         absent=("run",)),
    Case("train: resuming a run on shards written again since (3 to a shard)", "train", OURS + RESUME,
         make=shard_run, words=("train-000000.tar: not the shard the checkpoint's run read (its SHA-256 in "
                                "shards.json changed, 2 samples then, 3 now)",),
         unchanged=("run/checkpoint.safetensors",)),
    # a resume follows the shards' bytes: ours by shards.json's SHA-256 (a file whose stamp changed is
    # hashed), others' by their content (member names, sizes, first and last bytes)
    Case("train: resuming after two of our shards swapped their bytes (names, sizes, counts the same)",
         "train", OURS3 + RESUME, make=lambda tmp: ours_then(tmp, "swap"),
         words=("train-000001.tar: its bytes are not those its shards.json lists", "swapped or replaced"),
         unchanged=("run/checkpoint.safetensors",)),
    Case("train: resuming after our shard 1 was replaced by a byte copy of shard 0", "train",
         OURS3 + RESUME, make=lambda tmp: ours_then(tmp, "copy"),
         words=("train-000001.tar: its bytes are not those its shards.json lists",),
         unchanged=("run/checkpoint.safetensors",)),
    Case("train: resuming after two of another's shards swapped their bytes", "train",
         ["--data", "{tmp}/other"] + RESUME, make=others_then_swap,
         words=("00001.tar: not the shard the checkpoint's run read (its content: member names, sizes",),
         unchanged=("run/checkpoint.safetensors",)),
    # shards.json is read by its type before any work
    *(Case(f"train: shards.json with {what}", "train", OURS + STREAM,
           make=lambda tmp, edit=edit: edit_index(tmp, edit), words=(words,), absent=("run",))
      for what, edit, words in (
          ('a shard\'s samples "10"', lambda x: x["shards"][1].update(samples="10"),
           'shards.json: shards[1].samples: "10" is not a whole number >= 1'),
          ("a shard's samples 10.5", lambda x: x["shards"][1].update(samples=10.5),
           "shards[1].samples: 10.5 is not a whole number >= 1"),
          ("a shard's samples -5", lambda x: x["shards"][1].update(samples=-5),
           "shards[1].samples: -5 is not a whole number >= 1"),
          ("a shard's samples 0", lambda x: x["shards"][1].update(samples=0),
           "shards[1].samples: 0 is not a whole number >= 1"),
          ("a shard without samples", lambda x: x["shards"][1].pop("samples"),
           "shards[1].samples: missing (a whole number >= 1)"),
          ("a shard without bytes", lambda x: x["shards"][0].pop("bytes"),
           "shards[0].bytes: missing (a whole number >= 1)"),
          ("langs null", lambda x: x.update(langs=None), "shards.json: langs: null is not a list"),
          ('a shard entry {"nope": 1}', lambda x: x["shards"].__setitem__(1, {"nope": 1}),
           "shards[1].name: missing"),
          ("a total that is not its shards' sum", lambda x: x.update(samples=5),
           "samples: 5 is not the sum of its shards' samples (4)"),
          ("a shard listed twice", lambda x: x["shards"][1].update(name="train-000000.tar"),
           "shards: train-000000.tar is listed twice"))),
    Case("train: a shard with two images under one key (dup.png, dup.txt, dup.png)", "train",
         ["--data", "{tmp}/other"] + STREAM,
         make=lambda tmp: other_shards(tmp, [("dup.png", png()), ("dup.txt", b"a road"), ("dup.png", png(30))]
                                       + sample("b"), sample("c") + sample("d")),
         words=("00000.tar: dup.png comes twice in one sample",), absent=("run",)),
    Case("train: a GNU sparse member, refused when the shard is opened (before the model is built)", "train",
         ["--data", "{tmp}/other"] + STREAM, make=sparse_shard,
         words=("00000.tar: s.png is a sparse member (GNU tar --sparse)",), absent=("run",)),
    Case("train: a member above --max-member is skipped by its header, counted", "train",
         ["--data", "{tmp}/other", *STREAM[:5], "6", *STREAM[6:], "--max-member", "1"], code=0,
         make=a_large_member, stdout=("1 of 8 samples hold a member above --max-member (1.0 MiB)",
                                      "big.png: 2.0 MiB, above --max-member"),
         check=skipped(1)),
    Case("train: a brace range of 20 million names, refused before any is made", "train",
         ["--data", "{tmp}/sh/train-{0..20000000}.tar"] + STREAM, make=our_shards,
         words=("20,000,001 names, more than the 1,000,000 that one --data pattern may name",),
         absent=("run",)),
    Case("train: --shuffle-buffer 0", "train", OURS + STREAM + ["--shuffle-buffer", "0"], make=our_shards,
         words=("--shuffle-buffer 0: a whole number >= 1",), absent=("run",)),
    Case("train: --image-cache with shards", "train",
         OURS + STREAM + ["--image-cache", "{tmp}/c.safetensors"], make=our_shards,
         words=("shards are read as they are",), absent=("run",)),
    Case("train plot: steps written by two runs are a warning, not a zigzag", "train", ["plot", "{tmp}/run"],
         code=0, make=two_writers, words=("repeated or decreasing steps (2 after 4)", "two runs")),
    Case("train plot: inf and 1e308 are marked, not plotted", "train", ["plot", "{tmp}/run"], code=0,
         make=blow_up, check=svg_is_finite),
    Case("train plot: no such folder", "train", ["plot", "{tmp}/run"], words=("run: no such run directory",)),
    Case("train plot: a folder without metrics.jsonl", "train", ["plot", "{tmp}/run"],
         make=lambda tmp: (tmp / "run").mkdir(), words=("run/metrics.jsonl: no such file",),
         absent=("run/curves.svg",)),
    Case("train plot: a damaged line in metrics.jsonl", "train", ["plot", "{tmp}/run"],
         make=lambda tmp: (tmp / "run").mkdir() or (tmp / "run" / "metrics.jsonl").write_text(
             '{"step": 2, "loss": 3.0}\n{"step": 4, "lo\n{"step": 6, "loss": 2.0}\n'),
         words=("metrics.jsonl line 2 is damaged", "delete or fix that line"), absent=("run/curves.svg",)),
    # --- scenes (search/: GeoTIFF scenes tiled on the fly)
    Case("scenes: a TIFF without georeference is searched as one picture", "rsmclip",
         ["search", "{tmp}/plain.tif", "roads", "--model", "{w}", "--geojson", "{tmp}/hits.geojson"], code=0,
         make=lambda tmp: Image.new("RGB", (80, 60), (40, 90, 160)).save(tmp / "plain.tif"),
         words=("plain.tif has no georeference (no CRS): searched as one picture",
                "1 hits are pictures without georeference: they are not in"),
         check=lambda tmp: features(tmp) == []),
    Case("scenes: an all-nodata scene indexes 0 tiles and says so", "rsmclip",
         ["search", "{tmp}/s.tif", "roads", "--model", "{w}", "--out", "{tmp}/hits.json"],
         make=lambda tmp: scene(tmp, data=np.zeros((3, 96, 128), np.uint8), nodata=0),
         stdout=("0 of 4 tiles indexed (4 below --min-valid 0.5)",),
         words=("no readable images or tiles to search",), absent=("hits.json",)),
    Case("scenes: a 1-band scene is read as grey", "rsmclip",
         ["search", "{tmp}/s.tif", "roads", "--model", "{w}"], code=0,
         make=lambda tmp: scene(tmp, data=np.full((1, 96, 128), 70, np.uint8)),
         stdout=("4 of 4 tiles indexed",)),
    Case("scenes: a 2-band scene without colour bands", "rsmclip",
         ["search", "{tmp}/s.tif", "roads", "--model", "{w}"],
         make=lambda tmp: scene(tmp, data=np.full((2, 96, 128), 70, np.uint8)),
         words=("2 data bands and none of them red, green or blue", "--bands 1"), absent=("home/index/*/*",)),
    Case("scenes: a rotated geotransform is handled (rotated footprints)", "rsmclip",
         ["search", "{tmp}/s.tif", "roads", "--model", "{w}", "--geojson", "{tmp}/hits.geojson"], code=0,
         make=rotated, check=footprint_is_rotated),
    Case("scenes: scenes of different CRSs in one search", "rsmclip",
         ["search", "{tmp}/s.tif", "{tmp}/g.tif", "roads", "--model", "{w}", "--geojson",
          "{tmp}/hits.geojson", "--top-k", "8"], code=0,
         make=two_scenes, check=two_crs),
    Case("scenes: a truncated TIFF", "rsmclip", ["search", "{tmp}/s.tif", "roads", "--model", "{w}"],
         make=lambda tmp: truncate(scene(tmp), 0.3),
         words=("s.tif: 4 of 4 tiles unreadable (", "no readable images or tiles to search")),
    Case("scenes: a scene too large to read whole is read by windows", "rsmclip",
         ["search", "{tmp}/huge.tif", "roads", "--model", "{w}", "--gsd", "32"], code=0, make=huge_scene,
         stdout=("25 of 25 tiles indexed",)),
    *(Case(f"scenes: {' '.join(flag)}", "rsmclip",
           ["search", "{tmp}/s.tif", "roads", "--model", "{w}", *flag], code=2, make=scene,
           words=(f"Invalid value for '{flag[0]}'", words), absent=("home/index",))
      for flag, words in ((("--tile", "8"), "8 is not at least 16 pixels"),
                          (("--overlap", "-0.1"), "-0.1 is not a share in [0, 1)"),
                          (("--overlap", "1"), "1.0 is not a share in [0, 1)"),
                          (("--gsd", "0"), "0.0 is not a positive number of metres per pixel"),
                          (("--gsd", "nan"), "nan is not a positive number of metres per pixel"),
                          (("--min-valid", "1.5"), "1.5 is not a share in [0, 1]"),
                          (("--min-valid", "-0.1"), "-0.1 is not a share in [0, 1]"),
                          (("--bands", "1,2"), "one band (grey) or three"),
                          (("--bands", "red"), "comma-separated band numbers"))),
    Case("scenes: --tile larger than the scene", "rsmclip",
         ["search", "{tmp}/s.tif", "roads", "--model", "{w}", "--tile", "200"], make=scene,
         words=("s.tif: 128 x 96 pixels, smaller than one tile (200 x 200", "no readable images or tiles")),
    Case("scenes: --bands naming a band that is not there", "rsmclip",
         ["search", "{tmp}/s.tif", "roads", "--model", "{w}", "--bands", "1,2,5"], make=scene,
         words=("--bands 1,2,5: ", "s.tif has 3 bands"), absent=("home/index/*/*",)),
    *(Case(f"scenes: {option} onto the scene", "rsmclip",
           ["search", "{tmp}/s.tif", "roads", "--model", "{w}", option, "{tmp}/s.tif"], make=scene,
           words=(option, "is the input", "s.tif"), unchanged=("s.tif",), absent=("home/index",))
      for option in ("--geojson", "--html")),
    Case("scenes: an index built with another tiling is rebuilt, saying why", "rsmclip",
         ["search", "{tmp}/s.tif", "roads", "--model", "{w}", "--index", "{tmp}/ix", "--tile", "48"], code=0,
         make=index_of_another_tiling, words=("built with another tiling (--tile 32 -> 48), rebuilding",)),
    Case("scenes: --index a folder of other files", "rsmclip",
         ["search", "{tmp}/s.tif", "roads", "--model", "{w}", "--index", "{tmp}/imgs"],
         make=lambda tmp: (scene(tmp), images(tmp)), words=("a folder that holds other files",),
         unchanged=("imgs/0.png", "imgs/1.png", "imgs/2.png")),
    Case("scenes: --index with two inputs", "rsmclip",
         ["search", "{tmp}/s.tif", "{tmp}/imgs", "roads", "--model", "{w}", "--index", "{tmp}/ix"],
         make=lambda tmp: (scene(tmp), images(tmp)), words=("--index names one index",), absent=("ix",)),
    # --- bench.ablation
    Case("bench.ablation: --seeds a", "ablation", ["demo", "--work", "{tmp}/w", "--seeds", "a"], code=2,
         words=("Invalid value for --seeds", "'a': comma-separated whole numbers"), absent=("w",)),
    Case("bench.ablation: --seeds 0,0 (a seed twice)", "ablation",
         ["regime", "--work", "{tmp}/w", "--seeds", "0,0"], code=2,
         words=("Invalid value for --seeds", "a seed given twice"), absent=("w",)),
    Case("bench.ablation: --bases -1", "ablation", ["regime", "--work", "{tmp}/w", "--bases", "-1"], code=2,
         words=("Invalid value for --bases", "each a whole number >= 0"), absent=("w",)),
    Case("bench.ablation: --head both", "ablation", ["regime", "--work", "{tmp}/w", "--head", "both"], code=2,
         words=("Invalid value for --head", "'both': one of auto, bn, plain"), absent=("w",)),
    Case("bench.ablation: selfdist --only a row it does not have", "ablation",
         ["selfdist", "--work", "{tmp}/w", "--only", "today,longer"], code=2,
         words=("Invalid value for --only", "longer: rows are today, clip, wd"), absent=("w",)),
    Case("bench.ablation attributes: a manifest without the demo's scenes", "ablation",
         ["attributes", "{w}", "--data", MANIFEST], make=lambda tmp: manifest(tmp, {"en": ["a"]}),
         words=("captions.jsonl: not the demo's manifest", '"scene"')),
    # --- train --lang-weights
    *(Case(f"train: --langs {langs} --lang-weights {weights}", "train",
           TRAIN + ["--langs", langs, "--lang-weights", weights], make=train_split, words=(words,),
           absent=("run",))
      for langs, weights, words in (("en,pt", "en=-0.5", "'en=-0.5' is not LANG=P with a probability P >= 0"),
                                    ("en,pt", "en=0,pt=0", "the probabilities add up to 0"),
                                    ("en,pt", "xx=0.5", "unknown language xx"),
                                    ("en", "de=0.5", "de is not one of --langs en; add it there"),
                                    ("en,pt", "en=0.8,pt=0.4", "add up to 1.2"),
                                    ("en,pt", "en:0.5", "'en:0.5' is not LANG=P"))),
]


def entry_app(name: str):
    if name == "rsmclip":
        return rsmclip_cli.app
    if name == "eval":
        return ev.app
    if name == "prepare":
        return prepare.app
    if name == "ablation":
        from bench import ablation
        return ablation.app
    if name == "translate":  # each imported only when needed: a row runs without the other
        import translate
        return translate.app
    import train
    return train.app


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path, spm_model, capsys, monkeypatch):
    monkeypatch.setenv("RSMCLIP_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    w = weights(tmp_path, spm_model) if any("{w}" in a or "{spm}" in a for a in case.args) else None
    case.make(tmp_path)  # after the weights: some rows run a command to make their input
    before = {f: (tmp_path / f).read_bytes() for f in case.unchanged}
    fill = {"{tmp}": tmp_path, "{w}": w, "{spm}": tmp_path / TINY.tokenizer}
    args = [a.replace("{tmp}", str(tmp_path)).replace("{w}", str(w)).replace("{spm}", str(fill["{spm}"]))
            for a in case.args]  # not str.format: rows pass braces of their own (templates)
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.run_cli(entry_app(case.entry), args)
    finally:
        while MOUNTS:
            os.system(f"umount {MOUNTS.pop()}")
    out = capsys.readouterr()
    assert exit_.value.code == case.code, out
    assert "Traceback" not in out.err + out.out
    for word in case.words:
        assert word in out.err, out.err
    for f, data in before.items():
        assert (tmp_path / f).read_bytes() == data, f"{f} changed"
    for pattern in case.absent:
        assert not list(tmp_path.glob(pattern)), pattern
    for word in case.stdout:
        assert word in out.out, out.out
    case.check(tmp_path)


# ----------------------------------------------------------------------------- the one atomic writer


def test_atomic_write_keeps_the_old_file_on_failure_and_sweeps_stale_temporaries(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    stale = tmp_path / ".out.json.999999999.abc.tmp"  # a writer killed before it could clean up
    stale.write_text("half")
    mine = tmp_path / f".out.json.{os.getpid()}.xyz.tmp"  # a live writer's file stays
    mine.write_text("live")

    def fail(tmp):
        tmp.write_text("partial")
        raise OSError(28, "No space left on device", str(tmp))

    with pytest.raises(rsmclip.RsmclipError, match="out.json: cannot write it .No space left on device; "):
        files.atomic_write(target, fail)
    assert target.read_text() == "old" and not stale.exists() and mine.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.json", mine.name])
    files.atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o666 & ~files.umask()
    with pytest.raises(rsmclip.RsmclipError, match="is a folder; give a file name"):
        files.atomic_write(tmp_path, lambda tmp: None)


def test_a_failing_safetensors_write_names_the_file_and_the_space(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own error, with the OS error inside its text."""
    target = tmp_path / "index.safetensors"
    target.write_bytes(b"the old index")

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(files, "save_file", full)
    with pytest.raises(rsmclip.RsmclipError) as error:
        files.atomic_save({"embeddings": torch.zeros(256, 4)}, target, {})
    assert str(error.value).startswith(f"{target}: cannot write it (No space left on device; needs 4.0 KiB, ")
    assert "free there; an existing file is unchanged)" in str(error.value)
    assert target.read_bytes() == b"the old index" and [p.name for p in tmp_path.iterdir()] == [target.name]


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB file system mounted at tmp/small, then filled: every write there fails with ENOSPC, as on
    a full disk. Needs root (mount); skipped with the reason otherwise."""
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o size=1m tmpfs {small} 2>/dev/null") != 0:
        pytest.skip("mounting a small tmpfs needs root: the full-disk path is covered by the unit test above")
    try:
        with contextlib.suppress(OSError), open(small / "filler", "wb", buffering=0) as f:
            while True:
                f.write(bytes(4096))
        yield small
    finally:
        os.system(f"umount {small}")


@pytest.mark.parametrize("entry", ["search", "cache"])
def test_a_full_disk_is_a_message_not_a_traceback(entry, full_disk, tmp_path, spm_model, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    w = weights(tmp_path, spm_model)
    if entry == "search":
        app, out = rsmclip_cli.app, full_disk / "ix"
        args = ["search", str(images(tmp_path)), "roads", "--model", str(w), "--index", str(out)]
    else:
        train_split(tmp_path)
        app, out = prepare.app, full_disk / "c.safetensors"
        args = ["cache", str(tmp_path / "ds" / "captions.jsonl"), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_:
        cli.run_cli(app, args)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err, err
    written = f"{out}/p-" if entry == "search" else f"{out}: "  # the index is a folder: one of its files
    assert f"error: {written}" in err and "cannot write it (No space left on device; " in err
    assert "0 bytes free there; an existing file is unchanged" in err
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]  # no partial or temporary file
