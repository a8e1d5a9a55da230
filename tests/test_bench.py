"""bench/peers.py's one-shot GPU check runs end to end (on CPU, quick mode) and reports every part."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
from data.manifest import load_manifest, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_runs_end_to_end_in_quick_mode_on_cpu(tmp_path):
    """bench.peers gpu is for a GPU host; --device cpu --quick runs the whole script on the tiny model (no
    compile) so that its every part is exercised here. Without CUDA the default device is refused."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        refused = subprocess.run([sys.executable, "-m", "bench.peers", "gpu"], capture_output=True,
                                 text=True, env=env, cwd=ROOT, timeout=120)
        assert refused.returncode == 1 and "CUDA is not available" in refused.stderr, refused.stderr
    result = subprocess.run([sys.executable, "-m", "bench.peers", "gpu", "--device", "cpu", "--quick",
                             "--out", str(tmp_path / "gpu.json")], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert json.loads(result.stdout) == report  # stdout is the one JSON
    assert {"device", "parity_bf16_vs_fp32", "demo", "demo_compiled", "paper", "paper_compiled", "data_bound",
            "train_vs_open_clip"} <= report.keys()
    assert {"images_per_s", "mfu", "peak_memory_mb", "flops_per_sample"} <= report["paper"].keys()
    assert report["parity_bf16_vs_fp32"]["image_cosine_min"] > 0.99
    assert {"waiting_for_loader_s", "computing_s", "data_bound"} <= report["data_bound"].keys()
    assert report["train_vs_open_clip"]["ratio"] > 0


def ablation(args: list[str], capsys) -> tuple[int, str, str]:
    """bench.ablation in this process (its runs train in-process too) on one thread, as its command line
    runs: -> exit code, stdout, stderr."""
    from bench.ablation import app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as done:
            cli.run_cli(app, args)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def table_rows(text: str) -> list[list[str]]:
    return [line.strip("| ").split(" | ") for line in text.splitlines() if line.startswith("| ")][1:]


def test_ucm_ablations_run_end_to_end_in_quick_mode_and_reuse_only_runs_of_their_settings(tmp_path, capsys):
    """The self-distillation and claim (1) tables on the UCM-Captions sample, 2 steps a run: every arm trains,
    every number is measured and lands in its table with the rule's verdict (the method needs the full runs).
    Run again, nothing trains; asked for other settings, a run made by others is refused before any work."""
    ucm = ROOT.parent / "shared/datasets/ucm_captions_sample"
    if not ucm.is_dir():
        pytest.skip("no ../shared/datasets/ucm_captions_sample here")
    common = ["--ucm", str(ucm), "--work", str(tmp_path), "--quick"]
    code, out, err = ablation(["selfdist", *common, "--only", "ema,today"], capsys)  # a share of the rows
    assert code == 0, err
    shared = table_rows((tmp_path / "selfdist-ema-today.md").read_text())
    assert [r[0].split(" (")[0] for r in shared] == ["at initialisation", "+ EMA momentum 0.996 -> 1, cosine",
                                                     "today's settings"]  # and no winner table
    made = {key: (tmp_path / f"selfdist-{key}-seed0/model.safetensors").stat().st_mtime_ns
            for key in ("ema", "today")}
    for table in ("selfdist", "regime"):
        code, out, err = ablation([table, *common], capsys)
        assert code == 0, err
        assert (tmp_path / f"{table}.md").read_text() in out
    assert made == {key: (tmp_path / f"selfdist-{key}-seed0/model.safetensors").stat().st_mtime_ns
                    for key in made}  # gathered, not trained again
    selfdist = table_rows((tmp_path / "selfdist.md").read_text())
    gathered = [r[1:] for r in selfdist if r[0].startswith(("today's", "+ EMA"))]
    assert gathered == [r[1:] for r in shared[1:]][::-1]
    assert [r[0].split(" (")[0] for r in selfdist[:2]] == ["at initialisation", "today's settings"]
    assert selfdist[2][0].startswith("+ each parameter's gradient clipped at 3.0, before the freeze")
    assert all(len(r) == 12 for r in selfdist[:8]) and selfdist[8][:2] == ["run", "gain (points)"]
    read = {r[0].split(" (")[0]: float(r[4 if "patch tokens" in r[0] else 2].split(" ")[0])
            for r in selfdist[1:8]}  # the gain on the feature the row's head reads
    tied = [title for title, gain in read.items() if gain == max(read.values())]
    assert [r[0].split(": ", 1)[1].split(" (")[0] for r in selfdist[9:]] == tied  # every row tied at the top
    regime = (tmp_path / "regime.md").read_text()
    arms = table_rows(regime.split("Paired differences")[0])
    assert [r[0] for r in arms] == ["the bases: CLIP alone on the source classes, 2 steps, seeds [0]",
                                    *(title for title, _ in ablation_module().REGIME_ARMS.values())]
    assert all(r[5] == "–" for r in arms[:4]) and all(r[5] != "–" for r in arms[4:])  # a teacher only when on
    assert "teacher_cosine" in regime and "with teacher_cosine 0." in regime
    # after 2 steps the base's features are all alike: by the step-0 rule the teacher's head takes batch norm
    assert "By that rule (`--head auto`) the heads of bases 0 take batch norm; at step 0 with it" in regime
    heads = {arm: json.loads((tmp_path / f"regime-b0-{arm}-seed0/config.json").read_text())["config"]
             for arm in ("light-off", "light-on", "global-on")}
    heads = {arm: config["head_bn"] for arm, config in heads.items()}
    assert heads == {"light-off": False, "light-on": True, "global-on": True}  # an -off arm builds no head
    contrasts = table_rows(regime.split("Paired differences")[1])
    assert contrasts[0][0] == "the teacher, CLIP on the global crops (claim 1)" and len(contrasts) == 6
    assert all(cell.endswith("**not shown**") for row in contrasts for cell in row[1:])  # one pair: no spread
    checkpoint = tmp_path / "regime-b0-global-on-seed0/checkpoint.safetensors"
    stamp = checkpoint.stat().st_mtime_ns
    code, out, err = ablation(["regime", *common], capsys)
    assert code == 0 and checkpoint.stat().st_mtime_ns == stamp and "starting:" not in out  # measured only
    code, out, err = ablation(["regime", "--ucm", str(ucm), "--work", str(tmp_path), "--seeds", "0",
                               "--bases", "0", "--steps", "3", "--base-steps", "2"], capsys)
    assert code == 1 and "regime-b0-light-off-seed0 holds a run made by other settings (steps, " in err, err
    assert checkpoint.stat().st_mtime_ns == stamp


def test_the_step_0_rule_asks_for_batch_norm_when_the_teachers_spread_is_below_its_temperature():
    from bench.ablation import needs_batch_norm

    assert needs_batch_norm({"teacher_spread": 0.0286, "teacher_temp": 0.04})  # base 0's, without it
    assert not needs_batch_norm({"teacher_spread": 0.0753, "teacher_temp": 0.04})


def ablation_module():
    from bench import ablation as module

    return module


@pytest.fixture
def small_demo(tmp_path, demo_manifest):
    """A demo folder holding 64 train, 8 val and 20 test images of the session's demo (its stamp, tokenizer
    and images linked): the demo tables' quick modes measure on it in seconds."""
    folder = tmp_path / "demo"
    folder.mkdir()
    records = load_manifest(demo_manifest)
    keep = {"train": 64, "val": 8, "test": 20}
    chosen = [r for split, n in keep.items() for r in [r for r in records if r["split"] == split][:n]]
    write_jsonl(chosen, folder / "captions.jsonl")
    for name in ("VERSION", "spm.model"):
        shutil.copy(demo_manifest.parent / name, folder / name)
    (folder / "images").symlink_to(demo_manifest.parent / "images")
    return folder


def test_demo_ablations_run_end_to_end_in_quick_mode(tmp_path, small_demo, capsys):
    """The demo table (the teacher on and off, two CLIP views) and claim (2) (a ten-language base on the
    demo generator's seed 1, fine-tuned four ways), 2 steps a run."""
    for table in ("demo", "languages"):
        code, out, err = ablation([table, "--work", str(tmp_path), "--demo", str(small_demo), "--quick"],
                                  capsys)
        assert code == 0, err
        assert (tmp_path / f"{table}.md").read_text() in out
    demo_arms = table_rows((tmp_path / "demo.md").read_text().split("Paired differences")[0])
    assert [r[6] != "–" for r in demo_arms] == [True, False, True, False]  # teacher entropy: with a teacher
    assert "H(batch-mean target), nats" in (tmp_path / "demo.md").read_text()
    languages = (tmp_path / "languages.md").read_text()
    rows = table_rows(languages.split("Test mR per language")[0])
    assert rows[0][0].startswith("the base before fine-tuning") and len(rows) == 5
    assert all(len(r) == 5 for r in rows)
    assert (tmp_path / "demo-variant/VERSION").read_text().strip() == "rsmclip-demo 3, seed 1"
    base = json.loads((tmp_path / "languages-base/config.json").read_text())["config"]
    assert base["data"] == [str(tmp_path / "demo-variant/captions.jsonl")] and base["distill_weight"] == 0
    half = json.loads((tmp_path / "languages-en-half-seed0/config.json").read_text())["config"]
    assert half["lang_weights"] == "en=0.5"
    assert half["init"] == str(tmp_path / "languages-base/model.safetensors")
    paraphrased = load_manifest(small_demo / "captions-paraphrased.jsonl")
    assert {len(r["captions"]["en"]) for r in paraphrased if r["split"] == "train"} == {50}
    assert {len(r["captions"]["en"]) for r in paraphrased if r["split"] == "test"} == {5}


def test_the_decision_rule_needs_five_of_six_positive_and_a_mean_above_two_sd():
    from bench.ablation import verdict

    assert verdict([1.0, 1.2, 0.9, 1.1, 1.0, 0.8]) == "shown"
    assert verdict([1.0, 1.0, 1.0, 1.0, 1.0, -0.01]) == "shown"  # 5 of 6, mean 0.832 > 2 x 0.412
    assert verdict([1.0, 1.2, 0.9, 1.1, 1.0, -0.1]) == "not shown"  # 5 of 6, mean 0.85 < 2 x 0.48
    assert verdict([1.0, 1.2, 0.9, 1.1, -0.1, -0.1]) == "not shown"  # 4 of 6
    assert verdict([0.1, 0.1, 0.1, 0.1, 0.1, 3.0]) == "not shown"  # 6 of 6, mean 0.58 < 2 x 1.18
    assert verdict([-1.0, -1.2, -0.9, -1.1, -1.0, -0.8]) == "the opposite"
    assert verdict([0.5, 0.6, 0.4]) == "shown" and verdict([0.5, 0.6, -0.1]) == "not shown"  # 3 of 3
    assert verdict([2.0]) == "not shown"  # one pair has no spread to compare with


def test_english_paraphrases_are_as_many_as_the_translations_and_new_sentences():
    from bench.ablation import paraphrases
    from data.demo import captions

    scene = {"kind": "airplane", "colour": "blue", "count": 3, "position": "bottom right",
             "ground": "farmland", "road": "vertical"}
    made = paraphrases(scene)  # 9 voices x the 5 templates, each saying what its template says
    assert len(made) == len(set(made)) == 45 and not set(made) & set(captions(scene, "en"))
    assert made[0] == "Three navy planes at the lower right, on cropland."
    assert made[21] == "3 azure aircraft are visible in the south-east corner. A street crosses vertically."
    assert made[44] == "Satellite image: a group of three bluish jets over farm fields."
    one = paraphrases(scene | {"count": 1})
    assert one[21] == "1 azure aircraft is visible in the south-east corner. A street crosses vertically."
    assert one[3] == "One navy plane is placed at the lower right."


def test_ablation_markdown_gives_mean_sd_and_each_seed():
    from bench.ablation import markdown

    text = markdown("t", ["a", "b"], [("row", [[1.0, 2.0, 4.0], [math.nan, math.nan, math.nan]])])
    assert "| row | 2.33 ± 1.53 (1.00, 2.00, 4.00) | – |" in text


def test_demo_attribute_accuracy_changes_one_attribute_and_counts_the_best_caption():
    from bench.ablation import attribute_accuracy, attribute_captions

    scene = {"kind": "tank", "colour": "red", "count": 4, "position": "top left", "ground": "desert",
             "road": "none"}
    colours = attribute_captions(scene, "colour")
    assert colours == [f"Four {c} storage tanks in the top left corner, in the desert."
                       for c in ("red", "white", "blue", "yellow")]
    assert attribute_captions(scene, "kind")[2] == "Four red airplanes in the top left corner, in the desert."
    images = torch.eye(3)[[0, 2]]  # image 0 points at caption value 0, image 1 at value 2
    captions = torch.eye(3).expand(2, 3, 3)  # each image: one caption per value, value v along axis v
    assert attribute_accuracy(images, captions, torch.tensor([0, 2])) == 100
    assert attribute_accuracy(images, captions, torch.tensor([0, 1])) == 50
