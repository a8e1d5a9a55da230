"""Where the toolkit meets the user's files, for every other file of it: the error a user can fix
(RsmclipError: the command lines print it as one line and exit 1), paths printed safely, and files
written whole or not at all, with the stamps and hashes that tell a changed file. Imports nothing of the
project: it is the bottom layer, below the library."""
from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from safetensors import SafetensorError
from safetensors.torch import save_file


class RsmclipError(Exception):
    """An error the user can fix (bad file, wrong checkpoint, ...): the CLIs print it and exit 1."""


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
