"""data/: converters on the real samples and on hand-made files of every format, each bad input, the
leakage check of `merge`, the demo dataset, and the zero-shot class names and templates."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import files
import rsmclip
from data import demo, prepare
from data.manifest import LANGS, DataError, load_labels, load_manifest, scan_image_folder, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"


def need(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"{path} not present (shared samples are optional)")
    return path


def scene_image(seed: int) -> Image.Image:
    """A distinct synthetic overhead scene (the demo's renderer): varied, realistic enough for hashing."""
    rng = np.random.default_rng([7, seed])
    return demo.render(demo.random_scene(rng), rng)


def save(image: Image.Image, path: Path, **kw) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)
    return path.name


def karpathy(entries, **extra) -> dict:
    return {"images": [{"filename": f, "split": s, "imgid": i, "sentids": [],
                        "sentences": [{"raw": c, "tokens": c.split(), "extra_field": 1} for c in caps]}
                       for i, (f, s, caps) in enumerate(entries)], **extra}


def write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- the real samples


def test_ucm_sample_converts_with_text_kept_and_counts_reported(tmp_path):
    src = need("ucm_captions_sample")
    (tmp_path / "ucm").mkdir()
    (tmp_path / "ucm" / "images").symlink_to(src / "images")  # a linked image folder in the dataset folder
    out = tmp_path / "ucm" / "captions.jsonl"
    report = prepare.build_captions(src / "dataset_ucm.json", tmp_path / "ucm" / "images", out)
    assert any("differs from the published dataset" in line and "images 105 (published 2,100)" in line
               and "test images 1 (published 210)" in line for line in report)
    records = load_manifest(out)
    raw = json.loads((src / "dataset_ucm.json").read_text())["images"]
    assert len(records) == len(raw) == 105
    for r, im in zip(records, raw):
        assert r["captions"]["en"] == [s["raw"].strip() for s in im["sentences"]]  # text kept exactly
        assert r["image"] == f"images/{im['filename']}" and r["split"] == im["split"]
        assert r["dataset"] == "ucm"
        assert (out.parent / r["image"]).is_file()


def test_sydney_partial_missing_images_error_then_drop_report(tmp_path):
    src = need("sydney_captions_partial")
    (tmp_path / "images").symlink_to(src / "images")
    ann = src / "dataset_sydney_modified.json"  # extra per-sentence field tokens_transformers
    message = r"604 of 613 images are missing or unreadable.*10\.tif \(missing\).*--drop-missing"
    with pytest.raises(DataError, match=message):
        prepare.build_captions(ann, tmp_path / "images", tmp_path / "captions.jsonl")
    assert not (tmp_path / "captions.jsonl").exists()  # nothing written on error
    report = prepare.build_captions(ann, tmp_path / "images", tmp_path / "captions.jsonl", drop_missing=True)
    assert any("counts match the published sydney: 613 images, 58 test" in line for line in report)
    assert any(line.startswith("dropped 604 of 613 images") for line in report)
    records = load_manifest(tmp_path / "captions.jsonl")
    assert sorted(r["id"] for r in records) == [f"sydney/{i}" for i in range(1, 10)]


def test_sydney_cli_error_is_one_message_and_exit_1(tmp_path):
    src = need("sydney_captions_partial")
    (tmp_path / "images").symlink_to(src / "images")
    run = subprocess.run([sys.executable, "data/prepare.py", "captions",
                          str(src / "dataset_sydney_modified.json"),
                          "--images", str(tmp_path / "images"), "--out", str(tmp_path / "c.jsonl")],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith("error: 604 of 613 images are missing")


def test_rsscn7_sample_labels_and_folder_names(tmp_path):
    src = need("rsscn7_sample")
    (tmp_path / "rsscn7").symlink_to(src)
    report = prepare.build_labels(tmp_path / "rsscn7", tmp_path / "labels.jsonl")
    records = load_labels(tmp_path / "labels.jsonl")
    assert len(records) == 70 and {r["split"] for r in records} == {"test"}
    assert sorted({r["label"] for r in records}) == list(json.loads(
        (ROOT / "data" / "classnames.json").read_text())["datasets"]["RSSCN7"])
    assert records[0] == {"image": "rsscn7/aGrass/a001.jpg", "label": "aGrass", "split": "test"}
    assert "70 images in 7 classes" in report[0]


# ----------------------------------------------------------------------------- hand-made files, every format


def test_karpathy_rsitmd_style_with_extra_fields(tmp_path):
    images = tmp_path / "images"
    names = [save(scene_image(i), images / f"airport_{i}.tif") for i in range(3)]
    ann = write(tmp_path / "dataset_RSITMD.json", karpathy(
        [(names[0], "train", ["  Many planes.  ", "A runway."]), (names[1], "test", ["Planes."]),
         (names[2], "val", ["Terminal \u201cbuildings\u201d."])], dataset="rsitmd"))
    report = prepare.build_captions(ann, images, tmp_path / "captions.jsonl")
    records = load_manifest(tmp_path / "captions.jsonl")
    assert [r["captions"]["en"] for r in records] == [["Many planes.", "A runway."], ["Planes."],
                                                      ["Terminal \u201cbuildings\u201d."]]
    assert [r["id"] for r in records] == ["rsitmd/airport_0", "rsitmd/airport_1", "rsitmd/airport_2"]
    assert "karpathy format, dataset 'rsitmd'" in report[0] and "images 3 (published 4,743)" in report[1]
    assert (tmp_path / "captions.jsonl").stat().st_mode & 0o777 == 0o666 & ~files.umask()  # as any tool


def test_nwpu_per_category_layout(tmp_path):
    images = tmp_path / "NWPU_images"
    for cat in ("airport", "beach"):
        for i in range(2):
            save(scene_image(hash(cat) % 100 + i), images / cat / f"{cat}_{i:03d}.jpg")
    doc = {cat: [{"filename": f"{cat}_{i:03d}.jpg", "split": "train" if i else "test", "imgid": i,
                  "raw": f"{cat} {i} a", "raw_1": "b", "raw_2": "c", "raw_3": "d", "raw_4": "e"}
                 for i in range(2)] for cat in ("airport", "beach")}
    ann = write(tmp_path / "dataset_nwpu.json", doc)
    report = prepare.build_captions(ann, images, tmp_path / "captions.jsonl")
    records = load_manifest(tmp_path / "captions.jsonl")
    assert "nwpu format, dataset 'nwpu'" in report[0] and "images 4 (published 31,500)" in report[1]
    assert records[0] == {"id": "nwpu/airport/airport_000", "image": "NWPU_images/airport/airport_000.jpg",
                          "split": "test", "dataset": "nwpu",
                          "captions": {"en": ["airport 0 a", "b", "c", "d", "e"]}}


def test_manifest_written_inside_the_dataset_folder_only(tmp_path):
    images = tmp_path / "data" / "images"
    name = save(scene_image(0), images / "a.png")
    ann = write(tmp_path / "ann.json", karpathy([(name, "test", ["x"])], dataset="x"))
    with pytest.raises(DataError, match="is not inside .*Write the manifest into the dataset folder"):
        prepare.build_captions(ann, images, tmp_path / "elsewhere" / "captions.jsonl")
    prepare.build_captions(ann, images, tmp_path / "captions.jsonl")  # an ancestor folder is fine
    assert load_manifest(tmp_path / "captions.jsonl")[0]["image"] == "data/images/a.png"
    prepare.build_captions(ann, images, images / "captions.jsonl")  # and so is the image folder itself
    assert load_manifest(images / "captions.jsonl")[0]["image"] == "a.png"


# ----------------------------------------------------------------------------- bad inputs, one message each


@pytest.fixture
def dataset(tmp_path):
    """Three good images; returns (images folder, annotation writer)."""
    images = tmp_path / "images"
    for i in range(3):
        save(scene_image(i), images / f"{i}.png")

    def annotate(entries, raw_text=None):
        path = tmp_path / "ann.json"
        if raw_text is not None:
            path.write_bytes(raw_text)
        else:
            write(path, karpathy(entries, dataset="toy"))
        return path
    return images, annotate


GOOD = [("0.png", "train", ["a"]), ("1.png", "val", ["b"]), ("2.png", "test", ["c"])]


@pytest.mark.parametrize("entries, raw, message", [
    (GOOD + [("9.png", "train", ["d"])], None,
     r"1 of 4 images are missing or unreadable under .*: 9\.png \(missing\)"),
    (GOOD + [("0.png", "train", ["d"])], None, r"1 images are listed more than once: 0"),
    (GOOD + [("../outside.png", "train", ["d"])], None,
     r"unsafe: '\.\./outside\.png' \(leaves the dataset folder\)"),
    (GOOD + [("/etc/passwd", "train", ["d"])], None, r"unsafe: '/etc/passwd' \(absolute or not POSIX\)"),
    (GOOD + [("/", "train", ["d"])], None, r"unsafe: '/' \(absolute or not POSIX\)"),
    (GOOD + [("images/", "train", ["d"])], None, r"unsafe: 'images/' \(names a folder, not a file\)"),
    ([("0.png", "train", ["a", "   "])] + GOOD[1:], None, r"1 captions are empty: 0\.png #1.*--drop-empty"),
    ([("0.png", "train", [])] + GOOD[1:], None, r"1 images have no caption: 0\.png"),
    ([("0.png", "restval", ["a"])] + GOOD[1:], None,
     r"split other than train/val/test: 0\.png \('restval'\)"),
    (None, '{"images": [{"filename": "0.png", "sentences": [{"raw": "caf\xe9"}]}]}'.encode("latin-1"),
     r"not UTF-8 \(byte 0xe9 at offset"),
    (None, b'{"images": [', r"not valid JSON \(line 1"),
    (None, b'{"something": 1}', r"unrecognised annotation format"),
    (None, b'{"images": []}', r"lists no images: nothing to write"),
    (None, b'{"airport": []}', r"lists no images: nothing to write"),  # NWPU, one empty category
    (None, b'{"images": [{"filename": "0.png"}]}', r"images\[0\] lacks filename/split/sentences\[\]\.raw"),
])
def test_bad_annotations_are_reported(dataset, tmp_path, entries, raw, message):
    images, annotate = dataset
    with pytest.raises(DataError, match=message):
        prepare.build_captions(annotate(entries, raw), images, tmp_path / "captions.jsonl")
    assert not (tmp_path / "captions.jsonl").exists()


def test_unreadable_image_error_and_drop(dataset, tmp_path):
    images, annotate = dataset
    (images / "1.png").write_bytes((images / "1.png").read_bytes()[:200])  # truncated: fails only on decode
    with pytest.raises(DataError, match=r"1 of 3 images are missing or unreadable.*1\.png \(cannot read"):
        prepare.build_captions(annotate(GOOD), images, tmp_path / "captions.jsonl")
    report = prepare.build_captions(annotate(GOOD), images, tmp_path / "captions.jsonl", drop_missing=True)
    assert any(line.startswith("dropped 1 of 3 images") and "1.png" in line for line in report)
    assert [r["id"] for r in load_manifest(tmp_path / "captions.jsonl")] == ["toy/0", "toy/2"]


def test_empty_captions_dropped_only_on_request(dataset, tmp_path):
    images, annotate = dataset
    ann = annotate([("0.png", "train", ["a", " "]), ("1.png", "val", [""]), ("2.png", "test", ["c"])])
    report = prepare.build_captions(ann, images, tmp_path / "captions.jsonl", drop_empty=True)
    assert "dropped 2 empty captions: 0.png #1, 1.png #0" in report
    assert "dropped 1 images left without captions: 1.png" in report
    assert {r["id"]: r["captions"]["en"] for r in load_manifest(tmp_path / "captions.jsonl")} == \
        {"toy/0": ["a"], "toy/2": ["c"]}
    ann = annotate([(f"{i}.png", "train", [" "]) for i in range(3)])
    with pytest.raises(DataError, match="no image left once the empty and the unreadable ones are dropped"):
        prepare.build_captions(ann, images, tmp_path / "none.jsonl", drop_empty=True)
    assert not (tmp_path / "none.jsonl").exists()  # never a manifest of 0 records


@pytest.mark.parametrize("line, message", [
    ({"id": "a", "image": "../x.png", "split": "test", "captions": {"en": ["x"]}},
     r'line 1: image: "\.\./x\.png" is unsafe \(leaves the dataset folder\)'),
    ({"id": "a", "image": "/abs/x.png", "split": "test", "captions": {"en": ["x"]}}, "is unsafe"),
    ({"id": "a", "image": "x.png", "split": "dev", "captions": {"en": ["x"]}},
     'line 1: split: "dev" is not one of "train", "val", "test"'),
    ({"id": "a", "image": "x.png", "split": "test", "captions": {"en": []}},
     r"line 1: captions\.en: \[\] is not a list of 1 or more items"),
    ({"id": "a", "image": "x.png", "split": "test", "captions": {"en": ["x", " "]}},
     r'line 1: captions\.en\[1\]: " " is not non-blank text'),
    ({"id": "a", "image": "x.png", "split": "test"}, r"line 1: captions: missing \(an object\)"),
    ({"id": "a\ud800", "image": "x.png", "split": "test", "captions": {"en": ["x"]}},
     r'line 1: id: "a\\ud800" is not text \(it holds a lone surrogate'),
])
def test_manifest_reader_rejects_bad_records(tmp_path, line, message):
    path = tmp_path / "captions.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(DataError, match=message):
        load_manifest(path)


def test_manifest_reader_rejects_duplicate_ids(tmp_path):
    rec = {"id": "a", "image": "x.png", "split": "test", "captions": {"en": ["x"]}}
    (tmp_path / "m.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(DataError, match="duplicated ids a"):
        load_manifest(tmp_path / "m.jsonl")


def test_classes_tree_checks(tmp_path):
    root = tmp_path / "tree"
    for label in ("b_forest", "a_beach"):
        for i in range(2):
            save(scene_image(i), root / label / f"{i}.png")
    (root / "a_beach" / "notes.txt").write_text("x")
    (root / ".DS_Store").write_text("x")
    report = prepare.build_labels(root, tmp_path / "labels.jsonl")
    assert "ignored 2 files that are not images: .DS_Store, a_beach/notes.txt" in report
    assert [(r["image"], r["label"]) for r in load_labels(tmp_path / "labels.jsonl")] == [
        ("tree/a_beach/0.png", "a_beach"), ("tree/a_beach/1.png", "a_beach"),
        ("tree/b_forest/0.png", "b_forest"), ("tree/b_forest/1.png", "b_forest")]
    (root / "b_forest" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"1 of 4 images are unreadable: b_forest/1\.png"):
        prepare.build_labels(root, tmp_path / "labels.jsonl")
    assert "dropped 1 unreadable images" in prepare.build_labels(root, tmp_path / "labels.jsonl",
                                                                 drop_unreadable=True)[-2]
    save(scene_image(5), root / "stray.png")  # an image outside any class folder
    with pytest.raises(DataError, match=r"class folders at one depth.*stray\.png"):
        prepare.build_labels(root, tmp_path / "labels.jsonl")
    with pytest.raises(DataError, match="is not inside"):
        prepare.build_labels(root, tmp_path / "other" / "labels.jsonl")


def test_classes_file_names_not_utf8_stop_the_run_or_are_dropped(tmp_path):
    root = tmp_path / "tree"
    save(scene_image(0), root / "beach" / "ok.png")
    save(scene_image(1), Path(os.fsdecode(os.fsencode(root / "beach") + b"/caf\xe9.png")))  # Latin-1 bytes
    with pytest.raises(DataError, match=r"1 of 2 images are unreadable: beach/caf\\xe9\.png \(file name not"):
        prepare.build_labels(root, tmp_path / "labels.jsonl")
    report = prepare.build_labels(root, tmp_path / "labels.jsonl", drop_unreadable=True)
    assert "dropped 1 unreadable images: beach/caf\\xe9.png (file name not UTF-8: rename it)" in report
    assert [r["image"] for r in load_labels(tmp_path / "labels.jsonl")] == ["tree/beach/ok.png"]
    (root / "beach" / "ok.png").unlink()
    with pytest.raises(DataError, match="no readable image left: nothing to write"):
        prepare.build_labels(root, tmp_path / "labels.jsonl", drop_unreadable=True)


def test_two_level_tree_uses_the_leaf_folder_as_label(tmp_path):
    root = tmp_path / "rsi-cb256"
    save(scene_image(0), root / "water area" / "dam" / "a.jpg")
    save(scene_image(1), root / "woodland" / "forest" / "b.jpg")
    assert scan_image_folder(root)[0] == [("water area/dam/a.jpg", "dam"),
                                          ("woodland/forest/b.jpg", "forest")]
    save(scene_image(2), root / "other" / "dam" / "c.jpg")
    with pytest.raises(DataError, match="class folder names must be unique: dam"):
        scan_image_folder(root)


# ----------------------------------------------------------------------------- merge: the leakage check


def reencode(image: Image.Image, size=None, quality=None) -> Image.Image:
    if size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    if quality:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return image


def manifest(folder: Path, name: str, images: list) -> Path:
    recs = [{"id": f"{name}/{i}", "image": f"images/{fn}", "split": s, "dataset": name,
             "captions": {"en": ["x"]}} for i, (fn, s) in enumerate(images)]
    write_jsonl(recs, folder / "captions.jsonl")
    return folder / "captions.jsonl"


def test_merge_removes_planted_duplicates_and_nothing_else(tmp_path):
    test_dir, train_dir = tmp_path / "ds" / "evalset", tmp_path / "ds" / "trainset"
    tests = [scene_image(100 + i) for i in range(12)]
    test_m = manifest(test_dir, "evalset", [(save(im, test_dir / "images" / f"t{i}.png"), "test")
                                            for i, im in enumerate(tests)])
    (train_dir / "images").mkdir(parents=True)
    shutil.copy(test_dir / "images" / "t0.png", train_dir / "images" / "dup_exact.png")
    planted = {"dup_exact.png": None,
               "dup_jpeg.jpg": reencode(tests[1], quality=60),
               "dup_small.png": reencode(tests[2], size=48),
               "dup_big_jpeg.jpg": reencode(tests[3], size=100, quality=80)}
    entries = [("dup_exact.png", "train")]
    for fn, im in planted.items():
        if im is not None:
            entries.append((save(im, train_dir / "images" / fn), "train"))
    entries += [(save(scene_image(i), train_dir / "images" / f"own{i}.png"), "train" if i % 4 else "val")
                for i in range(40)]
    entries.append((save(reencode(tests[4], quality=70), train_dir / "images" / "dup_in_test.jpg"), "test"))
    train_m = manifest(train_dir, "trainset", entries)

    report = prepare.merge([train_m, test_m], [test_m], tmp_path / "ds" / "train.jsonl")
    merged = load_manifest(tmp_path / "ds" / "train.jsonl")
    kept = {Path(r["image"]).name for r in merged}
    assert kept == {f"own{i}.png" for i in range(40)}  # every planted copy gone, every own image kept
    assert ("trainset: train 30, val 10, exact duplicates removed 1, near duplicates removed 3, "
            "test (left out) 1") in report
    assert ("evalset: train 0, val 0, exact duplicates removed 0, near duplicates removed 0, "
            "test (left out) 12") in report
    assert all((tmp_path / "ds" / r["image"]).is_file() for r in merged)  # paths now relative to ds/
    assert merged[0]["image"] == "trainset/images/own0.png"


def test_merge_on_real_ucm_images_flags_only_the_planted_copies(tmp_path):
    src = need("ucm_captions_sample") / "images"
    files = sorted(src.glob("*.tif"))  # 21 classes x 5 look-alike images: a hard case for false positives
    (tmp_path / "a" / "images").mkdir(parents=True)
    (tmp_path / "b" / "images").mkdir(parents=True)
    for f in files[:20]:
        shutil.copy(f, tmp_path / "a" / "images" / f.name)
    test_m = manifest(tmp_path / "a", "a", [(f.name, "test") for f in files[:20]])
    entries = [(f.name, "train") for f in files[20:]]
    for f in files[20:]:
        shutil.copy(f, tmp_path / "b" / "images" / f.name)
    copies = [(save(reencode(Image.open(files[i]).convert("RGB"), size=224, quality=75),
                    tmp_path / "b" / "images" / f"copy{i}.jpg"), "train") for i in range(3)]
    train_m = manifest(tmp_path / "b", "b", entries + copies)
    report = prepare.merge([train_m], [test_m], tmp_path / "train.jsonl")
    assert report[0].startswith(f"b: train {len(files) - 20}, val 0, exact duplicates removed 0, "
                                "near duplicates removed 3")


def test_merge_needs_a_common_folder_and_unique_ids(tmp_path):
    d = tmp_path / "x"
    m = manifest(d, "x", [(save(scene_image(0), d / "images" / "0.png"), "train")])
    with pytest.raises(DataError, match="is not inside"):
        prepare.merge([m], [], tmp_path / "elsewhere" / "train.jsonl")
    with pytest.raises(DataError, match="1 ids occur in more than one input: x/0"):
        prepare.merge([m, m], [], tmp_path / "train.jsonl")
    with pytest.raises(DataError, match="hold no test images"):
        prepare.merge([m], [m], tmp_path / "train.jsonl")
    assert "WARNING: no --exclude manifest given" in prepare.merge([m], [], tmp_path / "train.jsonl")[0]
    (tmp_path / "link.jsonl").symlink_to(m)  # the input by another name
    with pytest.raises(rsmclip.RsmclipError, match="link.jsonl is the input .*x/captions.jsonl"):
        prepare.merge([m], [], tmp_path / "link.jsonl")


# ----------------------------------------------------------------------------- the demo dataset


def test_demo_is_deterministic_complete_and_idempotent(tmp_path):
    # the default demo_data/ (made now, or earlier by another process) against a fresh build
    a, b = demo.make_demo(tmp_path / "a"), demo.make_demo(ROOT / "demo_data")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 900 + 3
    assert all((tmp_path / "a" / f).read_bytes() == (b.parent / f).read_bytes() for f in files)
    records = load_manifest(a)
    assert [sum(r["split"] == s for r in records) for s in ("train", "val", "test")] == [600, 100, 200]
    for r in records[:50]:
        assert list(r["captions"]) == list(LANGS)
        assert all(len(c) == 5 and len(set(c)) == 5 for c in r["captions"].values())
        assert Image.open(a.parent / r["image"]).size == (64, 64)
    tok = rsmclip.Tokenizer(a.parent / "spm.model")
    assert tok.vocab_size <= rsmclip.PRESETS["tiny"].text.vocab_size
    ids = tok([c for r in records[600:] for caps in r["captions"].values() for c in caps])
    assert (ids == rsmclip.UNK).sum() == 0  # val/test text is covered by the train-caption tokenizer
    stamp = (tmp_path / "a" / "captions.jsonl").stat().st_mtime_ns
    assert demo.make_demo(tmp_path / "a") == a
    assert (tmp_path / "a" / "captions.jsonl").stat().st_mtime_ns == stamp  # not rebuilt
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not a demo folder"):
        demo.make_demo(tmp_path / "c")


def test_demo_captions_say_what_the_scene_holds():
    scene = dict(kind="building", colour="red", count=1, position="top left", ground="desert",
                 road="vertical")
    en = demo.captions(scene, "en")
    assert en[0] == "One red building in the top left corner, in the desert."
    assert en[1] == ("There is one red building in the top left corner. "
                     "A road crosses the image from top to bottom.")
    scene.update(count=3, kind="tank")
    assert demo.captions(scene, "de")[3] == "Drei rote Speichertanks befinden sich in der oberen linken Ecke."
    assert demo.captions(scene, "ru")[0] == "Три красных резервуара в левом верхнем углу, в пустыне."
    assert demo.captions(scene, "zh")[4] == "沙漠中有三个红色储罐。"


# ----------------------------------------------------------------------------- zero-shot names and templates


def test_classnames_complete_for_every_dataset_and_language():
    doc = json.loads((ROOT / "data" / "classnames.json").read_text(encoding="utf-8"))
    expected = {"UCM": 21, "AID": 30, "RESISC45": 45, "EuroSAT": 10, "WHU-RS19": 19, "RSSCN7": 7,
                "PatternNet": 38, "SIRI-WHU": 12, "OPTIMAL-31": 31, "RSI-CB256": 35, "MLRSNet": 46}
    assert {k: len(v) for k, v in doc["datasets"].items()} == expected
    for name, mapping in doc["datasets"].items():
        assert list(mapping) == sorted(mapping), f"{name}: folders must be listed in sorted order"
        english = list(mapping.values())
        for lang in LANGS:
            names = english if lang == "en" else [doc["names"][en][lang] for en in english]
            assert len(names) == len(english), (name, lang)
            assert all(isinstance(n, str) and n.strip() for n in names), (name, lang)
    used = {en for mapping in doc["datasets"].values() for en in mapping.values()}
    assert set(doc["names"]) == used
    assert all(set(t) == set(LANGS) - {"en"} for t in doc["names"].values())
    assert doc["datasets"]["RSSCN7"]["aGrass"] == "grass"
    assert doc["datasets"]["MLRSNet"]["swimmimg_pool"] == "swimming pool"  # the dataset's own spelling


def test_templates_for_all_ten_languages():
    doc = json.loads((ROOT / "data" / "templates.json").read_text(encoding="utf-8"))
    for lang in LANGS:
        assert len(doc[lang]) == len(doc["en"]) and all(t.count("{}") == 1 for t in doc[lang])
