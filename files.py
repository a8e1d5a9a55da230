"""Where the toolkit meets the user's files, for every other file of it: the error a user can fix
(RsmclipError: the command lines print it as one line and exit 1), paths printed safely, files written
whole or not at all, with the stamps and hashes that tell a changed file, and image files read as 8-bit
RGB within bounds (16-bit bands and float rasters stretched). Imports nothing of the project: it is the
bottom layer, below the library."""
from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file


class RsmclipError(Exception):
    """An error the user can fix (bad file, wrong checkpoint, ...): the CLIs print it and exit 1."""


class ImageError(RsmclipError):
    pass


# ----------------------------------------------------------------------------- names

def display(path) -> str:
    """A path as text that can always be printed and written as UTF-8: bytes of a file name that are not
    UTF-8 (kept by Python as surrogates) are shown as \\xNN escapes."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def listing(items: list, n: int = 5) -> str:
    """The first n items of a list in a message (printable, see display), and how many there are in all."""
    return ", ".join(map(display, items[:n])) + (f", ... ({len(items)} in all)" if len(items) > n else "")


# ----------------------------------------------------------------------------- stamps and hashes

def file_stamp(path: Path) -> list[int]:
    """What tells a changed file without reading it: size, modification time, inode change time and inode.
    A file replaced by another of the same size, its mtime set back, still has a new ctime and inode."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 16 MiB blocks (weights are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- whole or not at all

def check_writable(out: Path, option: str = "the output"):
    """An output that is a folder, lies below a file, or sits in a folder that cannot be written is refused
    before any work (`option` names it in the message)."""
    if out.is_dir():
        raise RsmclipError(f"{option} {out}: is a folder; give a file name")
    if parent := next((d for d in out.absolute().parents if d.exists()), None):
        if not parent.is_dir():
            raise RsmclipError(f"{option} {out}: {parent} is a file, not a folder")
    if parent and not os.access(parent, os.W_OK | os.X_OK):  # also a read-only file system, even for root
        raise RsmclipError(f"{option} {display(out)}: cannot write in {display(parent)} (not writable)")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


@functools.cache
def umask() -> int:
    """The process umask, read on first use: the only way to read it is to set it, so it is put back
    at once (an import must not touch it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sweep_temporaries(folder: Path, name: str = "*"):
    """Remove the temporary files (atomic_write's) of writers that are gone, for the file `name` (a glob:
    every file by default) in `folder`; those of live writers stay."""
    for stale in folder.glob(f".{glob.escape(name) if name != '*' else '*'}.*.tmp"):
        pid = stale.name[1:].removesuffix(".tmp").split(".")[-2]
        if pid.isdigit() and not _process_alive(int(pid)):
            stale.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Path], None], size: Optional[int] = None) -> Path:
    """Write a file whole or not at all: write(tmp) fills a temporary file beside `path`, which is then
    flushed to disk, given the mode any tool would give it (0666 less the umask) and renamed over `path`.
    On any failure (disk full, an exception) the temporary file is removed and an existing `path` keeps
    its old bytes, and the message names the file, the space it needed (`size`, when the caller knows it)
    and the space left. Temporary names carry the writer's pid, so two writers never collide and one killed
    before it could clean up (SIGKILL) is swept away by the next write of the same file."""
    path = Path(path)
    check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path.parent, path.name)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:  # disk full, no permission: the old file stays
        tmp.unlink(missing_ok=True)
        why = os_reason(e)
        space = f"needs {byte_size(size)}, " if size else ""
        with contextlib.suppress(OSError):
            space += f"{byte_size(shutil.disk_usage(path.parent).free)} free there; "
        raise RsmclipError(f"{display(path)}: cannot write it ({why}; {space}an existing file is "
                           "unchanged)") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def os_reason(e: Exception) -> str:
    """The system's words for a failed write: an OSError's strerror, or the part of a SafetensorError that
    quotes it ("Error while serializing: I/O error: No space left on device (os error 28)")."""
    if getattr(e, "strerror", None):
        return e.strerror
    found = re.search(r'I/O error: (.+?) \(os error \d+\)|message: "([^"]+)"', str(e))
    return next(filter(None, found.groups())) if found else str(e)


def byte_size(n: int) -> str:
    """1,234 bytes, 12.1 KiB, 3.4 MiB, 1.2 GiB: a size as a person reads it."""
    if n < 1024:
        return f"{n:,} bytes"
    unit = next(u for u in range(1, 4) if n < 1024 ** (u + 1) or u == 3)
    return f"{n / 1024 ** unit:,.1f} {('KiB', 'MiB', 'GiB')[unit - 1]}"


def atomic_save(tensors: dict, path: Path, metadata: dict):
    """A safetensors file written with atomic_write: a crash never leaves a half-written weights file."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    size = sum(t.nbytes for t in tensors.values())
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), size)


# ----------------------------------------------------------------------------- image files

# Decoding is bounded before it starts: a 99-byte PNG can declare 1 x 10,000 pixels (2.6 GB once the
# short side is resized to 224) and a scene of 12,000 x 12,000 needs 1.2 GB. Larger scenes are cut into
# tiles first, as for any CLIP. PIL's own bomb check is set to the same limit.
MAX_PIXELS = 100_000_000
MAX_ASPECT = 20
STRETCH_PERCENTILES = (1, 99)


def open_image(path: str | Path, data: Optional[bytes] = None) -> Image.Image:
    """Read an image file (or its bytes, `data`, named `path` in messages: a sample of a tar shard) as 8-bit
    RGB, or raise ImageError naming the file and the problem."""
    path = Path(path)
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL's bomb check, at our limit: set where images are opened
    if data is None and path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image")
    try:
        image = Image.open(path if data is None else io.BytesIO(data))
        w, h = image.size
        if w * h > MAX_PIXELS:
            raise ImageError(f"{path}: {w} x {h} pixels, above the limit of {MAX_PIXELS // 10 ** 6} "
                             "megapixels; cut the scene into tiles")
        if max(w, h) > MAX_ASPECT * min(w, h):
            raise ImageError(f"{path}: {w} x {h} pixels, an aspect ratio above {MAX_ASPECT}:1; not a scene "
                             "this model can see (cut it into tiles)")
        bands = sixteen_bit_bands(image, str(path))
        if bands is not None:
            return Image.fromarray(stretch(bands), "RGB")
        image.load()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot read image ({e})") from None
    return to_rgb(image, name=str(path))


def sixteen_bit_bands(image: Image.Image, name: str) -> Optional[np.ndarray]:
    """[H, W, bands] uint16 of a TIFF with 3 or 4 bands of 16 bits (common for 12- and 16-bit sensors),
    else None. PIL opens those as 8-bit RGB holding only the top byte of each sample (12-bit data ends
    at 15/255): here the same raw strips are decoded as 16-bit samples instead. PIL cannot do that for
    compressed strips, so those are refused rather than read nearly black."""
    rawmodes = [t.args[0] for t in image.tile if t.args and isinstance(t.args[0], str)]
    if (image.format != "TIFF" or image.mode not in ("RGB", "RGBA", "RGBX", "CMYK") or not rawmodes
            or not all(";16" in r for r in rawmodes)):
        return None
    layout = rawmodes[0].split(";")[0]
    if any(t.codec_name != "raw" for t in image.tile) or len(layout) < 3 or len(set(rawmodes)) > 1:
        raise ImageError(f"{name}: a compressed or band-separated TIFF with 16-bit {image.mode} samples, "
                         "which PIL can only read as their top 8 bits; save it uncompressed (e.g. "
                         "gdal_translate -co COMPRESS=NONE -co INTERLEAVE=PIXEL) or as 8-bit")
    n, (w, h), mode = len(layout), image.size, "I;16B" if rawmodes[0].endswith("B") else "I;16"
    image._size, image._mode = (w * n, h), mode  # the same bytes, one 16-bit sample per "pixel"
    image.tile = [t._replace(extents=(0, t.extents[1], w * n, t.extents[3]), args=(mode, *t.args[1:]))
                  for t in image.tile]
    image.load()
    return np.asarray(image).reshape(h, w, n)


def stretch(a: np.ndarray) -> np.ndarray:
    """[H, W] or [H, W, bands] of any numbers -> [H, W, 3] uint8: each band linearly from its 1st to its
    99th percentile of finite values (robust to a few hot or dead pixels); NaN and inf become 0. One band
    is repeated as grey; of 4 or more bands the first three are taken as red, green, blue."""
    a = np.asarray(a, dtype=np.float64)
    a = a[..., None] if a.ndim == 2 else a[..., :3]
    out = np.zeros(a.shape, dtype=np.uint8)
    for b in range(a.shape[-1]):
        band, finite = a[..., b], np.isfinite(a[..., b])
        if not finite.any():
            continue
        lo, hi = np.percentile(band[finite], STRETCH_PERCENTILES)
        if hi > lo:
            scaled = np.clip((band - lo) * (255.0 / (hi - lo)), 0, 255)
            out[..., b] = np.where(finite, np.round(np.nan_to_num(scaled)), 0)
    return np.repeat(out, 3, axis=-1) if out.shape[-1] == 1 else out


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """Convert any single-image PIL mode to 8-bit RGB. 16-bit, 32-bit and float images (common in
    remote sensing) are stretched per band (stretch()): PIL's own conversion would clip them to white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(stretch(np.asarray(image)), "RGB")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"{name}: cannot convert image mode {image.mode} to RGB ({e})") from None
