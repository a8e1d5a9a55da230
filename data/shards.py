"""WebDataset tar shards: a manifest written as shards (data/prepare.py shards), and the streams train.py
reads them as, split across processes and loader workers, with exact resume.

The layout is WebDataset's: a sample is consecutive tar members that share a key, `<key>.<ext>`: the image
(`jpg`, `png` or `webp`: the file's own bytes), `<key>.json` ({"id", "captions": {lang: [...]}, "split",
"dataset", "source", "class" when the manifest has one}) and `<key>.txt` (the first English caption: what
open_clip's `--dataset-type webdataset` reads). Beside the shards, shards.json: the manifest's SHA-256, the
settings, and per shard its samples, bytes and SHA-256. Shards written by others are read too: an image
and a `txt`, or a `json` with a "caption" (English, as far as anyone knows).

Reading: with P processes and W loader workers each, the shards feed G = P x max(W, 1) streams. A stream
never ends: in its pass e it reads the shards perm_e[g::G] (perm_e a permutation of all shards, seeded by
the seed and e) one after the other, shuffled in blocks of `block` samples (a bounded buffer: a worker
holds one or two blocks), then starts its pass e + 1. Every shard is in exactly one stream's pass e, so
each pass of the G streams together sees every sample once. Step k takes process p's batch from its stream
k mod max(W, 1): the sample of every step is a pure function of the step, so a resumed run reads exactly
what an uninterrupted one reads, and no process waits at an epoch's end (every process takes a batch at
every step; a stream with fewer samples only starts its next pass sooner).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import sys
import tarfile
from collections import Counter, OrderedDict
from dataclasses import dataclass
from itertools import chain, product
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

import cli
import files
import rsmclip
from data.manifest import SPLITS, DataError, data_files, load_manifest, read_json
from files import listing

FORMAT = "rsmclip-shards 1"
INDEX = "shards.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
KEEP = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # formats stored as they are
MAX_MEMBER_MIB = 64  # train.py --max-member: a member above it is skipped by its header, never read
MAX_NAMES = 1_000_000  # brace ranges: names a --data pattern may expand to (each is checked on disk)
SHA256 = cli.Pattern(r"[0-9a-f]{64}", "a SHA-256 in hex")
SHARD = cli.Obj({"name": cli.Pattern(r"[0-9A-Za-z_-]+-\d{6,}\.tar", "a shard file name, NAME-000000.tar"),
                 "samples": cli.WHOLE, "bytes": cli.WHOLE, "sha256": SHA256})
INDEX_SPEC = cli.Obj({  # shards.json, as write_shards writes it
    "format": (FORMAT,), "manifest_sha256": SHA256, "split": SPLITS, "per_shard": cli.WHOLE,
    "max_side": cli.Range(32, whole=True), "name": cli.Pattern(r"[0-9A-Za-z_-]+", "a --name"),
    "complete": bool, "langs": cli.ListOf(str), "samples": cli.COUNT, "shards": cli.ListOf(SHARD)})


class ShardError(files.RsmclipError):
    """Shards that cannot be read or trained on as given: one message, exit status 1."""


# ----------------------------------------------------------------------------- writing


def sample_key(record_id: str) -> str:
    """The WebDataset key of a record: its id with every character but letters, digits, '-' and '_' made
    '_' (a dot would end the key, a slash make a folder)."""
    return re.sub(r"[^0-9A-Za-z_-]", "_", record_id)


def add_member(tar: tarfile.TarFile, name: str, data: bytes):
    """A member with fixed owner, mode and time: the same samples always give the same shard bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def image_bytes(path: Path, max_side: int) -> tuple[str, bytes, bool]:
    """(extension, bytes, re-encoded?): the file's own bytes when it is a JPEG, PNG or WebP no longer than
    max_side, else the decoded image once re-encoded (downscaled to max_side; JPEG q95 for JPEG sources,
    PNG, lossless, for the rest)."""
    image = rsmclip.open_image(path)  # refuses what training could not read
    with Image.open(path) as raw:
        kind = raw.format
    if max(image.size) <= max_side and kind in KEEP:
        return KEEP[kind], path.read_bytes(), False
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BICUBIC)
    out = io.BytesIO()
    if kind == "JPEG":
        image.save(out, "JPEG", quality=95)
        return "jpg", out.getvalue(), True
    image.save(out, "PNG")
    return "png", out.getvalue(), True


def sample_json(record: dict) -> dict:
    extra = {k: record[k] for k in ("class", "label") if k in record}
    return {"id": record["id"], "captions": record["captions"], "split": record["split"],
            "dataset": record.get("dataset", ""), "source": record["image"]} | extra


def first_caption(captions: dict) -> str:
    lang = "en" if captions.get("en") else next(lang for lang, caps in captions.items() if caps)
    return captions[lang][0]


def write_shards(manifest: Path, out: Path, split: str = "train", per_shard: int = 1000, max_side: int = 512,
                 name: Optional[str] = None) -> list[str]:
    """Write one split of a manifest as shards; -> the report lines. Each shard is written whole or not at
    all; a second call with the same manifest and settings checks the shards already written (bytes and
    SHA-256) and continues after the last good one, so a killed run ends with the same bytes."""
    if split not in SPLITS:
        raise DataError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    if per_shard < 1:
        raise DataError(f"--per-shard {per_shard}: at least 1 sample per shard")
    if max_side < 32:
        raise DataError(f"--max-side {max_side}: at least 32 pixels")
    name = name or split
    if not re.fullmatch(r"[0-9A-Za-z_-]+", name):
        raise DataError(f"--name {name!r}: letters, digits, '-' and '_' only")
    cli.refuse_overwrite(out / INDEX, data_files(manifest))
    records = [r for r in load_manifest(manifest) if r["split"] == split]
    if not records:
        raise DataError(f"{manifest}: no {split} images to write")
    keys = [sample_key(r["id"]) for r in records]
    same = [k for k, n in Counter(keys).items() if n > 1]
    if same:
        raise DataError(f"{manifest}: ids that differ only in characters a key cannot hold give the same "
                        f"key: {listing(same)}; rename them")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: a file; shards go in a folder")
    settings = {"format": FORMAT, "manifest_sha256": files.file_sha256(manifest), "split": split,
                "per_shard": per_shard, "max_side": max_side, "name": name}
    done = kept_shards(out, settings) if (out / INDEX).exists() else []
    kept = len(done)
    if not (out / INDEX).exists() and out.is_dir() and any(out.glob(f"{name}-*.tar")):
        raise DataError(f"--out {out} holds {name}-*.tar files but no {INDEX}: shards of something else? "
                        "Choose another --out or empty it")
    out.mkdir(parents=True, exist_ok=True)
    langs = sorted({lang for r in records for lang, caps in r["captions"].items() if caps})
    groups = [range(i, min(i + per_shard, len(records))) for i in range(0, len(records), per_shard)]
    encoded = 0
    for number, group in enumerate(groups[len(done):], start=len(done)):
        buf, bad = io.BytesIO(), []
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in group:
                r = records[i]
                try:
                    ext, data, again = image_bytes(manifest.parent / r["image"], max_side)
                except (rsmclip.ImageError, OSError) as e:
                    bad.append(str(e))
                    continue
                encoded += again
                add_member(tar, f"{keys[i]}.{ext}", data)
                add_member(tar, f"{keys[i]}.json", json.dumps(sample_json(r), ensure_ascii=False).encode())
                add_member(tar, f"{keys[i]}.txt", first_caption(r["captions"]).encode())
        if bad:
            raise DataError(f"{len(bad)} {split} images of shard {number} are unreadable: {listing(bad)}; "
                            f"{number} shards are written. Fix the images or rewrite the manifest without "
                            "them (prepare.py captions --drop-missing), then run the same command")
        data, shard = buf.getvalue(), f"{name}-{number:06d}.tar"
        files.atomic_write(out / shard, lambda tmp: tmp.write_bytes(data), len(data))
        done.append({"name": shard, "samples": len(group), "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest()})
        index = settings | {"complete": len(done) == len(groups), "langs": langs,
                            "samples": sum(s["samples"] for s in done), "shards": done}
        text = json.dumps(index, indent=1) + "\n"
        files.atomic_write(out / INDEX, lambda tmp: tmp.write_text(text))
    total = sum(s["bytes"] for s in done)
    again = f"; {kept} of them were already there, checked" if kept else ""
    return [f"wrote {out}: {len(records):,} {split} samples of {manifest} in {len(done)} shards "
            f"({name}-000000.tar ... {done[-1]['name']}, {total / 2 ** 20:,.1f} MiB; {encoded} images "
            f"re-encoded{again}), and {out / INDEX}",
            f"train on them: python train.py --data '{out}/{name}-{{000000..{len(done) - 1:06d}}}.tar' "
            f"--val-data {manifest} ... (and --tokenizer or --init)"]


def kept_shards(out: Path, settings: dict) -> list[dict]:
    """The shards of an earlier run with the same settings that are whole (size and SHA-256 as listed)."""
    index = read_json(out / INDEX, spec=INDEX_SPEC)
    differ = [k for k in settings if index[k] != settings[k]]
    if differ:
        raise DataError(f"--out {out} holds shards of another manifest or settings ({', '.join(differ)} "
                        "differ); choose another --out or empty it")
    kept = []
    for shard in index["shards"]:
        path = out / shard["name"]
        if not (path.is_file() and path.stat().st_size == shard["bytes"]
                and files.file_sha256(path) == shard["sha256"]):
            break
        kept.append(shard)
    return kept


# ----------------------------------------------------------------------------- finding and checking shards


def expand_braces(pattern: str) -> list[str]:
    """'a-{000..002}.tar' -> a-000.tar, a-001.tar, a-002.tar (the width of equal-width bounds kept);
    '{a,b}' -> a, b; several groups multiply (WebDataset's and braceexpand's notation, groups side by
    side). The names are counted from the groups' sizes before any is made: more than MAX_NAMES is refused,
    as are nested or unmatched braces."""
    parts = BRACES.split(pattern)  # literal, group, literal, group, ..., literal
    literals, groups = parts[0::2], parts[1::2]
    if any(c in literal for literal in literals for c in "{}"):
        raise ShardError(f"{pattern}: nested or unmatched braces; give groups side by side, "
                         "'{a,b}-{000..099}.tar'")
    ranges = [re.fullmatch(r"(\d+)\.\.(\d+)", group) for group in groups]
    sizes = [int(r[2]) - int(r[1]) + 1 if r else len(group.split(",")) for r, group in zip(ranges, groups)]
    if empty := next((group for group, n in zip(groups, sizes) if n < 1), None):
        raise ShardError(f"{pattern}: the range {{{empty}}} is empty (its end is below its start)")
    if (count := math.prod(sizes)) > MAX_NAMES:
        raise ShardError(f"{pattern}: {count:,} names, more than the {MAX_NAMES:,} that one --data pattern "
                         "may name (each is looked for on disk); check its ranges, or give a folder")
    width = [len(r[1]) if r and len(r[1]) == len(r[2]) else 0 for r in ranges]
    items = [[str(n).zfill(w) for n in range(int(r[1]), int(r[2]) + 1)] if r else group.split(",")
             for r, w, group in zip(ranges, width, groups)]
    return ["".join(chain.from_iterable(zip(literals, [*combo, ""]))) for combo in product(*items)]


BRACES = re.compile(r"\{([^{}]*)\}")


def is_shards(data: list[str]) -> bool:
    """Whether --data names shards (a .tar pattern or a folder of them) rather than manifests: read from the
    pattern's last name, made without expanding it."""
    last = [BRACES.sub(lambda m: re.split(r",|\.\.", m.group(1))[-1], d) for d in data]
    return any(Path(d).is_dir() or name.endswith(".tar") for d, name in zip(data, last))


def shard_paths(data: list[str]) -> list[Path]:
    """The shard files that patterns (brace ranges), folders (their *.tar, sorted) and files name, in
    order; every one must exist and none may come twice."""
    paths = []
    for entry in data:
        if Path(entry).is_dir():
            found = sorted(p for p in Path(entry).iterdir() if p.suffix == ".tar" and p.is_file())
            if not found:
                raise ShardError(f"--data {entry}: a folder with no .tar shards")
            paths += found
            continue
        names = expand_braces(entry)
        if not all(n.endswith(".tar") for n in names):
            raise ShardError(f"--data {entry}: not .tar shards; give shards or captions.jsonl manifests, "
                             "not both")
        missing = [n for n in names if not Path(n).is_file()]
        if missing:
            raise ShardError(f"--data {entry}: {len(missing)} of {len(names)} shards are missing: "
                             f"{listing(missing)}")
        paths += map(Path, names)
    twice = [p for p, n in Counter(p.resolve() for p in paths).items() if n > 1]
    if twice:
        raise ShardError(f"--data: shards named twice: {listing(twice)}")
    return paths


def split_name(name: str) -> tuple[str, str]:
    """A member's (key, extension) as WebDataset splits it: at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext.lower()


def scan(path: Path) -> list[tuple[str, dict]]:
    """The samples of a shard from its headers alone (no data read): [(key, {extension: (offset, size)})],
    in order. A truncated file, a key that comes back later in the shard, a member that comes twice in a
    sample (which image goes with the caption?), a sparse member (GNU tar --sparse: its bytes are not where
    its header says) or a tar that is not one is refused."""
    samples = []
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if member.issparse():
                    raise ShardError(f"{path}: {member.name} is a sparse member (GNU tar --sparse): "
                                     "its bytes are not stored as read; write the shard without --sparse")
                if not member.isfile():
                    continue
                key, ext = split_name(member.name)
                if samples and samples[-1][0] == key:
                    if ext in samples[-1][1]:
                        raise ShardError(f"{path}: {member.name} comes twice in one sample: which {ext} goes "
                                         "with its other members is unknown; write the shard with one member "
                                         "per key and extension")
                    samples[-1][1][ext] = (member.offset_data, member.size)
                else:
                    samples.append((key, {ext: (member.offset_data, member.size)}))
            f.seek(tar.offset)
            if f.read(512) != bytes(512):  # a tar ends with zero blocks: a file cut between members has none
                raise ShardError(f"{path}: truncated (it ends after {len(samples)} samples without the end "
                                 "of the archive); write it again")
    except (tarfile.TarError, EOFError) as e:
        raise ShardError(f"{path}: not a readable tar ({e}); truncated or damaged? Write it again") from None
    if not samples:
        raise ShardError(f"{path}: holds no samples")
    again = [k for k, n in Counter(k for k, _ in samples).items() if n > 1]
    if again:
        raise ShardError(f"{path}: the key {again[0]} comes back after other samples: its members must be "
                         "consecutive")
    return samples


def content_digest(path: Path, samples: list[tuple[str, dict]]) -> str:
    """What tells others' shards apart without hashing their bytes: the SHA-256 of every member's name,
    offset and size (the headers scan() read) and of the first and last member's data, up to 64 KiB each.
    A shard swapped, copied or rewritten under the same name has other keys (or other bytes)."""
    digest = hashlib.sha256(json.dumps(samples).encode())
    with open(path, "rb") as f:
        for offset, size in (min(samples[0][1].values()), max(samples[-1][1].values())):
            f.seek(offset)
            digest.update(f.read(min(size, 1 << 16)))
    return digest.hexdigest()


@dataclass
class ShardSet:
    paths: list[Path]
    counts: list[int]
    langs: list[str]
    ours: bool  # written by data/prepare.py shards (shards.json beside them)
    digests: list[str]  # each shard's SHA-256 as shards.json lists it (ours), or its content_digest (others')
    stamps: list[list[int]]  # each file's stamp (files.file_stamp) when opened
    notes: list[str]

    @property
    def fingerprint(self) -> str:
        """The names and sample counts (what checkpoints recorded before they recorded each shard's bytes)."""
        names = json.dumps([[p.name, n] for p, n in zip(self.paths, self.counts)])
        return hashlib.sha256(names.encode()).hexdigest()


def open_shards(data: list[str], max_member: int = MAX_MEMBER_MIB << 20) -> ShardSet:
    """The shards that --data names, checked: against their shards.json when they have one (ours: sizes
    and counts, cheap), else counted from their headers (others': also finds truncated files, samples
    without image or caption, members above max_member bytes, sparse or repeated members, and keys repeated
    across shards)."""
    paths = shard_paths(data)
    indexes, notes = {}, []
    for folder in dict.fromkeys(p.parent for p in paths):
        if (folder / INDEX).is_file():
            indexes[folder] = read_index(folder / INDEX)
    listed = [p for p in paths if p.parent in indexes and p.name in indexes[p.parent]["by_name"]]
    if listed and len(listed) < len(paths):
        other = next(p for p in paths if p not in listed)
        raise ShardError(f"--data mixes shards written by data/prepare.py shards ({listed[0]}: listed in its "
                         f"{INDEX}) with others ({other}: no {INDEX} lists it); their captions differ "
                         "(ours hold every language, others English). Train on one kind, or write the "
                         "others' manifest as shards with data/prepare.py")
    if listed:
        counts, digests = [], []
        for p in paths:
            entry = indexes[p.parent]["by_name"][p.name]
            if p.stat().st_size != entry["bytes"]:
                raise ShardError(f"{p}: {p.stat().st_size:,} bytes, {p.parent / INDEX} says "
                                 f"{entry['bytes']:,}: truncated or replaced since it was written; write the "
                                 "shards again")
            counts.append(entry["samples"])
            digests.append(entry["sha256"])
        used = {p.parent for p in paths}
        sources = Counter(indexes[f]["manifest_sha256"] + indexes[f]["split"] for f in used)
        if any(n > 1 for n in sources.values()):
            raise ShardError("--data: two folders hold shards of the same manifest and split: every key "
                             "would come twice; give one of them")
        langs = sorted({lang for f in used for lang in indexes[f]["langs"]})
    else:
        scans = [scan(p) for p in paths]
        counts = [len(s) for s in scans]
        digests = [content_digest(p, samples) for p, samples in zip(paths, scans)]
        first = {}
        for p, samples in zip(paths, scans):
            for key, _ in samples:
                if first.setdefault(key, p) != p:
                    raise ShardError(f"--data: the key {key} is in {first[key]} and in {p}: a sample twice, "
                                     "or two datasets with the same keys; give each once")
        lacking = sum(1 for s in scans for _, m in s
                      if not set(m) & set(IMAGE_EXTS) or not {"txt", "json"} & set(m))
        if lacking:
            notes.append(f"{lacking} of {sum(counts):,} samples lack an image or a caption: each is skipped "
                         "and counted when it comes")
        if large := sum(1 for s in scans for _, m in s if any(n > max_member for _, n in m.values())):
            notes.append(f"{large} of {sum(counts):,} samples hold a member above --max-member "
                         f"({files.byte_size(max_member)}): each is skipped unread and counted when it comes")
        langs = ["en"]
    stamps = [files.file_stamp(p) for p in paths]
    return ShardSet(paths, counts, langs, bool(listed), digests, stamps, notes)


def read_index(path: Path) -> dict:
    """Our shards.json, checked by its type (INDEX_SPEC) before any work, each shard listed once and the
    samples its shards' sum; a stopped writer's (not complete) is refused."""
    index = read_json(path, spec=INDEX_SPEC)
    names = [s["name"] for s in index["shards"]]
    if twice := [name for name, n in Counter(names).items() if n > 1]:
        raise ShardError(f"{path}: shards: {twice[0]} is listed twice; write the shards again")
    if index["samples"] != sum(s["samples"] for s in index["shards"]):
        raise ShardError(f"{path}: samples: {index['samples']} is not the sum of its shards' samples "
                         f"({sum(s['samples'] for s in index['shards'])}); write the shards again")
    if not index["complete"]:
        raise ShardError(f"{path}: the shards were not all written (a stopped run); run the same "
                         "data/prepare.py shards command again to finish them")
    return index | {"by_name": dict(zip(names, index["shards"]))}


# ----------------------------------------------------------------------------- streams


def seeded(*parts) -> torch.Generator:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class Streams:
    """Which sample each stream holds at each position (see the module docstring): arithmetic on the
    shards' sample counts, no file read."""

    def __init__(self, counts: list[int], streams: int, seed: int, block: int):
        if len(counts) < streams:
            raise ShardError(f"{len(counts)} shards for {streams} streams (processes x loader workers): "
                             "each stream needs a shard of its own; write more, smaller shards (--per-shard) "
                             "or use fewer --workers")
        self.counts, self.streams, self.seed, self.block = counts, streams, seed, block
        self.passes: dict[int, list[tuple[int, list[int], int]]] = {}  # stream -> [(start, shards, samples)]
        self.orders: OrderedDict = OrderedDict()

    def shards_of(self, stream: int, number: int) -> list[int]:
        order = torch.randperm(len(self.counts), generator=seeded("shards", self.seed, number))
        return order[stream::self.streams].tolist()

    def find_pass(self, stream: int, position: int) -> tuple[int, int, list[int]]:
        """(pass number, its first position, its shards) of a stream position."""
        passes = self.passes.setdefault(stream, [])
        while not passes or passes[-1][0] + passes[-1][2] <= position:
            start = passes[-1][0] + passes[-1][2] if passes else 0
            shards = self.shards_of(stream, len(passes))
            passes.append((start, shards, sum(self.counts[s] for s in shards)))
        number = next(i for i in range(len(passes) - 1, -1, -1) if passes[i][0] <= position)
        return number, *passes[number][:2]

    def sample(self, stream: int, position: int) -> tuple[int, int, tuple]:
        """(shard, sample within it, block) of a stream position; the block names the samples read
        together."""
        number, start, shards = self.find_pass(stream, position)
        offset, length = position - start, self.passes[stream][number][2]
        block = offset // self.block
        size = min(self.block, length - block * self.block)
        tag = (stream, number, block)
        if tag not in self.orders:
            self.orders[tag] = torch.randperm(size, generator=seeded("block", self.seed, *tag)).tolist()
            if len(self.orders) > 4:
                self.orders.popitem(last=False)
        within = block * self.block + self.orders[tag][offset % self.block]
        for s in shards:
            if within < self.counts[s]:
                return s, within, tag
            within -= self.counts[s]
        raise AssertionError("a position past its pass")

    def block_samples(self, tag: tuple) -> list[tuple[int, int]]:
        """The (shard, sample) of a block (a tag that sample() gave) in reading order."""
        stream, number, block = tag
        first, out = block * self.block, []  # the block's positions in its pass: first .. first + block - 1
        for s in self.passes[stream][number][1]:  # first: the block's start relative to this shard
            out += [(s, i) for i in range(max(first, 0), min(first + self.block, self.counts[s]))]
            first -= self.counts[s]
        return out


def stream_state(shards: ShardSet, streams: Streams, per_process: int, batch: int,
                 step: int) -> dict:
    """What the checkpoint records of the shards: which (each shard's name, samples, digest and file stamp;
    the names and counts as one fingerprint, as earlier checkpoints recorded them), the streams, and where
    every stream stands after `step` steps (its position, pass, and the shard its next block starts in)."""
    where = []
    for stream in range(streams.streams):
        position = max(0, step - stream % per_process + per_process - 1) // per_process * batch
        number, start, _ = streams.find_pass(stream, position)
        shard = streams.block_samples((stream, number, (position - start) // streams.block))[0][0]
        where.append({"stream": stream, "position": position, "pass": number,
                      "shard": shards.paths[shard].name})
    read = [{"name": p.name, "samples": n, "digest": d, "stamp": t}
            for p, n, d, t in zip(shards.paths, shards.counts, shards.digests, shards.stamps)]
    return {"shards": shards.fingerprint, "files": read, "streams": streams.streams, "block": streams.block,
            "positions": where}


STREAM_STATE = cli.Obj({  # stream_state() as a checkpoint holds it; "files" is missing in earlier ones
    "shards": SHA256, "streams": cli.WHOLE, "block": cli.WHOLE,
    "files": cli.ListOf(cli.Obj({"name": str, "samples": cli.WHOLE, "digest": SHA256,
                                 "stamp": cli.ListOf(int, cli.Range(4, 4, whole=True))})),
    "positions": cli.ListOf(cli.Obj({"stream": cli.COUNT, "position": cli.COUNT, "pass": cli.COUNT,
                                     "shard": str}))}, optional=("files",))


def check_same_shards(shards: ShardSet, saved: dict):
    """A resume reads the very shards that its checkpoint's run read: the same names in the same order,
    each with the samples and digest recorded then; and ours, whose digest is shards.json's, with those
    bytes: a file whose stamp changed since (swapped or copied in, shards.json untouched) is hashed once.
    The first shard that differs is named."""
    if "files" not in saved:  # a checkpoint made before the shards' bytes were recorded
        if saved["shards"] != shards.fingerprint:
            raise ShardError("the shards (their names or sample counts) changed since the checkpoint: the "
                             "resumed run would not read what the first one would have; use the same data")
        return
    then, rehashed = saved["files"], 0
    what = f"its SHA-256 in {INDEX}" if shards.ours else "its content: member names, sizes, first bytes"
    if len(then) != len(shards.paths):
        raise ShardError(f"--data names {len(shards.paths)} shards, the checkpoint's run read {len(then)}: "
                         "the resumed run would not read what the first one would have; use the same --data")
    now = zip(shards.paths, shards.counts, shards.digests, shards.stamps)
    for was, (path, count, digest, stamp) in zip(then, now):
        if path.name != was["name"]:
            raise ShardError(f"{path}: the checkpoint's run read {was['name']} in its place: the shards are "
                             "named in another order or are others; run with the same --data")
        if (count, digest) != (was["samples"], was["digest"]):
            samples = f", {was['samples']} samples then, {count} now" if count != was["samples"] else ""
            raise ShardError(f"{path}: not the shard the checkpoint's run read ({what} changed{samples}): "
                             "rewritten, swapped or replaced since; resume only on the same shards, or train "
                             "into a new --out")
        if shards.ours and stamp != was["stamp"]:
            rehashed += 1
            if (found := files.file_sha256(path)) != digest:
                raise ShardError(f"{path}: its bytes are not those its {INDEX} lists (SHA-256 "
                                 f"{found[:16]}..., listed {digest[:16]}...): swapped or replaced since the "
                                 "checkpoint; put the shard back, or write the shards again and train into a "
                                 "new --out")
    if rehashed:
        print(f"note: {rehashed} of {len(then)} shards have new file stamps since the checkpoint (copied or "
              f"touched): their bytes were checked against {INDEX} by hashing them", file=sys.stderr)


class ShardReader:
    """One process's reads: a block of a stream is read at once, shard by shard in file order (sequential
    reads), and kept while its samples are taken (the last two blocks). A member above max_member bytes is
    never read: its sample holds its size instead of its bytes, and is skipped."""

    def __init__(self, shards: ShardSet, streams: Streams, max_member: int = MAX_MEMBER_MIB << 20):
        self.shards, self.streams, self.max_member = shards, streams, max_member
        self.blocks: OrderedDict = OrderedDict()
        self.scans: OrderedDict = OrderedDict()

    def members(self, shard: int) -> list[tuple[str, dict]]:
        if shard not in self.scans:
            samples = scan(self.shards.paths[shard])
            if len(samples) != self.shards.counts[shard]:
                raise ShardError(f"{self.shards.paths[shard]}: {len(samples)} samples, its {INDEX} says "
                                 f"{self.shards.counts[shard]}: the file changed since it was written; write "
                                 "the shards again")
            self.scans[shard] = samples
            if len(self.scans) > 4:
                self.scans.popitem(last=False)
        return self.scans[shard]

    def get(self, stream: int, position: int) -> tuple[str, str, dict]:
        """(shard name, key, {extension: bytes, or the size of a member too large to read}) of a stream
        position."""
        shard, index, tag = self.streams.sample(stream, position)
        if tag not in self.blocks:
            self.blocks[tag] = self.read_block(tag)
            if len(self.blocks) > 2:
                self.blocks.popitem(last=False)
        key, data = self.blocks[tag][(shard, index)]
        return self.shards.paths[shard].name, key, data

    def read_block(self, tag: tuple) -> dict:
        wanted = self.streams.block_samples(tag)
        out = {}
        for shard in dict.fromkeys(s for s, _ in wanted):
            indices = [i for s, i in wanted if s == shard]
            members = self.members(shard)
            chosen = [members[i] for i in indices]
            small = [(o, n) for _, m in chosen for o, n in m.values() if n <= self.max_member]
            data = read_spans(self.shards.paths[shard], small, self.max_member)
            for i, (key, m) in zip(indices, chosen):  # a member too large: its size in place of its bytes
                out[(shard, i)] = key, {ext: data.get(o, n) for ext, (o, n) in m.items()}
        return out


def read_spans(path: Path, spans: list[tuple[int, int]], gap: int) -> dict[int, bytes]:
    """{offset: bytes} of each (offset, size) span of a file; spans less than `gap` bytes apart are read
    together, in one sequential read, so a member above the limit between them is never read."""
    out, spans = {}, sorted(spans)
    with open(path, "rb") as f:
        i = 0
        while i < len(spans):
            j, end = i, sum(spans[i])
            while j + 1 < len(spans) and spans[j + 1][0] - end <= gap:
                j += 1
                end = max(end, sum(spans[j]))
            f.seek(spans[i][0])
            chunk = f.read(end - spans[i][0])
            if len(chunk) < end - spans[i][0]:
                raise ShardError(f"{path}: shorter than its headers say: truncated")
            out |= {o: chunk[o - spans[i][0]:o - spans[i][0] + n] for o, n in spans[i:j + 1]}
            i = j + 1
    return out


def parse_sample(shard: str, key: str, data: dict) -> tuple[dict, str, bytes]:
    """(captions by language, image name for messages, image bytes) of a sample, ours or another's; a
    sample without an image or a caption, or with a member too large to read, raises rsmclip.ImageError (it
    is then skipped and counted)."""
    name = f"{shard}:{key}"
    if large := next((ext for ext, value in data.items() if isinstance(value, int)), None):
        raise rsmclip.ImageError(f"{name}.{large}: {files.byte_size(data[large])}, above --max-member: "
                                 "skipped without reading it")
    image = next(((ext, data[ext]) for ext in IMAGE_EXTS if ext in data), None)
    captions = {}
    if "json" in data:
        try:
            doc = json.loads(data["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise rsmclip.ImageError(f"{name}.json: not JSON ({e})") from None
        if isinstance(doc, dict) and isinstance(doc.get("captions"), dict):
            captions = {lang: [c for c in caps if isinstance(c, str) and c.strip()]
                        for lang, caps in doc["captions"].items() if isinstance(caps, list)}
        elif isinstance(doc, dict) and isinstance(doc.get("caption"), str) and doc["caption"].strip():
            captions = {"en": [doc["caption"]]}
    if not captions and "txt" in data:
        text = data["txt"].decode("utf-8", "replace").strip()
        captions = {"en": [text]} if text else {}
    if image is None:
        raise rsmclip.ImageError(f"{name}: no image ({', '.join(sorted(data))} only)")
    if not any(captions.values()):
        raise rsmclip.ImageError(f"{name}: no caption (neither a json 'captions'/'caption' nor a txt)")
    return captions, f"{name}.{image[0]}", image[1]
