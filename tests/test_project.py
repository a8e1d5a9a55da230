"""Project files that must agree with each other."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pins(text: str) -> set[str]:
    return set(re.findall(r"^\s*(?:- )?([A-Za-z0-9_.\-]+==[^\s#]+)", text, re.M))


def test_environment_yml_has_the_same_pins_as_requirements():
    reqs = pins((ROOT / "requirements.txt").read_text()) | pins((ROOT / "requirements-dev.txt").read_text())
    env = pins((ROOT / "environment.yml").read_text())
    assert reqs and env == reqs, f"only in requirements: {reqs - env}; only in environment.yml: {env - reqs}"


def test_toolkit_imports_no_test_oracle():
    for name in ("rsmclip.py", "eval.py", "train.py", "translate.py"):
        path = ROOT / name
        if path.exists():
            source = path.read_text()
            assert not re.search(r"^\s*(import|from)\s+(open_clip|transformers|tokenizers)\b", source, re.M), name
