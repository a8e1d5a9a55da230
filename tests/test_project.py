"""Project files that must agree with each other, and the package that pip installs."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pins(text: str) -> set[str]:
    return set(re.findall(r"^\s*(?:- )?([A-Za-z0-9_.\-]+==[^\s#]+)", text, re.M))


def test_environment_yml_has_the_same_pins_as_requirements():
    reqs = pins((ROOT / "requirements.txt").read_text()) | pins((ROOT / "requirements-dev.txt").read_text())
    env = pins((ROOT / "environment.yml").read_text())
    assert reqs and env == reqs, f"only in requirements: {reqs - env}; only in environment.yml: {env - reqs}"


def test_toolkit_imports_no_test_oracle():
    for name in ("rsmclip.py", "rsmclip_cli.py", "eval.py", "train.py", "translate.py"):
        path = ROOT / name
        if path.exists():
            source = path.read_text()
            assert not re.search(r"^\s*(import|from)\s+(open_clip|transformers|tokenizers)\b",
                                 source, re.M), name


def test_package_dependencies_are_the_runtime_requirements():
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ ]", d)[0] for d in declared}
    assert names == {p.split("==")[0] for p in pins((ROOT / "requirements.txt").read_text())}


def test_pip_install_gives_a_module_importable_from_anywhere_and_the_command(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    search = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "search").glob("*.py"))]
    for name in ("pyproject.toml", "rsmclip.py", "files.py", "cli.py", "rsmclip_cli.py", *search, "README.md",
                 "LICENSE"):  # what the build reads
        (src / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import rsmclip; print(rsmclip.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where) == target / "rsmclip.py"
    command = subprocess.run([sys.executable, str(target / "bin" / "rsmclip"), "info", "--preset", "tiny"],
                             cwd=tmp_path, env=env, capture_output=True, text=True)
    assert command.returncode == 0 and "parameters:" in command.stdout, command.stderr


def test_importing_the_library_only_defines():
    """`import rsmclip` loads no command-line library, asks nothing of CUDA and changes no process or PIL
    setting: every script and test imports it."""
    probe = ("import os, sys, PIL.Image as I, torch, safetensors.torch, sentencepiece, ftfy\n"
             "before, mask, pixels = set(sys.modules), os.umask(0o027), I.MAX_IMAGE_PIXELS\n"
             "import rsmclip\n"  # what it loads beyond its own dependencies, and what it changes
             "print(os.umask(mask) == 0o027, torch.cuda.is_initialized(), pixels == I.MAX_IMAGE_PIXELS,\n"
             "      sorted(m for m in ('typer', 'rich', 'click', 'urllib.request', 'http.client')\n"
             "             if m in sys.modules and m not in before))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "True False True []", out.stdout + out.stderr


def test_every_language_table_has_the_ten_languages():
    """manifest.LANGUAGES is the one list: everything keyed by language is checked against it."""
    import json

    import rsmclip_cli
    import translate
    from data import demo, manifest

    langs = set(manifest.LANGS)
    assert set(rsmclip_cli.PROMPTS) == langs and set(translate.LANGS) == langs - {"en"}
    assert set(json.loads((ROOT / "data/templates.json").read_text())) - {"_about"} == langs
    assert set(demo.TEXT) == langs
    assert manifest.parse_langs(" PT,en,pt ") == ["pt", "en"]


# Every script a user runs, by the module that holds its command line (an `app`, or a `main` wrapped as
# the script wraps it).
SCRIPTS = ["rsmclip_cli", "train", "eval", "translate", "data.prepare", "data.demo", "bench.ablation",
           "bench.peers", "bench.precision", "bench.eval_speed", "bench.generate_speed"]


def script_app(name: str):
    import importlib

    import typer
    module = importlib.import_module(name)
    if hasattr(module, "app"):
        return module.app
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(module.main)
    return app


def help_pages(app) -> list[tuple[list[str], object]]:
    """([command words], click command) for an app and each of its subcommands."""
    import typer

    import cli
    root = cli.readable_help(typer.main.get_command(app))
    return [([], root)] + [([name], sub) for name, sub in getattr(root, "commands", {}).items()]


def test_every_help_page_is_readable_and_describes_every_option(capsys):
    import pytest

    import cli

    for name in SCRIPTS:
        app = script_app(name)
        for words, command in help_pages(app):
            where = " ".join([name, *words])
            with pytest.raises(SystemExit) as done:
                cli.run_cli(app, [*words, "--help"])
            assert done.value.code == 0, where
            text = capsys.readouterr().out
            # typer's own rendering (<path>, <bool>, {folder} in the usage line) and empty defaults stay out
            typer_marks = r"<(bool|int|str|float|path|list)\b|^Usage:.*[{}]|\(default: \)|\[default: \]"
            assert not re.search(typer_marks, text, re.M), (where, text)
            for param in command.params:
                if param.name != "help":
                    assert (param.help or "").strip(), f"{where}: {param.name} has no description"


# The import order (docs/internals.md, "Files, and who may import whom"): bottom to top; a module imports
# only from its own layer or below, never in a circle, and never a project module inside a function (that
# hides a circle). Optional heavy dependencies (rasterio, faiss, open_clip) may be imported lazily.
LAYERS = [
    ("files", ["files.py"]),
    ("library", ["rsmclip.py"]),
    ("command-line conventions", ["cli.py"]),
    ("data contract", ["data/manifest.py"]),
    ("data loading", ["data/augment.py", "data/demo.py", "data/shards.py", "data/loading.py"]),
    ("entry points", ["rundir.py", "curves.py", "eval.py", "optimization.py", "train.py", "translate.py"]),
    ("commands", ["rsmclip_cli.py", "search/*.py", "data/prepare.py"]),
    ("bench", ["bench/*.py"]),
]
COMMANDS_ONLY = {"data/prepare.py"}  # run, never imported: bench runs it as a user does


def project_imports(root: Path) -> dict[str, list[tuple[str, int, bool]]]:
    """Every project module's imports of project modules: {file: [(imported file, line, at top level)]}."""
    import ast

    paths = [p.relative_to(root) for layer in LAYERS for pattern in layer[1] for p in root.glob(pattern)]
    modules = {p.with_suffix("").as_posix().replace("/", "."): p.as_posix() for p in paths}
    found = {}
    for name, path in modules.items():
        tree = ast.parse((root / path).read_text(), path)
        top = {id(node) for node in tree.body}
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            nested = id(node) not in top and not any(id(node) in {id(n) for n in ast.walk(t)}
                                                     for t in tree.body if isinstance(t, ast.If))
            edges += [(modules[t], node.lineno, not nested) for t in targets if t in modules]
        found[path] = edges
    return found


def layer_problems(root: Path) -> list[str]:
    """What breaks the import order in the tree at `root`: an upward import, an import inside a function, a
    circle, a module in no layer, an import of a command that only runs."""
    rank = {p.relative_to(root).as_posix(): i for i, (_, patterns) in enumerate(LAYERS)
            for pattern in patterns for p in root.glob(pattern)}
    placed = set(rank)
    every = {p.relative_to(root).as_posix() for p in root.rglob("*.py")
             if p.relative_to(root).parts[0] not in ("tests", ".venv", "build", "demo_data")}
    problems = [f"{path}: in no layer of tests/test_project.py's LAYERS" for path in sorted(every - placed)]
    graph = project_imports(root)
    for path, edges in graph.items():
        for target, line, top in edges:
            if rank[target] > rank[path]:
                problems.append(f"{path}:{line} imports {target}, a layer above it "
                                f"({LAYERS[rank[target]][0]} > {LAYERS[rank[path]][0]})")
            if not top:
                problems.append(f"{path}:{line} imports {target} inside a function")
            if target in COMMANDS_ONLY:
                problems.append(f"{path}:{line} imports {target}, a command that no module imports")
    state = {}

    def visit(path, trail):
        state[path] = "open"
        for target, _, _ in graph[path]:
            if state.get(target) == "open":
                problems.append("a circle: " + " -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[path] = "done"

    for path in sorted(graph):
        if path not in state:
            visit(path, [path])
    return problems


def test_modules_import_only_downward_never_inside_a_function_never_in_a_circle():
    assert layer_problems(ROOT) == []


def test_the_import_order_check_finds_what_it_guards_against(tmp_path):
    """The check on a copy of the tree with each fault planted: an upward import (the data contract
    importing train.py), a project import inside a function, a circle within one layer, bench importing the
    data/prepare.py command, an unplaced file."""
    def tree_with(path: str, line: str) -> Path:
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        for layer in LAYERS:
            for pattern in layer[1]:
                for p in ROOT.glob(pattern):
                    (root / p.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(p, root / p.relative_to(ROOT))
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        with open(root / path, "a") as f:
            f.write(line)
        return root

    assert "data/manifest.py:" in layer_problems(tree_with("data/manifest.py", "\nimport train\n"))[0]
    assert "a layer above it (entry points > data contract)" in layer_problems(
        tree_with("data/manifest.py", "\nimport train\n"))[0]
    assert any("imports eval.py inside a function" in p for p in layer_problems(
        tree_with("train.py", "\n\ndef late():\n    import eval\n")))
    assert any(p.startswith("a circle: ") and "eval.py" in p and "curves.py" in p for p in layer_problems(
        tree_with("eval.py", "\nimport curves\n")))
    line = len((ROOT / "bench/scale.py").read_text().splitlines()) + 2  # after the appended blank line
    assert layer_problems(tree_with("bench/scale.py", "\nfrom data.prepare import build_cache\n")) == [
        f"bench/scale.py:{line} imports data/prepare.py, a command that no module imports"]
    assert layer_problems(tree_with("utils.py", "import rsmclip\n")) == [
        "utils.py: in no layer of tests/test_project.py's LAYERS"]
