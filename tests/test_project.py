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
    for name in ("pyproject.toml", "rsmclip.py", "rsmclip_cli.py", "README.md", "LICENSE"):  # the build reads
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
    """rsmclip.LANGUAGES is the one list: everything keyed by language is checked against it."""
    import json

    import rsmclip
    import rsmclip_cli
    import translate
    from data import demo

    langs = set(rsmclip.LANGS)
    assert set(rsmclip_cli.PROMPTS) == langs and set(translate.LANGS) == langs - {"en"}
    assert set(json.loads((ROOT / "data/templates.json").read_text())) - {"_about"} == langs
    assert set(demo.TEXT) == langs
    assert rsmclip.parse_langs(" PT,en,pt ") == ["pt", "en"]


# Every script a user runs, by the module that holds its command line (an `app`, or a `main` wrapped as
# the script wraps it).
SCRIPTS = ["rsmclip_cli", "train", "eval", "translate", "data.prepare", "data.demo", "bench.ablation",
           "bench.peers", "bench.eval_speed", "bench.generate_speed"]


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

    import rsmclip_cli
    root = rsmclip_cli.readable_help(typer.main.get_command(app))
    return [([], root)] + [([name], sub) for name, sub in getattr(root, "commands", {}).items()]


def test_every_help_page_is_readable_and_describes_every_option(capsys):
    import pytest

    import rsmclip_cli
    for name in SCRIPTS:
        app = script_app(name)
        for words, command in help_pages(app):
            where = " ".join([name, *words])
            with pytest.raises(SystemExit) as done:
                rsmclip_cli.run_cli(app, [*words, "--help"])
            assert done.value.code == 0, where
            text = capsys.readouterr().out
            # typer's own rendering (<path>, <bool>, {folder} in the usage line) and empty defaults stay out
            typer_marks = r"<(bool|int|str|float|path|list)\b|^Usage:.*[{}]|\(default: \)|\[default: \]"
            assert not re.search(typer_marks, text, re.M), (where, text)
            for param in command.params:
                if param.name != "help":
                    assert (param.help or "").strip(), f"{where}: {param.name} has no description"
