"""The `rsmclip` command: info, download, convert, embed, classify, search.

    python rsmclip_cli.py search FOLDER "a red storage tank" --model rs-m-clip     # from a checkout
    rsmclip search FOLDER "a red storage tank" --model rs-m-clip                   # after `pip install .`

It drives the library (rsmclip.py), which never imports it; its search index and HTML pages are in
search/, the conventions it shares with every script (run_cli, --model/--tokenizer/--device) in cli.py.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table
from safetensors import SafetensorError, safe_open

import cli
from cli import (
    DEVICE,
    MODEL,
    PRECISION,
    TOKENIZER,
    Precision,
    check_template,
    list_images,
    refuse_overwrite,
    warn_if_toy,
    write_text,
)
from files import atomic_save, atomic_write, display, file_sha256, listing
from rsmclip import (
    CLIP,
    HUB_FILES,
    PRESETS,
    RsmclipError,
    Tokenizer,
    cache_dir,
    config_from_json,
    convert,
    count_parameters,
    embed_images,
    embed_texts,
    load,
    read_weights,
    weights_dir,
    weights_path,
)
from search import geo
from search.index import EXACT_LIMIT, best_hits, check_index_folder, processes, update_index
from search.pages import results_page, search_page
from search.scenes import Tiling

# ----------------------------------------------------------------------------- download


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the hub's first answer carries the LFS size and sha256; keep it, do not follow


def _request(url: str, method: str = "GET", headers: Optional[dict] = None) -> urllib.request.Request:
    req = urllib.request.Request(url, method=method, headers={"User-Agent": "rsmclip", **(headers or {})})
    if token := os.environ.get("HF_TOKEN"):
        req.add_unredirected_header("Authorization", f"Bearer {token}")  # never forwarded to the CDN
    return req


def remote_info(url: str, timeout: float = 60) -> Optional[dict]:
    """Size and sha256 the server announces for a file (None if it has no such file). The hub sends an
    LFS file's sha256 in X-Linked-Etag (ETag on direct answers); a git blob ETag is no sha256."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        resp = opener.open(_request(url, "HEAD"), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        if e.code not in (301, 302, 303, 307, 308):
            raise RsmclipError(f"{url}: HTTP {e.code} {e.reason}"
                               + (" (gated or private: set HF_TOKEN)"
                                  if e.code in (401, 403) else "")) from None
        resp = e
    except (urllib.error.URLError, OSError) as e:
        raise RsmclipError(f"{url}: cannot connect ({e})") from None
    h = resp.headers
    etag = (h.get("X-Linked-Etag") or h.get("ETag") or "").removeprefix("W/").strip('"')
    size = (h.get("X-Linked-Size") or (h.get("Content-Length") if resp.status == 200 else None) or "").strip()
    if size and not size.isdigit():
        print(f"warning: {url}: the server announced the size {size[:40]!r}, not a number; no size check",
              file=sys.stderr)
    return {"size": int(size) if size.isdigit() else None,
            "sha256": etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None}


def fetch(url: str, dest: Path, info: dict, retries: int = 3, timeout: float = 60) -> Path:
    """Download url to dest with resume (a .part file and HTTP Range), a progress bar, size and sha256
    checks, and an atomic rename. A dropped connection, or no byte for `timeout` seconds, is resumed
    up to `retries` times; after that the .part file stays and the same command continues from it."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        if info["size"] is not None and have > info["size"]:
            part.unlink()
            have = 0
        try:
            resp = urllib.request.urlopen(_request(url, headers={"Range": f"bytes={have}-"} if have else {}),
                                          timeout=timeout)
            if have and resp.status != 206:  # the server ignored the range: start over
                have = 0
            with open(part, "ab" if have else "wb") as f, Progress(
                    "[bold]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn()) as bar:
                task = bar.add_task(dest.name, total=info["size"], completed=have)
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.advance(task, len(chunk))
            if info["size"] is not None and part.stat().st_size < info["size"]:
                raise ConnectionError("the server closed the connection early")  # http.client just stops
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # already complete
                break
            raise RsmclipError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # a dropped connection
            if attempt == retries:
                raise RsmclipError(f"{url}: download interrupted ({e}); {part.stat().st_size} bytes are "
                                   f"kept in {part}: run the same command again to resume") from None
            print(f"connection lost or stalled for {timeout:g} s ({e}), resuming", file=sys.stderr)
    size = part.stat().st_size
    if info["size"] is not None and size != info["size"]:
        raise RsmclipError(f"{url}: got {size} bytes, the server announced {info['size']}; "
                           "run again to resume")
    if info["sha256"] and (digest := file_sha256(part)) != info["sha256"]:
        part.unlink()
        raise RsmclipError(f"{url}: sha256 {digest} differs from the announced {info['sha256']}; the file "
                           "was deleted")
    os.replace(part, dest)
    return dest


def download_problem(name: str, path: Path) -> Optional[str]:
    """Why a file in the download folder is not a usable `name` (None if it is): presence is not enough,
    an HTML error page saved under the name, or an empty file, must not pass as "already present"."""
    try:
        if path.stat().st_size == 0:
            return "it is empty"
        if name == "tokenizer":
            Tokenizer(path)
        else:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            config_from_json(meta.get("config"), path)
    except (RsmclipError, SafetensorError, OSError, ValueError) as e:
        return str(e).removeprefix(f"{path}: ")
    return None


def download(name: str, out_dir: Path, endpoint: str, timeout: float = 60) -> Path:
    repo, candidates, saved_as = HUB_FILES[name]
    final = out_dir / saved_as
    if final.exists():
        if problem := download_problem(name, final):
            raise RsmclipError(f"{final}: present but not usable ({problem}); delete it and run again")
        print(f"{final}: already present (checked)")
        return final
    parsed = urllib.parse.urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise RsmclipError(f"--endpoint {endpoint!r}: not an http(s) URL such as https://huggingface.co")
    for filename in candidates:
        url = f"{endpoint.rstrip('/')}/{repo}/resolve/main/{filename}"
        if (info := remote_info(url, timeout)) is None:
            continue
        checks = " and ".join(c for c, v in (("size", info["size"]), ("sha256", info["sha256"])) if v) or "no"
        print(f"{repo}/{filename} -> {final} ({checks} check; {timeout:g} s without data counts as a stall)")
        if name == "tokenizer":
            fetch(url, final, info, timeout=timeout)
            if problem := download_problem(name, final):
                final.unlink()
                raise RsmclipError(f"{url}: the server sent no SentencePiece model ({problem}); deleted")
            return final
        raw = fetch(url, out_dir / f"{final.stem}.{filename}", info, timeout=timeout)
        convert(raw, final)  # open_clip names (and maybe a pickle) -> our safetensors with its config
        raw.unlink()
        print(f"converted to {final}")
        return final
    raise RsmclipError(f"{repo}: none of {', '.join(candidates)} found at {endpoint}")


# ----------------------------------------------------------------------------- the commands

# One short prompt per language for `classify`; eval.py's zero-shot protocol uses the full template
# sets in data/.
PROMPTS = {
    "en": "a satellite image of {}.", "pt": "uma imagem de satélite de {}.",
    "es": "una imagen satelital de {}.", "fr": "une image satellite de {}.",
    "de": "ein Satellitenbild von {}.", "nl": "een satellietbeeld van {}.",
    "it": "un'immagine satellitare di {}.", "zh": "{}的卫星图像。", "ko": "{}의 위성 이미지.",
    "ru": "спутниковый снимок: {}.",
}


def warn_unknown(tokenizer: Tokenizer, texts: list[str], what: str = "query"):
    """A text made mostly of pieces the vocabulary does not know reads as a row of <unk> to the model: its
    scores mean nothing, so say so (stderr) rather than rank images by it."""
    for text in texts:
        unknown, pieces = tokenizer.unknown(text)
        if 2 * unknown > pieces:
            print(f"warning: {what} {display(text)!r}: {unknown} of {pieces} pieces are unknown to the "
                  f"tokenizer {display(tokenizer.path)}, so the model cannot read it", file=sys.stderr)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="RS-M-CLIP: multilingual CLIP for remote-sensing images.")


@app.command()
def info(weights: Optional[Path] = typer.Argument(None, help="weights file (ours or open_clip safetensors), "
                                                  "or rs-m-clip / laion once downloaded"),
         preset: str = typer.Option("xlmr-b32", help=f"architecture to describe when no weights are given: "
                                                     f"{', '.join(PRESETS)}"),
         as_json: bool = typer.Option(False, "--json", help="print one JSON object (config and parameter "
                                                            "counts) and nothing else")):
    """Print the architecture config and parameter counts."""
    if weights:
        cfg, _ = read_weights(weights)
    elif preset in PRESETS:
        cfg = PRESETS[preset]
    else:
        raise RsmclipError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    with torch.device("meta"):
        counts = count_parameters(CLIP(cfg))
    if as_json:
        print(json.dumps({"config": asdict(cfg), "parameters": counts}, indent=2))
        return
    print(json.dumps(asdict(cfg), indent=2))
    print(f"parameters: visual {counts['visual']:,}  text {counts['text']:,}  total {counts['total']:,}")


@app.command("download")
def download_cmd(names: list[str] = typer.Argument(None, help=f"any of {', '.join(HUB_FILES)} "
                                                              "(default: rs-m-clip tokenizer)"),
                 out: Optional[Path] = typer.Option(None, help="folder for the files (default: weights/ in "
                                                    "the user cache, $RSMCLIP_HOME or ~/.cache/rsmclip)"),
                 endpoint: str = typer.Option(os.environ.get("HF_ENDPOINT", "https://huggingface.co"),
                                              help="hub base URL (env HF_ENDPOINT)"),
                 timeout: float = typer.Option(60, min=1, help="seconds without data before a stalled "
                                               "connection is dropped and resumed")):
    """Fetch public weights and the XLM-R vocabulary from the Hugging Face hub (resumable, checked)."""
    names = names or ["rs-m-clip", "tokenizer"]
    if unknown := [n for n in names if n not in HUB_FILES]:
        raise RsmclipError(f"unknown download {', '.join(unknown)}; choose from {', '.join(HUB_FILES)}")
    for name in names:
        download(name, out or weights_dir(), endpoint, timeout)


@app.command("convert")
def convert_cmd(src: Path = typer.Argument(..., help="checkpoint to read: open_clip's .safetensors, .bin or "
                                                     ".pt (pickles are read weights-only), or ours"),
                dst: Path = typer.Argument(..., help="the .safetensors file to write"),
                to_openclip: bool = typer.Option(False, help="write open_clip tensor names instead of ours"),
                tokenizer: Optional[Path] = typer.Option(None, help="the SentencePiece model the weights "
                                                         "belong to: its SHA-256 goes into the metadata, "
                                                         "and loading refuses another one beside them")):
    """Convert open_clip checkpoints (.safetensors, or pickled .bin/.pt read weights-only) to ours, or
    back."""
    if dst.suffix != ".safetensors":
        raise RsmclipError(f"{dst}: the output must be a .safetensors file")
    refuse_overwrite(dst, [src, tokenizer], "the output")
    cfg = convert(src, dst, to_openclip, tokenizer)
    print(f"wrote {dst} ({'open_clip' if to_openclip else 'rsmclip'} names, "
          f"vision {cfg.vision.width}x{cfg.vision.layers}, text {cfg.text.width}x{cfg.text.layers})")


EMBED_FORMATS = {".safetensors": "safetensors (tensors image_embeddings, text_embeddings; the image paths "
                                 "and texts in the metadata)",
                 ".npz": "numpy .npz (arrays image_embeddings, images, text_embeddings, texts)"}


def text_lines(path: Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file."""
    if not path.is_file():
        raise RsmclipError(f"{path}: no such text file")
    try:
        lines = [t for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
    except UnicodeDecodeError as e:
        raise RsmclipError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    if not lines:
        raise RsmclipError(f"{path}: no text lines to embed")
    return lines


@app.command()
def embed(model_path: Path = MODEL,
          images: list[Path] = typer.Option(None, help="image files or folders (repeat the option)"),
          texts: Optional[Path] = typer.Option(None, help="text file, one caption per line"),
          out: Path = typer.Option(..., help="output file; its suffix names the format: "
                                   + "; ".join(f"{k} {v}" for k, v in EMBED_FORMATS.items())),
          tokenizer: Optional[Path] = TOKENIZER,
          batch_size: int = typer.Option(64, min=1, help="images per forward pass"),
          device: str = DEVICE, precision: Precision = PRECISION):
    """Write L2-normalised embeddings of images and/or texts (safetensors or numpy .npz)."""
    if not images and not texts:
        raise RsmclipError("nothing to embed: give --images and/or --texts")
    refuse_overwrite(out, [model_path, texts, *(images or [])])
    if out.suffix not in EMBED_FORMATS:
        raise RsmclipError(f"--out {out}: unknown format {out.suffix or '(no suffix)'!r}; name the file "
                           f"{' or '.join(EMBED_FORMATS)}")
    lines = text_lines(texts) if texts else []
    model, preprocess, tok = load(model_path, tokenizer, device, precision)
    tensors, names = {}, {}  # the embeddings, and what each row is
    if images:
        paths = list_images(images)
        warn_if_toy(model.config, model_path, paths)
        with cli.image_progress(len(paths)) as progress:
            feats, ok, _ = embed_images(model, preprocess, paths, batch_size, device, progress=progress)
        tensors["image_embeddings"], names["images"] = feats.cpu(), [display(p) for p in ok]
    if lines:
        warn_unknown(tok, lines, "text")
        tensors["text_embeddings"], names["texts"] = embed_texts(model, tok, lines, device=device), lines
    if out.suffix == ".npz":
        def write(tmp: Path):
            with open(tmp, "wb") as f:  # np.savez adds .npz to a file name, not to an open file
                np.savez(f, **{k: v.numpy() for k, v in tensors.items()}, **{k: np.array(v, dtype=str)
                                                                             for k, v in names.items()})
        atomic_write(out, write)
    else:
        atomic_save(tensors, out, {k: json.dumps(v) for k, v in names.items()})
    print(f"wrote {display(out)}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items()))


@app.command()
def classify(images: list[Path] = typer.Argument(..., help="image files or folders"),
             labels: str = typer.Option(..., help="comma-separated class names, in the --lang language"),
             model_path: Path = MODEL,
             lang: str = typer.Option("en", help=f"language of the labels: {', '.join(PROMPTS)}"),
             template: Optional[str] = typer.Option(None, help="prompt with {} for the label "
                                                    "(default: one per --lang)"),
             tokenizer: Optional[Path] = TOKENIZER,
             out: Optional[Path] = typer.Option(None, help="also write the results as JSON"),
             html_page: Optional[Path] = typer.Option(None, "--html", help="also write a page to look "
                                                      "at: each image with its prediction (self-contained)"),
             device: str = DEVICE, precision: Precision = PRECISION):
    """Zero-shot classification: a table of class probabilities per image."""
    if lang not in PROMPTS and template is None:
        raise RsmclipError(f"unknown language {lang!r}; choose from {', '.join(PROMPTS)} or give --template")
    names = [n.strip() for n in labels.split(",") if n.strip()]
    if len(names) < 2:
        raise RsmclipError("give at least two comma-separated --labels")
    prompt = check_template(template or PROMPTS[lang])
    refuse_overwrite(out, [model_path, tokenizer, *images])
    refuse_overwrite(html_page, [model_path, tokenizer, out, *images], "--html")
    model, preprocess, tok = load(model_path, tokenizer, device, precision)
    paths = list_images(images)
    warn_if_toy(model.config, model_path, paths)
    warn_unknown(tok, names, "label")
    with cli.image_progress(len(paths)) as progress:
        feats, ok, failed = embed_images(model, preprocess, paths, device=device, progress=progress)
    if not ok:
        raise RsmclipError(f"no readable images in {', '.join(display(p) for p in images)}")
    classes = embed_texts(model, tok, [prompt.format(n) for n in names], device=device)
    probs = (100 * feats.cpu() @ classes.T).softmax(dim=-1)  # CLIP's fixed zero-shot scale of 100
    rows = [{"path": display(path), "prediction": names[int(row.argmax())],
             "probability": round(row.max().item(), 4),
             "probabilities": dict(zip(names, (round(p, 4) for p in row.tolist())))}
            for path, row in zip(ok, probs)]
    table = Table("image", *names, "prediction", title=f"zero-shot, prompt {prompt!r}")
    for row in rows:
        table.add_row(row["path"], *(f"{p:.3f}" for p in row["probabilities"].values()), row["prediction"])
    Console().print(table)
    if out:
        result = {"prompt": prompt, "labels": names, "skipped": len(failed), "images": rows}
        write_text(out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if html_page:
        top = [sorted(row["probabilities"].items(), key=lambda kv: -kv[1])[:3] for row in rows]
        write_text(html_page, results_page(f"zero-shot, prompt {prompt!r}", [("", [
            (path, [f"{row['prediction']} {row['probability']:.3f}",
                    *(f"{name} {p:.3f}" for name, p in best[1:]), display(path)])
            for path, row, best in zip(ok, rows, top)])]))


def split_inputs(args: list[str]) -> tuple[list[Path], list[str]]:
    """`search` takes files and folders, then the queries: the leading arguments that exist on disk are the
    inputs, the first that does not starts the queries."""
    inputs = []
    for arg in args[:-1] if len(args) > 1 else args:  # the last argument is a query, whatever it names
        if not Path(arg).exists():
            break
        inputs.append(Path(arg))
    if not inputs:
        raise RsmclipError(f"{display(args[0])}: no such file or folder to search (give scenes, pictures or "
                           "folders first, then the text queries)")
    return inputs, args[len(inputs):]


def within(test, what: str):
    """An option's callback: a value that fails `test` (nan fails every comparison): a usage error, exit 2."""
    def check(value):
        if value is not None and not test(value):
            raise typer.BadParameter(f"{value} is not {what}")
        return value
    return check


def bands_option(text: Optional[str]) -> Optional[tuple[int, ...]]:
    try:
        bands = None if text is None else tuple(int(b) for b in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r}: comma-separated band numbers, such as 1,2,3") from None
    if bands is not None and (len(bands) not in (1, 3) or min(bands) < 1):
        raise typer.BadParameter(f"{text!r}: one band (grey) or three (red, green, blue), counted from 1")
    return bands


def centre(hit: dict) -> dict:
    """A scene tile's centre as longitude and latitude (EPSG:4326), for the table and --out."""
    if hit["kind"] != "scene":
        return {}
    col, row, w, h = hit["window"]
    xs, ys = geo.footprint(hit["transform"], (col + w / 2, row + h / 2, 0, 0), 1)
    lon, lat = geo.to_lonlat(hit["crs"], xs[:1], ys[:1])
    return {"lon": round(lon[0], 6), "lat": round(lat[0], 6)}


def where(hit: dict) -> str:
    """A hit's place for the table: a scene tile's window and its centre."""
    if hit["kind"] != "scene":
        return ""
    col, row, w, h = hit["window"]
    return f"col {col} row {row} ({w} x {h} px), lon {hit['lon']:.5f} lat {hit['lat']:.5f}"


@app.command()
def search(args: list[str] = typer.Argument(..., help="scenes (GeoTIFF, COG), pictures and folders of them "
                                            "(searched recursively), then the text queries in any of the ten "
                                            "languages"),
           model_path: Path = MODEL,
           index: Optional[Path] = typer.Option(None, help="index folder, with one input only (default: one "
                                                "per input, weights and tiling in the user cache, "
                                                "$RSMCLIP_HOME or ~/.cache/rsmclip)"),
           top_k: int = typer.Option(5, min=1, help="hits shown per query"),
           tile: Optional[int] = typer.Option(None, help="tile side in output pixels, at least 16 (default: "
                                              "the model's input size)",
                                              callback=within(lambda v: v >= 16, "at least 16 pixels")),
           overlap: float = typer.Option(0.0, help="share of a tile the next one covers again, in [0, 1)",
                                         callback=within(lambda v: 0 <= v < 1, "a share in [0, 1)")),
           gsd: Optional[float] = typer.Option(None, help="metres per pixel to resample scenes to (default: "
                                               "each scene's own)",
                                               callback=within(lambda v: 0 < v < math.inf,
                                                               "a positive number of metres per pixel")),
           min_valid: float = typer.Option(0.5, help="tiles with a smaller share of valid pixels (nodata, "
                                           "alpha, mask, past the edge) are not indexed",
                                           callback=within(lambda v: 0 <= v <= 1, "a share in [0, 1]")),
           bands: Optional[str] = typer.Option(None, help="the scene bands read as red,green,blue, or one "
                                               "band as grey (default: by colour interpretation, else "
                                               "the first three)", callback=bands_option),
           nms: float = typer.Option(0.5, help="a hit overlapping a better hit of the same scene by more "
                                     "than this IoU is dropped (1: keep all)",
                                     callback=within(lambda v: 0 <= v <= 1, "an IoU in [0, 1]")),
           ann: bool = typer.Option(False, help="approximate search with FAISS (for millions of tiles; "
                                    "needs faiss-cpu)"),
           batch_size: int = typer.Option(64, min=1, help="images or tiles per forward pass while indexing"),
           workers: int = typer.Option(2, min=0, help="loader processes reading tiles while the model "
                                       "encodes"),
           tokenizer: Optional[Path] = TOKENIZER,
           out: Optional[Path] = typer.Option(None, help="also write the results as JSON"),
           html_page: Optional[Path] = typer.Option(None, "--html", help="also write a page to look at: the "
                                                    "hits of each query on their scenes and as pictures "
                                                    "(self-contained .html)"),
           geojson: Optional[Path] = typer.Option(None, help="also write the hits on scenes as GeoJSON "
                                                  "(EPSG:4326, RFC 7946), and beside it one file per scene "
                                                  "CRS in that CRS (FILE.EPSG_32618.geojson)"),
           device: str = DEVICE, precision: Precision = PRECISION):
    """Text-to-image search over scenes and pictures; the index is built once, updated when files change."""
    inputs, queries = split_inputs(args)
    if not queries:
        raise RsmclipError("no query: give the text queries after the files and folders to search")
    if index is not None:
        if len(inputs) > 1:
            raise RsmclipError("--index names one index: give it with one file or folder to search")
        check_index_folder(index, [model_path, tokenizer, *inputs])
    written = [model_path, tokenizer, *inputs]
    for option, path in (("--out", out), ("--html", html_page), ("--geojson", geojson)):
        refuse_overwrite(path, written, option)
        written.append(path)
    if index is None:
        cache_dir(check=True)  # where the index goes: a problem there is found now, not after the embedding
    model, preprocess, tok = load(model_path, tokenizer, device, precision)
    tiling = Tiling(tile or model.config.vision.image_size, overlap, gsd, min_valid, bands)
    rank, world = processes()
    weights = weights_path(model_path)
    found = [(root, update_index(model, preprocess, weights, root, index, tiling, batch_size, device, workers,
                                 rank, world)) for root in inputs]
    if rank != 0:
        return
    found = [(root, ix) for root, ix in found if ix is not None and ix.rows]
    if not found:
        raise RsmclipError(f"{listing(inputs)}: no readable images or tiles to search")
    warn_if_toy(model.config, weights, inputs)
    warn_unknown(tok, queries)
    if sum(ix.rows for _, ix in found) > EXACT_LIMIT and not ann:
        print(f"note: more than {EXACT_LIMIT:,} tiles: --ann searches them faster (approximately)",
              file=sys.stderr)
    emb = embed_texts(model, tok, queries, device=device)
    per_input = [best_hits(ix, root, emb, top_k, nms, ann) for root, ix in found]
    hits = {}
    for q, query in enumerate(queries):
        best = sorted((h for per in per_input for h in per[q]), key=lambda h: -h["score"])[:top_k]
        table = Table("rank", "score", "image", "where", title=query)
        for rank_, h in enumerate(best, 1):
            h |= {"rank": rank_, "query": query, "model": display(model_path), **centre(h)}
            table.add_row(str(rank_), f"{h['score']:.4f}", h["path"], where(h))
        Console().print(table)
        hits[query] = best
    write_search_outputs(hits, out, html_page, geojson, inputs)


def write_search_outputs(hits: dict, out: Optional[Path], html_page: Optional[Path], geojson: Optional[Path],
                         inputs: list[Path]):
    """--out (JSON), --geojson (and one file per scene CRS beside it) and --html of a search's hits."""
    if out:
        keys = ("path", "score", "window", "crs", "gsd_m", "valid_frac", "lon", "lat")
        rows = {q: [{k: list(h[k]) if k == "window" else round(h[k], 4) if k == "score" else h[k]
                     for k in keys if k in h} for h in best] for q, best in hits.items()}
        write_text(out, json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    on_scenes = [h for best in hits.values() for h in best if h["kind"] == "scene"]
    if geojson:
        write_text(geojson, geo.geojson(on_scenes))
        for crs in sorted({h["crs"] for h in on_scenes}):
            native = geojson.with_name(f"{geojson.stem}.{crs.replace(':', '_')}{geojson.suffix}")
            refuse_overwrite(native, inputs, "--geojson")
            write_text(native, geo.geojson_native(on_scenes, crs))
        if skipped := sum(len(best) for best in hits.values()) - len(on_scenes):
            print(f"note: {skipped} hits are pictures without georeference: they are not in "
                  f"{display(geojson)}", file=sys.stderr)
    if html_page:
        write_text(html_page, search_page(f"search in {listing(inputs)}", hits))


def main():
    cli.run_cli(app)


if __name__ == "__main__":
    main()
