"""The data contract: the one format of training and evaluation (captions.jsonl), the classification
datasets (labels.jsonl or an ImageFolder tree), the ten caption languages, and how they are read and
written: DataError, SPLITS, read_json, load_manifest, load_labels, write_jsonl, data_files. Every script
that reads data imports this module; it is not a command (data/prepare.py is) and imports only the
library below it. The format, field by field: data/README.md."""
from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
from typing import Optional

import cli
import files
import rsmclip
from files import RsmclipError, listing

# ----------------------------------------------------------------------------- languages

# The ten languages of RS-M-CLIP (English and Tower's nine): the one list; prompts, templates, class
# names, the demo's text tables and translate.py's targets are derived from it or tested against it.
LANGUAGES = {"en": "English", "pt": "Portuguese", "es": "Spanish", "fr": "French", "de": "German",
             "nl": "Dutch", "it": "Italian", "zh": "Chinese", "ko": "Korean", "ru": "Russian"}
LANGS = tuple(LANGUAGES)


def parse_langs(text: str, option: str = "--langs", allowed=LANGS) -> list[str]:
    """The one parser of comma-separated language codes: `en,pt` -> ["en", "pt"], in the given order, each
    once; an unknown code or none at all is one message naming the option and the choices."""
    langs = list(dict.fromkeys(x.strip().lower() for x in text.split(",") if x.strip()))
    if (unknown := [x for x in langs if x not in allowed]) or not langs:
        raise RsmclipError(f"{option} {text!r}: unknown language {', '.join(unknown) or '(none given)'}; "
                           f"choose comma-separated from {','.join(allowed)}")
    return langs


# ----------------------------------------------------------------------------- manifests and labels

SPLITS = ("train", "val", "test")


class DataError(RsmclipError):
    """A problem in the user's data: printed as one message, exit status 1."""


def read_json(path: Path, what: str = "", spec=cli.ANY):
    """Strict UTF-8 JSON, the one reader of a JSON file for the whole project, checked by its type before
    any work: a missing file, a bad byte, a syntax error or a field that is not as `spec` says (cli's typed
    JSON; by default any JSON whose text is valid, no lone surrogate) names the file and the place (`what`
    the file is for, when a missing one needs saying: "model config")."""
    if not path.is_file():
        raise DataError(f"{path.parent}: no {path.name} ({what})" if what else f"{path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
        doc = json.loads(text)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    problems = cli.json_problems(doc, spec) if spec is not cli.ANY or SURROGATE_ESCAPE.search(text) else []
    if problems:  # (only an escape, \\udXXX, can make a lone surrogate: other files are not walked)
        raise DataError(f"{files.display(path)}: {cli.say_problems(problems)}")
    return doc


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def bad_relative(path: str) -> Optional[str]:
    """Why a stored relative path is unsafe (absolute, leaves its folder, not POSIX), or None."""
    if not isinstance(path, str) or not path.strip():
        return "empty"
    if "\\" in path or path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        return "absolute or not POSIX"
    if ".." in PurePosixPath(path).parts:
        return "leaves the dataset folder"
    if path.rsplit("/", 1)[-1] in ("", "."):
        return "names a folder, not a file"
    return None


def inside(path: Path, folder: Path) -> Optional[str]:
    """`path` relative to `folder` (POSIX), or None if it is not inside. Lexical, so a symlinked
    image folder placed inside the dataset folder is accepted."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(folder))
    if rel == ".." or rel.startswith(".." + os.sep):
        return None
    return PurePosixPath(*Path(rel).parts).as_posix()


def read_jsonl(path: Path, spec: cli.Obj) -> list[dict]:
    """One JSON object per line, each as `spec` says (cli's typed JSON), and its image path safe; every
    problem named by its line and field (the first five, and how many in all)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records, problems = [], []
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (offset {e.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        if found := cli.json_problems(r, spec):
            problems += [f"line {n}: {p}" for p in found]
        elif why := bad_relative(r["image"]):
            problems.append(f"line {n}: image: {cli.show(r['image'])} is unsafe ({why})")
        else:
            records.append(r)
    if len(problems) == 1:
        raise DataError(f"{path}, {problems[0]}")
    if problems:
        raise DataError(f"{path}: {cli.say_problems(problems)}")
    return records


def not_utf8(name: str) -> bool:
    """Whether a file name came from bytes that are not UTF-8 (Python keeps those as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# A manifest's record and a labels.jsonl's, as cli's typed JSON (data/README.md says each field); other
# fields (the demo's "scene") are kept and ignored. UNCHECKED: any captions object (translate.py's repairs).
CAPTION = cli.Pattern(r"(?s).*\S.*", "non-blank text")
RECORD = {"id": str, "image": str, "split": SPLITS, "dataset": str}
CAPTIONS = cli.MapOf(cli.ListOf(CAPTION, cli.WHOLE))  # {lang: [caption, ...]}, no list empty
MANIFEST_RECORD = cli.Obj(RECORD | {"captions": CAPTIONS}, ("dataset",), True)
UNCHECKED_CAPTIONS = cli.Obj(RECORD | {"captions": dict}, ("dataset",), True)
LABELS_RECORD = cli.Obj({"image": str, "label": str, "split": str}, extra=True)


def load_manifest(path: Path, check_captions: bool = True) -> list[dict]:
    """Read and check a captions.jsonl, the one format of training and evaluation (data/README.md); the one
    reader of that format. check_captions=False leaves the caption lists' contents to the caller
    (translate.py, which repairs damaged translations with --overwrite).

    One JSON object per line, UTF-8, one line per image: {"id": "<dataset>/<name>", "image": path of the
    image relative to this file's folder (POSIX, never absolute, never leaving the folder), "split":
    "train" | "val" | "test", "dataset": name, "captions": {lang: [caption, ...]}}, the caption lists
    aligned by index across languages (caption i in "pt" translates caption i in "en"). Other fields
    (e.g. the demo's "scene") are kept and ignored. Ids are unique; every caption list is non-empty text."""
    records = read_jsonl(Path(path), MANIFEST_RECORD if check_captions else UNCHECKED_CAPTIONS)
    dup = [i for i, n in Counter(r["id"] for r in records).items() if n > 1]
    if dup:
        raise DataError(f"{path}: duplicated ids {listing(dup)}")
    return records


def load_labels(path: Path) -> list[dict]:
    """Read a labels.jsonl: {"image": path relative to its folder, "label": class (folder) name, "split":
    "train" | "val" | "test"} per line, UTF-8; zero-shot and the linear probe read it (data/README.md)."""
    records = read_jsonl(Path(path), LABELS_RECORD)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def data_files(data: Path) -> list[Path]:
    """What a command reads of its data argument, for cli.refuse_overwrite: a folder (whose images it
    checks), or a manifest (captions.jsonl, labels.jsonl) and every image the manifest lists. Lines that
    do not parse are left to the reader proper, which names them."""
    data = Path(data)
    if not data.is_file():
        return [data]
    images = []
    with open(data, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # bad JSON and bad UTF-8 alike
                continue
            if isinstance(record, dict) and isinstance(record.get("image"), str):
                images.append(data.parent / record["image"])
    return [data, *images]


def write_jsonl(records: list[dict], path: Path):
    """Whole or not at all (files.atomic_write): a crash or a full disk never leaves half a manifest."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    files.atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# UC Merced's 21 classes in alphabetical order: UCM-Captions' image N (N.tif, N.jpg) is of class
# (N - 1) // 100
UCM_CLASSES = ("agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral",
               "denseresidential", "forest", "freeway", "golfcourse", "harbor", "intersection",
               "mediumresidential", "mobilehomepark", "overpass", "parkinglot", "river", "runway",
               "sparseresidential", "storagetanks", "tenniscourt")


def ucm_class(image: str) -> str:
    """The scene class of a UCM-Captions image, by its number (the dataset's own numbering)."""
    return UCM_CLASSES[(int(Path(image).stem) - 1) // 100]


# ----------------------------------------------------------------------------- classification trees

def scan_image_folder(root: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """An ImageFolder tree -> ([(image path relative to root, label)], ignored files), sorted by label.

    The label is the folder that holds the image, so a two-level tree such as RSI-CB256's
    <category>/<class>/<image> works as well as <class>/<image>; all images must sit at one depth."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    found, ignored = [], []
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            continue
        rel = p.relative_to(root)
        if p.suffix.lower() not in rsmclip.IMAGE_SUFFIXES or any(part.startswith(".") for part in rel.parts):
            ignored.append(rel.as_posix())
        else:
            found.append(rel)
    if not found:
        raise DataError(f"{root}: no images found (looked for {', '.join(sorted(rsmclip.IMAGE_SUFFIXES))})")
    depths = Counter(len(r.parts) for r in found)
    if len(depths) > 1 or 1 in depths:
        usual = max(depths, key=depths.get)
        odd = [r.as_posix() for r in found if len(r.parts) != usual or len(r.parts) == 1]
        raise DataError(f"{root}: images must all sit in class folders at one depth (<class>/<image>): "
                        f"{len(odd)} do not: {listing(odd)}")
    parents = defaultdict(set)
    for r in found:
        parents[r.parent.name].add(r.parent.as_posix())
    clashes = [f"{label} ({' and '.join(sorted(ps))})" for label, ps in parents.items() if len(ps) > 1]
    if clashes:
        raise DataError(f"{root}: class folder names must be unique: {listing(clashes)}")
    return sorted(((r.as_posix(), r.parent.name) for r in found), key=lambda x: (x[1], x[0])), ignored
