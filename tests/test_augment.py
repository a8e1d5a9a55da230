"""The tensor augmentation (data/augment.py) against torchvision's functional ops (transforms/functional.py)
on single images, its crop against PIL's crop + bicubic resize, its parameters against the PIL path's and
torchvision's samplers (RandomResizedCrop.get_params, ColorJitter), and the decoded image cache
(data/prepare.py) against the files it was made from."""
import json
import math
import os
import pickle
import random
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms import functional as TF

import files
import rsmclip
import train
from data import augment, loading, prepare
from data.manifest import DataError, write_jsonl


def scene(size=(256, 256), seed=0) -> Image.Image:
    """A scene-like test image: smooth fields, sharp-edged blocks and fine noise."""
    rng = np.random.default_rng(seed)
    fields = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    a = np.asarray(fields).astype(np.int16)
    for _ in range(30):
        y, x, h, w = rng.integers(0, min(size) - 20, 4)
        a[y:y + h // 4 + 5, x:x + w // 4 + 5] = rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8))


def test_each_op_equals_torchvisions_functional_op():
    x = torch.rand(4, 3, 40, 50, generator=torch.Generator().manual_seed(0))
    x[0, :, :6, :6] = 0.5  # grey pixels: hue undefined, saturation 0
    x[1, 0] = x[1, 1]  # ties of the largest channel
    every = torch.ones(4, dtype=torch.bool)

    def stacked(planes):
        return torch.stack(planes, 1)

    for change, theirs, factors in ((0, TF.adjust_brightness, (0.6, 1.37)),
                                    (1, TF.adjust_contrast, (0.6, 1.4)),
                                    (2, TF.adjust_saturation, (0.8, 1.2))):
        for f in factors:
            expected = torch.stack([theirs(image, f) for image in x])
            got = stacked(augment.blend(x.unbind(1), torch.full((4,), change), torch.full((4,), f)))
            assert torch.allclose(got, expected, atol=1e-6), (theirs.__name__, f)
    for f in (-0.1, 0.03, 0.1, 0.5):
        expected = torch.stack([TF.adjust_hue(image, f) for image in x])
        assert torch.allclose(stacked(augment.hue(x.unbind(1), torch.full((4,), f))), expected, atol=1e-5), f
    assert torch.allclose(stacked(augment.grey(x.unbind(1), every)), TF.rgb_to_grayscale(x, 3), atol=1e-6)
    assert torch.equal(augment.solarize(x, every), TF.solarize(x, 128 / 255))
    for sigma in (0.1, 0.57, 1.3, 2.0):
        radius = augment.blur_radius(sigma)
        expected = TF.gaussian_blur(x, 2 * radius + 1, sigma)
        for taps in (radius, 6):  # a wider kernel than the sigma needs is cut at the sigma's own radius
            weights = augment.blur_weights(torch.full((12,), sigma), taps)
            got = augment.gaussian_blur(x.flatten(0, 1), weights).view(x.shape)
            assert torch.allclose(got, expected, atol=1e-6), (sigma, taps)
    # per-image factors: each image gets its own
    f = torch.tensor([0.7, 1.0, 1.3, 0.9])
    expected = torch.stack([TF.adjust_contrast(i, float(v)) for i, v in zip(x, f)])
    assert torch.allclose(stacked(augment.blend(x.unbind(1), torch.ones(4), f)), expected, atol=1e-6)
    sigma = torch.tensor([0.3, 1.0, 2.0, 0.6])
    expected = torch.stack([TF.gaussian_blur(i, 2 * augment.blur_radius(float(s)) + 1, float(s))
                            for i, s in zip(x, sigma)])
    got = augment.gaussian_blur(x.flatten(0, 1), augment.blur_weights(sigma, 6).repeat_interleave(3, 0))
    assert torch.allclose(got.view(x.shape), expected, atol=1e-6)
    # what a view did not draw leaves it exactly as it was
    none = torch.zeros(4, dtype=torch.bool)
    assert torch.equal(stacked(augment.blend(x.unbind(1), torch.full((4,), -1), torch.ones(4))), x)
    assert torch.equal(stacked(augment.hue(x.unbind(1), torch.zeros(4))), x)
    assert torch.equal(stacked(augment.grey(x.unbind(1), none)), x)
    assert torch.equal(augment.solarize(x, none), x)
    identity = augment.gaussian_blur(x.flatten(0, 1), augment.blur_weights(torch.zeros(12), 6))
    assert torch.equal(identity.view(x.shape), x)


def test_crop_equals_pils_crop_and_bicubic_resize_within_tolerance():
    """torch's 8-bit antialiased bicubic resize (CPUs) against PIL's crop + resize, for crop boxes drawn as in
    training: mean absolute error below 0.1 8-bit levels, below 0.35 for every crop, and under 0.5% of the
    pixels more than one level off (measured: 0.056, 0.28 and 0.04%; the far ones sit at sharp edges, where
    both clip the first pass's overshoot to 8 bits with differently rounded weights). A flipped crop is the
    crop, flipped."""
    image = scene()
    pixels = torch.from_numpy(np.array(image))[None]
    rng, errors = random.Random(0), []
    for i in range(40):
        size, scale = (224, (0.4, 1.0)) if i % 2 else (96, (0.05, 0.4))
        left, top, w, h = augment.crop_box(*image.size, scale, rng)
        expected = TF.pil_to_tensor(image.crop((left, top, left + w, top + h)).resize((size, size),
                                                                                      Image.BICUBIC))
        box = torch.tensor([[0.0, left, top, left + w, top + h]])
        got = augment.crop_each(pixels, box, torch.tensor([False]), size)[0]
        flipped = augment.crop_each(pixels, box, torch.tensor([True]), size)[0]
        assert got.dtype == torch.uint8 and torch.equal(flipped, got.flip(-1))
        errors.append((got.int() - expected.int()).abs().float())
    means = [float(e.mean()) for e in errors]
    assert np.mean(means) < 0.1 and max(means) < 0.35, means
    assert float(torch.cat([e.flatten() for e in errors]).gt(1).float().mean()) < 0.005


def test_the_gpus_batched_crop_equals_the_cpus_crop_by_box():
    """crop_batched (GPUs: PIL's weights as matrix products over whole rows, all views at once, in chunks,
    rounded once) and crop_each (CPUs: torch's 8-bit resize, rounded after each axis as PIL) agree: mean
    absolute difference below 0.3 8-bit levels, under 1% of the pixels more than one level apart (measured:
    0.17 and 0.15%)."""
    images = [scene((120, 90)), scene((70, 100), seed=1)]
    pixels = augment.pad_images([torch.from_numpy(np.array(i)) for i in images])
    rng, boxes = random.Random(0), []
    for k in range(12):
        left, top, w, h = augment.crop_box(*images[k % 2].size, (0.05, 1.0), rng)
        boxes.append([k % 2, left, top, left + w, top + h])
    boxes = torch.tensor(boxes, dtype=torch.float32)
    flip = torch.arange(12) % 3 == 0
    each = augment.crop_each(pixels, boxes, flip, 32)
    batched = augment.crop_batched(pixels, boxes, flip, 32, chunk=5)
    assert batched.shape == each.shape and batched.dtype == torch.uint8
    difference = (batched.int() - each.int()).abs().float()
    assert difference.mean() < 0.3 and difference.gt(1).float().mean() < 0.01


def test_tensor_views_equal_pil_views_for_the_same_parameters(tmp_path, spm_model):
    """The whole sample: both paths of MultiCropDataset draw the same parameters from a seed; applied, the
    views differ only by resampling and 8-bit rounding (PIL rounds after every op)."""
    scene((120, 90)).save(tmp_path / "a.png")
    scene((70, 100), seed=1).save(tmp_path / "b.png")
    items = [{"path": tmp_path / n, "captions": {"en": ["one"]}} for n in ("a.png", "b.png")]
    cfg = train.TrainConfig(local_crops=3, local_size=24, langs="en", hue=0.1, grayscale=0.2, solarize=0.5)
    tokenizer = rsmclip.Tokenizer(spm_model)
    pil = loading.MultiCropDataset(items, cfg, 64, tokenizer)
    tensor = loading.MultiCropDataset(items, cfg, 64, tokenizer, tensor=True)
    keys = [(0, 11), (1, 12), (0, 13), (1, 14)]
    batch = loading.collate([tensor[k] for k in keys])
    reference = loading.collate([pil[k] for k in keys])
    for seed, sample in zip((11, 12, 13, 14), (tensor[k] for k in keys)):
        image = np.asarray(Image.open(tmp_path / ("a.png" if seed % 2 else "b.png")))
        assert (sample["view_params"], sample["local_params"]) == augment.draw_sample(
            image.shape[1], image.shape[0], cfg.recipe(), 64, random.Random(seed))
    assert torch.equal(batch["ids"], reference["ids"])
    views = augment.views(batch["pixels"], batch["view_plan"], 64)
    local = augment.views(batch["pixels"], batch["local_plan"], 24)
    assert views.shape == reference["views"].shape and local.shape == reference["locals"].shape
    std = torch.tensor(rsmclip.CLIP_STD).view(1, 3, 1, 1) * 255  # normalised units -> 0-255
    for got, expected in ((views, reference["views"]), (local, reference["locals"])):
        error = ((got - expected).abs() * std).mean((1, 2, 3))
        assert error.mean() < 4 and error.max() < 12, error


def reference_view(crop: torch.Tensor, p: augment.ViewParams) -> torch.Tensor:
    """One view from its 8-bit crop by torchvision's functional tensor ops, in the order DINO applies them."""
    x = crop.float() / 255
    for name, factor in p.jitter:
        x = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
             "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}[name](x, factor)
    if p.grey:
        x = TF.rgb_to_grayscale(x, 3)
    if p.blur:
        x = TF.gaussian_blur(x, 2 * augment.blur_radius(p.blur) + 1, p.blur)
    if p.solarize:
        x = TF.solarize(x, 128 / 255)
    return TF.normalize(x, rsmclip.CLIP_MEAN, rsmclip.CLIP_STD)


def drawn_views(n: int, seed: int) -> tuple[torch.Tensor, list]:
    """A padded batch of two scenes and n views of them drawn as local crops are (all changes possible)."""
    images = [scene((120, 90)), scene((70, 100), seed=1)]
    pixels = augment.pad_images([torch.from_numpy(np.array(i)) for i in images])
    recipe, rng = train.TrainConfig(hue=0.1, grayscale=0.3).recipe(), random.Random(seed)
    return pixels, [(k % 2, augment.draw_view(*images[k % 2].size, (0.05, 1.0), 0.5, 0.3, recipe, rng, 224))
                    for k in range(n)]


def test_a_plan_applies_each_views_changes_in_its_drawn_order(monkeypatch):
    """The blend slots around the hue give every view its own order of ColorJitter's four changes (24
    orders), and the CPU's grouping (blurred views first) and chunking (the last chunk padded) put every
    view back in its place: views() equals torchvision's ops applied view by view in the drawn order."""
    monkeypatch.setattr(augment, "CPU_CHUNK", 5 * 24 * 24)  # 5 views per chunk
    pixels, drawn = drawn_views(61, seed=0)
    assert len({tuple(name for name, _ in p.jitter) for _, p in drawn}) >= 20
    plan = augment.plan(drawn)
    got = augment.views(pixels, plan, 24, radius=6)
    crops = augment.crop_each(pixels, plan.boxes, plan.flip, 24)
    expected = torch.stack([reference_view(c, p) for c, (_, p) in zip(crops, drawn)])
    assert torch.allclose(got, expected, atol=2e-5), (got - expected).abs().max()


def test_the_gpus_way_equals_the_cpus_and_keeps_every_tensor_on_the_device():
    """views_batched (what a GPU runs: batched crop, every view at once, eagerly) against the CPU's views:
    the same within the crops' rounding (mean difference below 0.5 8-bit levels; measured: 0.15). On
    the meta device, a stand-in for CUDA here, no CPU tensor meets a device tensor."""
    pixels, drawn = drawn_views(24, seed=1)
    plan = augment.plan(drawn)
    weights = augment.blur_weights(plan.sigma, 6)
    batched = augment.views_batched(pixels, plan, 32, weights)
    std = torch.tensor(rsmclip.CLIP_STD).view(1, 3, 1, 1) * 255
    difference = ((batched - augment.views(pixels, plan, 32, 6)) * std).abs()
    assert difference.mean() < 0.5
    on_meta = augment.views(pixels.to("meta"), plan, 32, 6)
    assert on_meta.device.type == "meta" and on_meta.shape == batched.shape


def test_the_compiled_colour_ops_equal_the_eager_ones(monkeypatch):
    """What a CPU runs (torch.compile of colour, one fixed shape) against the same ops run eagerly."""
    monkeypatch.setenv("RSMCLIP_COMPILE", "1")
    monkeypatch.setattr(augment, "COMPILED", None)
    g = torch.Generator().manual_seed(0)
    n = 6
    args = (torch.randint(0, 256, (n, 3, 20, 20), dtype=torch.uint8, generator=g),
            torch.tensor([[0, 1, 2, -1, -1, -1], [1, -1, -1, 2, 0, -1]] * 3, dtype=torch.int8),
            torch.rand(n, 6, generator=g) * 0.8 + 0.6, torch.rand(n, generator=g) * 0.2 - 0.1,
            torch.arange(n) % 3 == 0, augment.blur_weights(torch.rand(n, generator=g) * 2, 6),
            torch.arange(n) % 2 == 0)
    compiled = augment.compiled_colour(*args)
    assert augment.COMPILED is not augment.colour  # compiled, not fallen back to eager
    assert torch.allclose(compiled, augment.colour(*args), atol=1e-5)


def test_without_a_working_compiler_the_colour_ops_run_eagerly_with_a_warning(monkeypatch, capsys):
    def broken(fn, **options):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return call

    monkeypatch.setenv("RSMCLIP_COMPILE", "1")
    monkeypatch.setattr(augment, "COMPILED", None)
    monkeypatch.setattr(torch, "compile", broken)
    n = 2
    args = (torch.full((n, 3, 8, 8), 200, dtype=torch.uint8), torch.full((n, 6), -1, dtype=torch.int8),
            torch.ones(n, 6), torch.zeros(n), torch.zeros(n, dtype=torch.bool), None,
            torch.zeros(n, dtype=torch.bool))
    assert torch.equal(augment.compiled_colour(*args), augment.colour(*args))
    assert augment.COMPILED is augment.colour
    err = capsys.readouterr().err
    assert "torch.compile failed (RuntimeError: InvalidCxxCompiler" in err and "runs eagerly" in err


def test_parameters_follow_the_pil_pipelines_distributions():
    """Drawn once for both paths (draw_view), so the paths match by construction; here the draws are
    checked against torchvision's own samplers and DINO's probabilities (many samples, fixed seeds)."""
    cfg = train.TrainConfig(hue=0.1)
    rng, n = random.Random(0), 4000
    views = [augment.draw_view(256, 256, (0.05, 0.4), 0.5, 0.2, cfg.recipe(), rng, 224) for _ in range(n)]
    torch.manual_seed(0)
    blank = Image.new("RGB", (256, 256))
    theirs = np.array([T.RandomResizedCrop.get_params(blank, [0.05, 0.4], [3 / 4, 4 / 3])[2:]
                       for _ in range(n)])
    ours = np.array([v.box[2:] for v in views])  # (w, h); theirs is (h, w)
    for a, b in ((ours[:, 0] * ours[:, 1], theirs[:, 0] * theirs[:, 1]),
                 (np.log(ours[:, 0] / ours[:, 1]), np.log(theirs[:, 1] / theirs[:, 0]))):
        assert abs(a.mean() - b.mean()) < 0.05 * b.std() + 1e-9 and abs(a.std() / b.std() - 1) < 0.05
    jitter = T.ColorJitter(0.4, 0.4, 0.2, 0.1)
    reference = [jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
                 for _ in range(n)]
    jittered = [dict(v.jitter) for v in views if v.jitter]
    for k, name in enumerate(augment.JITTER):
        a, b = np.array([j[name] for j in jittered]), np.array([float(r[k + 1]) for r in reference])
        assert abs(a.mean() - b.mean()) < 0.01 and abs(a.std() / b.std() - 1) < 0.05, name
        assert abs(np.mean([list(dict(v.jitter)).index(name) for v in views if v.jitter]) - 1.5) < 0.1
    for drawn, expected in ((lambda v: bool(v.jitter), 0.8), (lambda v: v.flip, 0.5), (lambda v: v.grey, 0.2),
                            (lambda v: v.blur > 0, 0.5), (lambda v: v.solarize, 0.2)):
        rate = np.mean([drawn(v) for v in views])
        assert abs(rate - expected) < 3 * math.sqrt(expected * (1 - expected) / n)
    sigmas = np.array([v.blur for v in views if v.blur])
    assert 0.1 <= sigmas.min() and sigmas.max() <= 2.0 and abs(sigmas.mean() - 1.05) < 0.03


# ----------------------------------------------------------------------------- the decoded image cache


def tiny_dataset(tmp_path, n=4):
    folder = tmp_path / "ds"
    (folder / "imgs").mkdir(parents=True)
    sizes = [(40, 30), (30, 50), (600, 200), (32, 32)]
    records = []
    for i in range(n):
        scene(sizes[i % 4], seed=i).save(folder / "imgs" / f"{i}.{'png' if i % 2 else 'jpg'}")
        records.append({"id": f"d/{i}", "image": f"imgs/{i}.{'png' if i % 2 else 'jpg'}",
                        "split": "train" if i < n - 1 else "val", "captions": {"en": [f"image {i}"]}})
    write_jsonl(records, folder / "captions.jsonl")
    return folder / "captions.jsonl"


def test_no_blur_blurs_no_crop_and_leaves_the_other_draws_alone():
    """--no-blur (the views control's unaugmented global crops): no crop is blurred, while DINO's recipe
    always blurs the first global crop; crops, flips and jitter are drawn as before."""
    recipe = train.TrainConfig(local_crops=4).recipe()
    plain = replace(recipe, blur=False)
    for seed in range(200):
        views, local = augment.draw_sample(120, 90, plain, 64, random.Random(seed))
        assert not any(v.blur for v in views + local)
        dino = augment.draw_sample(120, 90, recipe, 64, random.Random(seed))[0]
        assert dino[0].blur > 0 and dino[0].box == views[0].box and dino[0].jitter == views[0].jitter
    no_augmentation = train.TrainConfig(distill_weight=0, clip_view="global", global_scale=(0.9, 1.0), flip=0,
                                        jitter_prob=0, grayscale=0, solarize=0, blur=False).recipe()
    views, local = augment.draw_sample(120, 90, no_augmentation, 64, random.Random(0))
    assert len(views) == 2 and not local
    assert all(v == augment.ViewParams(v.box) and v.box[2] * v.box[3] >= 0.85 * 120 * 90 for v in views)


def test_cache_holds_the_decoded_images_memory_mapped(tmp_path):
    manifest = tiny_dataset(tmp_path)
    report = prepare.build_cache(manifest, max_side=256)
    path = prepare.default_cache(manifest)
    assert "3 train images" in report[0] and "1 downscaled" in report[0] and path.exists()
    cache = loading.ImageCache(path, manifest)
    assert isinstance(cache.pixels, np.memmap) and len(cache) == 3
    sent = pickle.loads(pickle.dumps(cache))  # to a spawned loader process: mapped again, not copied
    assert isinstance(sent.pixels, np.memmap) and len(pickle.dumps(cache)) < 10_000
    assert np.array_equal(sent[2], cache[2])
    for i in range(3):
        image = rsmclip.open_image(manifest.parent / f"imgs/{i}.{'png' if i % 2 else 'jpg'}")
        if max(image.size) > 256:  # 600 x 200 -> 256 x 85, bicubic
            image = image.resize((256, 85), Image.BICUBIC)
        assert np.array_equal(cache[i], np.asarray(image))


def test_a_stale_foreign_or_cut_cache_is_refused(tmp_path):
    manifest = tiny_dataset(tmp_path)
    path = tmp_path / "c.safetensors"
    prepare.build_cache(manifest, path)
    with pytest.raises(DataError, match="holds the train split, training reads val"):
        loading.ImageCache(path, manifest, "val")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(DataError, match="cut short"):
        loading.ImageCache(tmp_path / "cut.safetensors", manifest)
    files.atomic_save({"x": torch.zeros(2)}, tmp_path / "w.safetensors", {"format": "rsmclip"})
    for other in (tmp_path / "w.safetensors", manifest):
        with pytest.raises(DataError, match="not an rsmclip image cache"):
            loading.ImageCache(other, manifest)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    write_jsonl([r | {"captions": {"en": ["another caption"]}} for r in records], manifest)
    with pytest.raises(DataError, match="made from another manifest .* rebuild it: python data/"):
        loading.ImageCache(path, manifest)


def test_a_cache_follows_its_images_not_only_its_manifest(tmp_path, capsys):
    """A copied dataset (new inodes and change times, same bytes) keeps its cache, with a note; an image
    edited in place, its modification time set back, is found by its bytes and the cache refused."""
    manifest = tiny_dataset(tmp_path / "a")
    path = manifest.parent / "c.safetensors"
    prepare.build_cache(manifest, path)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # copy2: the same mtimes, other inodes and ctimes
    copy = loading.ImageCache(tmp_path / "b/ds/c.safetensors", tmp_path / "b/ds" / manifest.name)
    assert len(copy) == 3
    assert "3 of 3 cached images have new file stamps but the same bytes" in capsys.readouterr().err
    image = manifest.parent / "imgs/1.png"
    st = image.stat()
    with open(image, "r+b") as f:  # one byte of the file changed where it lies: same size, same inode
        f.seek(st.st_size - 20)
        byte = f.read(1)
        f.seek(st.st_size - 20)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DataError, match="1 of 3 cached images changed since the cache was made"):
        loading.ImageCache(path, manifest)


def test_training_reads_the_cache_with_tensor_augmentation(tmp_path, demo_manifest, spm_model):
    """A cache sample's parameters equal the file path's for the same seed, its pixels the decoded file."""
    cache_file = tmp_path / "cache.safetensors"
    prepare.build_cache(demo_manifest, cache_file)
    items = loading.read_manifests([str(demo_manifest)], "train")
    cfg = replace(train.RECIPES["demo"], langs="en", local_crops=2)
    tokenizer = rsmclip.Tokenizer(demo_manifest.parent / "spm.model")
    cached = loading.MultiCropDataset(items, cfg, 64, tokenizer,
                                      loading.ImageCache(cache_file, demo_manifest), tensor=True)
    files = loading.MultiCropDataset(items, cfg, 64, tokenizer, tensor=True)
    for key in [(0, 5), (7, 99)]:
        a, b = cached[key], files[key]
        assert torch.equal(a["pixels"], b["pixels"]) and a["view_params"] == b["view_params"]
        assert torch.equal(a["ids"], b["ids"])
