"""bench/peers.py's one-shot GPU check runs end to end (on CPU, quick mode) and reports every part."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_ablation_tables_run_end_to_end_in_quick_mode(tmp_path):
    """bench.ablation's self-distillation and paper-regime tables on the UCM-Captions sample, 2 steps a run:
    every run trains, every number is measured and lands in its table (the method needs the full runs)."""
    ucm = ROOT.parent / "shared/datasets/ucm_captions_sample"
    if not ucm.is_dir():
        pytest.skip("no ../shared/datasets/ucm_captions_sample here")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for table in ("selfdist", "regime"):
        run = subprocess.run([sys.executable, "-m", "bench.ablation", table, "--ucm", str(ucm), "--work",
                              str(tmp_path), "--quick"], capture_output=True, text=True, env=env, cwd=ROOT,
                             timeout=300)
        assert run.returncode == 0, run.stderr
        assert (tmp_path / f"{table}.md").read_text() in run.stdout
    selfdist = (tmp_path / "selfdist.md").read_text()
    assert all(f"| {row} | " in selfdist for row in ("at initialisation", "after 2 steps", "gain (points)"))
    rows = [line for line in (tmp_path / "regime.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| the start: CLIP alone, 2 steps from scratch (seed 0)",
                                                 "| CLIP loss alone (`--distill-weight 0`)",
                                                 "| CLIP + self-distillation"]
    assert rows[1].endswith("| – |") and not rows[2].endswith("| – |")  # a teacher only with distillation


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
