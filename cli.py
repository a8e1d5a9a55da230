"""The conventions every script's command line shares: one exit-code rule and readable help (run_cli), the
options several scripts take (--model, --tokenizer, --device, --precision) defined once, the rule for outputs
(refuse_overwrite), the progress bar of long jobs, and the advice a command prints about what it is given
(a toy model on real images, a prompt template). train.py, eval.py, translate.py, data/prepare.py, the
`rsmclip` command and bench/ all run through it; the library (rsmclip.py) never imports it."""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

import files
import rsmclip
from files import RsmclipError, display
from rsmclip import default_device

# ----------------------------------------------------------------------------- running a command line


def readable_help(command) -> typer.core.TyperCommand:
    """Every parameter with the usual upper-case metavar (FOLDER, QUERIES..., PATH, INTEGER), not typer's
    own `{folder}`, `<list[str]>` or `--top-k <int range>`: help that reads as other command lines do
    (tests/test_project.py checks every script's help)."""
    for sub in getattr(command, "commands", {}).values():
        readable_help(sub)
    for param in command.params:
        kind = param.type_descriptor
        if param.param_type_name == "argument":
            name = param.name.upper() + ("..." if param.nargs != 1 else "")
            param.metavar = name
            param._usage_display_name = lambda name=name, p=param: name if p.required else f"[{name}]"
            param.display_type_rich = lambda ctx: None
        elif not param.is_flag:
            param.metavar = ("[" + "|".join(map(str, kind.choices)) + "]" if kind.is_choice
                             else "PATH" if kind.is_path
                             else METAVARS.get(param._bare_type(kind.annotation), "VALUE"))
    return command


METAVARS = {"int": "INTEGER", "float": "NUMBER", "str": "TEXT", "list[str]": "TEXT", "list[int]": "INTEGER",
            "list[Path]": "PATH"}


def run_cli(app: typer.Typer, args: Optional[list[str]] = None):
    """Every script's command line runs through here, with one exit-code rule: a user error (RsmclipError,
    a bad file or value) or a failed file operation (disk full, no permission) is one line `error: ...`
    and exit 1; a usage error (unknown option, missing argument, a value of the wrong type or range) is
    click's message and exit 2. Never a traceback for either."""
    app.rich_markup_mode = None  # plain click help: see readable_help
    try:
        readable_help(typer.main.get_command(app)).main(args=args, prog_name=Path(sys.argv[0]).name)
    except RsmclipError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(1)


DEVICE_HELP = "cpu, cuda, cuda:1, ... (default: cuda when there is one)"
TOKENIZER_HELP = "SentencePiece model (default: the one the weights name, next to them)"
MODEL_HELP = "weights file, or rs-m-clip / laion once downloaded"
PRECISION_HELP = (f"auto: bf16 on a CPU with bf16 units (AMX, AVX-512 BF16), else {rsmclip.AUTO_WITHOUT_BF16}"
                  "; bf16 autocast on CUDA. fp32: the reference numbers. int8: CPU only")

# The options several scripts take, defined once (their help cannot drift apart): use them as defaults,
# `device: str = DEVICE`. The device default is resolved when a command runs, not when a script imports.
MODEL = typer.Option(..., "--model", help=MODEL_HELP)
TOKENIZER = typer.Option(None, help=TOKENIZER_HELP)
DEVICE = typer.Option(None, help=DEVICE_HELP, show_default=False,
                      callback=lambda device: device or default_device())
Precision = Literal[rsmclip.PRECISIONS]  # annotate the option with it: click checks the choice (exit 2)


def precision_option(default: str = "auto"):
    """--precision, as `precision: Precision = PRECISION` (eval.py's default: precision_option("fp32"))."""
    return typer.Option(default, help=PRECISION_HELP)


PRECISION = precision_option()


# ----------------------------------------------------------------------------- typed settings

@dataclasses.dataclass(frozen=True)
class Range:
    """What a numeric setting may be: from lo (excluded with open_lo) to hi, whole numbers only with whole;
    said in one form wherever it is checked ("a whole number >= 1", "a number in (0, inf]")."""
    lo: float = 0
    hi: float = math.inf
    whole: bool = False
    open_lo: bool = False

    def __contains__(self, value) -> bool:
        if self.whole:
            return type(value) is int and self.lo <= value <= self.hi
        return (isinstance(value, (int, float)) and math.isfinite(value)
                and (self.lo < value if self.open_lo else self.lo <= value) and value <= self.hi)

    def __str__(self) -> str:
        if self.whole:
            return f"a whole number >= {self.lo}"
        return f"a number in {'(' if self.open_lo else '['}{self.lo}, {self.hi}]"


WHOLE, COUNT = Range(1, whole=True), Range(0, whole=True)  # counts of steps, sizes; seeds and optional counts
POSITIVE, FRACTION = Range(0, open_lo=True), Range(0, 1)  # rates and temperatures; probabilities, momenta


def option(default, help: str, check: Range | tuple | None = None, unset: str = "") -> dataclasses.Field:
    """A field of an entry point's typed config, which is its command line: the default, the help, what it
    may be (a Range, or a tuple of choices; checked by check_options), and what an empty default means."""
    metadata = {"help": help} | ({"check": check} if check is not None else {}) | (
        {"unset": unset} if unset else {})
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_options(cfg) -> list[str]:
    """Every option of a typed config (made with option()) against what it may be: the problems, one line each
    (--steps 0: a whole number >= 1)."""
    bad = []
    for f in dataclasses.fields(cfg):
        value, check = getattr(cfg, f.name), f.metadata.get("check")
        if check is not None and value not in check:
            what = str(check) if isinstance(check, Range) else f"choose {', '.join(check)}"
            bad.append(f"--{f.name.replace('_', '-')} {value!r}: {what}")
    return bad


def options_signature(config_class, presets: dict, lead: list[inspect.Parameter]) -> inspect.Signature:
    """The command line of a typed config: after the `lead` parameters, one option per field, its help saying
    its default (in each preset where they differ: "demo 600, rs-m-clip 5000"; what an empty one means).
    Every option defaults to None: the caller fills in what was not given."""
    values = {name: dataclasses.asdict(preset) for name, preset in presets.items()}
    first = next(iter(values.values()))
    scalar = {bool: Optional[bool], int: Optional[int], float: Optional[float], str: Optional[str]}
    params = list(lead)
    for f in dataclasses.fields(config_class):
        seen = [v[f.name] for v in values.values()]
        default = seen[0] if all(s == seen[0] for s in seen) else ", ".join(
            f"{name} {v[f.name]}" for name, v in values.items())
        if default in ("", []):  # an empty value means something: say what
            default = f.metadata["unset"]
        annotation = scalar.get(type(first[f.name]), Optional[list[str]] if isinstance(first[f.name], list)
                                else Optional[tuple[float, float]])
        option = typer.Option(None, help=f"{f.metadata['help']} (default: {default})", show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=option))
    return inspect.Signature(params)


# ----------------------------------------------------------------------------- outputs and inputs

def refuse_overwrite(out: Optional[Path], inputs: list, option: str = "--out", role: str = "the input"):
    """The one rule for outputs, applied before any work: an output that is a folder, that lies below a
    file, or that is any file the command reads is refused. `inputs` are what it reads: files, which an
    output may not be by any name (a symlink or a hard link too), and folders, whose images (list_images,
    what the commands read of a folder) it may not be either. A manifest's images are passed by the caller
    (data.manifest.data_files)."""
    if out is None:
        return
    out = Path(out)
    files.check_writable(out, option)
    target = out.stat() if out.exists() else None  # a file not there yet cannot be destroyed by the write
    for given in map(Path, filter(None, inputs)):
        if given.is_dir():
            hit = target and next((f for f in list_images([given]) if _same_file(f, target)), None)
            if hit:
                which = "" if hit == out else f" (as {display(hit)})"
                raise RsmclipError(f"{option} {display(out)} is an image of {role} {display(given)}{which}: "
                                   f"writing it would destroy that image; choose another {option}")
        elif given.resolve() == out.resolve() or (target and given.exists() and _same_file(given, target)):
            raise RsmclipError(f"{option} {display(out)} is {role} {display(given)}: writing it would "
                               f"destroy that file; choose another {option}")


def _same_file(path: Path, target: os.stat_result) -> bool:
    try:
        found = path.stat()
    except OSError:
        return False
    return (found.st_dev, found.st_ino) == (target.st_dev, target.st_ino)


def list_images(paths: list[Path]) -> list[Path]:
    """Image files among the given files and (recursively) folders, sorted within each folder."""
    found = []
    for p in paths:
        if p.is_dir():
            found += sorted(f for f in p.rglob("*")
                            if f.suffix.lower() in rsmclip.IMAGE_SUFFIXES and f.is_file())
        elif p.exists():
            found.append(p)
        else:
            raise RsmclipError(f"{p}: no such file or folder")
    return found


# ----------------------------------------------------------------------------- advice

def check_template(template: str) -> str:
    """A prompt with exactly one {} for the class name and nothing else for str.format to fill."""
    try:
        filled = template.format("\0")
    except (KeyError, IndexError, ValueError) as e:
        raise RsmclipError(f"template {template!r}: {type(e).__name__} {e}; use exactly one {{}} "
                           "for the class name ({{ and }} for literal braces)") from None
    if filled.count("\0") != 1:
        raise RsmclipError(f"template {template!r} needs exactly one {{}} for the class name "
                           "(without it every class gets the same text and the same score)")
    return template


def is_demo_image(path: Path) -> bool:
    """An image (or a manifest, a folder) inside a folder that data/demo.py made (its VERSION stamp names
    the demo)."""
    for folder in Path(path).resolve().parents:
        stamp = folder / "VERSION"
        if stamp.is_file():
            return stamp.read_text(errors="replace").startswith("rsmclip-demo")
    return False


def warn_if_toy(cfg: rsmclip.CLIPConfig, weights: Path, paths: list[Path]):
    """The tiny architecture is the demo's toy (64-pixel input, 1.4M parameters, synthetic scenes): on
    real imagery its scores are flat and mean little. Say so whenever it sees images not from the demo
    (`paths`: the images, or the manifest or folder that holds them)."""
    tiny = rsmclip.PRESETS["tiny"]
    if (cfg.vision, cfg.embed_dim) == (tiny.vision, tiny.embed_dim) and not all(map(is_demo_image, paths)):
        print(f"warning: {display(weights)} is the tiny demo model, a toy trained on synthetic scenes: its "
              "scores on other images mean little; for real imagery use --model rs-m-clip "
              "(`rsmclip download`)", file=sys.stderr)


def write_text(path: Path, text: str):
    files.atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    print(f"wrote {display(path)}")


# ----------------------------------------------------------------------------- progress

@contextlib.contextmanager
def image_progress(total: int):
    """A progress bar for embedding `total` images (on stderr, gone when done), yielding the callback that
    rsmclip.embed_images calls after each batch: the library draws nothing itself."""
    with Progress(TextColumn("images"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                  TimeRemainingColumn(), transient=True, console=Console(stderr=True)) as bar:
        task, start, done = bar.add_task("", total=total, rate=""), time.perf_counter(), [0]

        def advance(n: int):
            done[0] += n
            bar.update(task, advance=n, rate=f"{done[0] / (time.perf_counter() - start):.0f} img/s")
        yield advance


class StepRate(ProgressColumn):
    """steps/s and the time left, from the mean duration of the steps this process has run, shown from the
    first finished step on (rich's own estimate waits for several updates within 30 s, so a slow run read
    -:--:-- throughout)."""

    def render(self, task) -> Text:
        if not task.fields["ran"]:
            return Text("first step ...")
        rate = task.fields["ran"] / task.fields["seconds"]
        left = round((task.total - task.completed) / rate)
        return Text(f"{rate:.2f} steps/s, {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left")


class StepProgress:
    """A training run's bar (steps done of the total, the last logged line, steps/s and the time left),
    drawn by the main process only."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), StepRate(), disable=not enabled)
        self.total, self.start, self.console = total, start, self.bar.console

    def __enter__(self):
        self.bar.__enter__()
        self.task = self.bar.add_task("train", total=self.total, completed=self.start, info="", ran=0,
                                      seconds=0.0)
        self.began = time.perf_counter()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def step(self, step: int):
        self.bar.update(self.task, completed=step, ran=step - self.start,
                        seconds=time.perf_counter() - self.began)

    def info(self, text: str):
        self.bar.update(self.task, info=text)
