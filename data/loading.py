"""Data loading for training: the datasets (a manifest's images, or tar shards), the samplers that make
every step's samples a pure function of the step (so a resume is exact), collate, the decoded image
cache's reader, and build_loader, the one function that builds a training loader for a config and a
world (process rank, world size, loader workers): train.py and every bench script use it. The views
themselves are drawn and made in data/augment.py; the shards are read by data/shards.py."""
from __future__ import annotations

import functools
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch
from PIL import Image

import files
import rsmclip
from data import augment
from data import shards as shardlib
from data.manifest import LANGS, DataError, load_manifest, parse_langs
from files import listing


def read_manifests(paths: list[str], split: str) -> list[dict]:
    """Records of one split, image paths resolved inside their manifest's folder."""
    items = []
    for path in map(Path, paths):
        records = load_manifest(path)
        items += [{**r, "path": path.parent / r["image"]} for r in records if r["split"] == split]
    return items


def check_languages(items: list[dict], langs: list[str]):
    """The training data hold captions in each language (their codes were checked with the other settings);
    shards are passed as one item holding the languages their shards.json lists (others': English)."""
    present = {lang for item in items for lang, caps in item["captions"].items() if caps}
    if missing := [lang for lang in langs if lang not in present]:
        raise DataError(f"no {', '.join(missing)} captions in the training data (it has "
                        f"{', '.join(sorted(present)) or 'none'}); translate them or pass --langs")
    if unusable := sum(1 for item in items if not any(item["captions"].get(lang) for lang in langs)):
        raise DataError(f"{unusable} training images have no caption in {','.join(langs)}")


def lang_probabilities(langs: str, weights: str) -> dict[str, float]:
    """--langs and --lang-weights -> {language: the probability of drawing it for a caption}. Without weights
    every language alike; LANG=P pairs give the named languages P, and the --langs languages not named share
    what is left equally. An image without captions in some languages draws among those it has, in the same
    proportions. One message for what cannot be a distribution."""
    enabled, given, option = parse_langs(langs), {}, f"--lang-weights {weights!r}"
    for part in filter(None, (p.strip() for p in weights.split(","))):
        lang, _, value = (x.strip().lower() for x in part.partition("="))
        try:
            p = float(value)
        except ValueError:
            p = math.nan
        if not (math.isfinite(p) and p >= 0):
            raise DataError(f"{option}: {part!r} is not LANG=P with a probability P >= 0")
        if lang not in LANGS:
            raise DataError(f"{option}: unknown language {lang}; choose from {','.join(LANGS)}")
        if lang in given:
            raise DataError(f"{option}: {lang} is given twice")
        if lang not in enabled:
            raise DataError(f"{option}: {lang} is not one of --langs {','.join(enabled)}; add it there or "
                            "drop its weight")
        given[lang] = p
    rest = [lang for lang in enabled if lang not in given]
    left = 1 - sum(given.values())
    if left < -1e-9 or not rest and abs(left) > 1e-6:
        raise DataError(f"{option}: the probabilities add up to {sum(given.values()):g}; they must add up to "
                        "1, or to less when other --langs languages share the rest")
    return {lang: given.get(lang, max(left, 0) / len(rest) if rest else 0) for lang in enabled}


def draw_language(langs: list[str], probabilities: Optional[dict[str, float]], rng: random.Random) -> str:
    """One of an image's caption languages: uniformly, or in the given proportions."""
    if probabilities is None:
        return rng.choice(langs)
    return rng.choices(langs, [probabilities[lang] for lang in langs])[0]


class MultiCropDataset(torch.utils.data.Dataset):
    """Sample (index, seed) -> full-size views (augment.view_layout), local crops, a caption per CLIP view.
    Images come from their files or, with `cache`, from the decoded image cache (no decoding). With
    tensor=True a sample is its 8-bit image and its views' parameters: the training device applies them
    to the whole batch (collate, data/augment.py). An unreadable image is replaced by the next readable one
    (batches keep their size, which DDP needs) and reported."""

    def __init__(self, items: list[dict], cfg: LoaderSettings, image_size: int, tokenizer: rsmclip.Tokenizer,
                 cache: Optional[ImageCache] = None, tensor: bool = False):
        self.items, self.recipe, self.image_size, self.tokenizer = items, cfg.recipe(), image_size, tokenizer
        self.langs = parse_langs(cfg.langs)
        self.probabilities = lang_probabilities(cfg.langs, cfg.lang_weights) if cfg.lang_weights else None
        self.cache, self.tensor = cache, tensor

    def __len__(self):
        return len(self.items)

    def read(self, index: int) -> tuple[dict, np.ndarray | Image.Image, list[str]]:
        """-> (item, image, failures): [H, W, 3] uint8 from the cache, else the first readable file from
        `index` on."""
        if self.cache is not None:
            return self.items[index], self.cache[index], []
        failures = []
        for attempt in range(len(self.items)):
            item = self.items[(index + attempt) % len(self.items)]
            try:
                return item, rsmclip.open_image(item["path"]), failures
            except rsmclip.ImageError as e:
                failures.append(str(e))
        raise DataError("no training image can be read")

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        rng = random.Random(seed)
        item, image, failures = self.read(index)
        height, width = image.shape[:2] if isinstance(image, np.ndarray) else image.size[::-1]
        views, local = augment.draw_sample(width, height, self.recipe, self.image_size, rng)
        langs = [lang for lang in self.langs if item["captions"].get(lang)]
        clip_views = augment.view_layout(self.recipe)[1]
        captions = [rng.choice(item["captions"][draw_language(langs, self.probabilities, rng)])
                    for _ in range(clip_views)]
        sample = {"ids": self.tokenizer(captions), "failures": failures}
        if self.tensor:
            return sample | {"pixels": torch.from_numpy(np.array(image)), "view_params": views,
                             "local_params": local}
        image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
        pil = augment.apply_pil
        return sample | {"views": torch.stack([pil(image, self.image_size, p) for p in views]),
                         "locals": torch.stack([pil(image, self.recipe.local_size, p) for p in local])
                         if local else None}


class ShardDataset(MultiCropDataset):
    """The same samples as MultiCropDataset, read from tar shards: a key is ((stream, position), seed)
    (data/shards.py). A sample without image or caption, or whose image does not decode, is replaced by
    the next one of its stream and reported, as an unreadable file is; a shard that cannot be read stops the
    run with its message (carried in the batch: a loader worker's exception would arrive as a traceback)."""

    def __init__(self, shards: shardlib.ShardSet, streams: shardlib.Streams, cfg: LoaderSettings,
                 image_size: int, tokenizer: rsmclip.Tokenizer, tensor: bool = False):
        super().__init__([], cfg, image_size, tokenizer, None, tensor)
        self.reader = shardlib.ShardReader(shards, streams, cfg.max_member << 20)

    def read(self, index: tuple[int, int]) -> tuple[dict, Image.Image, list[str]]:
        stream, position = index
        failures = []
        for attempt in range(self.reader.streams.block):
            shard, key, data = self.reader.get(stream, position + attempt)
            try:
                captions, name, image = shardlib.parse_sample(shard, key, data)
                if not any(captions.get(lang) for lang in self.langs):
                    raise rsmclip.ImageError(f"{name}: no caption in --langs {','.join(self.langs)}")
                return {"captions": captions}, rsmclip.open_image(name, image), failures
            except rsmclip.ImageError as e:
                failures.append(str(e))
        raise shardlib.ShardError(f"stream {stream}: {len(failures)} samples in a row cannot be used, the "
                                  f"last: {failures[-1]}")

    def __getitem__(self, key):
        try:
            return super().__getitem__(key)
        except shardlib.ShardError as e:
            return {"fatal": str(e)}


def collate(samples: list[dict]) -> dict:
    """Stack view-major ([view 0 of every image, view 1 of every image, ...]) as the losses expect. Tensor
    samples give their images, padded to one size, and the plans of their views (data/augment.py)."""
    if fatal := [s["fatal"] for s in samples if "fatal" in s]:
        return {"fatal": fatal[0]}
    ids = torch.stack([s["ids"] for s in samples], 1).flatten(0, 1)
    # cut after the longest caption here, on the CPU: the text tower does not on a GPU (a host sync)
    last = int((ids != rsmclip.PAD).any(0).nonzero().max()) + 1
    out = {"ids": ids[:, :last], "failures": [f for s in samples for f in s["failures"]]}
    if "pixels" in samples[0]:
        def view_major(key):
            return [(i, s[key][v]) for v in range(len(samples[0][key])) for i, s in enumerate(samples)]

        return out | {"pixels": augment.pad_images([s["pixels"] for s in samples]),
                      "view_plan": augment.plan(view_major("view_params")),
                      "local_plan": augment.plan(view_major("local_params"))}
    out["views"] = torch.stack([s["views"] for s in samples], 1).flatten(0, 1)
    out["locals"] = (torch.stack([s["locals"] for s in samples], 1).flatten(0, 1)
                     if samples[0]["locals"] is not None else None)
    return out


class StepSampler:
    """Batches of (index, seed) for steps start..steps-1. The order of epoch e is a permutation seeded by
    (seed, e); each process takes its slice of the global batch; each sample's augmentation seed is
    derived from (seed, step, position). So data are a pure function of the step: resume is exact."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int, start: int, steps: int):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self.start, self.steps = start, steps
        self.per_epoch = n // (batch * world)

    def __len__(self):
        return self.steps - self.start

    def __iter__(self):
        order, epoch = None, -1
        for step in range(self.start, self.steps):
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
                order = torch.randperm(self.n, generator=generator)
            pos = (step % self.per_epoch) * self.batch * self.world + self.rank * self.batch
            yield [(int(i), (self.seed * 1_000_003 + step) * 4096 + self.rank * self.batch + j)
                   for j, i in enumerate(order[pos:pos + self.batch])]


class StreamSampler:
    """Shards' batches for steps start..steps-1: ((stream, position), seed) keys. At step k each process
    reads the next batch of its stream k mod S (S = max(workers, 1) streams a process): the loader sends
    a step's batch to worker (k - start) mod workers, so each worker always reads the same stream, in
    order. Augmentation seeds as StepSampler's."""

    def __init__(self, streams: int, batch: int, rank: int, seed: int, start: int, steps: int):
        self.streams, self.batch, self.rank, self.seed = streams, batch, rank, seed
        self.start, self.steps = start, steps

    def __len__(self):
        return self.steps - self.start

    def __iter__(self):
        for step in range(self.start, self.steps):
            stream = self.rank * self.streams + step % self.streams
            position = (step // self.streams) * self.batch
            seed = (self.seed * 1_000_003 + step) * 4096 + self.rank * self.batch
            yield [((stream, position + j), seed + j) for j in range(self.batch)]


def open_shards(data: list[str], max_member_mib: int) -> shardlib.ShardSet:
    """The shards, opened once while their files are unchanged: the settings check and the run share them
    (others' shards are counted from their headers, minutes at millions of samples)."""
    paths = shardlib.shard_paths(data)
    found = [*paths, *{p.parent / shardlib.INDEX for p in paths if (p.parent / shardlib.INDEX).is_file()}]
    return opened_shards(tuple(data), tuple(tuple(files.file_stamp(f)) for f in found), max_member_mib)


@functools.lru_cache(maxsize=1)
def opened_shards(data: tuple[str, ...], stamps: tuple, max_member_mib: int) -> shardlib.ShardSet:
    return shardlib.open_shards(list(data), max_member_mib << 20)


# One safetensors file: every image of one split of one manifest, decoded once to 8-bit RGB at its native
# size (downscaled, bicubic, aspect kept, when its longer side exceeds max_side), so training reads pixels
# instead of decoding JPEG/TIFF each step. Tensors: `pixels` (uint8, all images' HWC bytes end to end),
# `offsets` (int64 [N + 1]: image i is pixels[offsets[i]:offsets[i + 1]]), `shapes` (int32 [N, 2]: height,
# width). Metadata: format, version, the SHA-256 of the manifest's bytes, the split, max_side, the image
# paths, and per image its stamp (files.file_stamp: size, mtime, ctime, inode) and the SHA-256 of its
# bytes: an image changed since is found by its stamp and confirmed by its bytes (a copied dataset has new
# stamps but the same bytes), so a cache never feeds the pixels of a replaced image. Read memory-mapped
# (ImageCache): the pages of the images in use stay in the OS page cache, shared by every loader process.
# The command that writes it: data/prepare.py cache (build_cache).
CACHE_FORMAT, CACHE_VERSION = "rsmclip-image-cache", "2"  # 2: the images' stamps and SHA-256


def check_cached_images(folder: Path, images: list[str], stamps: list, hashes: list[str], rebuild: str):
    """Refuse a cache whose images changed since it was made: a stamp that differs sends the file to be
    hashed, and only different bytes (or a missing file) count as a change."""
    changed, hashed = [], 0
    for rel, stamp, digest in zip(images, stamps, hashes):
        path = folder / rel
        try:
            if files.file_stamp(path) != stamp:
                hashed += 1
                if files.file_sha256(path) != digest:
                    changed.append(rel)
        except OSError:
            changed.append(f"{rel} (missing)")
    if changed:
        raise DataError(f"{len(changed)} of {len(images)} cached images changed since the cache was made: "
                        f"{listing(changed)}; {rebuild}")
    if hashed:  # a copied dataset: right, but hashed again at every start
        print(f"note: {hashed} of {len(images)} cached images have new file stamps but the same bytes "
              f"(copied or touched), checked by hashing them; to skip that at every start, {rebuild}",
              file=sys.stderr)


class ImageCache:
    """A cache file made by build_cache for this manifest and split, memory-mapped: cache[i] is image i
    of the split as [H, W, 3] uint8, read from the mapped file (no decoding, no full read). Anything else
    (another file, another manifest or split, a cut file) is refused with one message."""

    def __init__(self, path: Path, manifest: Path, split: str = "train"):
        rebuild = f"rebuild it: python data/prepare.py cache {manifest} --out {path}"
        if not path.is_file():
            raise DataError(f"{path}: no such image cache; make it: python data/prepare.py cache {manifest} "
                            f"--out {path}")
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n)) if 8 + n <= size else None
            meta = header.pop("__metadata__")
            ok = meta["format"] == CACHE_FORMAT and {"pixels", "offsets", "shapes"} <= header.keys()
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            ok = False
        if not ok:
            raise DataError(f"{path}: not an rsmclip image cache; make one: python data/prepare.py cache "
                            f"{manifest} --out {path}")
        if meta["version"] != CACHE_VERSION:
            raise DataError(f"{path}: image cache format {meta['version']}, this rsmclip reads "
                            f"{CACHE_VERSION}; {rebuild}")
        digest = files.file_sha256(manifest)
        if meta["manifest_sha256"] != digest:
            raise DataError(f"{path} was made from another manifest (SHA-256 {meta['manifest_sha256'][:16]}, "
                            f"{manifest} now has {digest[:16]}): its images may not be the manifest's; "
                            f"{rebuild}")
        if meta["split"] != split:
            raise DataError(f"{path} holds the {meta['split']} split, training reads {split}; "
                            f"{rebuild} --split {split}")
        end = 8 + n + max(t["data_offsets"][1] for t in header.values())
        if size < end:
            raise DataError(f"{path}: cut short ({size:,} of {end:,} bytes); {rebuild}")

        def mapped(name: str, dtype) -> np.ndarray:
            begin, stop = header[name]["data_offsets"]
            return np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin,
                             shape=((stop - begin) // np.dtype(dtype).itemsize,))

        self.pixels = mapped("pixels", np.uint8)
        self.offsets = np.array(mapped("offsets", np.int64))
        self.shapes = np.array(mapped("shapes", np.int32)).reshape(-1, 2)
        self.images, self.max_side = json.loads(meta["images"]), int(meta["max_side"])
        check_cached_images(manifest.parent, self.images, json.loads(meta["stamps"]),
                            json.loads(meta["sha256"]), rebuild)
        self.mapping = (path, 8 + n + header["pixels"]["data_offsets"][0], len(self.pixels))

    def __len__(self):
        return len(self.images)

    def __getstate__(self):
        """Sent to a loader process that is spawned, not forked: the mapping, never the pixels."""
        return {k: v for k, v in self.__dict__.items() if k != "pixels"}

    def __setstate__(self, state):
        self.__dict__ = state
        path, offset, size = self.mapping
        self.pixels = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(size,))

    def __getitem__(self, i: int) -> np.ndarray:
        return self.pixels[self.offsets[i]:self.offsets[i + 1]].reshape(*self.shapes[i], 3)


# ----------------------------------------------------------------------------- the loader

class LoaderSettings(Protocol):
    """What the loader reads of a training config (train.TrainConfig has these, and more)."""
    data: list[str]
    langs: str
    lang_weights: str
    batch_size: int
    workers: int
    seed: int
    shuffle_buffer: int
    max_member: int  # MiB
    image_cache: str
    augment: str

    def recipe(self) -> augment.Recipe: ...


@dataclass(frozen=True)
class World:
    """The processes a run is spread over: this one's rank among `size` (torchrun's; 0 of 1 without it) and
    the device it trains on."""
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")


@dataclass
class TrainingData:
    """The training data that --data names, opened and checked: the train split of manifests (items, and
    the decoded cache of their images when given), or tar shards and the streams they are read as."""
    items: list[dict]
    cache: Optional[ImageCache]
    shards: Optional[shardlib.ShardSet]
    streams: Optional[shardlib.Streams]
    size: int  # training images

    def state(self, workers: int, batch: int, step: int) -> Optional[dict]:
        """What a checkpoint records of where the data stand after `step` steps: the shards' streams (a
        manifest's order is a function of the step alone: nothing)."""
        return self.shards and shardlib.stream_state(self.shards, self.streams, max(workers, 1), batch, step)


def open_data(cfg: LoaderSettings, world: World) -> TrainingData:
    """Open and check the training data of a config before the model is built: every language asked for is
    there, there is at least one global batch, the image cache is this manifest's."""
    langs = [lang for lang, p in lang_probabilities(cfg.langs, cfg.lang_weights).items() if p > 0]  # drawn
    shards = open_shards(cfg.data, cfg.max_member) if shardlib.is_shards(cfg.data) else None
    if shards:
        items, cache = [], None
        streams = shardlib.Streams(shards.counts, world.size * max(cfg.workers, 1), cfg.seed,
                                   cfg.shuffle_buffer)
        check_languages([{"captions": {lang: [""] for lang in shards.langs}}], langs)
        size = sum(shards.counts)
    else:
        items, streams = read_manifests(cfg.data, "train"), None
        if not items:
            raise DataError(f"no training images in {', '.join(cfg.data)} (split 'train')")
        check_languages(items, langs)
        cache = ImageCache(Path(cfg.image_cache), Path(cfg.data[0])) if cfg.image_cache else None
        size = len(items)
    if size < cfg.batch_size * world.size:
        raise DataError(f"{size} training images: fewer than one batch of {cfg.batch_size * world.size}")
    return TrainingData(items, cache, shards, streams, size)


def check_data(cfg: LoaderSettings, demo: bool, world_size: int) -> list[str]:
    """The data settings checked before any work (the demo's manifest is made by the run): the manifests
    exist, the shards open (their shards.json, or others' headers: read again when the run starts) and
    feed every stream, the image cache belongs to the one manifest. -> the problems, one line each."""
    bad = []
    shards = shardlib.is_shards(cfg.data)
    if shards:
        try:
            found = open_shards(cfg.data, cfg.max_member)
            shardlib.Streams(found.counts, world_size * max(cfg.workers, 1), cfg.seed, cfg.shuffle_buffer)
        except rsmclip.RsmclipError as e:
            bad.append(str(e))
        if cfg.image_cache:
            bad.append(f"--image-cache {cfg.image_cache!r}: shards are read as they are; the cache holds a "
                       "manifest's images")
    missing = [d for d in cfg.data if not Path(d).is_file() and not demo and not shards]
    if missing:
        bad.append(f"--data {cfg.data!r}: no such file: {', '.join(missing)}")
    if cfg.image_cache and len(cfg.data) != 1:
        bad.append(f"--image-cache {cfg.image_cache!r}: one cache holds one manifest: give one --data (merge "
                   "several with data/prepare.py merge)")
    if cfg.image_cache and len(cfg.data) == 1 and not missing and not shards:
        try:  # a stale or foreign cache must stop the run before any work
            ImageCache(Path(cfg.image_cache), Path(cfg.data[0]))
        except rsmclip.RsmclipError as e:
            bad.append(f"--image-cache: {e}")
    return bad


def tensor_views(cfg: LoaderSettings, world: World) -> bool:
    """Whether the views are made on the training device (batched tensor ops) rather than by PIL in the
    loader processes. Batched on a GPU the augmentation costs little of the step; on a CPU it would share
    the cores with the model, while PIL runs in the loader processes beside it."""
    return cfg.augment == "tensor" or cfg.augment == "auto" and world.device.type == "cuda"


def build_loader(data: TrainingData, cfg: LoaderSettings, world: World, image_size: int,
                 tokenizer: rsmclip.Tokenizer, start: int, steps: int) -> torch.utils.data.DataLoader:
    """The loader of steps start..steps-1 for this process: batches of cfg.batch_size samples (views,
    local crops, caption ids), each step's samples a function of the step, read by cfg.workers processes."""
    tensor = tensor_views(cfg, world)
    if data.shards:
        dataset = ShardDataset(data.shards, data.streams, cfg, image_size, tokenizer, tensor)
        sampler = StreamSampler(max(cfg.workers, 1), cfg.batch_size, world.rank, cfg.seed, start, steps)
    else:
        dataset = MultiCropDataset(data.items, cfg, image_size, tokenizer, data.cache, tensor)
        sampler = StepSampler(len(data.items), cfg.batch_size, world.rank, world.size, cfg.seed, start, steps)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                       num_workers=cfg.workers, pin_memory=world.device.type == "cuda",
                                       persistent_workers=False)


def failures(batch: dict, strict: bool) -> list[str]:
    """The images of a batch that could not be read (each replaced by the next readable one); a shard that
    cannot be read, or an unreadable image with --strict-images, stops the run."""
    if "fatal" in batch:
        raise DataError(batch["fatal"])
    if batch["failures"] and strict:
        raise DataError(f"unreadable training image: {batch['failures'][0]} (drop --strict-images to skip)")
    return batch["failures"]
