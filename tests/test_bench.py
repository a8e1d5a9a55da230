"""bench/peers.py's one-shot GPU check runs end to end (on CPU, quick mode) and reports every part."""
import json
import os
import subprocess
import sys
from pathlib import Path

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
