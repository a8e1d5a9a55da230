"""Precision (rsmclip.native_bf16, resolve_precision, set_precision, load(precision=...), --precision): auto
by what the CPU multiplies, each precision within its tolerance of fp32 on a tiny model trained here, and
bf16 asked for where the CPU has no bf16 units. The refusals are rows of tests/test_bad_inputs.py."""
import json
import signal
import sys

import pytest
import torch
import torch.nn as nn

import cli
import eval as ev
import rsmclip
import rsmclip_cli
import train
from data.manifest import load_manifest

TINY = rsmclip.PRESETS["tiny"]


# ----------------------------------------------------------------------------- what auto picks


@pytest.mark.parametrize("line, native", [
    ("flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 amx_tile", True),  # Cooper Lake, Zen 4
    ("flags\t\t: fpu avx2 avx512f amx_bf16 amx_int8 amx_tile", True),  # Sapphire Rapids (AMX)
    ("flags\t\t: fpu sse avx2 fma avx512f avx512_vnni", False),  # Cascade Lake: int8 dot products only
    ("flags\t\t: fpu sse avx2 fma", False),  # Zen 2 and 3
    ("Features\t: fp asimd sve bf16 i8mm", True),  # Arm v8.6 (Graviton 3)
    ("Features\t: fp asimd crc32 atomics", False),  # Arm (Graviton 2)
])
def test_native_bf16_reads_the_flags_linux_reports(tmp_path, line, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: a CPU\n{line}\n\nprocessor\t: 1\n{line}\n")
    assert rsmclip.native_bf16(cpuinfo) is native
    assert rsmclip.native_bf16(tmp_path / "absent") is False  # another system: no /proc/cpuinfo


@pytest.fixture
def tiny_weights(tmp_path, spm_model):
    torch.manual_seed(0)
    rsmclip.save(rsmclip.CLIP(TINY), tmp_path / "w.safetensors")
    (tmp_path / TINY.tokenizer).write_bytes(spm_model.read_bytes())
    return tmp_path / "w.safetensors"


@pytest.mark.parametrize("native", [True, False])
def test_auto_takes_bf16_where_the_cpu_multiplies_it_and_keeps_autocast_on_cuda(native, tiny_weights,
                                                                                monkeypatch):
    monkeypatch.setattr(rsmclip, "native_bf16", lambda: native)
    expected = "bf16" if native else rsmclip.AUTO_WITHOUT_BF16
    assert rsmclip.resolve_precision("auto", "cpu") == expected
    model = rsmclip.load(tiny_weights, precision="auto")[0]
    assert model.precision == expected
    floats = {p.dtype for p in model.parameters()}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if expected == "bf16":  # every weight held in bf16 (no cast per call)
        assert floats == {torch.bfloat16} and len(linears) == 2 * 4 * 2 + 3  # 4 per block, 2 blocks a tower
    else:  # every Linear of both towers quantized, attention projections included
        assert linears == [] and floats == {torch.float32}
        quantized = [m for m in model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
        assert len(quantized) == 2 * 4 * 2 + 3
    # on CUDA auto keeps the behaviour before precisions: fp32 weights, bf16 autocast in embed_*
    assert rsmclip.resolve_precision("auto", "cuda") == "amp" == rsmclip.CLIP(TINY).precision
    assert [rsmclip.resolve_precision(p, "cuda:1") for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    assert rsmclip.load(tiny_weights)[0].precision == "fp32"  # the library's default: the reference


def test_bf16_on_a_cpu_without_bf16_units_runs_after_a_one_line_note(tiny_weights, tmp_path, monkeypatch,
                                                                     capsys):
    (tmp_path / "t.txt").write_text("a river\n")
    args = ["embed", "--model", str(tiny_weights), "--texts", str(tmp_path / "t.txt"), "--out",
            str(tmp_path / "e.npz"), "--precision", "bf16"]
    for native in (True, False):
        monkeypatch.setattr(rsmclip, "native_bf16", lambda: native)
        with pytest.raises(SystemExit) as exit_:
            cli.run_cli(rsmclip_cli.app, args)
        err = capsys.readouterr().err
        notes = [line for line in err.splitlines() if line.startswith("note:")]
        assert exit_.value.code == 0 and (tmp_path / "e.npz").is_file(), err
        assert notes == ([] if native else [
            "note: this CPU does not multiply bf16 natively (no AMX or AVX-512 BF16): bf16 is emulated and "
            "slower than fp32 here; --precision auto picks the fast one"])
        (tmp_path / "e.npz").unlink()


# ----------------------------------------------------------------------------- equal results


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_manifest):
    """The tiny model trained here on the demo (CLIP loss, fp32; retrieval well above chance, so that a
    precision that reorders its rankings shows in mR), its demo test split, and fp32's embeddings of it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    given = {"data": [str(demo_manifest)], "tokenizer": str(demo_manifest.parent / "spm.model"),
             "out": str(out), "steps": STEPS, "distill_weight": 0.0, "batch_size": 32, "langs": "en",
             "workers": 0, "log_every": STEPS, "ckpt_every": STEPS, "precision": "fp32"}
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        torch.manual_seed(0)
        train.train(train.resolve_config("demo", None, given), ["train.py"])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    test = [r for r in load_manifest(demo_manifest) if r["split"] == "test"]
    split = ([demo_manifest.parent / r["image"] for r in test],
             [c for r in test for c in r["captions"]["en"]],
             torch.tensor([i for i, r in enumerate(test) for _ in r["captions"]["en"]]))
    return out / "model.safetensors", split, encode(out / "model.safetensors", "fp32", split)


STEPS = 120


def encode(weights, precision: str, split) -> tuple:
    """(image and caption embeddings, text->image top 10 of each caption, mR, chance mR) at a precision."""
    paths, captions, owner = split
    model, preprocess, tok = rsmclip.load(weights, precision=precision)
    images = rsmclip.embed_images(model, preprocess, paths, skip_unreadable=False)[0]
    texts = rsmclip.embed_texts(model, tok, captions)
    mr = ev.retrieval_metrics(images, texts, owner)["expected"]["mR"]
    chance = ev.chance_mR(torch.bincount(owner).tolist())
    return images, texts, (texts @ images.T).topk(10, dim=1).indices, mr, chance


# the issue's tolerances: mean cosine to fp32's embedding of the same input, and mR points
@pytest.mark.parametrize("precision, cosine", [("bf16", 0.999), ("int8", 0.99)])
def test_each_precision_is_within_its_tolerance_of_fp32_on_a_trained_tiny_model(trained, precision, cosine):
    weights, split, (images, texts, top10, mr, chance) = trained
    p_images, p_texts, p_top10, p_mr, _ = encode(weights, precision, split)
    assert mr > 2 * chance, (mr, chance)  # trained: its rankings mean something
    for a, b in ((images, p_images), (texts, p_texts)):
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        assert cos.mean() >= cosine and cos.min() >= 1 - 5 * (1 - cosine), (precision, cos.mean(), cos.min())
    assert abs(p_mr - mr) <= 0.5, (precision, mr, p_mr)
    overlap = (top10[:, :, None] == p_top10[:, None, :]).any(2).double().mean()  # text->image top 10 kept
    assert overlap >= 0.8, (precision, overlap)


# ----------------------------------------------------------------------------- bench/precision.py


def test_the_side_by_side_runs_every_variant_and_measures_memory_alone(tmp_path, capsys):
    """bench.precision speed --quick (the tiny preset): every variant timed, interleaved, its time as a
    share of both peers'; one variant's memory measured as its own process measures it."""
    from bench import precision

    precision.speed(preset="xlmr-b32", batch_size=64, captions=256, repeats=7, threads=0, memory=False,
                    compiled=False, sweep="", variants=",".join(precision.VARIANTS), quick=True, only=None,
                    out=tmp_path / "s.json")
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["preset"] == "tiny" and report["repeats"] == 2
    assert list(report["image"]) == list(precision.VARIANTS) == list(report["text"])
    for task in ("image", "text"):
        for row in report[task].values():
            assert len(row["seconds"]) == 2 and row["slowest"] <= row["per_s"] <= row["fastest"]
            assert {"time_vs_open_clip fp32", "time_vs_open_clip bf16 autocast"} <= row.keys()
        assert report[task]["open_clip fp32"]["time_vs_open_clip fp32"] == 1
    assert report["machine"]["affinity"] and "| rsmclip int8 | " in capsys.readouterr().out
    memory = precision.one_variant("rsmclip bf16", TINY, 8, 16)
    assert 0 < memory["resident_mib"] <= memory["peak_mib"]


def test_top10_overlap_and_a_process_peak_against_plain_references():
    from bench.precision import timed_process, top10_overlap

    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(30, 8, generator=g), torch.randn(12, 8, generator=g)
    assert top10_overlap(images, texts, images, texts) == 100
    shuffled = images[torch.randperm(30, generator=g)]  # other images: the overlap a loop counts
    expected = 100 * sum(len(set((t @ images.T).topk(10).indices.tolist())
                             & set((t @ shuffled.T).topk(10).indices.tolist())) for t in texts) / 120
    assert top10_overlap(images, texts, shuffled, texts) == pytest.approx(expected)
    small = timed_process([sys.executable, "-c", "pass"])
    large = timed_process([sys.executable, "-c", "x = b'1' * (300 * 2 ** 20)"])  # every page written
    assert large["peak_mib"] - small["peak_mib"] >= 290 and small["seconds"] > 0
