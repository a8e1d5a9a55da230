"""eval.py: recall against a naive per-query reference, zero-shot weights against open_clip, retrieval,
zero-shot and report end to end on tiny data, the no-argument demo, and the error paths."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from typer.testing import CliRunner

import eval as ev
import rsmclip
from data import demo, prepare
from openclip_oracle import paired_models

ROOT = Path(__file__).resolve().parents[1]
TINY = rsmclip.PRESETS["tiny"]


# ----------------------------------------------------------------------------- recall vs a naive reference


def naive_recall(image_feats, text_feats, owner, ks=(1, 5, 10)):
    """Per query: sort all candidates by score, a non-match before a match on equal scores; take the top K."""
    sims = (image_feats @ text_feats.T).tolist()
    n, m = len(image_feats), len(text_feats)
    i2t = {k: 0 for k in ks}
    for i in range(n):
        order = sorted(range(m), key=lambda j: (-sims[i][j], owner[j] == i))
        for k in ks:
            i2t[k] += any(owner[j] == i for j in order[:k])
    t2i = {k: 0 for k in ks}
    for j in range(m):
        order = sorted(range(n), key=lambda i: (-sims[i][j], i == owner[j]))
        for k in ks:
            t2i[k] += owner[j] in order[:k]
    out = {"i2t": {f"R@{k}": 100 * i2t[k] / n for k in ks}, "t2i": {f"R@{k}": 100 * t2i[k] / m for k in ks}}
    out["mR"] = (sum(out["i2t"].values()) + sum(out["t2i"].values())) / (2 * len(ks))
    return out


def assert_same(a, b):
    for d in ("i2t", "t2i"):
        for k in a[d]:
            assert a[d][k] == pytest.approx(b[d][k], abs=1e-9), (d, k)
    assert a["mR"] == pytest.approx(b["mR"], abs=1e-9)


@pytest.mark.parametrize("counts", ["five", "uneven"])
@pytest.mark.parametrize("chunk", [None, 7])
def test_recall_equals_naive_reference_on_random_embeddings(counts, chunk):
    g = torch.Generator().manual_seed(0)
    n = 40
    per_image = [5] * n if counts == "five" else torch.randint(1, 8, (n,), generator=g).tolist()
    owner = torch.tensor([i for i, c in enumerate(per_image) for _ in range(c)])
    images = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=-1)
    # captions near their image (so recalls are neither 0 nor 100), shuffled
    noise = 1.2 * torch.randn(len(owner), 16, generator=g)
    texts = torch.nn.functional.normalize(images[owner] + noise, dim=-1)
    perm = torch.randperm(len(owner), generator=g)
    texts, owner = texts[perm], owner[perm]
    ours = ev.retrieval_metrics(images, texts, owner, chunk=chunk)
    assert_same(ours, naive_recall(images, texts, owner.tolist()))
    assert 0 < ours["t2i"]["R@1"] < 100 and 0 < ours["i2t"]["R@10"] < 100


def test_ties_count_against_the_query():
    g = torch.Generator().manual_seed(1)
    owner = torch.tensor([i for i in range(12) for _ in range(3)])
    images = torch.randint(0, 3, (12, 4), generator=g).float()  # small integers: exact, frequent ties
    texts = torch.randint(0, 3, (36, 4), generator=g).float()
    ours = ev.retrieval_metrics(images, texts, owner, chunk=5)
    assert_same(ours, naive_recall(images, texts, owner.tolist()))
    flat = ev.retrieval_metrics(torch.ones(12, 4), torch.ones(36, 4), owner)  # a collapsed model
    assert flat["mR"] == 0.0


def test_chance_level_formula():
    assert ev.chance_mR([1] * 100) == pytest.approx((1 + 5 + 10) / 3)
    g = torch.Generator().manual_seed(2)
    n, m = 200, 1000
    owner = torch.arange(m) // 5
    random = [ev.retrieval_metrics(torch.randn(n, 32, generator=g), torch.randn(m, 32, generator=g),
                                   owner)["mR"] for _ in range(5)]
    assert abs(np.mean(random) - ev.chance_mR([5] * n)) < 0.6


# ----------------------------------------------------------------------------- zero-shot vs open_clip


@pytest.fixture(scope="module")
def models():
    return paired_models(TINY, seed=3)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_zeroshot_classifier_equals_openclip(models, spm_model, lang):
    ours, theirs = models
    tok = rsmclip.Tokenizer(spm_model)
    names = list(ev.load_classes("RSSCN7", lang).values())
    templates = ev.load_templates(lang)
    mine = ev.zeroshot_classifier(ours, tok, names, templates)
    ref = open_clip.zero_shot_classifier.build_zero_shot_classifier(
        theirs, tokenizer=lambda texts: tok(texts), classnames=names, templates=templates,
        num_classes_per_batch=3, device="cpu", use_tqdm=False)
    assert mine.shape == ref.shape == (TINY.embed_dim, 7)
    assert (mine - ref).abs().max() < 1e-4


def tiny_tree(root: Path, per_class=3):
    for c, label in enumerate(("zb_field", "za_beach", "zc_forest")):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            rng = np.random.default_rng([c, i])
            demo.render(demo.random_scene(rng), rng).save(root / label / f"{i}.png")
    classes = root.parent / "classes.json"
    classes.write_text(json.dumps({"zb_field": {"en": "field"}, "za_beach": {"en": "beach"},
                                   "zc_forest": {"en": "forest"}, "zz_unused": {"en": "unused"}}))
    return classes


def test_zeroshot_top1_equals_openclip_pipeline(models, spm_model, tmp_path):
    ours, theirs = models
    tok, pp = rsmclip.Tokenizer(spm_model), rsmclip.Preprocess(TINY.vision.image_size)
    classes = tiny_tree(tmp_path / "tree")
    res = ev.evaluate_zeroshot(ours, tok, pp, tmp_path / "tree", str(classes), "en", workers=0)
    assert res["labels"] == ["za_beach", "zb_field", "zc_forest"]  # sorted folder order
    assert res["classnames"] == ["beach", "field", "forest"]
    assert res["absent_classes"] == ["zz_unused"] and res["images"] == 9
    weights = open_clip.zero_shot_classifier.build_zero_shot_classifier(
        theirs, tokenizer=lambda t: tok(t), classnames=res["classnames"], templates=res["templates"],
        device="cpu", use_tqdm=False)
    files = sorted((tmp_path / "tree").rglob("*.png"), key=lambda p: (p.parent.name, p.name))
    with torch.no_grad():
        feats = theirs.encode_image(torch.stack([pp(f) for f in files]), normalize=True)
    target = torch.tensor([res["labels"].index(f.parent.name) for f in files])
    expected = 100 * ((100 * feats @ weights).argmax(1) == target).float().mean().item()
    assert res["top1"] == pytest.approx(expected)
    prepare.build_labels(tmp_path / "tree", tmp_path / "labels.jsonl")  # the same images as a labels.jsonl
    from_labels = ev.evaluate_zeroshot(ours, tok, pp, tmp_path / "labels.jsonl", str(classes), "en", workers=0)
    assert from_labels["top1"] == res["top1"] and from_labels["classnames"] == res["classnames"]


def test_zeroshot_errors(models, spm_model, tmp_path):
    ours, _ = models
    tok, pp = rsmclip.Tokenizer(spm_model), rsmclip.Preprocess(TINY.vision.image_size)
    tiny_tree(tmp_path / "tree")
    with pytest.raises(ev.EvalError, match="labels za_beach, zb_field, zc_forest are not in --classes"):
        ev.evaluate_zeroshot(ours, tok, pp, tmp_path / "tree", "RSSCN7", "en", workers=0)
    with pytest.raises(ev.EvalError, match="neither a file nor a known dataset"):
        ev.load_classes("NoSuchSet", "en")
    with pytest.raises(ev.EvalError, match="no 'xx' templates"):
        ev.load_templates("xx")


# ----------------------------------------------------------------------------- retrieval end to end


@pytest.fixture
def small_manifest(tmp_path):
    """Six test images with en/pt captions, two records sharing one image file, one train record."""
    folder = tmp_path / "ds"
    (folder / "images").mkdir(parents=True)
    records = []
    for i in range(7):
        rng = np.random.default_rng([5, i])
        scene = demo.random_scene(rng)
        demo.render(scene, rng).save(folder / "images" / f"{i}.png")
        caps = {lang: demo.captions(scene, lang)[: 2 + i % 3] for lang in ("en", "pt")}
        records.append({"id": f"s/{i}", "image": f"images/{min(i, 5)}.png", "split": "test" if i else "train",
                        "dataset": "s", "captions": caps})
    prepare.write_jsonl(records, folder / "captions.jsonl")
    return folder / "captions.jsonl"


class CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.images = model, model.config, 0

    def encode_image(self, pixels, normalize=False):
        self.images += len(pixels)
        return self.model.encode_image(pixels, normalize)

    def encode_text(self, ids, normalize=False):
        return self.model.encode_text(ids, normalize)


def test_evaluate_retrieval_encodes_each_image_once_and_matches_metrics(models, spm_model, small_manifest):
    ours, _ = models
    tok, pp = rsmclip.Tokenizer(spm_model), rsmclip.Preprocess(TINY.vision.image_size)
    counting = CountingModel(ours).train()  # as train.py hands it over: dropout must be off while evaluating
    res = ev.evaluate_retrieval(counting, tok, pp, small_manifest, "test", batch_size=4, workers=0)
    assert counting.images == 5  # 6 test records, two share one file
    assert counting.training and ours.training
    ours.eval()
    assert list(res) == ["en", "pt", "mean"]
    records = [r for r in prepare.load_manifest(small_manifest) if r["split"] == "test"]
    with torch.no_grad():
        pixels = torch.stack([pp(small_manifest.parent / r["image"]) for r in records])
        images = ours.encode_image(pixels, normalize=True)
        for lang in ("en", "pt"):
            texts = [c for r in records for c in r["captions"][lang]]
            owner = torch.tensor([i for i, r in enumerate(records) for _ in r["captions"][lang]])
            ref = naive_recall(images, ours.encode_text(tok(texts), True), owner.tolist())
            assert_same(res[lang], ref)
            assert res[lang]["images"] == 6 and res[lang]["captions"] == len(texts)
    assert res["mean"]["mR"] == pytest.approx((res["en"]["mR"] + res["pt"]["mR"]) / 2)


def test_evaluate_retrieval_errors(models, spm_model, small_manifest):
    ours, _ = models
    tok, pp = rsmclip.Tokenizer(spm_model), rsmclip.Preprocess(TINY.vision.image_size)
    run = lambda **kw: ev.evaluate_retrieval(ours, tok, pp, small_manifest, workers=0, **kw)  # noqa: E731
    with pytest.raises(ev.EvalError, match=r"no 'val' images \(splits there: test, train\)"):
        run(split="val")
    with pytest.raises(ev.EvalError, match=r"6 test images have no 'ko' captions.*available: en, pt"):
        run(langs=["ko"])
    (small_manifest.parent / "images" / "3.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ev.EvalError, match=r"1 images cannot be read: .*3\.png"):
        run()
    (small_manifest.parent / "images" / "3.png").unlink()
    with pytest.raises(ev.EvalError, match=r"1 of 5 images are missing: .*3\.png"):
        run()


# ----------------------------------------------------------------------------- command lines


@pytest.fixture
def weights(tmp_path, spm_model):
    """Two random tiny checkpoints with their tokenizer next to them."""
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"tiny{seed}.safetensors"
        rsmclip.save(rsmclip.CLIP(TINY), path)
        paths.append(path)
    shutil.copy(spm_model, tmp_path / TINY.tokenizer)
    return paths


def test_retrieval_and_zeroshot_cli_write_the_documented_json(weights, small_manifest, tmp_path):
    runner = CliRunner()
    out = tmp_path / "r.json"
    result = runner.invoke(ev.app, ["retrieval", "--model", str(weights[0]), "--data", str(small_manifest),
                                    "--langs", "pt", "--out", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "Retrieval protocol" in result.output
    doc = json.loads(out.read_text())
    assert set(doc) == {"pt", "_meta"} and "mR" in doc["pt"]
    assert set(doc["pt"]["i2t"]) == set(doc["pt"]["t2i"]) == {"R@1", "R@5", "R@10"}
    classes = tiny_tree(tmp_path / "tree")
    result = runner.invoke(ev.app, ["zeroshot", "--model", str(weights[0]), "--data", str(tmp_path / "tree"),
                                    "--classes", str(classes), "--lang", "en", "--out", str(out),
                                    "--workers", "0"])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["classnames"] == ["beach", "field", "forest"] and doc["templates"] == ev.load_templates("en")
    assert 0 <= doc["top1"] <= 100 and "note: 1 classes" in result.output


def test_report_shows_models_and_peers_side_by_side(weights, small_manifest, tmp_path):
    classes = tiny_tree(tmp_path / "tree")
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"name": "tiny suite", "tasks": [
        {"name": "small", "task": "retrieval", "data": str(small_manifest.relative_to(tmp_path)),
         "langs": ["en", "pt"], "peers": {"PaperNet": {"en": 12.5}}},
        {"name": "tree", "task": "zeroshot", "data": "tree", "classes": str(classes), "langs": ["en"],
         "templates": {"en": ["{} from above."]}, "peers": {"PaperNet": {"en": 50.0}, "Other": {"en": 40.0}}}]}))
    report = ev.run_suite(suite, weights, None, 8, "cpu", 0)
    assert [(r["name"], r["lang"], r["metric"]) for r in report["rows"]] == [
        ("small", "en", "mR"), ("small", "pt", "mR"), ("small", "mean", "mR"), ("tree", "en", "top1")]
    assert report["details"]["tiny1"]["tree"]["en"]["templates"] == ["{} from above."]
    assert report["rows"][0]["peers"] == {"PaperNet": 12.5}
    assert set(report["rows"][0]["values"]) == {"tiny0", "tiny1"}
    md = ev.report_markdown(report)
    assert "| task | dataset | lang | metric | tiny0 | tiny1 | PaperNet (reported) | Other (reported) |" in md
    assert "| zeroshot | tree | en | top1 |" in md and "| 50.00 | 40.00 |" in md
    assert ev.RETRIEVAL_PROTOCOL in md and ev.ZEROSHOT_PROTOCOL in md
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tasks": [{"name": "x", "task": "captioning", "data": "y"}]}))
    with pytest.raises(ev.EvalError, match=r"tasks \[0\] need"):
        ev.run_suite(bad, weights, None, 8, "cpu", 0)


def test_cli_errors_are_one_message(tmp_path):
    run = subprocess.run([sys.executable, "eval.py", "retrieval", "--model",
                          str(tmp_path / "none.safetensors"), "--data", "x.jsonl"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip() == f"error: {tmp_path / 'none.safetensors'}: no such weights file"


def test_eval_without_arguments_prints_a_chance_level_demo_table():
    run = subprocess.run([sys.executable, "eval.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "untrained tiny model (seed 0)" in run.stdout and "Retrieval protocol" in run.stdout
    for lang in rsmclip.LANGS + ("mean",):
        assert f"│ {lang:<4} │" in run.stdout
    line = next(s for s in run.stdout.splitlines() if s.startswith("mean mR "))
    measured, chance = float(line.split()[2]), float(line.split("random ranking: ")[1].split(")")[0])
    assert 0.5 * chance < measured < 2 * chance  # untrained: near chance (about 2.65 here)
