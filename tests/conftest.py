"""Shared fixtures: a multilingual test corpus and a SentencePiece model trained on it."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sentencepiece

# The CPU's tensor augmentation runs eagerly in tests, subprocesses included: compiling it costs about 13 s
# per shape on two cores. test_augment compiles one shape and compares it with the eager ops.
os.environ["RSMCLIP_COMPILE"] = "0"

CORPUS = [  # all ten languages, plus the text that breaks tokenizers
    "Many planes are parked next to a long runway at the airport.",
    "Muitos aviões estão estacionados ao lado de uma pista longa no aeroporto.",
    "Hay muchos edificios residenciales densos cerca de un río verde.",
    "Plusieurs bâtiments industriels entourent un parking à côté d’une autoroute.",
    "Mehrere grüne Bäume stehen um einen großen Sportplatz mit Laufbahn.",
    "Een brede rivier stroomt langs akkers en een kleine haven met boten.",
    "Alcune navi sono ormeggiate in un porto vicino a un ponte.",
    "机场跑道旁停着许多飞机，附近有几栋白色建筑。",
    "공항 활주로 옆에 비행기 여러 대가 주차되어 있습니다.",
    "Несколько самолётов стоят рядом с длинной взлётной полосой.",
    "“Curly quotes” and ‘single ones’ — dashes… ellipses",
    "emoji 🛰️🌍✈️🏙️ and a 🦩 flamingo lake 👩‍👩‍👧",
    "unknown chars: ꙮ 𓀀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ⁂ ꧁꧂ 𐍈 \ue000",
    "HTML: &amp;amp; &lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;x&#39; caf&eacute;",
    "  odd\twhitespace\n\nand\u00a0nbsp\u3000ideographic\u2003em  \r\n  ",
    "fullwidth ＡＢＣ１２３ and ligatures ﬁ ﬂ, combining e\u0301 vs é, zero\u200bwidth",
    "mojibake: cafÃ© naÃ¯ve â€œquotedâ€\x9d",
    "",
    "a",
    " ".join(["sparse residential area with many trees and several roads"] * 12),  # > 75 pieces
    "长" * 200,
]


def train_spm(path: Path, sentences, vocab_size=400):
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(path.with_suffix("")), vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, num_threads=1, hard_vocab_limit=False, minloglevel=2)
    return path


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory):
    """A small SentencePiece (unigram, NMT-NFKC, like XLM-R's) trained on the test corpus."""
    return train_spm(tmp_path_factory.mktemp("spm") / "spm.model", CORPUS[:17] * 20)


@pytest.fixture(scope="session")
def demo_manifest(tmp_path_factory):
    """The built-in demo dataset, generated for this test session (never the working tree's copy)."""
    from data.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo") / "demo")


@pytest.fixture(autouse=True)
def user_cache(tmp_path_factory, monkeypatch):
    """Downloads, search indexes and feature caches go to the user cache: each test gets its own empty one,
    never the real ~/.cache/rsmclip."""
    home = tmp_path_factory.mktemp("rsmclip_home")
    monkeypatch.setenv("RSMCLIP_HOME", str(home))
    return home


def kill_after_first_checkpoint(out: Path, args: list, delay: float = 0.0) -> int:
    """Start `train.py --out OUT ARGS` (one thread), SIGKILL it `delay` seconds after its first checkpoint
    appears, and return the step that checkpoint (or a later one written meanwhile) holds."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, str(root / "train.py"), "--out", str(out), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=root)
    checkpoint, deadline = out / "checkpoint.safetensors", time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as f:
        return json.loads(f.metadata()["state"])["step"]
