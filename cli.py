"""The conventions every script's command line shares: one exit-code rule and readable help (run_cli), the
options several scripts take (--model, --tokenizer, --device, --precision) defined once, the rule for outputs
(refuse_overwrite), the progress bar of long jobs, and the advice a command prints about what it is given
(a toy model on real images, a prompt template). train.py, eval.py, translate.py, data/prepare.py, the
`rsmclip` command and bench/ all run through it; the library (rsmclip.py) never imports it."""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import json
import math
import os
import re
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
    never true or false (JSON's true is not the number 1) and never nan or inf. Said in one form wherever
    it is checked ("a whole number >= 1", "a number in (0, inf)")."""
    lo: float = 0
    hi: float = math.inf
    whole: bool = False
    open_lo: bool = False

    def __contains__(self, value) -> bool:
        if self.whole:
            return type(value) is int and self.lo <= value <= self.hi
        return (type(value) in (int, float) and math.isfinite(value)
                and (self.lo < value if self.open_lo else self.lo <= value) and value <= self.hi)

    def __str__(self) -> str:
        if self.whole:
            return f"a whole number >= {self.lo}" if self.hi == math.inf else \
                f"a whole number in [{self.lo}, {self.hi}]"
        left, right = "(" if self.open_lo else "[", ")" if self.hi == math.inf else "]"  # inf is never in it
        return f"a number in {left}{self.lo}, {self.hi}{right}"


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


def in_range(check: Range):
    """A typer callback for an option that is not a typed config's field: its value against the Range that
    the same setting's JSON field uses too (a suite's), a usage error (exit 2) when outside it."""
    def callback(value):
        if value is not None and value not in check:
            raise typer.BadParameter(f"{value} is not {check}")
        return value
    return callback


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


# ----------------------------------------------------------------------------- typed JSON
# Every JSON file the toolkit reads (shards.json, suites, config.json, checkpoints' metadata, manifests) is
# checked against a small schema before any work, with the command line's own Ranges and choices, so that a
# flag and the same setting in a file accept the same values. A spec is bool, int, float, str (valid text),
# dict or list (any object or list, its text valid), a Range, a Pattern, a tuple of choices, or an Obj,
# ListOf, MapOf or Maybe of specs. Every problem reads `field: value is not what was expected`.

LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins a pair (\ud83d\ude00); a lone one stays


class JsonError(RsmclipError):
    """A JSON file whose fields are not of their type or range: one message naming the file and each field."""


@dataclasses.dataclass(frozen=True)
class Pattern:
    """What a text setting may be: valid text (no lone surrogate, which no UTF-8 file can hold), matching
    `pattern` when one is given, said as `what`."""
    pattern: str = ""
    what: str = "text"

    def __contains__(self, value) -> bool:
        return (isinstance(value, str) and not LONE_SURROGATE.search(value)
                and (not self.pattern or re.fullmatch(self.pattern, value) is not None))

    def __str__(self) -> str:
        return self.what


TEXT, ANY = Pattern(), Pattern(what="a JSON value")  # ANY: any value, its text valid throughout


@dataclasses.dataclass(frozen=True)
class Obj:
    """A JSON object with these fields, each a spec; those named in `optional` may be missing, and a key
    that is not a field is refused unless `extra`."""
    fields: dict
    optional: tuple = ()
    extra: bool = False


@dataclasses.dataclass(frozen=True)
class ListOf:
    """A JSON list of `size` items (a whole-number Range), each an `item`."""
    item: object
    size: Range = COUNT


@dataclasses.dataclass(frozen=True)
class MapOf:
    """A JSON object whose keys are `keys` (a text spec) and whose values are each a `value`."""
    value: object
    keys: object = TEXT


@dataclasses.dataclass(frozen=True)
class Maybe:
    """null, or a `spec`."""
    spec: object


def expand(spec):
    """The plain types as specs: str is valid text; dict and list hold valid text throughout."""
    return TEXT if spec is str else MapOf(ANY) if spec is dict else ListOf(ANY) if spec is list else spec


def describe(spec) -> str:
    """What a spec accepts, in the words of the messages ("a whole number >= 1", "true or false")."""
    spec = expand(spec)
    if spec in (bool, int, float):
        return {bool: "true or false", int: "a whole number", float: "a number"}[spec]
    if isinstance(spec, tuple):
        return "one of " + ", ".join(map(show, spec))
    if isinstance(spec, Maybe):
        return f"{describe(spec.spec)} or null"
    if isinstance(spec, ListOf):
        lo, hi = spec.size.lo, spec.size.hi
        return "a list" + ("" if spec.size == COUNT else f" of {lo} or more items" if hi == math.inf
                           else f" of {lo} items" if lo == hi else f" of {lo} to {hi} items")
    return "an object" if isinstance(spec, (Obj, MapOf)) else str(spec)  # the rest: a Range or a Pattern


def fits(value, spec) -> bool:
    """Whether a value has the type (and range) of a spec; its items and fields are json_problems'."""
    spec = expand(spec)
    if isinstance(spec, Maybe):
        return value is None or fits(value, spec.spec)
    if spec in (bool, int):
        return type(value) is spec
    if spec is float:
        return type(value) in (int, float) and math.isfinite(value)
    if isinstance(spec, tuple):
        return any(type(value) is type(choice) and value == choice for choice in spec)
    if isinstance(spec, (Obj, MapOf)):
        return isinstance(value, dict)
    if isinstance(spec, ListOf):
        return isinstance(value, list) and len(value) in spec.size
    if spec is ANY:
        return not isinstance(value, str) or value in TEXT
    return value in spec  # a Range or a Pattern


def json_problems(value, spec, at: str = "") -> list[str]:
    """Everything in a JSON value that is not as `spec` says, one line per field: its place (`at`, then
    `shards[1].samples`) and `"10" is not a whole number >= 1`, or `missing (...)`."""
    spec = expand(spec)
    if spec is ANY and isinstance(value, (dict, list, str)):  # its parts, or its text, as any other's
        spec = MapOf(ANY) if isinstance(value, dict) else ListOf(ANY) if isinstance(value, list) else TEXT
    if not fits(value, spec):
        return [f"{at + ': ' if at else ''}{unfit(value, spec)}"]
    if isinstance(spec, Maybe):
        return [] if value is None else json_problems(value, spec.spec, at)
    problems = []
    if isinstance(spec, Obj):
        for name, field in spec.fields.items():
            if name in value:
                problems += json_problems(value[name], field, inside(at, name))
            elif name not in spec.optional:
                problems.append(f"{inside(at, name)}: missing ({describe(field)})")
        for name in [] if spec.extra else [k for k in value if k not in spec.fields]:
            close = difflib.get_close_matches(name, list(spec.fields), 1)
            problems.append(f"{inside(at, printable(name))}: not a field here"
                            + (f" (did you mean {close[0]}?)" if close else ""))
    elif isinstance(spec, MapOf):
        for key, item in value.items():
            if not fits(key, spec.keys):
                problems.append(f"{at + ': ' if at else ''}the key {unfit(key, spec.keys)}")
            problems += json_problems(item, spec.value, inside(at, printable(key)))
    elif isinstance(spec, ListOf):
        for i, item in enumerate(value):
            problems += json_problems(item, spec.item, f"{at}[{i}]")
    return problems


def unfit(value, spec) -> str:
    lone = isinstance(value, str) and LONE_SURROGATE.search(value)
    return f"{show(value)} is not {describe(spec)}" + (
        " (it holds a lone surrogate, which no UTF-8 file can)" if lone else "")


def check_json(value, spec, where: str):
    """`value` if it is as `spec` says, else JsonError: `where` (the file, and the line or the part of it),
    then every problem (the first five, and how many in all)."""
    if problems := json_problems(value, spec):
        raise JsonError(f"{where}: {say_problems(problems)}")
    return value


def say_problems(problems: list[str]) -> str:
    more = f"; ... ({len(problems)} problems in all)" if len(problems) > 5 else ""
    return "; ".join(problems[:5]) + more


def config_spec(config_class) -> Obj:
    """A typed config's settings as a JSON object (a saved config.json): each field of the type of its
    default, with the Range or choices that option() gave it; any of them may be left out."""
    fields = {}
    for f in dataclasses.fields(config_class):
        default, check = (f.default if f.default is not dataclasses.MISSING else f.default_factory(),
                          f.metadata.get("check"))
        if isinstance(default, (list, tuple)):  # a list of texts (--data), or a pair of numbers (a scale)
            fields[f.name] = ListOf(str) if isinstance(default, list) else ListOf(
                float, Range(len(default), len(default), whole=True))
        else:
            fields[f.name] = check if check is not None and type(default) is not bool else type(default)
    return Obj(fields, optional=tuple(fields))


def inside(at: str, name: str) -> str:
    return f"{at}.{name}" if at else name


def printable(text: str) -> str:
    """Text that can always be printed: a lone surrogate shown as \\udXXX."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def show(value) -> str:
    """A JSON value as it was written, printable and cut to 60 characters."""
    text = printable(json.dumps(value, ensure_ascii=False))
    return text if len(text) <= 60 else text[:56] + " ..."


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
