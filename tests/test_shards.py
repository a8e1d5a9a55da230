"""Tar shards: written from a manifest byte for byte, read back by WebDataset's own package, streamed by
train.py with every sample once per pass across 2 processes x 2 loader workers, resumed exactly after
SIGKILL, and other people's shards (image + txt, or a json caption) trained on."""
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kill_after_first_checkpoint
from PIL import Image
from safetensors import safe_open

import cli
import rsmclip
import train
from data import loading
from data import shards as shardlib
from data.manifest import load_manifest, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--langs", "en", "--batch-size", "8", "--local-crops", "2", "--prototypes", "64", "--log-every", "2"]


@pytest.fixture(scope="module")
def demo_shards(demo_manifest, tmp_path_factory) -> Path:
    """The demo's 600 train images as 7 shards (85 samples each, the last 90: uneven on purpose)."""
    out = tmp_path_factory.mktemp("shards") / "sh"
    shardlib.write_shards(demo_manifest, out, per_shard=85)
    return out


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_manifest_to_shards_round_trips_every_caption_and_image_byte(demo_manifest, demo_shards):
    records = [r for r in load_manifest(demo_manifest) if r["split"] == "train"]
    index = json.loads((demo_shards / "shards.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [85] * 7 + [5]
    assert index["complete"] and index["samples"] == 600 and len(index["langs"]) == 10
    members = {}
    for shard in index["shards"]:
        data = (demo_shards / shard["name"]).read_bytes()
        assert len(data) == shard["bytes"] and shardlib.hashlib.sha256(data).hexdigest() == shard["sha256"]
        members |= tar_members(demo_shards / shard["name"])
    assert len(members) == 3 * len(records)
    for r in records:
        key = shardlib.sample_key(r["id"])
        assert members[f"{key}.png"] == (demo_manifest.parent / r["image"]).read_bytes()
        doc = json.loads(members[f"{key}.json"])
        assert doc["captions"] == r["captions"] and doc["id"] == r["id"] and doc["source"] == r["image"]
        assert members[f"{key}.txt"].decode() == r["captions"]["en"][0]
    # and through the reader train.py uses
    shards = shardlib.open_shards([str(demo_shards)])
    reader = shardlib.ShardReader(shards, shardlib.Streams(shards.counts, 1, 0, 1000))
    shard, key, data = reader.get(0, 17)
    captions, _, image = shardlib.parse_sample(shard, key, data)
    record = next(r for r in records if shardlib.sample_key(r["id"]) == key)
    assert captions == record["captions"] and image == (demo_manifest.parent / record["image"]).read_bytes()


def test_shard_samples_feed_both_augmentation_paths(demo_manifest, demo_shards):
    """What a loader worker gives from a shard: PIL views, or for --augment tensor the 8-bit image (the
    same pixels) and its views' parameters, which collate batches."""
    shards = shardlib.open_shards([str(demo_shards)])
    streams = shardlib.Streams(shards.counts, 1, 0, 1000)
    tokenizer = rsmclip.Tokenizer(demo_manifest.parent / "spm.model")
    cfg = replace(train.RECIPES["demo"], langs="en", local_crops=2)
    pil, tensor = (loading.ShardDataset(shards, streams, cfg, 64, tokenizer, tensor=t) for t in (False, True))
    _, image, failures = pil.read((0, 5))
    sample = tensor[((0, 5), 123)]
    assert not failures and sample["pixels"].dtype == torch.uint8
    assert torch.equal(sample["pixels"], torch.from_numpy(np.array(image)))
    views = pil[((0, 5), 123)]
    assert views["views"].shape == (2, 3, 64, 64) and views["locals"].shape == (2, 3, 24, 24)
    batch = loading.collate([sample, tensor[((0, 6), 124)]])
    assert batch["pixels"].shape == (2, 64, 64, 3) and batch["ids"].shape[0] == 4


def test_webdataset_reads_our_shards(demo_manifest, demo_shards):
    import webdataset as wds

    records = {shardlib.sample_key(r["id"]): r for r in load_manifest(demo_manifest) if r["split"] == "train"}
    pattern = str(demo_shards / "train-{000000..000007}.tar")
    seen = 0
    for sample in wds.WebDataset(pattern, shardshuffle=False):
        r = records[sample["__key__"]]
        assert sample["png"] == (demo_manifest.parent / r["image"]).read_bytes()
        assert json.loads(sample["json"])["captions"] == r["captions"]
        assert sample["txt"].decode() == r["captions"]["en"][0]
        seen += 1
    assert seen == 600


def test_a_stopped_writer_continues_to_the_same_bytes(demo_manifest, tmp_path, monkeypatch):
    shardlib.write_shards(demo_manifest, tmp_path / "whole", per_shard=150)
    real, calls = shardlib.image_bytes, []

    def dies(*args):  # killed while the third shard is being made
        calls.append(1)
        if len(calls) == 2 * 150 + 40:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(shardlib, "image_bytes", dies)
    with pytest.raises(KeyboardInterrupt):
        shardlib.write_shards(demo_manifest, tmp_path / "cut", per_shard=150)
    index = json.loads((tmp_path / "cut/shards.json").read_text())
    assert not index["complete"] and len(index["shards"]) == 2
    written = sorted(p.name for p in (tmp_path / "cut").iterdir())
    assert written == ["shards.json", "train-000000.tar", "train-000001.tar"]
    monkeypatch.setattr(shardlib, "image_bytes", real)
    with pytest.raises(shardlib.ShardError, match="not all written"):
        shardlib.open_shards([str(tmp_path / "cut")])
    calls.clear()
    shardlib.write_shards(demo_manifest, tmp_path / "cut", per_shard=150)
    for name in [p.name for p in (tmp_path / "whole").iterdir()]:
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_brace_ranges_lists_and_folders():
    assert shardlib.expand_braces("a-{008..011}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar", "a-011.tar"]
    assert shardlib.expand_braces("{x,y}-{1..2}.tar") == ["x-1.tar", "x-2.tar", "y-1.tar", "y-2.tar"]
    assert shardlib.expand_braces("{8..10}") == ["8", "9", "10"]
    # counted from the groups' sizes before any name is made (a 20-million range used to take GBs)
    with pytest.raises(shardlib.ShardError, match=r"\{0\.\.20000000\}\.tar: 20,000,001 names, more than "):
        shardlib.expand_braces("sh/train-{0..20000000}.tar")
    assert shardlib.is_shards(["sh/train-{0..20000000}.tar"]) and not shardlib.is_shards(["a-{1..3}.jsonl"])
    with pytest.raises(shardlib.ShardError, match="nested or unmatched braces"):
        shardlib.expand_braces("{a,{b,c}}.tar")
    assert train.resolve_config("demo", None, {"data": ["a/{x,y}.tar,b.jsonl"]}).data == ["a/{x,y}.tar",
                                                                                          "b.jsonl"]


def test_every_sample_once_per_pass_with_uneven_shards():
    """4 streams (2 processes x 2 workers) over shards of 7 different sizes: pass e of the streams together
    holds every sample exactly once, for several passes; the positions are arithmetic, no file read."""
    counts = [5, 9, 3, 12, 7, 8, 6]
    streams = shardlib.Streams(counts, 4, seed=3, block=4)
    everything = Counter((s, i) for s, n in enumerate(counts) for i in range(n))
    for number in range(3):
        seen = Counter()
        for stream in range(4):
            start = streams.find_pass(stream, 0)[1]
            for _ in range(number):  # the start of this stream's pass `number`
                start += sum(counts[s] for s in streams.find_pass(stream, start)[2])
            shards = streams.find_pass(stream, start)[2]
            length = sum(counts[s] for s in shards)
            seen += Counter(streams.sample(stream, start + q)[:2] for q in range(length))
        assert seen == everything, number
    # the shuffle moves samples within blocks of 4 only, and differs between passes
    orders = [[streams.sample(0, q)[:2] for q in range(4)] for _ in range(2)]
    assert orders[0] == orders[1] and len(set(orders[0])) == 4


class Keys(torch.utils.data.Dataset):
    """The sample keys a loader worker reads for ((stream, position), seed) keys."""

    def __init__(self, shards, streams):
        self.reader = shardlib.ShardReader(shards, streams)

    def __getitem__(self, key):
        return self.reader.get(*key[0])[1]


def test_two_processes_with_two_loader_workers_see_every_sample_once(demo_manifest, tmp_path):
    """Through train.py's sampler and real loader processes: 2 ranks x 2 workers, 8 shards of 75 samples,
    batch 5: 60 steps (each worker's 30 batches: its stream's pass) read all 600 train images once."""
    shardlib.write_shards(demo_manifest, tmp_path / "sh", per_shard=75)
    shards = shardlib.open_shards([str(tmp_path / "sh")])
    streams = shardlib.Streams(shards.counts, 4, seed=0, block=40)
    seen = Counter()
    for rank in range(2):
        sampler = loading.StreamSampler(2, 5, rank, 0, 0, 60)
        loader = torch.utils.data.DataLoader(Keys(shards, streams), batch_sampler=sampler, num_workers=2,
                                             collate_fn=list)
        seen += Counter(key for batch in loader for key in batch)
    ids = [shardlib.sample_key(r["id"]) for r in load_manifest(demo_manifest) if r["split"] == "train"]
    assert seen == Counter(ids)


def run_train(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=ROOT)


def test_sigkill_and_resume_from_shards_equals_an_uninterrupted_run(demo_manifest, demo_shards, tmp_path):
    """2 loader workers, 2 streams, a shuffle block smaller than a shard: killed at a random moment after
    the first checkpoint and resumed, the run ends bit for bit where an uninterrupted one does, and its
    checkpoint records where each stream stands. Shards that change under the same name are refused."""
    shutil.copytree(demo_shards, tmp_path / "sh")
    args = ["--data", tmp_path / "sh", "--tokenizer",
            demo_manifest.parent / "spm.model", *FAST, "--workers", "2", "--shuffle-buffer", "50", "--steps",
            "6", "--ckpt-every", "2", "--deterministic"]
    reference = run_train("--out", tmp_path / "ref", *args)
    assert reference.returncode == 0, reference.stderr
    assert "600 training images in 8 shards, 2 streams" in reference.stdout
    assert "no --val-data" in reference.stdout
    kill_after_first_checkpoint(tmp_path / "cut", args, random.Random(1).uniform(0, 0.3))
    checkpoint = tmp_path / "cut/checkpoint.safetensors"
    with safe_open(str(checkpoint), "pt") as f:
        state = json.loads(f.metadata()["state"])
    assert state["step"] < 6 and state["data"]["streams"] == 2
    assert [p["position"] for p in state["data"]["positions"]] == [(state["step"] + 1) // 2 * 8,
                                                                   state["step"] // 2 * 8]
    resumed = run_train("--out", tmp_path / "cut", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {state['step']}" in resumed.stdout
    with safe_open(str(tmp_path / "ref/checkpoint.safetensors"), "pt") as f, \
            safe_open(str(checkpoint), "pt") as g:
        assert f.keys() == g.keys() and all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
        assert json.loads(f.metadata()["state"])["data"] == json.loads(g.metadata()["state"])["data"]
    shutil.rmtree(tmp_path / "sh")
    shardlib.write_shards(demo_manifest, tmp_path / "sh", per_shard=100)
    other = run_train("--out", tmp_path / "cut", *args[:-5], "--steps", "8", "--ckpt-every", "2",
                      "--deterministic")
    assert other.returncode == 1, other.stderr
    assert "--data names 6 shards, the checkpoint's run read 8" in other.stderr


def foreign_shards(folder: Path, demo_manifest: Path, per_shard: int, json_caption: bool) -> list[Path]:
    """open_clip-style shards of the demo's train images, made as other tools make them: `<key>.jpg` (JPEG
    re-encoded) and `<key>.txt`, or `<key>.json` with {"caption": ...}; no shards.json."""
    from PIL import Image

    folder.mkdir()
    records = [r for r in load_manifest(demo_manifest) if r["split"] == "train"][:4 * per_shard]
    paths = []
    for n in range(0, len(records), per_shard):
        path = folder / f"{n // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, r in enumerate(records[n:n + per_shard]):
                jpg = io.BytesIO()
                Image.open(demo_manifest.parent / r["image"]).save(jpg, "JPEG")
                text = r["captions"]["en"][0]
                caption = (f"{n + i:08d}.json", json.dumps({"caption": text}).encode()) if json_caption \
                    else (f"{n + i:08d}.txt", text.encode())
                for name, data in ((f"{n + i:08d}.jpg", jpg.getvalue()), caption):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def test_open_clip_style_shards_train(demo_manifest, tmp_path):
    """jpg + txt shards train (a json {"caption": ...} instead of the txt reads the same captions)."""
    records = [r for r in load_manifest(demo_manifest) if r["split"] == "train"]
    with_json = foreign_shards(tmp_path / "js", demo_manifest, 20, json_caption=True)
    shards = shardlib.open_shards([str(p) for p in with_json])
    reader = shardlib.ShardReader(shards, shardlib.Streams(shards.counts, 1, 0, 1000))
    for position in range(80):
        shard, key, data = reader.get(0, position)
        assert shardlib.parse_sample(shard, key, data)[0] == {"en": [records[int(key)]["captions"]["en"][0]]}
    paths = foreign_shards(tmp_path / "oc", demo_manifest, 20, json_caption=False)
    shards = shardlib.open_shards([str(tmp_path / "oc/{00000..00003}.tar")])
    assert shards.counts == [20] * 4 and shards.langs == ["en"] and not shards.ours and not shards.notes
    result = run_train("--data", tmp_path / "oc", "--tokenizer", demo_manifest.parent / "spm.model", *FAST,
                       "--workers", "0", "--steps", "4", "--out", tmp_path / "run", "--val-data",
                       demo_manifest)
    assert result.returncode == 0, result.stderr
    assert f"80 training images in {len(paths)} shards" in result.stdout
    assert "retrieval mR before" in result.stdout
    assert json.loads((tmp_path / "run/summary.json").read_text())["skipped_images"] == 0


def equal_size_shards(tmp: Path, ours: bool) -> Path:
    """sh/: three shards of two samples, all of one size (32-pixel PNGs and short captions fill a tar block
    each): written by prepare.py shards from a manifest (ours), or as another tool writes them (png + txt)."""
    folder, pngs = tmp / "sh", []
    for i in range(6):
        image = io.BytesIO()
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(image, "PNG")
        pngs.append(image.getvalue())
    if ours:
        (tmp / "ds" / "imgs").mkdir(parents=True)
        for i, data in enumerate(pngs):
            (tmp / "ds" / "imgs" / f"{i}.png").write_bytes(data)
        write_jsonl([{"id": f"d/{i}", "image": f"imgs/{i}.png", "split": "train", "dataset": "d",
                      "captions": {"en": [f"a road {i}"]}} for i in range(6)], tmp / "ds" / "captions.jsonl")
        shardlib.write_shards(tmp / "ds" / "captions.jsonl", folder, per_shard=2)
        return folder
    folder.mkdir()
    for n in range(3):
        with tarfile.open(folder / f"{n:05d}.tar", "w") as tar:
            for i in (2 * n, 2 * n + 1):
                for name, data in ((f"{i:03d}.png", pngs[i]), (f"{i:03d}.txt", f"a road {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def train_here(args: list, capsys) -> tuple[int, str, str]:
    """train.py's command line in this process, as the script runs it: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as done:
        cli.run_cli(train.app, list(map(str, args)))
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def swap(a: Path, b: Path):
    first, second = a.read_bytes(), b.read_bytes()
    a.write_bytes(second)
    b.write_bytes(first)


@pytest.mark.parametrize("ours", [True, False], ids=["ours", "others'"])
def test_a_resume_follows_the_shards_bytes(tmp_path, spm_model, capsys, ours):
    """A finished run, then two shards' bytes swapped (same names, sizes and sample counts; ours' shards.json
    untouched): a longer --steps is refused naming the shard, the checkpoint unchanged. Put back, the same
    command resumes; ours' files whose stamps changed are hashed once against shards.json, and it says so."""
    folder = equal_size_shards(tmp_path, ours)
    names = sorted(p.name for p in folder.glob("*.tar"))
    assert len(names) == 3 and len({(folder / n).stat().st_size for n in names}) == 1
    args = ["--data", folder, "--tokenizer", spm_model, "--out", tmp_path / "run", "--langs", "en",
            "--batch-size", "2", "--workers", "0", "--local-crops", "2", "--prototypes", "64"]
    assert train_here(args + ["--steps", "2"], capsys)[0] == 0
    checkpoint = (tmp_path / "run" / "checkpoint.safetensors").read_bytes()
    swap(folder / names[1], folder / names[2])
    code, out, err = train_here(args + ["--steps", "4"], capsys)
    why = "its bytes are not those its shards.json lists" if ours else "not the shard the checkpoint's run"
    assert code == 1 and f"error: {folder / names[1]}: {why}" in err and "swapped" in err, err
    assert (tmp_path / "run" / "checkpoint.safetensors").read_bytes() == checkpoint
    swap(folder / names[1], folder / names[2])
    code, out, err = train_here(args + ["--steps", "4"], capsys)
    assert code == 0 and "resuming at step 2" in out, err
    assert ("note: 2 of 3 shards have new file stamps since the checkpoint" in err) == ours, err


def test_a_member_above_max_member_is_never_read(tmp_path, monkeypatch):
    """A member's header gives its size: one above the limit is read around, never read, and its sample
    holds the size instead (skipped and counted as unreadable); others' shards say how many at start."""
    image = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 120, 200)).save(image, "PNG")
    members = [("a.png", image.getvalue()), ("a.txt", b"a road"), ("b.png", bytes(3 << 20)), ("b.txt", b"b"),
               ("c.png", image.getvalue()), ("c.txt", b"c")]
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shards = shardlib.open_shards([str(tmp_path / "00000.tar")], max_member=1 << 20)
    assert shards.notes == ["1 of 3 samples hold a member above --max-member (1.0 MiB): each is skipped "
                            "unread and counted when it comes"]
    read = []

    class Counted:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            read.append(len(data := self.f.read(n)))
            return data

    monkeypatch.setattr(shardlib, "open", lambda *a: Counted(open(*a)), raising=False)
    reader = shardlib.ShardReader(shards, shardlib.Streams(shards.counts, 1, 0, 1000), max_member=1 << 20)
    got = dict(reader.get(0, q)[1:] for q in range(3))
    assert got["b"] == {"png": 3 << 20, "txt": b"b"}  # the size in place of the bytes
    assert got["a"] == {"png": image.getvalue(), "txt": b"a road"}
    assert 0 < sum(read) < 1 << 20 and (tmp_path / "00000.tar").stat().st_size > 3 << 20
    with pytest.raises(rsmclip.ImageError, match=r"00000\.tar:b\.png: 3\.0 MiB, above --max-member: skipped"):
        shardlib.parse_sample("00000.tar", "b", got["b"])


def test_a_checkpoint_made_before_the_bytes_were_recorded_resumes_by_names_and_counts(tmp_path):
    """Checkpoints written before "files" recorded each shard's bytes hold the names-and-counts fingerprint
    alone: they resume on the same names and counts, and are refused on others."""
    shards = shardlib.open_shards([str(equal_size_shards(tmp_path, ours=True))])
    state = shardlib.stream_state(shards, shardlib.Streams(shards.counts, 1, 0, 1000), 1, 2, 4)
    earlier = {k: v for k, v in state.items() if k != "files"}
    assert [cli.json_problems(s, shardlib.STREAM_STATE) for s in (state, earlier)] == [[], []]
    shardlib.check_same_shards(shards, earlier)
    with pytest.raises(shardlib.ShardError, match=r"the shards \(their names or sample counts\) changed"):
        shardlib.check_same_shards(replace(shards, counts=[2, 2, 1]), earlier)
