"""A training run's directory: one writer at a time (a lock), its config.json (the settings, the command
line and the git commit), checkpoint.safetensors (everything a resume needs, no pickle, written whole or
not at all), the check that a resume continues the same run on the same data, and metrics.jsonl (one line
per logged step, cut back to the checkpoint on resume). train.py is its one user; the curves drawn from
metrics.jsonl are curves.py's."""
from __future__ import annotations

import fcntl
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Protocol

import torch
import torch.nn as nn
from safetensors import safe_open

import cli
import files
import rsmclip
from data.loading import World
from data.manifest import read_json
from data.shards import STREAM_STATE, ShardSet, check_same_shards
from files import RsmclipError

ROOT = Path(__file__).resolve().parent


class RunError(RsmclipError):
    """A run directory that cannot be used as asked: one message, exit status 1."""


class Trainable(Protocol):
    """What a checkpoint holds of a run (train.Run is one)."""
    unwrapped: nn.Module
    teacher: Optional[nn.Module]
    dino: Optional[nn.Module]
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    device: torch.device


# ----------------------------------------------------------------------------- processes

def setup_distributed() -> World:
    """This process's rank, the world size and the device. Only under torchrun (WORLD_SIZE > 1) is a process
    group created."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        return World(torch.distributed.get_rank(), world, device)
    return World(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def barrier():
    if rsmclip.world()[1] > 1:
        torch.distributed.barrier()


def teardown_distributed():
    """Destroy the process group once every rank is done with it. Callers first drop what holds it (the
    DDP wrapper, graphs with collectives): freed later, during interpreter shutdown, gloo's objects can
    abort the process ("terminate called without an active exception"), so they are collected here while
    Python is alive."""
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- the directory

def lock_run_dir(out: Path):
    """One writer per run directory: an exclusive lock on OUT/.lock, held while the returned file is open,
    so a second train.py on the same --out stops at once instead of interleaving its steps with the
    first's. The kernel releases it when the process ends in any way (SIGKILL too): no stale lock. A POSIX
    lock (lockf), not flock: a flock is shared with the loader processes forked after it, which outlive a
    killed trainer by seconds and would hold the lock against its resume. The file stays empty (a finished
    run, run again, changes no file); the holder is found in /proc/locks."""
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".lock", "a")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # EAGAIN or EACCES: held by another process
        holder = lock_holder(out / ".lock")
        f.close()
        raise RunError(f"{out} is in use by another train.py (pid {holder}): one run writes a run "
                       "directory at a time; wait for it to end, or use another --out") from None
    return f


def lock_holder(path: Path) -> str:
    """The pid holding a lock on `path`, from /proc/locks ("1: POSIX ADVISORY WRITE PID MAJ:MIN:INODE
    0 EOF"), or "unknown" where there is no such file."""
    inode = str(path.stat().st_ino)
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "unknown"
    for fields_ in map(str.split, lines):
        if "POSIX" in fields_ and "->" not in fields_ and len(fields_) >= 6:
            pid, where = fields_[4], fields_[5]
            if where.rsplit(":", 1)[-1] == inode:
                return pid
    return "unknown"


RENAMED = {"model": "arch", "head_dim": "prototypes"}  # settings' old names -> new (old config.json files)


def read_config_json(path: Path, config_class) -> dict:
    """The settings of a run's config.json (or of a bare settings file), each of the type and in the range
    that the command line accepts (cli.config_spec of the typed config), or one message why not."""
    doc = read_json(path)
    within = isinstance(doc, dict) and "config" in doc  # a run's config.json: {"config", "argv", ...}
    saved = doc["config"] if within else doc
    if not isinstance(saved, dict):
        raise RunError(f"{path}: expected a JSON object of settings")
    saved = {RENAMED.get(k, k): v for k, v in saved.items()}  # run directories made before a rename resume
    if problems := cli.json_problems(saved, cli.config_spec(config_class), "config" if within else ""):
        raise RunError(f"{path}: {cli.say_problems(problems)}")
    return saved


def resolved(key: str, value):
    """Paths compare by the file they name: runs/x/, ./runs/x and /abs/runs/x are one run directory."""
    if key == "data":
        return [str(Path(v).resolve()) for v in value]
    paths = ("out", "init", "tokenizer", "val_data", "image_cache")
    return str(Path(value).resolve()) if key in paths and value else value


def check_resume(cfg):
    """An existing run directory is resumed with its own config: other settings would not be a resume."""
    saved = Path(cfg.out) / "config.json"
    if not (Path(cfg.out) / "checkpoint.safetensors").exists():
        return
    if not saved.exists():
        raise RunError(f"{cfg.out} holds a checkpoint but no config.json, so its settings are unknown and "
                       "a resume could silently change them; use another --out")
    try:
        old = read_config_json(saved, type(cfg))
    except RsmclipError as e:
        raise RunError(f"{e}; a run directory with a damaged config.json cannot be resumed: use another "
                       "--out") from None
    now = json.loads(json.dumps(asdict(cfg)))
    if differ := [k for k in old if k != "steps" and resolved(k, old[k]) != resolved(k, now.get(k))]:
        raise RunError(f"{cfg.out} holds a run with other settings ({', '.join(differ)}); "
                       "use another --out, or the same settings to resume")


def finished(out: Path, steps: int) -> bool:
    """Whether the run directory holds a run finished at `steps` or more steps (then nothing is to be done,
    and the main process says so: a finished run is left alone)."""
    if (done := finished_step(out)) is None or done < steps:
        return False
    if os.environ.get("RANK", "0") == "0":
        print(f"{out} already finished at step {done}: nothing to do, no file changed. To train it "
              f"further, run the same command with a larger --steps (e.g. --steps {2 * done}): it "
              "continues from its last checkpoint")
    return True


def finished_step(out: Path) -> Optional[int]:
    """The step of a run directory's checkpoint if the run got to its end (summary.json, the last file
    written, is there), else None."""
    checkpoint = out / "checkpoint.safetensors"
    if not (checkpoint.is_file() and (out / "summary.json").is_file()):
        return None
    return read_checkpoint(checkpoint)[0]["step"]


def begin(out: Path, saved: dict, start: int):
    """Make the run directory ready for the steps after `start`: temporary files of a killed write swept,
    metrics.jsonl cut back to the checkpoint, and config.json written (`saved`: the settings, the command
    line, the world size; the git commit is added)."""
    out.mkdir(parents=True, exist_ok=True)
    # A kill during a write leaves a temporary file: atomic_write's (.NAME.PID.XXXX.tmp) or the one
    # safetensors itself writes and renames (.tmpXXXXXX, Rust's tempfile)
    for stale in [*out.glob(".*.tmp"), *out.glob(".tmp??????")]:
        stale.unlink()
    cut_metrics(out / "metrics.jsonl", start)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    text = json.dumps({"config": saved["config"], "argv": saved["argv"], "git_commit": commit,
                       "world_size": saved["world_size"]}, indent=2) + "\n"
    files.atomic_write(out / "config.json", lambda tmp: tmp.write_text(text))


def save_final(out: Path, model: rsmclip.CLIP, tokenizer: rsmclip.Tokenizer) -> Path:
    """The trained model as OUT/model.safetensors (rsmclip format, the tokenizer's SHA-256 recorded) with a
    copy of its tokenizer beside it, where load() looks: the run directory is all a user needs."""
    final = out / "model.safetensors"
    rsmclip.save(model, final, tokenizer_sha256=files.file_sha256(tokenizer.path))
    tokenizer_copy = out / model.config.tokenizer
    if tokenizer.path.resolve() != tokenizer_copy.resolve():
        data = tokenizer.path.read_bytes()
        files.atomic_write(tokenizer_copy, lambda tmp: tmp.write_bytes(data))
    return final


def write_summary(out: Path, summary: dict):
    """OUT/summary.json, the last file a run writes: finished_step() reads its presence as the run's end."""
    text = json.dumps(summary, indent=2) + "\n"
    files.atomic_write(out / "summary.json", lambda tmp: tmp.write_text(text))


def earlier_before(out: Path) -> Optional[dict]:
    """Retrieval before training as the summary of a finished run, now extended, recorded it; None when the
    run never finished (a resumed run cannot measure it again: its model has trained)."""
    path = out / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["before"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        print(f"warning: {path} is damaged ({e!r}): the new summary's 'before' is null", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------- checkpoints (no pickle)

def save_checkpoint(run: Trainable, path: Path, step: int, skipped: int, data: Optional[dict] = None,
                    saved: int = 0):
    """Everything a resume needs in one safetensors file (tensors + JSON metadata), written to a
    temporary file and renamed: a kill at any moment leaves the previous checkpoint intact. `data`: where
    the shards' streams stand (shards.stream_state); a manifest's order is a function of the step alone."""
    tensors = {f"student.{k}": v for k, v in run.unwrapped.state_dict().items()}
    if run.teacher is not None:
        tensors |= {f"teacher.{k}": v for k, v in run.teacher.state_dict().items()}
        tensors["dino.center"] = run.dino.center
    optim = run.optimizer.state_dict()
    for index, state in optim["state"].items():
        tensors |= {f"optim.{index}.{k}": v for k, v in state.items()}
    meta = {"step": step, "skipped": skipped, "param_groups": optim["param_groups"],
            "scaler": run.scaler.state_dict() if run.scaler else None, "data": data}
    tensors = {k: v.detach().clone() for k, v in tensors.items()}
    try:
        files.atomic_save(tensors, path, {"state": json.dumps(meta)})
    except RsmclipError as e:  # a full disk: the previous checkpoint (step `saved`) is whole
        raise stopped(str(e), step, saved) from None


def read_checkpoint(path: Path, device: Optional[str] = None) -> tuple[dict, dict]:
    """The one reader of a checkpoint: (metadata, checked by its type: CHECKPOINT; the tensors, on `device`,
    or none without one)."""
    try:
        with safe_open(str(path), "pt", device=device or "cpu") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()} if device else {}
    except Exception as e:  # any failure here means the file is not a checkpoint of ours
        raise RunError(f"{path}: unreadable checkpoint ({e})") from None
    return cli.check_json(meta, CHECKPOINT, f'{path}, metadata "state"'), tensors


CHECKPOINT = cli.Obj({"step": cli.COUNT, "skipped": cli.COUNT, "param_groups": cli.ListOf(dict),
                      "scaler": cli.Maybe(dict), "data": cli.Maybe(STREAM_STATE)})  # save_checkpoint's


def load_checkpoint(run: Trainable, path: Path) -> tuple[int, int]:
    meta, tensors = read_checkpoint(path, str(run.device))

    def section(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    run.unwrapped.load_state_dict(section("student."), strict=True)
    if run.teacher is not None:
        run.teacher.load_state_dict(section("teacher."), strict=True)
        run.dino.center.copy_(tensors["dino.center"])
    state = {}
    for key, value in section("optim.").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value if name != "step" else value.cpu()
    run.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if run.scaler and meta["scaler"]:
        run.scaler.load_state_dict(meta["scaler"])
    return meta["step"], meta["skipped"]


def check_data_state(saved: Optional[dict], now: Optional[dict], shards: Optional[ShardSet]):
    """A run resumes on the kind of data it began on, and a run on shards only on the same shards (their
    bytes: data.shards.check_same_shards) and streams: else its data order would change."""
    if (saved is None) != (now is None):
        kinds = ("shards", "manifests") if now is None else ("manifests", "shards")
        raise RunError(f"the checkpoint is of a run on {kinds[0]}, this one reads {kinds[1]}: its data "
                       "order cannot continue; train into a new --out (--init the checkpoint's model, if "
                       "wanted)")
    if now is None:
        return
    check_same_shards(shards, saved)
    for key, what in (("streams", "processes x loader workers (--workers, torchrun's --nproc-per-node)"),
                      ("block", "--shuffle-buffer")):
        if saved[key] != now[key]:
            raise RunError(f"{what} changed since the checkpoint ({saved[key]} then, {now[key]} now): the "
                           "resumed run would not read what the first one would have; run with the same "
                           "data and settings")
    if saved["positions"] != now["positions"]:
        raise RunError("the streams' positions recorded in the checkpoint differ from those its step "
                       "gives (a checkpoint from another version?)")


# ----------------------------------------------------------------------------- metrics

class FiniteWatch:
    """The first step whose loss is not finite, kept on the device (no host sync per step); check() reads
    it, on logging steps and before each checkpoint, so no checkpoint is ever written past that step."""

    def __init__(self, device: torch.device):
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.loss = torch.zeros((), device=device)

    def update(self, loss: torch.Tensor, step: int):
        first = (self.step < 0) & ~torch.isfinite(loss)
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss.float(), self.loss)

    def check(self):
        step, loss = torch.stack([self.step.float(), self.loss]).tolist()
        if step >= 0:
            raise RunError(f"non-finite loss ({loss}) at step {int(step)}; the last checkpoint is kept")


def read_logs(logs: dict) -> dict:
    """train_step's logs as numbers: one transfer for all the device values."""
    names = [k for k, v in logs.items() if torch.is_tensor(v)]
    values = torch.stack([logs[k].float().reshape(()) for k in names]).tolist() if names else []
    return logs | dict(zip(names, values))


class Metrics:
    """metrics.jsonl, appended to by the main process (the others write nowhere): one JSON line per logged
    step, flushed, so a kill loses at most the line being written."""

    def __init__(self, out: Path, main_process: bool):
        self.path = out / "metrics.jsonl" if main_process else Path(os.devnull)

    def __enter__(self):
        self.file, self.tick = open(self.path, "a"), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.file.close()

    def log(self, row: dict, step: int, saved: int):
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as e:
            raise stopped(f"{files.display(self.path)}: cannot write it ({e.strerror})", step,
                          saved) from None

    def log_step(self, logs: dict, step: int, saved: int, skipped: int, images: int,
                 device_type: str) -> dict:
        """A training step's line: its logs (train_step's, read from the device), the images per second since
        the last line (`images` were trained since), the skipped images so far, the memory in use. -> the
        line."""
        now = time.perf_counter()
        logs = read_logs(logs) | {"step": step, "images_per_s": images / (now - self.tick),
                                  "skipped_images": skipped, "memory_mb": memory_mb(device_type)}
        self.tick = now
        self.log(logs, step, saved)
        return logs


def cut_metrics(path: Path, step: int):
    """Drop the lines of steps after `step`, the checkpoint resumed from: those steps run and log again."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except json.JSONDecodeError:  # the last line, torn by a kill
            break
    files.atomic_write(path, lambda tmp: tmp.write_text("".join(keep)))


def stopped(why: str, step: int, saved: int) -> RunError:
    """A run that cannot write (a full disk): where it stopped, and what a resume starts from."""
    kept = f"its last good checkpoint, step {saved}, is unchanged" if saved else "it has no checkpoint yet"
    return RunError(f"{why}; the run stopped at step {step} and {kept}: free space and run the same "
                    "command to resume")


def memory_mb(device_type: str, peak: bool = True) -> float:
    """MiB in use: on CUDA the allocator's peak (or current) allocation; elsewhere the process' peak
    (VmHWM) or current (VmRSS) resident set, read from Linux's /proc/self/status."""
    if device_type == "cuda":
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2 ** 20
    field_name = "VmHWM" if peak else "VmRSS"
    line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith(field_name))
    return int(line.split()[1]) / 1024

