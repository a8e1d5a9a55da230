"""The search index of a folder of pictures: one file per (folder, weights) in the user cache, holding every
image's embedding and what tells a changed file (its stamp); built once, then brought up to date (new and
changed images embedded, removed ones dropped), never trusted when damaged or made with other weights."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open

from cli import image_progress, list_images
from files import atomic_save, display, file_stamp
from rsmclip import cache_dir, embed_images, weights_fingerprint


def read_index(index: Path, fingerprint: str, dim: int) -> tuple[list[dict], torch.Tensor]:
    """(entries, embeddings) of a search index made with these weights; an index that is absent, made
    with other weights, or damaged in any way is rebuilt (with a warning saying why), never trusted."""
    empty = [], torch.zeros(0, dim)
    if not index.exists():
        return empty
    try:
        with safe_open(str(index), "pt") as f:
            meta, feats = f.metadata() or {}, f.get_tensor("embeddings") if "embeddings" in f.keys() else None
        if meta.get("model") != fingerprint:
            weights = str(meta.get("model")).split(" ")[0]  # the fingerprint is "weights precision"
            other = "at another precision" if weights == fingerprint.split(" ")[0] else "with other weights"
            print(f"{index}: built {other}, rebuilding", file=sys.stderr)
            return empty
        entries = json.loads(meta["entries"])
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("path"), str) and type(e.get("size")) is int
                and type(e.get("mtime")) is int for e in entries):
            raise ValueError("entries are not a list of {path, size, mtime}")
        if feats is None or feats.dtype != torch.float32 or tuple(feats.shape) != (len(entries), dim):
            raise ValueError(f"embeddings {None if feats is None else tuple(feats.shape)}, expected "
                             f"{(len(entries), dim)} float32")
        if not torch.isfinite(feats).all():
            raise ValueError("non-finite embeddings")
    except (SafetensorError, OSError, ValueError, KeyError) as e:  # json's errors are ValueErrors
        print(f"warning: {index}: damaged search index ({str(e)[:200]}); rebuilding it", file=sys.stderr)
        return empty
    return entries, feats


def index_path(folder: Path, fingerprint: str) -> Path:
    """The default search index of a folder for given weights: in the user cache, never in the folder
    (which may be read-only or shared), one file per (folder, weights) so that switching models does not
    rebuild."""
    key = hashlib.sha256(f"{folder.resolve()}\0{fingerprint}".encode("utf-8", "surrogateescape"))
    return cache_dir() / "index" / f"{key.hexdigest()[:32]}.safetensors"


STAMP = ("size", "mtime", "ctime", "inode")  # an index entry's names for file_stamp's numbers


def update_index(model, preprocess, weights: Path, folder: Path, index: Optional[Path], batch_size: int,
                 device: str):
    """Bring a folder's search index up to date: embed only new or changed images, drop deleted ones.
    The index is one safetensors file (embeddings + JSON metadata), replaced atomically."""
    fingerprint = f"{weights_fingerprint(weights)} {model.precision}"  # bf16 rows are not fp32 rows
    index = index or index_path(folder, fingerprint)
    entries, feats = read_index(index, fingerprint, model.config.embed_dim)
    known = {e["path"]: (e, row) for row, e in enumerate(entries)}
    keep_rows, kept, todo = [], [], []
    for p in list_images([folder]):
        rel = p.relative_to(folder).as_posix()
        old = known.get(rel)
        if old and [old[0].get(k) for k in STAMP] == file_stamp(p):  # an older index lacks ctime and inode
            keep_rows.append(old[1])
            kept.append(old[0])
        else:
            todo.append(p)
    with image_progress(len(todo)) as progress:
        new_feats, done, failed = embed_images(model, preprocess, todo, batch_size, device, progress=progress)
    new_feats = new_feats.cpu()
    added = [{"path": p.relative_to(folder).as_posix(), **dict(zip(STAMP, file_stamp(p)))} for p in done]
    entries, feats = kept + added, torch.cat([feats[keep_rows], new_feats])
    removed = len(known) - len(kept)
    if added or removed or not index.exists():
        atomic_save({"embeddings": feats}, index, {"model": fingerprint, "folder": display(folder.resolve()),
                                                   "entries": json.dumps(entries)})
    print(f"index {index}: {len(entries)} images ({len(added)} added, {removed} removed or changed, "
          f"{len(failed)} unreadable skipped)")
    return entries, feats
