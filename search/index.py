"""The search index of a folder, a picture or a scene: one folder per (input, weights, tiling) in the user
cache, built once, then brought up to date (a new scene or picture adds its tiles, a changed one is tiled
again, a removed one is dropped); searching never reads the scenes again.

    index.json        the commit point: format, weights, tiling, every source (path, stamp, kind, and for a
                      scene its CRS, geotransform, window and stretch) and the parts, in order
    PART.f16          float16 [rows, dim] L2-normalised embeddings, raw, memory-mapped for the search
    PART.npy          the tile table of those rows: source (within the part), col_off, row_off, width,
                      height (the window in the scene's pixels), valid (share of valid pixels)
    ann.faiss         the approximate index (--ann), with ann.json naming the parts it was built from

Every file is written whole under a new name and index.json, replaced last, says which are the index: a
killed update leaves the last good one. No tile metadata goes into a JSON header (safetensors caps a
header at 100 MB, a few hundred thousand tiles); the sources list holds one entry per scene or picture."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from cli import image_progress, list_images, refuse_overwrite
from files import RsmclipError, atomic_write, display, file_stamp, sweep_temporaries
from rsmclip import cache_dir, embed_images, encoding, weights_fingerprint
from search import geo, scenes
from search.scenes import Tiling

FORMAT = "rsmclip-index 2"
TABLE = np.dtype([("source", "<i4"), ("col_off", "<i4"), ("row_off", "<i4"), ("width", "<i4"),
                  ("height", "<i4"), ("valid", "<f4")])
FLUSH = 4096  # tiles embedded between two commits of index.json: a killed update loses at most these
CHUNK = 1 << 16  # rows per matrix product of the exact search: 64 MB of float16 at width 512
EXACT_LIMIT = 1_000_000  # beyond this many tiles a search suggests --ann


@dataclass
class Index:
    """An index read back: its index.json, and per part its embeddings (memory-mapped) and tile table."""
    folder: Path
    manifest: dict
    feats: list[np.ndarray] = field(default_factory=list)
    tables: list[np.ndarray] = field(default_factory=list)
    ann: object = None  # the FAISS index, once loaded (--ann)

    @property
    def rows(self) -> int:
        return sum(len(t) for t in self.tables)

    def locate(self, row: int) -> tuple[str, dict, np.void]:
        """(source path within the input, its index.json entry, its tile-table row) of a global row."""
        for part, table in zip(self.manifest["parts"], self.tables):
            if row < len(table):
                rel = part["sources"][table[row]["source"]]
                return rel, self.manifest["sources"][rel], table[row]
            row -= len(table)
        raise IndexError(row)


def index_fingerprint(weights: Path, precision: str) -> str:
    """What an index's rows depend on besides the tiling: the weights' bytes and the precision they encode at
    (bf16 or int8 rows are not fp32 rows)."""
    return f"{weights_fingerprint(weights)} {precision}"


def index_path(root: Path, fingerprint: str, tiling: Tiling) -> Path:
    """The default index of an input: in the user cache, never beside the input (which may be read-only
    or shared); one per (input, weights, tiling), so switching models or tilings does not rebuild."""
    key = f"{root.resolve()}\0{fingerprint}\0{json.dumps(tiling.as_json(), sort_keys=True)}"
    return cache_dir() / "index" / hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def check_index_folder(folder: Path, inputs: list[Path]):
    """--index names a folder (the index's files go in it): refused before any work when it is a file (an
    older rsmclip's one-file index too), an input, or in a folder that cannot be written."""
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "index.json").exists():
        raise RsmclipError(f"--index {display(folder)}: a folder that holds other files, not a search index; "
                           "give a new or empty folder")
    if folder.exists() and not folder.is_dir():
        refuse_overwrite(folder, inputs, "--index")  # an image of an input: said so, as for every output
        raise RsmclipError(f"--index {display(folder)}: is a file; the index is a folder of files now (an "
                           "older rsmclip wrote one file): give a folder name, or delete the file")
    for given in filter(None, inputs):
        if folder.resolve() == Path(given).resolve():
            raise RsmclipError(f"--index {display(folder)} is the input {display(given)}; choose another")
    parent = next((d for d in folder.absolute().parents if d.exists()), None)
    if parent is not None and not os.access(parent if not folder.exists() else folder, os.W_OK | os.X_OK):
        raise RsmclipError(f"--index {display(folder)}: cannot write there (not writable)")


# ----------------------------------------------------------------------------- reading

def read_index(folder: Path, fingerprint: str, dim: int, tiling: Tiling) -> Optional[Index]:
    """The index in `folder` if it was made with these weights and this tiling and is whole; None (with a
    line on stderr saying why) when it must be built again: absent, other weights, another tiling, damaged."""
    manifest_file = folder / "index.json"
    if not manifest_file.exists():
        return None
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"not an {FORMAT} index")
        if manifest.get("model") != fingerprint:
            weights = str(manifest.get("model")).split(" ")[0]  # the fingerprint is "weights precision"
            other = "at another precision" if weights == fingerprint.split(" ")[0] else "with other weights"
            print(f"{display(folder)}: built {other}, rebuilding", file=sys.stderr)
            return None
        if manifest.get("tiling") != tiling.as_json():
            old = manifest.get("tiling") or {}
            changed = ", ".join(f"--{k.replace('_', '-')} {old.get(k)} -> {v}"
                                for k, v in tiling.as_json().items() if old.get(k) != v)
            print(f"{display(folder)}: built with another tiling ({changed}), rebuilding", file=sys.stderr)
            return None
        index = Index(folder, manifest)
        if manifest["dim"] != dim or not isinstance(manifest["sources"], dict):
            raise ValueError(f"width {manifest['dim']}, expected {dim}")
        for part in manifest["parts"]:
            table = np.load(folder / f"{part['name']}.npy", allow_pickle=False)
            size = (folder / f"{part['name']}.f16").stat().st_size
            if table.dtype != TABLE or len(table) != part["rows"] or size != part["rows"] * dim * 2:
                raise ValueError(f"part {part['name']}: {len(table)} table rows and {size} bytes of "
                                 f"embeddings for {part['rows']} rows of width {dim}")
            if len(table) and (table["source"].min() < 0 or table["source"].max() >= len(part["sources"])
                               or not set(part["sources"]) <= set(manifest["sources"])):
                raise ValueError(f"part {part['name']}: its table names unknown sources")
            index.tables.append(table)
            file = folder / f"{part['name']}.f16"
            index.feats.append(np.memmap(file, np.float16, "r", shape=(part["rows"], dim)) if part["rows"]
                               else np.zeros((0, dim), np.float16))
    except (OSError, ValueError, KeyError, TypeError) as e:  # json's errors are ValueErrors
        print(f"warning: {display(folder)}: damaged search index ({str(e)[:200]}); rebuilding it",
              file=sys.stderr)
        return None
    return index


# ----------------------------------------------------------------------------- building and updating

@dataclass
class Plan:
    """What an update embeds: the sources to (re)embed, pictures and scenes apart, and what it skipped."""
    pictures: list[tuple[str, Path]] = field(default_factory=list)
    scenes: list[tuple[str, Path, dict]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    start: dict[str, int] = field(default_factory=dict)  # scenes resumed: the first grid tile to embed


def plan(root: Path, known: dict, tiling: Tiling) -> tuple[Plan, dict]:
    """(what to embed, the sources kept as they are) for the files of an input: one file, or every image
    file under a folder. A raster with a CRS is a scene; any other picture, a georeference-less TIFF too,
    is searched whole, as before (with a note for the TIFF, whose tiles are not searched)."""
    todo, keep = Plan(), {}
    for path in list_images([root]):
        rel = "" if path == root else path.relative_to(root).as_posix()
        old = known.get(rel)
        if old and old["stamp"] == file_stamp(path):
            keep[rel] = old
            if old["kind"] == "scene" and old["grid"] < (total := len(scenes.grid(old["info"]))):
                print(f"{display(path)}: resuming at tile {old['grid']:,} of {total:,}", file=sys.stderr)
                todo.scenes.append((rel, path, old["info"]))  # a killed update's scene: the rest of it
                todo.start[rel] = old["grid"]
            continue
        try:
            if not scenes.is_scene(path):
                if path.suffix.lower() in scenes.SCENE_SUFFIXES:
                    print(f"note: {display(path)} has no georeference (no CRS): searched as one picture; "
                          "georeference it (gdal_translate -a_srs ... -a_ullr ...) to search its tiles",
                          file=sys.stderr)
                todo.pictures.append((rel, path))
                continue
            info = scenes.describe(path, tiling)
        except scenes.SceneSkipped as e:
            todo.skipped.append(f"{display(path)}: {e}")
            continue
        except RsmclipError as e:
            if "cannot read it as a raster" not in str(e):
                raise  # --bands naming a band that is not there, bands that are not colours: the user's fix
            todo.skipped.append(str(e))
            continue
        scenes.note_untiled(path, info)
        todo.scenes.append((rel, path, info))
    return todo, keep


def update_index(model, preprocess, weights: Path, root: Path, folder: Optional[Path], tiling: Tiling,
                 batch_size: int, device: str, workers: int = 0, rank: int = 0, world: int = 1
                 ) -> Optional[Index]:
    """Bring an input's index up to date and return it read back (None on ranks other than 0 under
    torchrun). Only new or changed sources are embedded; each process embeds its share of their tiles and
    writes its part; rank 0 then commits index.json, naming every part."""
    fingerprint = index_fingerprint(weights, model.precision)
    folder = folder or index_path(root, fingerprint, tiling)
    dim = model.config.embed_dim
    old = read_index(folder, fingerprint, dim, tiling) if rank == 0 or world == 1 else None
    old = barrier_share(old.manifest if old else None, rank, world)
    old = Index(folder, old) if old else None
    todo, keep = plan(root, old.manifest["sources"] if old else {}, tiling)
    if old and not (todo.pictures or todo.scenes) and len(keep) == len(old.manifest["sources"]):
        for message in todo.skipped:
            print(f"skipped: {message}", file=sys.stderr)
        if rank != 0:
            return None
        index = read_index(folder, fingerprint, dim, tiling)  # nothing changed
        report(index, root, old, keep, todo, len(todo.skipped), tiling, {})
        return index
    run = barrier_share(uuid.uuid4().hex[:12], rank, world)
    items = [(rel, path, info, window) for rel, path, info in todo.scenes
             for window in scenes.grid(info)[todo.start.get(rel, 0):]]
    chunks = [items[i:i + FLUSH] for i in range(0, len(items), FLUSH)] or [[]]
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    index, failures, unreadable = old, 0, {}
    for n, chunk in enumerate(chunks):  # each chunk committed: a killed update resumes after the last one
        share = chunk[rank * len(chunk) // world:(rank + 1) * len(chunk) // world]
        pictures = [] if n else todo.pictures[rank * len(todo.pictures) // world:
                                              (rank + 1) * len(todo.pictures) // world]
        try:
            counts, failed = embed_part(model, preprocess, folder, f"p-{run}-{n}-r{rank}", pictures, share,
                                        tiling, batch_size, device, workers)
        except BaseException:
            if made and not any(folder.iterdir()):
                folder.rmdir()  # a first build that failed (a full disk) leaves nothing behind
            raise
        counts = barrier_share(counts, rank, world, gather=True)
        failures += len(sum(barrier_share(failed, rank, world, gather=True), []))
        if rank == 0:
            parts = [f"p-{run}-{n}-r{r}" for r in range(world)]
            index = commit(folder, fingerprint, dim, tiling, root, index, keep if n == 0 else None, todo,
                           parts, counts)
        for c in counts:
            for rel, got in c.items():
                if got["unreadable"]:
                    seen = unreadable.setdefault(rel, [0, got["error"]])
                    seen[0] += got["unreadable"]
        barrier_share(None, rank, world)
    if rank != 0:
        return None
    for message in todo.skipped:
        print(f"skipped: {message}", file=sys.stderr)
    report(index, root, old, keep, todo, failures + len(todo.skipped), tiling, unreadable)
    return index


def report(index: Index, root: Path, old: Optional[Index], keep: dict, todo: Plan, skipped: int,
           tiling: Tiling, unreadable: dict):
    """The index's line (images, scenes and tiles; what was added, removed, skipped) and one per new scene:
    its tiles indexed of the grid's, and how many fell below --min-valid (an all-nodata scene says 0);
    `unreadable`: per scene, its tiles that GDAL could not read and the first message."""
    sources = index.manifest["sources"]
    for rel, _, _ in todo.scenes:
        if rel in sources:
            s = sources[rel]
            print(f"{display(root / rel if rel else root)}: {s['tiles']:,} of {s['grid']:,} tiles "
                  f"indexed ({s['below']:,} below --min-valid {tiling.min_valid:g})")
    totals = {rel: len(scenes.grid(info)) for rel, _, info in todo.scenes}
    for rel, (n, error) in unreadable.items():
        print(f"skipped: {display(root / rel if rel else root)}: {n:,} of {totals[rel]:,} tiles unreadable "
              f"({error})", file=sys.stderr)
    n_scenes = sum(1 for s in sources.values() if s["kind"] == "scene")
    tiles = sum(s["tiles"] for s in sources.values() if s["kind"] == "scene")
    said = [f"{len(sources) - n_scenes} images"] if len(sources) > n_scenes or not n_scenes else []
    if n_scenes:
        said.append(f"{n_scenes} scene{'s' if n_scenes > 1 else ''} ({tiles:,} tiles)")
    what = " and ".join(said)
    removed = len(old.manifest["sources"]) - len(keep) if old else 0
    print(f"index {display(index.folder)}: {what} ({len(sources) - len(keep)} added, {removed} removed or "
          f"changed, {skipped} unreadable skipped)")


def embed_part(model, preprocess, folder: Path, name: str, pictures: list, tiles: list, tiling: Tiling,
               batch_size: int, device: str, workers: int) -> tuple[dict, list[str]]:
    """Embed pictures and tiles into one part (name.f16, name.npy and the list of its sources name.json,
    each written whole): (per source its tile counts, the messages of unreadable pictures)."""
    ids: dict[str, int] = {}  # source path -> its number within the part
    counts: dict = {}
    rows: list[np.ndarray] = []
    failed: list[str] = []

    def source_id(rel: str) -> int:
        if rel not in ids:
            ids[rel], counts[rel] = len(ids), {"tiles": 0, "grid": 0, "below": 0, "unreadable": 0}
        return ids[rel]

    def write(tmp: Path):
        with open(tmp, "wb") as out, image_progress(len(pictures) + len(tiles)) as progress:
            if pictures:
                feats, ok, bad = embed_images(model, preprocess, [p for _, p in pictures], batch_size, device,
                                              workers=workers, progress=progress)
                failed.extend(bad)
                rel_of = {p: rel for rel, p in pictures}
                rows.append(np.array([(source_id(rel_of[p]), 0, 0, 0, 0, 1.0) for p in ok], TABLE))
                for p in ok:
                    counts[rel_of[p]] = {"tiles": 1, "grid": 1, "below": 0, "unreadable": 0}
                out.write(feats.cpu().half().numpy().tobytes())
            embed_tiles(model, preprocess, tiles, tiling, batch_size, device, workers, out, rows, source_id,
                        counts, progress)
    atomic_write(folder / f"{name}.f16", write)
    table = np.concatenate(rows) if rows else np.zeros(0, TABLE)
    save_table(folder / f"{name}.npy", table)
    atomic_write(folder / f"{name}.json", lambda tmp: tmp.write_text(json.dumps(list(ids))))
    return counts, failed


def save_table(path: Path, table: np.ndarray):
    def write(tmp: Path):
        with open(tmp, "wb") as f:
            np.save(f, table, allow_pickle=False)
    atomic_write(path, write)


@torch.inference_mode()
def embed_tiles(model, preprocess, tiles: list, tiling: Tiling, batch_size: int, device: str, workers: int,
                out, rows: list, source_id, counts: dict, progress):
    """The tiles' embeddings appended to `out` as float16 rows, their table rows to `rows`; tiles below
    --min-valid are read (their mask decides) but neither encoded nor kept. The loader's workers read and
    resample windows while the model encodes."""
    workers = min(workers, len(tiles) // batch_size)  # a worker pool costs more than it saves on few tiles
    dataset = scenes.Tiles([(path, info, window) for _, path, info, window in tiles], preprocess,
                           tiling.tile, tiling.min_valid)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         shuffle=False)
    for first, (pixels, valid, keep, errors) in zip(range(0, len(tiles), batch_size), loader):
        batch = tiles[first:first + batch_size]
        for (rel, _, _, _), k, error in zip(batch, keep.tolist(), errors):
            source_id(rel)
            counts[rel]["grid"] += 1
            counts[rel]["tiles" if k else "unreadable" if error else "below"] += 1
            if error and not counts[rel].get("error"):
                counts[rel]["error"] = error
        if keep.any():
            with encoding(model, device):
                x = model.encode_image(pixels[keep].to(device, non_blocking=True))
            x = F.normalize(x.float(), dim=-1)
            if not torch.isfinite(x).all():
                raise RsmclipError("the model gives non-finite image embeddings (NaN or inf): its weights "
                                   "are damaged")
            out.write(x.cpu().half().numpy().tobytes())
            kept = [(source_id(rel), *window, v) for (rel, _, _, window), v, k
                    in zip(batch, valid.tolist(), keep.tolist()) if k]
            rows.append(np.array(kept, TABLE))
        progress(len(batch))


def commit(folder: Path, fingerprint: str, dim: int, tiling: Tiling, root: Path, old: Optional[Index],
           keep: Optional[dict], todo: Plan, parts: list[str], counts: list[dict]) -> Index:
    """Write index.json naming the parts of `old` and the new ones (each process's of one chunk), then
    remove the files no index.json names. The first commit of an update (`keep` given) starts from the
    sources kept and rewrites old parts without the rows of removed or changed sources; later ones add to
    the last. Every scene's count of grid tiles done is where a killed update resumes. Returns the index
    read back."""
    sources = dict(keep) if keep is not None else dict(old.manifest["sources"])
    infos = {rel: {"kind": "picture"} for rel, _ in todo.pictures}
    infos |= {rel: {"kind": "scene", "info": info} for rel, _, info in todo.scenes}
    paths = {rel: p for rel, p in todo.pictures} | {rel: p for rel, p, _ in todo.scenes}
    for c in counts:
        for rel, n in c.items():
            done = [d[rel] for d in counts if rel in d]
            if (rel not in sources and all(x["unreadable"] == x["grid"] for x in done)
                    and sum(x["grid"] for x in done) == len(scenes.grid(infos[rel]["info"]))):
                continue  # no tile of the scene could be read: not recorded, so the next search tries again
            entry = sources.setdefault(rel, {"stamp": file_stamp(paths[rel]), **infos[rel],
                                             "tiles": 0, "grid": 0, "below": 0, "unreadable": 0})
            for k in ("tiles", "grid", "below", "unreadable"):
                entry[k] += n[k]
            if n.get("error"):
                entry["error"] = n["error"]
    kept_parts = [prune_part(folder, part, keep, dim) if keep is not None else part
                  for part in (old.manifest["parts"] if old else [])]
    new_parts = []
    for name in parts:
        names = json.loads((folder / f"{name}.json").read_text())
        rows = len(np.load(folder / f"{name}.npy", allow_pickle=False))
        new_parts.append({"name": name, "rows": rows, "sources": names})
    manifest = {"format": FORMAT, "model": fingerprint, "dim": dim, "tiling": tiling.as_json(),
                "root": display(root.resolve()), "sources": sources,
                "parts": [p for p in kept_parts + new_parts if p["rows"]]}
    atomic_write(folder / "index.json", lambda tmp: tmp.write_text(json.dumps(manifest), encoding="utf-8"))
    named = {f"{p['name']}{s}" for p in manifest["parts"] for s in (".f16", ".npy")}
    for f in folder.glob("p-*"):  # only parts: whatever else is in the folder is not ours to remove
        if f.suffix in (".f16", ".npy", ".json") and f.name not in named:
            f.unlink()
    sweep_temporaries(folder)
    return read_index(folder, fingerprint, dim, tiling)


def prune_part(folder: Path, part: dict, keep: dict, dim: int) -> dict:
    """A part without the rows of sources that were removed or changed: the same part when it lost none,
    else a new one holding only the rows kept (copied in chunks, never all in memory)."""
    table = np.load(folder / f"{part['name']}.npy", allow_pickle=False)
    alive = [rel in keep for rel in part["sources"]]
    if all(alive):
        return part
    mask = np.array(alive, bool)[table["source"]] if len(table) else np.zeros(0, bool)
    names = [rel for rel, a in zip(part["sources"], alive) if a]
    renumber = np.cumsum(alive) - 1
    new = {"name": f"{part['name'].split('~')[0]}~{uuid.uuid4().hex[:6]}", "rows": int(mask.sum()),
           "sources": names}
    feats = np.memmap(folder / f"{part['name']}.f16", np.float16, "r", shape=(len(table), dim))

    def write(tmp: Path):
        with open(tmp, "wb") as out:
            for start in range(0, len(table), CHUNK):
                rows = feats[start:start + CHUNK][mask[start:start + CHUNK]]
                out.write(np.ascontiguousarray(rows).tobytes())
    atomic_write(folder / f"{new['name']}.f16", write)
    kept = table[mask]
    kept["source"] = renumber[kept["source"]]
    save_table(folder / f"{new['name']}.npy", kept)
    return new


def processes() -> tuple[int, int]:
    """(rank, world size): under torchrun (WORLD_SIZE > 1) a process group is made (gloo on CPUs, NCCL on
    GPUs) and each process embeds its share of the tiles; otherwise (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def barrier_share(value, rank: int, world: int, gather: bool = False):
    """Under torchrun: rank 0's value for every rank (or, with gather, the list of every rank's values),
    after every rank has come here. One process: the value itself (in a list with gather)."""
    if world == 1:
        return [value] if gather else value
    import torch.distributed as dist
    if gather:
        out = [None] * world
        dist.all_gather_object(out, value)
        return out
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- searching

def exact_top(index: Index, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, global rows) [queries, k] of the k best tiles per query: a matrix product over the memory-
    mapped embeddings in chunks of CHUNK rows (memory stays at one chunk), merged with the best so far."""
    q = queries.float()
    best_s = torch.full((len(q), 0), -float("inf"))
    best_i = torch.zeros((len(q), 0), dtype=torch.long)
    offset = 0
    for feats in index.feats:
        for start in range(0, len(feats), CHUNK):
            chunk = torch.from_numpy(np.asarray(feats[start:start + CHUNK], np.float32))
            scores = q @ chunk.T
            s = torch.cat([best_s, scores], 1)
            rows = torch.arange(offset + start, offset + start + len(chunk)).expand(len(q), -1)
            i = torch.cat([best_i, rows], 1)
            top = s.topk(min(k, s.shape[1]), dim=1)
            best_s, best_i = top.values, i.gather(1, top.indices)
        offset += len(feats)
    return best_s, best_i


def ann_top(index: Index, queries: torch.Tensor, k: int, nprobe: int = 64
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Like exact_top, through FAISS (load_ann's index, loaded once per Index): `nprobe` lists are searched
    per query."""
    ann = index.ann or load_ann(index)
    ann.nprobe = nprobe
    scores, rows = ann.search(np.ascontiguousarray(queries.float().numpy()), k)
    return torch.from_numpy(scores), torch.from_numpy(rows).long()


def load_ann(index: Index):
    """An inverted-file FAISS index of the rows (about sqrt(N) lists, inner product, vectors kept as
    float16): read from ann.faiss when it was built from the same parts, else built and written there."""
    try:
        import faiss
    except ImportError:
        raise RsmclipError("--ann needs FAISS: pip install faiss-cpu (tested with 1.15.1); without --ann the "
                           "search is exact") from None
    key = [[p["name"], p["rows"]] for p in index.manifest["parts"]]
    path, record = index.folder / "ann.faiss", index.folder / "ann.json"
    ann = None
    if path.exists() and record.exists():
        try:
            if json.loads(record.read_text()) == key:
                ann = faiss.read_index(str(path))
        except (ValueError, RuntimeError):
            ann = None
    if ann is None or ann.ntotal != index.rows:
        ann = build_ann(index)
        atomic_write(path, lambda tmp: faiss.write_index(ann, str(tmp)))
        atomic_write(record, lambda tmp: tmp.write_text(json.dumps(key)))
    index.ann = ann
    return ann


def build_ann(index: Index):
    """FAISS's IndexIVFScalarQuantizer (fp16) over every row: trained on an evenly spaced sample of 40
    vectors per list, then filled chunk by chunk (memory: the index, 2 bytes a value, and one chunk)."""
    import faiss
    n, dim = index.rows, index.manifest["dim"]
    lists = max(1, min(int(n ** 0.5), n // 40))  # FAISS's guidance is sqrt(N) to 16 sqrt(N): the cheapest
    ann = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, lists, faiss.ScalarQuantizer.QT_fp16,
                                        faiss.METRIC_INNER_PRODUCT)
    want = min(n, 40 * lists)
    sample = np.concatenate([np.asarray(f[np.linspace(0, len(f) - 1, max(1, round(want * len(f) / n)))
                                          .astype(np.int64)], np.float32) for f in index.feats if len(f)])
    ann.train(sample)
    for feats in index.feats:
        for start in range(0, len(feats), CHUNK):
            ann.add(np.asarray(feats[start:start + CHUNK], np.float32))
    return ann


def best_hits(index: Index, root: Path, queries: torch.Tensor, k: int, nms: float, ann: bool
              ) -> list[list[dict]]:
    """Per query the k best hits of one index (scene tiles and pictures), after non-maximum suppression of
    overlapping tiles: candidates are fetched in growing numbers until k survive or none are left."""
    take = k
    while True:
        scores, rows = (ann_top if ann else exact_top)(index, queries, min(take, index.rows))
        if not torch.isfinite(scores).all():  # not checked on reading: a scan of every row, at every search
            raise RsmclipError(f"{display(index.folder)}: the index holds non-finite embeddings (damaged); "
                               "delete that folder and search again to rebuild it")
        found = [[hit(index, root, r, s) for s, r in zip(ss, rr) if r >= 0]
                 for ss, rr in zip(scores.tolist(), rows.tolist())]
        kept = [geo.suppress(f, nms)[:k] for f in found]
        if all(len(h) >= k for h in kept) or take >= index.rows:
            return kept
        take *= 4


def hit(index: Index, root: Path, row: int, score: float) -> dict:
    """One row of the index as a hit: the picture, or the scene and the tile's window, geotransform, CRS."""
    rel, source, tile = index.locate(row)
    path = root / rel if rel else root
    if source["kind"] == "picture":
        return {"kind": "picture", "path": display(path), "file": path, "score": score}
    info = source["info"]
    return {"kind": "scene", "path": display(path), "scene": display(path), "file": path, "score": score,
            "window": tuple(int(tile[c]) for c in ("col_off", "row_off", "width", "height")),
            "transform": info["transform"], "crs": info["crs"], "gsd_m": info["gsd_m"],
            "valid_frac": float(tile["valid"]), "info": info}
