"""eval.py: tie-aware recall against brute force over every order of tied items, a peers'-style argsort
loop and a naive per-query loop; zero-shot weights against open_clip's `build_zero_shot_classifier`
(zero_shot_classifier.py); the linear probe against scikit-learn's `LogisticRegression`; retrieval,
zero-shot, linear probe and report end to end on tiny data, the no-argument demo, and the error paths."""
import dataclasses
import itertools
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

import eval as ev
import rsmclip
from bench.openclip_oracle import paired_models
from data import demo, prepare
from data.manifest import LANGS, load_manifest, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
TINY = rsmclip.PRESETS["tiny"]


# ----------------------------------------------------------------------------- recall vs naive references


def naive_recall(image_feats, text_feats, owner, ks=(1, 5, 10), ties="against"):
    """Per query: sort all candidates by score, a non-match before a match on equal scores ("against") or
    after it ("favour"); take the top K."""
    sims = (image_feats @ text_feats.T).tolist()
    n, m = len(image_feats), len(text_feats)
    last = ties == "against"
    i2t = {k: 0 for k in ks}
    for i in range(n):
        order = sorted(range(m), key=lambda j: (-sims[i][j], (owner[j] == i) == last))
        for k in ks:
            i2t[k] += any(owner[j] == i for j in order[:k])
    t2i = {k: 0 for k in ks}
    for j in range(m):
        order = sorted(range(n), key=lambda i: (-sims[i][j], (i == owner[j]) == last))
        for k in ks:
            t2i[k] += owner[j] in order[:k]
    return as_recall({k: 100 * i2t[k] / n for k in ks}, {k: 100 * t2i[k] / m for k in ks})


def as_recall(i2t: dict, t2i: dict) -> dict:
    out = {"i2t": {f"R@{k}": v for k, v in i2t.items()}, "t2i": {f"R@{k}": v for k, v in t2i.items()}}
    out["mR"] = (sum(out["i2t"].values()) + sum(out["t2i"].values())) / (2 * len(i2t))
    return out


def assert_same(a, b, tol=1e-9):
    for d in ("i2t", "t2i"):
        for k in a[d]:
            assert a[d][k] == pytest.approx(b[d][k], abs=tol), (d, k)
    assert a["mR"] == pytest.approx(b["mR"], abs=tol)


def near_captions(n, per_image, seed, dim=16):
    g = torch.Generator().manual_seed(seed)
    owner = torch.tensor([i for i, c in enumerate(per_image) for _ in range(c)])
    images = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    # captions near their image: recall neither 0 nor 100
    noise = 1.2 * torch.randn(len(owner), dim, generator=g)
    texts = torch.nn.functional.normalize(images[owner] + noise, dim=-1)
    perm = torch.randperm(len(owner), generator=g)
    return images, texts[perm], owner[perm]


@pytest.mark.parametrize("counts", ["five", "uneven"])
@pytest.mark.parametrize("chunk", [None, 7])
def test_untied_recall_is_the_same_under_every_rule_and_equals_the_naive_loop(counts, chunk):
    n = 40
    g = torch.Generator().manual_seed(0)
    per_image = [5] * n if counts == "five" else torch.randint(1, 8, (n,), generator=g).tolist()
    images, texts, owner = near_captions(n, per_image, seed=1)
    ours = ev.retrieval_metrics(images, texts, owner, chunk=chunk)
    ref = naive_recall(images, texts, owner.tolist())
    for rule in ev.TIE_RULES:
        assert_same(ours[rule], ref)
    assert ours["tied_queries"] == {"i2t": 0, "t2i": 0}
    assert 0 < ours["expected"]["t2i"]["R@1"] < 100 and 0 < ours["expected"]["i2t"]["R@10"] < 100


def brute_force_recall(image_feats, text_feats, owner, ks=(1, 5, 10)):
    """The mean hit rate over every order of the candidates that sorts them by score: every permutation
    within each group of equal scores, enumerated."""
    def mean_hits(scores, right):
        groups = {}
        for c, s in enumerate(scores):
            groups.setdefault(s, []).append(c)
        blocks = [list(itertools.permutations(groups[s])) for s in sorted(groups, reverse=True)]
        hits, total = {k: 0 for k in ks}, 0
        for choice in itertools.product(*blocks):
            order = [c for block in choice for c in block]
            total += 1
            for k in ks:
                hits[k] += any(c in right for c in order[:k])
        return {k: hits[k] / total for k in ks}

    sims = (image_feats @ text_feats.T).tolist()
    n, m = len(image_feats), len(text_feats)
    i2t = [mean_hits(sims[i], {j for j in range(m) if owner[j] == i}) for i in range(n)]
    t2i = [mean_hits([sims[i][j] for i in range(n)], {owner[j]}) for j in range(m)]
    return as_recall({k: 100 * sum(h[k] for h in i2t) / n for k in ks},
                     {k: 100 * sum(h[k] for h in t2i) / m for k in ks})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_recall_equals_the_mean_over_every_tie_breaking(seed):
    """Hand-sized cases with exact ties both ways: small integer vectors, repeated captions, one image
    appearing twice, and uneven caption counts (image 2 has one caption, image 0 three)."""
    g = torch.Generator().manual_seed(seed)
    owner = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])
    images = torch.randint(0, 2, (4, 2), generator=g).float()
    images[3] = images[1]  # the same image file twice: its two rows must tie
    texts = torch.randint(0, 3, (8, 2), generator=g).float()
    texts[4] = texts[6]  # one caption shared by two images
    ours = ev.retrieval_metrics(images, texts, owner, chunk=3)
    assert_same(ours["expected"], brute_force_recall(images, texts, owner.tolist()))
    assert_same(ours["against"], naive_recall(images, texts, owner.tolist(), ties="against"))
    assert_same(ours["favour"], naive_recall(images, texts, owner.tolist(), ties="favour"))
    assert ours["tied_queries"]["i2t"] > 0 and ours["tied_queries"]["t2i"] > 0


def test_expected_recall_equals_a_peers_argsort_loop_on_average():
    """The peers' loop (sort by score, ties in whatever order the candidates come) averaged over random
    candidate orders converges to the expected recall; the bounds enclose it."""
    g = torch.Generator().manual_seed(4)
    n, per = 60, 5
    owner = torch.arange(n * per) // per
    images = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1)
    images[n // 2:] = images[:n // 2]  # every image twice: text->image ties too
    pool = torch.nn.functional.normalize(torch.randn(25, 8, generator=g), dim=-1)  # 25 distinct captions
    texts = pool[(owner % 25 + torch.randint(0, 3, (n * per,), generator=g)) % 25]
    ours = ev.retrieval_metrics(images, texts, owner)
    sims = images @ texts.T
    draws, hits = 300, {d: {k: [] for k in ev.KS} for d in ("i2t", "t2i")}
    for _ in range(draws):
        perm_t, perm_i = torch.randperm(n * per, generator=g), torch.randperm(n, generator=g)
        order_t = perm_t[torch.argsort(-sims[:, perm_t], dim=1, stable=True)]  # [n, m] caption columns
        order_i = perm_i[torch.argsort(-sims.T[:, perm_i], dim=1, stable=True)]  # [m, n] image rows
        first_t = (owner[order_t] == torch.arange(n)[:, None]).int().argmax(1)
        first_i = (order_i == owner[:, None]).int().argmax(1)
        for k in ev.KS:
            hits["i2t"][k].append(100 * (first_t < k).double().mean().item())
            hits["t2i"][k].append(100 * (first_i < k).double().mean().item())
    for d in ("i2t", "t2i"):
        for k in ev.KS:
            runs = torch.tensor(hits[d][k], dtype=torch.float64)
            error = 4 * runs.std().item() / draws ** 0.5 + 1e-9
            assert abs(runs.mean().item() - ours["expected"][d][f"R@{k}"]) <= error, (d, k)
            assert (ours["against"][d][f"R@{k}"] <= ours["expected"][d][f"R@{k}"]
                    <= ours["favour"][d][f"R@{k}"])
    assert ours["favour"]["mR"] - ours["against"]["mR"] > 5  # a case where the rule matters


def test_a_collapsed_model_scores_chance_not_zero_or_hundred():
    owner = torch.tensor([i for i in range(12) for _ in range(3)])
    flat = ev.retrieval_metrics(torch.ones(12, 4), torch.ones(36, 4), owner)
    assert flat["against"]["mR"] == 0.0 and flat["favour"]["mR"] == 100.0
    assert flat["expected"]["mR"] == pytest.approx(ev.chance_mR([3] * 12))  # every order equally likely


def test_chance_level_formula():
    assert ev.chance_mR([1] * 100) == pytest.approx((1 + 5 + 10) / 3)
    # fewer captions than K
    assert ev.chance_mR([5]) == 100.0 and ev.chance_mR([2, 1]) == pytest.approx(100 * 5 / 6)
    g = torch.Generator().manual_seed(2)
    n, m = 200, 1000
    owner = torch.arange(m) // 5
    random = [ev.retrieval_metrics(torch.randn(n, 32, generator=g), torch.randn(m, 32, generator=g),
                                   owner)["expected"]["mR"] for _ in range(5)]
    assert abs(np.mean(random) - ev.chance_mR([5] * n)) < 0.6


def test_each_distinct_caption_is_encoded_once_and_identical_ones_are_bit_identical(spm_model):
    torch.manual_seed(5)
    model = rsmclip.CLIP(TINY).eval()
    tok = rsmclip.Tokenizer(spm_model)
    texts = ["a red roof", "two planes near a runway", "a red roof", "green fields", "a  red roof ",
             "two planes near a runway", "a dense residential area with many houses and a road"]
    seen = []
    original = model.encode_text
    model.encode_text = lambda ids, normalize=False: seen.append(len(ids)) or original(ids, normalize)
    feats = rsmclip.embed_texts(model, tok, texts, batch_size=2)
    assert sum(seen) == 4  # "a  red roof " cleans to the same ids as "a red roof"
    for i, j in ((0, 2), (0, 4), (1, 5)):
        assert torch.equal(feats[i], feats[j])
    with torch.no_grad():
        alone = torch.cat([F.normalize(original(tok([t])), dim=-1) for t in texts])
    assert (feats - alone).abs().max() < 1e-5
    assert rsmclip.embed_texts(model, tok, []).shape == (0, TINY.embed_dim)


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
    from_labels = ev.evaluate_zeroshot(ours, tok, pp, tmp_path / "labels.jsonl", str(classes), "en",
                                       workers=0)
    assert from_labels["top1"] == res["top1"] and from_labels["classnames"] == res["classnames"]


def test_zeroshot_result_holds_chance_per_class_confusion_and_predictions(models, spm_model, tmp_path):
    """On 3 unbalanced classes: the confusion matrix counts every image once, its diagonal over its row sums
    is the per-class accuracy, which equals a naive loop over the score matrix computed here; each image's
    prediction is that matrix's argmax and its top classes are the matrix row in order, with softmax
    probabilities."""
    ours, _ = models
    tok, pp = rsmclip.Tokenizer(spm_model), rsmclip.Preprocess(TINY.vision.image_size)
    classes = tiny_tree(tmp_path / "tree", per_class=4)
    (tmp_path / "tree/zc_forest/0.png").unlink()
    res = ev.evaluate_zeroshot(ours, tok, pp, tmp_path / "tree", str(classes), "en", workers=0)
    labels = res["labels"]
    assert res["chance"] == pytest.approx(100 / 3) and res["images"] == 11
    assert res["confusion"]["labels"] == labels and res["confusion"]["classnames"] == res["classnames"]
    matrix = np.array(res["confusion"]["matrix"])
    assert matrix.shape == (3, 3) and matrix.sum() == 11 and list(matrix.sum(1)) == [4, 4, 3]
    assert list(res["per_class"]) == labels
    assert res["top1"] == pytest.approx(100 * np.trace(matrix) / 11)
    files = [Path(p["path"]) for p in res["predictions"]]
    assert sorted(files) == sorted((tmp_path / "tree").rglob("*.png"))
    assert [p["true"] for p in res["predictions"]] == [f.parent.name for f in files]
    scores = ev.encode_images(ours, pp, files, workers=0) @ ev.zeroshot_classifier(
        ours, tok, res["classnames"], res["templates"])
    for c, label in enumerate(labels):
        rows = [i for i, f in enumerate(files) if f.parent.name == label]
        right = sum(1 for i in rows if int(scores[i].argmax()) == c)
        per_class = res["per_class"][label]
        assert per_class["images"] == len(rows) == matrix[c].sum()
        assert per_class["top1"] == pytest.approx(100 * right / len(rows)) == 100 * matrix[c, c] / len(rows)
        assert per_class["classname"] == res["classnames"][c]
    for p, row in zip(res["predictions"], scores):
        assert p["predicted"] == labels[int(row.argmax())] == p["top"][0][0]
        assert [label for label, _ in p["top"]] == [labels[int(i)] for i in row.argsort(descending=True)]
        expected = sorted((100 * row).softmax(0).tolist(), reverse=True)
        assert [q for _, q in p["top"]] == pytest.approx(expected, abs=1e-6)


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
    write_jsonl(records, folder / "captions.jsonl")
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
    records = [r for r in load_manifest(small_manifest) if r["split"] == "test"]
    with torch.no_grad():
        files = sorted({r["image"] for r in records})
        unique = ours.encode_image(torch.stack([pp(small_manifest.parent / f) for f in files]),
                                   normalize=True)
        images = unique[[files.index(r["image"]) for r in records]]  # the shared file: identical rows
        for lang in ("en", "pt"):
            texts = [c for r in records for c in r["captions"][lang]]
            owner = torch.tensor([i for i, r in enumerate(records) for _ in r["captions"][lang]])
            feats = torch.cat([ours.encode_text(tok([t]), True) for t in texts])
            assert res[lang]["ties"] == "expected" and res[lang]["tied_queries"]["t2i"] > 0
            assert_same(res[lang], res[lang]["by_tie_rule"]["expected"])
            assert_same(res[lang], brute_force_recall(images, feats, owner.tolist()), tol=1e-4)
            for rule in ("against", "favour"):
                assert_same(res[lang]["by_tie_rule"][rule],
                            naive_recall(images, feats, owner.tolist(), ties=rule), tol=1e-4)
            assert res[lang]["images"] == 6 and res[lang]["captions"] == len(texts)
            assert res[lang]["distinct_captions"] == len(set(texts))
    assert res["mean"]["mR"] == pytest.approx((res["en"]["mR"] + res["pt"]["mR"]) / 2)
    against = ev.evaluate_retrieval(ours, tok, pp, small_manifest, "test", workers=0, ties="against")
    assert against["en"]["mR"] == res["en"]["by_tie_rule"]["against"]["mR"] <= res["en"]["mR"]


@pytest.mark.parametrize("langs", [["en"], ["zh", "ru"]])
def test_recall_is_the_same_at_every_batch_size_on_the_demo_test_split(demo_manifest, langs):
    """A caption's embedding depends on the caption alone; train.py validates with batch 128 and eval.py
    defaults to 64, so both give the same table."""
    torch.manual_seed(6)
    model = rsmclip.CLIP(TINY).eval()
    tok = rsmclip.Tokenizer(demo_manifest.parent / TINY.tokenizer)
    pp = rsmclip.Preprocess(TINY.vision.image_size)
    results = [ev.evaluate_retrieval(model, tok, pp, demo_manifest, "test", langs, batch_size=b, workers=0)
               for b in (1, 7, 64, 128, 256)]
    for other in results[1:]:
        for lang in langs:
            for rule in ev.TIE_RULES:
                assert other[lang]["by_tie_rule"][rule] == results[0][lang]["by_tie_rule"][rule]


def test_a_one_image_split_gives_a_table(models, spm_model, small_manifest):
    ours, _ = models
    tok, pp = rsmclip.Tokenizer(spm_model), rsmclip.Preprocess(TINY.vision.image_size)
    # 1 image, 2 captions
    res = ev.evaluate_retrieval(ours, tok, pp, small_manifest, "train", ["en"], workers=0)
    assert res["en"]["images"] == 1 and res["en"]["chance_mR"] == 100.0 and res["en"]["mR"] == 100.0
    ev.retrieval_table(res, "one image")


@pytest.mark.skipif(not (SHARED / "ucm_captions_sample").is_dir(), reason="../shared/datasets absent")
def test_the_real_ucm_sample_test_split_of_one_image_is_evaluated(models, spm_model, tmp_path):
    src = SHARED / "ucm_captions_sample"
    shutil.copytree(src / "images", tmp_path / "images")
    prepare.build_captions(src / "dataset_ucm.json", tmp_path / "images", tmp_path / "captions.jsonl", "ucm")
    ours, _ = models
    tok, pp = rsmclip.Tokenizer(spm_model), rsmclip.Preprocess(TINY.vision.image_size)
    res = ev.evaluate_retrieval(ours, tok, pp, tmp_path / "captions.jsonl", "test", workers=0)
    assert list(res) == ["en"] and res["en"]["images"] == 1 and res["en"]["captions"] == 5
    assert res["en"]["mR"] == res["en"]["chance_mR"] == 100.0


def test_evaluate_retrieval_errors(models, spm_model, small_manifest):
    ours, _ = models
    tok, pp = rsmclip.Tokenizer(spm_model), rsmclip.Preprocess(TINY.vision.image_size)
    run = lambda **kw: ev.evaluate_retrieval(ours, tok, pp, small_manifest, workers=0, **kw)  # noqa: E731
    with pytest.raises(ev.EvalError, match=r"no 'val' images \(splits there: test, train\)"):
        run(split="val")
    with pytest.raises(ev.EvalError, match=r"6 test images have no 'ko' captions.*available: en, pt"):
        run(langs=["ko"])
    (small_manifest.parent / "images" / "3.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(rsmclip.ImageError, match=r"1 images cannot be read: .*3\.png"):
        run()
    (small_manifest.parent / "images" / "3.png").unlink()
    with pytest.raises(rsmclip.ImageError, match=r"1 of 5 images are missing: .*3\.png"):
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
    assert {"chance", "per_class", "confusion", "predictions"} <= set(doc) and len(doc["predictions"]) == 9
    assert "chance %" in result.output and f"{100 / 3:.2f}" in result.output  # beside the accuracy


def test_report_shows_models_and_peers_side_by_side(weights, small_manifest, tmp_path):
    classes = tiny_tree(tmp_path / "tree")
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"name": "tiny suite", "tasks": [
        {"name": "small", "task": "retrieval", "data": str(small_manifest.relative_to(tmp_path)),
         "langs": ["en", "pt"], "peers": {"PaperNet": {"en": 12.5}}},
        {"name": "tree", "task": "zeroshot", "data": "tree", "classes": str(classes), "langs": ["en"],
         "templates": {"en": ["{} from above."]},
         "peers": {"PaperNet": {"en": 50.0}, "Other": {"en": 40.0}}}]}))
    report = ev.run_suite(suite, weights, None, 8, "cpu", 0)
    assert [(r["name"], r["lang"], r["metric"]) for r in report["rows"]] == [
        ("small", "en", "mR"), ("small", "pt", "mR"), ("small", "mean", "mR"), ("tree", "en", "top1")]
    assert report["details"]["tiny1"]["tree"]["en"]["templates"] == ["{} from above."]
    assert report["rows"][0]["peers"] == {"PaperNet": 12.5}
    assert set(report["rows"][0]["values"]) == {"tiny0", "tiny1"}
    md = ev.report_markdown(report)
    assert ("| task | dataset | lang or setting | metric | tiny0 | tiny1 | PaperNet (reported) | "
            "Other (reported) |" in md)
    assert "| zeroshot | tree | en | top1 |" in md and "| 50.00 | 40.00 |" in md
    assert ev.retrieval_protocol() in md and ev.ZEROSHOT_PROTOCOL in md and ev.LINEAR_PROBE_PROTOCOL not in md
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tasks": [{"name": "x", "task": "captioning", "data": "y"}]}))
    with pytest.raises(ev.EvalError, match=r"tasks\[0\]\.task: \"captioning\" is not one of \"retrieval\""):
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
    for lang in LANGS + ("mean",):
        assert f"│ {lang:<4} │" in run.stdout
    line = next(s for s in run.stdout.splitlines() if s.startswith("mean mR "))
    measured, chance = float(line.split()[2]), float(line.split("random ranking: ")[1].split(")")[0])
    assert 0.5 * chance < measured < 2 * chance  # untrained: near chance (about 2.65 here)


# ----------------------------------------------------------------------------- linear probe


class ColourModel(torch.nn.Module):
    """Image features = the mean colour plus noise: separable when each class has its own colour."""
    config = dataclasses.replace(TINY, embed_dim=3)  # the width of its features, which caches check

    def encode_image(self, pixels, normalize=False):
        g = torch.Generator().manual_seed(int(pixels.sum() * 1000) % 2 ** 31)
        return pixels.mean((2, 3)) + 0.05 * torch.randn(len(pixels), 3, generator=g)


def colour_tree(root: Path, per_class=8, classes=("red", "green", "blue")):
    for c, label in enumerate(classes):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            colour = [40 + 3 * i] * 3
            colour[c % 3] = 220
            Image.new("RGB", (16, 16), tuple(colour)).save(root / label / f"{i}.png")
    return root


def test_linear_probe_on_separable_features_is_perfect(tmp_path):
    root = colour_tree(tmp_path / "tree")
    pp = rsmclip.Preprocess(16)
    res = ev.evaluate_linear_probe(ColourModel(), pp, root, shots=(1, 3), seeds=3, workers=0)
    assert res["full"]["top1"] == 100.0 and res["chance"] == pytest.approx(100 / 3)
    assert all(r["mean"] == 100.0 and r["std"] == 0.0 and len(r["runs"]) == 3 for r in res["shots"].values())
    assert res["images"] == {"fit": 9, "val": 3, "test": 12} and res["test_fraction"] == 0.5
    assert res["classes"] == ["blue", "green", "red"]


@pytest.fixture(scope="module")
def rsscn7_features():
    """Frozen features of the 70 real RSSCN7 sample images from a seeded tiny model."""
    torch.manual_seed(7)
    model = rsmclip.CLIP(TINY).eval()
    items = ev.classification_items(SHARED / "rsscn7_sample")
    feats = ev.encode_images(model, rsmclip.Preprocess(TINY.vision.image_size), [p for p, _, _ in items],
                             workers=0)
    names = sorted({label for _, label, _ in items})
    return feats, torch.tensor([names.index(label) for _, label, _ in items]), items


@pytest.mark.skipif(not (SHARED / "rsscn7_sample").is_dir(), reason="../shared/datasets absent")
@pytest.mark.parametrize("lam", [1e-1, 1e-3, 1e-5])
def test_logistic_regression_equals_scikit_learn_on_real_features(rsscn7_features, lam):
    from sklearn.linear_model import LogisticRegression  # the oracle: a test-only dependency

    feats, y, items = rsscn7_features
    part = ev.probe_splits(items, y.tolist(), 0.5)
    train = part["fit"] + part["val"]
    ours = ev.fit_logistic(feats[train], y[train], 7, lam)
    theirs = LogisticRegression(C=1 / (lam * len(train)), max_iter=20000, tol=1e-10).fit(
        feats[train].double().numpy(), y[train].numpy())
    test = part["test"]
    mine = ev.accuracy(ours, feats[test], y[test])
    ref = 100 * (theirs.predict(feats[test].double().numpy()) == y[test].numpy()).mean()
    assert abs(mine - ref) <= 100 / len(test) + 1e-9  # within one test image
    assert 100 / 7 < mine  # the real features carry signal even from a random model
    logits = (feats[test].double() @ ours[0] + ours[1]).numpy()
    ref_logits = theirs.decision_function(feats[test].double().numpy())
    centred = lambda a: a - a.mean(1, keepdims=True)  # noqa: E731 (softmax logits are shift-invariant)
    assert np.abs(centred(logits) - centred(ref_logits)).max() < 2e-2 * max(1, np.abs(ref_logits).max())


def test_k_shot_draws_are_seeded_and_never_take_validation_or_test_images(tmp_path):
    items = [(Path(f"{c}/{i}.png"), c, "all") for c in "abc" for i in range(20)]
    labels = [" abc".index(c) - 1 for _, c, _ in items]
    part = ev.probe_splits(items, labels, 0.5)
    assert part == ev.probe_splits(items, labels, 0.5)
    assert not set(part["fit"]) & set(part["val"]) and not set(part["fit"] + part["val"]) & set(part["test"])
    assert len(part["test"]) == 30 and len(part["val"]) == 6  # half of each class; 20% of the rest
    names = ["a", "b", "c"]
    draws = [ev.sample_shots(labels, part["fit"], 4, seed, names) for seed in range(5)]
    assert draws[0] == ev.sample_shots(labels, part["fit"], 4, 0, names)
    assert len({tuple(d) for d in draws}) == 5
    for d in draws:
        assert set(d) <= set(part["fit"]) and sorted(labels[i] for i in d) == [0] * 4 + [1] * 4 + [2] * 4
    with pytest.raises(ev.EvalError, match=r"5-shot: class 'a' has only 4 training images.*at most 4"):
        ev.sample_shots(labels, part["fit"][:4] + part["fit"][8:], 5, 0, names)


def write_labels(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl([{"image": i, "label": lab, "split": s} for i, lab, s in rows], path)
    return path


def test_linear_probe_errors_are_one_message_each(tmp_path):
    pp, model = rsmclip.Preprocess(16), ColourModel()
    probe = lambda data, **kw: ev.evaluate_linear_probe(model, pp, data, workers=0, **kw)  # noqa: E731
    root = colour_tree(tmp_path / "one", classes=("red",))
    with pytest.raises(ev.EvalError, match=r"1 class \(red\): a classifier needs at least 2"):
        probe(root)
    root = colour_tree(tmp_path / "tree", per_class=4)
    with pytest.raises(ev.EvalError, match=r"4-shot: class 'blue' has only 1 training images"):
        probe(root, shots=(4,))
    images = [f"tree/red/{i}.png" for i in range(4)] + [f"tree/blue/{i}.png" for i in range(4)]
    no_test = write_labels(tmp_path / "a.jsonl", [(p, p.split("/")[1], "train") for p in images[:6]]
                           + [(p, p.split("/")[1], "val") for p in images[6:]])
    with pytest.raises(ev.EvalError, match=r"splits train, val: a linear probe needs train and test splits"):
        probe(no_test)
    one_train = write_labels(tmp_path / "b.jsonl", [(images[0], "red", "train"), (images[4], "blue", "train")]
                             + [(p, p.split("/")[1], "test") for p in images[1:4] + images[5:]])
    with pytest.raises(ev.EvalError, match=r"has 1 image\(s\): a validation part of train needs at least 2"):
        probe(one_train)
    no_blue_test = write_labels(tmp_path / "c.jsonl", [(p, p.split("/")[1], "train") for p in images]
                                + [(images[0], "red", "test")])
    with pytest.raises(ev.EvalError, match=r"no test images of class blue"):
        probe(no_blue_test)


# ----------------------------------------------------------------------------- k-NN


def naive_knn(memory, memory_labels, queries, classes, k, temperature):
    """KNN_PROTOCOL one query at a time, in plain Python: neighbours by (-similarity, memory row), votes
    exp(similarity / T) per class, the first class of the largest sum."""
    out = []
    for q in queries:
        sims = [float(q.double() @ m.double()) for m in memory]
        nearest = sorted(range(len(memory)), key=lambda i: (-sims[i], i))[:k]
        votes = [0.0] * classes
        for i in nearest:
            votes[int(memory_labels[i])] += math.exp(sims[i] / temperature)
        out.append(max(range(classes), key=lambda c: (votes[c], -c)))
    return out


def test_knn_equals_a_naive_loop_with_ties_and_k_above_a_class():
    # hand-made unit features: equal similarities between memory rows, equal vote sums between classes
    e = torch.eye(3, dtype=torch.float64)
    memory = torch.stack([e[0], e[0], e[1], e[1], e[2], (e[0] + e[1]) / math.sqrt(2)])
    labels = torch.tensor([0, 1, 1, 0, 2, 2])
    queries = torch.stack([e[0], e[1], e[2], (e[0] + e[1]) / math.sqrt(2), (e[1] + e[2]) / math.sqrt(2)])
    for k in (1, 2, 3, 4, 6):  # k 3 and more: above the size of class 2 (and of every class from 4 on)
        for t in (0.07, 1.0, 1e3):
            got = ev.knn_predict(memory, labels, queries, 3, k, t, chunk=2).tolist()
            assert got == naive_knn(memory, labels, queries, 3, k, t), (k, t)
    # e0 ties between rows 0 (class 0) and 1 (class 1): with k 1 the earlier row decides; with k 2 the
    # two votes are equal and the first class wins
    assert ev.knn_predict(memory, labels, queries[:1], 3, 1).tolist() == [0]
    assert ev.knn_predict(memory, labels, queries[:1], 3, 2).tolist() == [0]
    g = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    labels = torch.randint(0, 4, (50,), generator=g)
    queries = F.normalize(torch.randn(23, 8, generator=g), dim=1)
    for k in (1, 5, 20, 50):
        assert ev.knn_predict(memory, labels, queries, 4, k, 0.07, chunk=7).tolist() == naive_knn(
            memory, labels, queries, 4, k, 0.07)


def stable_knn(memory, memory_labels, queries, classes, k, temperature):
    """KNN_PROTOCOL's vote computed another way: per class, the log-sum-exp of its neighbours' s / T (float64:
    finite for T >= 1e-300 when |s| <= 1); the largest wins, the first of equal ones."""
    sims = queries.double() @ memory.double().T
    top = torch.tensor([sorted(range(len(memory)), key=lambda i: (-float(row[i]), i))[:k] for row in sims])
    scaled = sims.gather(1, top) / temperature
    scores = torch.stack([torch.logsumexp(torch.where(memory_labels[top] == c, scaled, -math.inf), dim=1)
                          for c in range(classes)], dim=1)
    return scores.argmax(1).tolist()


def test_knn_vote_is_right_at_any_temperature():
    """exp(s / T) overflows to inf below T = 1/709 (every neighbour then weighs the same and the first class
    wins); the vote is in log space. Against a log-sum-exp reference at T = 1e-3 and 1e-300, and on a case
    made by hand, where the answer moves from five near neighbours to the one nearest as T falls."""
    e = torch.eye(3, dtype=torch.float64)
    near, five = 0.9 * e[0] + math.sqrt(1 - 0.81) * e[1], 0.899 * e[0] + math.sqrt(1 - 0.899 ** 2) * e[2]
    memory = torch.stack([near, *[five] * 5])
    for one, many in ((0, 1), (1, 0)):  # the one nearest in the first class, then in the second
        labels = torch.tensor([one] + [many] * 5)
        for t, winner in ((0.07, many), (1e-3, many), (1e-4, one), (1e-300, one), (5e-324, one)):
            assert ev.knn_predict(memory, labels, e[:1], 2, 6, t).tolist() == [winner], (one, t)
    g = torch.Generator().manual_seed(1)
    memory = F.normalize(torch.randn(60, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 3, (60,), generator=g)
    queries = F.normalize(torch.randn(40, 8, generator=g, dtype=torch.float64), dim=1)
    for t in (0.07, 1e-3, 1e-300):
        for k in (1, 5, 20):
            assert ev.knn_predict(memory, labels, queries, 3, k, t, chunk=9).tolist() == stable_knn(
                memory, labels, queries, 3, k, t), (t, k)
    nearest = ev.knn_predict(memory, labels, queries, 3, 1, 0.07).tolist()  # no two similarities are equal
    assert ev.knn_predict(memory, labels, queries, 3, 20, 5e-324).tolist() == nearest


def test_knn_on_separable_features_and_its_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("RSMCLIP_HOME", str(tmp_path / "home"))
    root = colour_tree(tmp_path / "tree", per_class=6)
    pp = rsmclip.Preprocess(16)
    res = ev.evaluate_knn(ColourModel(), pp, root, k=3, workers=0)
    assert res["top1"] == 100 and res["images"] == {"memory": 9, "test": 9} and res["chance"] == 100 / 3
    assert set(res["per_class"]) == {"blue", "green", "red"}
    with pytest.raises(ev.EvalError, match=r"--k 10: more neighbours than the 9 train images"):
        ev.evaluate_knn(ColourModel(), pp, root, k=10, workers=0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ev.EvalError, match=r"--temperature .*: a number in \(0, inf\)"):
            ev.evaluate_knn(ColourModel(), pp, root, temperature=bad, workers=0)
    with pytest.raises(ev.EvalError, match=r"1 class \(red\): a classifier needs at least 2"):
        ev.evaluate_knn(ColourModel(), pp, colour_tree(tmp_path / "one", classes=("red",)), workers=0)


def test_knn_shares_the_linear_probe_feature_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RSMCLIP_HOME", str(tmp_path / "home"))
    root = colour_tree(tmp_path / "tree")
    pp = rsmclip.Preprocess(16)
    ev.evaluate_linear_probe(ColourModel(), pp, root, (2,), 1, cache_key="w1", workers=0)
    monkeypatch.setattr(ev, "encode_images", lambda *a, **k: pytest.fail("encoded again"))
    assert ev.evaluate_knn(ColourModel(), pp, root, k=3, cache_key="w1", workers=0)["top1"] == 100


def test_linear_probe_features_are_cached_per_weights_and_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("RSMCLIP_HOME", str(tmp_path / "home"))
    root = colour_tree(tmp_path / "tree")
    pp = rsmclip.Preprocess(16)

    def probe(key):
        return ev.evaluate_linear_probe(ColourModel(), pp, root, (2,), 1, cache_key=key, workers=0)

    first = probe("w1")
    assert len(list((tmp_path / "home" / "features").iterdir())) == 1
    encoded = []
    monkeypatch.setattr(ev, "encode_images", lambda *a, **k: encoded.append(1) or torch.zeros(24, 3))
    assert probe("w1") == first
    assert not encoded
    probe("w2")  # other weights
    assert encoded == [1]


def test_linear_probe_cli_and_report_suite(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("RSMCLIP_HOME", str(tmp_path / "home"))
    colour_tree(tmp_path / "tree", per_class=6)
    out = tmp_path / "p.json"
    result = CliRunner().invoke(ev.app, ["linear-probe", "--model", str(weights[0]), "--data",
                                         str(tmp_path / "tree"), "--shots", "1,2", "--seeds", "2", "--out",
                                         str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "Linear-probe protocol" in result.output and "2 per class (2 seeds)" in result.output
    doc = json.loads(out.read_text())
    assert set(doc["shots"]) == {"1", "2"} and len(doc["shots"]["2"]["runs"]) == 2
    assert 0 <= doc["full"]["top1"] <= 100 and doc["_meta"]["protocol"] == ev.LINEAR_PROBE_PROTOCOL
    bad = CliRunner().invoke(ev.app, ["linear-probe", "--model", str(weights[0]), "--data", "x",
                                      "--shots", "a"])
    assert bad.exit_code == 1 and "--shots 'a'" in str(bad.exception)
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"name": "probe", "tasks": [
        {"name": "colours", "task": "linear-probe", "data": "tree", "shots": [2], "seeds": 1,
         "peers": {"PaperNet": {"full": 90.0}}}]}))
    report = ev.run_suite(suite, weights, None, 8, "cpu", 0)
    assert [(r["lang"], r["peers"]) for r in report["rows"]] == [("2-shot", {"PaperNet": None}),
                                                                 ("full", {"PaperNet": 90.0})]
    assert ev.LINEAR_PROBE_PROTOCOL in ev.report_markdown(report)
    suite.write_text(json.dumps({"name": "knn", "tasks": [
        {"name": "colours", "task": "knn", "data": "tree", "k": 3, "peers": {"PaperNet": {"k=3": 80.0}}}]}))
    report = ev.run_suite(suite, weights, None, 8, "cpu", 0)
    rows = [(r["lang"], r["metric"], r["peers"]) for r in report["rows"]]
    assert rows == [("k=3", "top1", {"PaperNet": 80.0})]
    assert ev.KNN_PROTOCOL in ev.report_markdown(report)
    result = CliRunner().invoke(ev.app, ["knn", "--model", str(weights[0]), "--data", str(tmp_path / "tree"),
                                         "--k", "3", "--out", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "k-NN protocol" in result.output and json.loads(out.read_text())["k"] == 3
    suite.write_text(json.dumps({"tasks": [{"name": "c", "task": "linear-probe", "data": "tree",
                                            "peers": {"PaperNet": {"full": "90"}}}]}))
    with pytest.raises(ev.EvalError, match=r"tasks\[0\]\.peers\.PaperNet\.full: \"90\" is not a number"):
        ev.run_suite(suite, weights, None, 8, "cpu", 0)
