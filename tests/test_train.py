"""train.py and rsmclip's CLIP loss against independent references: open_clip's `ClipLoss` (loss.py), the
`cosine_lr` schedule (open_clip_train/scheduler.py) and the weight-decay rule of open_clip_train/main.py
(no decay for tensors of fewer than 2 dims, norms, biases, logit_scale), open_clip's
`image_transform(is_train=True)` (transform.py) for the CLIP-only recipe; DINO's head, loss, centre and EMA
(dino's main_dino.py and vision_transformer.py's DINOHead) re-derived by hand; exact resume; DDP."""
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import kill_after_first_checkpoint
from PIL import Image
from rich.progress import Progress
from safetensors import safe_open

import cli
import curves
import files
import optimization as opt
import rsmclip
import rundir
import train
from bench.openclip_oracle import make_openclip_model
from data import augment, loading
from data.manifest import LANGS

ROOT = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"


# ----------------------------------------------------------------------------- parts against references


def test_clip_loss_equals_openclip():
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(16, 32, generator=g), dim=-1)
    texts = F.normalize(torch.randn(16, 32, generator=g), dim=-1)
    scale = torch.tensor(23.7)
    expected = open_clip.ClipLoss()(images, texts, scale)
    assert torch.allclose(rsmclip.clip_loss(images, texts, scale), expected, atol=1e-6)


def test_lr_schedule_equals_openclip():
    from open_clip_train.scheduler import cosine_lr

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = cosine_lr(optimizer, 3e-4, 25, 200)
    assert all(math.isclose(opt.lr_at(s, 3e-4, 25, 200), reference(s), rel_tol=1e-12) for s in range(200))


def test_dino_schedules_equal_their_definitions():
    # DINO main_dino.py: teacher temperature = linspace(warmup, final, warmup_epochs) then constant
    ramp = np.concatenate([np.linspace(0.04, 0.07, 30), np.full(70, 0.07)])
    assert np.allclose([opt.teacher_temp_at(s, 0.04, 0.07, 30) for s in range(100)], ramp)
    # DINO utils.cosine_scheduler(momentum, 1, epochs, niter): final + 0.5 (base - final)(1 + cos(pi i / n))
    i = np.arange(500)
    momentum = 1 + 0.5 * (0.996 - 1) * (1 + np.cos(np.pi * i / 500))
    assert np.allclose([opt.ema_momentum_at(s, 0.996, 500, "cosine") for s in range(500)], momentum)
    assert opt.ema_momentum_at(123, 0.999, 500, "fixed") == 0.999


def test_dino_head_equals_weight_normed_reference():
    torch.manual_seed(0)
    head = train.DINOHead(48, out_dim=40, hidden=64, bottleneck=16)
    last = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(16, 40, bias=False))
    with torch.no_grad():
        last.parametrizations.weight.original1.copy_(head.prototypes)  # v
        last.parametrizations.weight.original0.fill_(1)  # g, frozen at 1 (norm_last_layer)
    x = torch.randn(7, 48)
    expected = last(F.normalize(head.mlp(x), dim=-1, p=2))
    assert torch.allclose(head(x), expected, atol=1e-6)
    assert not head.prototype_norm.requires_grad
    assert train.DINOHead(48, 40, 64, 16, norm_last_layer=False).prototype_norm.requires_grad


def test_dino_loss_and_center_equal_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    B, K, local = 5, 12, 3
    student = [torch.randn(B, K, generator=g) for _ in range(2 + local)]
    teacher = [torch.randn(B, K, generator=g) for _ in range(2)]
    loss_fn = train.DINOLoss(K, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, K, generator=g))
    center = loss_fn.center.clone()
    got, entropy = loss_fn(student, teacher, teacher_temp=0.05)
    total, terms, entropies = 0.0, 0, []
    for iq in range(2):
        for v in range(2 + local):
            if v == iq:
                continue
            for b in range(B):
                q = np.exp((teacher[iq][b] - center[0]).numpy() / 0.05)
                q /= q.sum()
                entropies.append(-(q * np.log(np.where(q > 0, q, 1))).sum())
                s = student[v][b].numpy() / 0.1
                log_p = s - np.log(np.exp(s).sum())
                total += -(q * log_p).sum() / B
            terms += 1
    assert terms == 2 * (2 + local) - 2 and math.isclose(float(got), total / terms, rel_tol=1e-5)
    assert math.isclose(float(entropy), np.mean(entropies), rel_tol=1e-5)  # the teacher targets' entropy
    expected_center = 0.9 * center + 0.1 * torch.cat(teacher).mean(0, keepdim=True)
    assert torch.allclose(loss_fn.center, expected_center, atol=1e-6)


def test_dino_loss_is_right_down_to_the_lowest_temperature_the_options_take():
    """The DINO loss divides fp32 logits by the teacher's and the student's temperatures: at 1e-30, the floor
    of --teacher-temp, --warmup-teacher-temp and --student-temp (train.DINO_TEMPERATURE), the targets are the
    teacher's argmax and the loss equals a float64 computation; below it the fp32 division overflows (nan),
    which is why the options refuse it."""
    g = torch.Generator().manual_seed(2)
    student = [torch.randn(4, 16, generator=g) for _ in range(3)]
    teacher = [torch.randn(4, 16, generator=g) for _ in range(2)]
    floor = train.DINO_TEMPERATURE.lo
    got, entropy = train.DINOLoss(16, student_temp=floor)(student, teacher, floor)
    targets = [F.softmax(t.double() / floor, dim=-1) for t in teacher]
    log_probs = [F.log_softmax(s.double() / floor, dim=-1) for s in student]
    terms = [-(q * log_p).sum(-1).mean() for i, q in enumerate(targets) for v, log_p in enumerate(log_probs)
             if v != i]
    assert torch.isfinite(got) and math.isclose(float(got), float(sum(terms) / len(terms)), rel_tol=1e-5)
    assert float(entropy) == 0 and all(torch.equal(q, F.one_hot(q.argmax(-1), 16).double()) for q in targets)
    assert floor in train.DINO_TEMPERATURE and floor / 10 not in train.DINO_TEMPERATURE
    assert math.isnan(train.DINOLoss(16, student_temp=1e-39)(student, teacher, 1e-39)[0])


def test_ema_update():
    teacher, student = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    expected = [0.99 * t + 0.01 * s for t, s in zip(teacher.parameters(), student.parameters())]
    train.ema_update(teacher, student, 0.99)
    assert all(torch.allclose(t, e) for t, e in zip(teacher.parameters(), expected))


def test_weight_decay_groups_equal_openclip():
    cfg = rsmclip.PRESETS["tiny"]
    ours, theirs = rsmclip.CLIP(cfg), make_openclip_model(cfg)
    # open_clip_train's rule
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    their_no_decay = {n for n, p in theirs.named_parameters() if exclude(n, p)}
    groups = opt.param_groups(ours, 0.2, 1e-3, 1e-2)
    name_of = {id(p): n for n, p in ours.named_parameters()}
    no_decay = {name_of[id(p)] for p in groups[0]["params"]}
    source = {theirs_name: ours_name for ours_name, theirs_name in rsmclip._renames(cfg)}  # open_clip -> ours
    source["visual.proj"] = "visual.proj.weight"
    for i in range(cfg.text.layers):
        for p in ("weight", "bias"):
            for n in ("query", "key", "value"):  # our packed q/k/v stands for open_clip's three tensors
                theirs_name = f"text.transformer.encoder.layer.{i}.attention.self.{n}.{p}"
                source[theirs_name] = f"text.blocks.{i}.attn.qkv.{p}"
    assert source.keys() == {n for n, _ in theirs.named_parameters()}
    assert {n for n, o in source.items() if o in no_decay} == their_no_decay
    assert groups[0]["weight_decay"] == 0 and groups[1]["weight_decay"] == 0.2
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(ours.parameters()))


def test_step_sampler_is_a_function_of_the_step():
    full = list(loading.StepSampler(100, 8, 0, 1, seed=3, start=0, steps=30))
    assert list(loading.StepSampler(100, 8, 0, 1, seed=3, start=17, steps=30)) == full[17:]
    epoch0 = [i for batch in full[:12] for i, _ in batch]
    assert len(set(epoch0)) == 96  # 12 full batches per epoch, no image twice, drop_last
    halves = [list(loading.StepSampler(100, 4, r, 2, seed=3, start=0, steps=30)) for r in range(2)]
    # DDP slices of the same global batch
    assert all(a + b == f for a, b, f in zip(halves[0], halves[1], full))


def test_multicrop_views(tmp_path, spm_model):
    pixels = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    items = [{"path": tmp_path / "a.png", "captions": {"en": ["one"], "pt": ["um", "uma"]}},
             {"path": tmp_path / "missing.png", "captions": {"en": ["two"]}}]
    cfg = train.TrainConfig(local_crops=3, local_size=24, langs="en,pt")
    ds = loading.MultiCropDataset(items, cfg, 64, rsmclip.Tokenizer(spm_model))
    a, b = ds[(0, 7)], ds[(0, 7)]
    assert a["views"].shape == (2, 3, 64, 64) and a["locals"].shape == (3, 3, 24, 24)
    assert a["ids"].shape == (2, 77)
    assert torch.equal(a["views"], b["views"]) and torch.equal(a["ids"], b["ids"])  # seeded
    assert not torch.equal(a["views"][0], ds[(0, 8)]["views"][0])
    substitute = ds[(1, 7)]  # an unreadable image is replaced by the next one and reported
    assert substitute["failures"] and "missing.png" in substitute["failures"][0]
    batch = loading.collate([a, substitute])
    assert batch["views"].shape == (4, 3, 64, 64) and batch["locals"].shape == (6, 3, 24, 24)
    assert torch.equal(batch["views"][1], substitute["views"][0])  # view-major order
    # ids are cut after the batch's longest caption (on the CPU: the text tower does not cut on a GPU)
    last = batch["ids"].shape[1]
    assert (batch["ids"][:, -1] != rsmclip.PAD).any() and (a["ids"][:, last:] == rsmclip.PAD).all()
    assert torch.equal(batch["ids"][2], a["ids"][1, :last])
    clip_cfg = train.TrainConfig(distill_weight=0, langs="en")
    clip_only = loading.MultiCropDataset(items, clip_cfg, 64, ds.tokenizer)[(0, 7)]
    assert clip_only["views"].shape == (1, 3, 64, 64) and clip_only["locals"] is None  # open_clip's recipe
    light = loading.MultiCropDataset(items, replace(cfg, clip_view="light"), 64, ds.tokenizer)[(0, 7)]
    # 2 global crops + the CLIP view
    assert light["views"].shape == (3, 3, 64, 64) and light["ids"].shape == (1, 77)
    assert torch.equal(light["views"][:2], a["views"])


def test_clip_only_view_is_openclips_training_transform(monkeypatch, tmp_path, spm_model):
    """--distill-weight 0 trains on open_clip's image_transform(is_train=True): equal outputs for the same
    crop, crops drawn from the same distribution."""
    import torchvision.transforms as T
    from open_clip.transform import image_transform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    theirs = image_transform(64, is_train=True)
    # crop, RGB, tensor, normalise
    assert theirs.transforms[0].scale == (0.9, 1.0) and len(theirs.transforms) == 4
    for seed in range(10):
        left, top, w, h = augment.crop_box(120, 90, (0.9, 1.0), random.Random(seed))
        params = staticmethod(lambda img, scale, ratio: (top, left, h, w))
        monkeypatch.setattr(T.RandomResizedCrop, "get_params", params)
        assert torch.allclose(augment.light_view(image, 64, random.Random(seed)), theirs(image), atol=1e-6)
    monkeypatch.undo()
    for size in [(120, 90), (40, 200)]:  # (40, 200): no crop of the drawn aspect fits, both fall back
        ours = np.array([augment.crop_box(*size, (0.9, 1.0), random.Random(i))[2:] for i in range(3000)])
        blank = Image.new("RGB", size)
        ref = np.array([T.RandomResizedCrop.get_params(blank, [0.9, 1.0], [3 / 4, 4 / 3])[:1:-1]
                        for _ in range(3000)])
        assert np.allclose(ours.mean(0), ref.mean(0), rtol=0.01)
        assert np.allclose(ours.std(0), ref.std(0), rtol=0.1, atol=0.2)
    image.save(tmp_path / "a.png")
    item = {"path": tmp_path / "a.png", "captions": {"en": ["one"]}}
    clip_cfg = train.TrainConfig(distill_weight=0, langs="en")
    ds = loading.MultiCropDataset([item], clip_cfg, 64, rsmclip.Tokenizer(spm_model))
    assert torch.equal(ds[(0, 5)]["views"][0], augment.light_view(image, 64, random.Random(5)))  # one view


def tiny_run(**overrides):
    """A distillation run of the tiny model on CPU and a synthetic batch for it (2 images)."""
    cfg = train.TrainConfig(batch_size=2, local_crops=2, prototypes=32, head_hidden=64, head_bottleneck=16,
                            steps=10, warmup=3, text_dropout=0.0, **overrides)
    torch.manual_seed(0)
    model = rsmclip.CLIP(rsmclip.PRESETS["tiny"])
    g = torch.Generator().manual_seed(0)
    n_views, n_clip = augment.view_layout(cfg.recipe())
    ids = torch.full((2 * n_clip, 77), rsmclip.PAD)
    ids[:, :5] = torch.randint(3, 300, (2 * n_clip, 5), generator=g)
    batch = {"views": torch.randn(2 * n_views, 3, 64, 64, generator=g), "ids": ids,
             "locals": torch.randn(2 * cfg.local_crops, 3, 24, 24, generator=g)}
    return train.build_run(cfg, model, None, torch.device("cpu")), batch


def test_head_has_its_own_lr_schedule():
    run, batch = tiny_run(lr=1e-3, head_lr=2e-2)
    head = {id(p) for p in run.unwrapped.head.parameters() if p.requires_grad}
    for group in run.optimizer.param_groups:  # the head's groups hold exactly the head, with its own peak lr
        assert {id(p) in head for p in group["params"]} == {group["base_lr"] == 2e-2}
    assert sum(len(g["params"]) for g in run.optimizer.param_groups if g["base_lr"] == 2e-2) == len(head)
    for step in range(5):
        logs = train.train_step(run, batch, step)
        for group in run.optimizer.param_groups:
            assert group["lr"] == opt.lr_at(step, group["base_lr"], 3, 10)
        assert logs["head_lr"] == opt.lr_at(step, 2e-2, 3, 10)
        assert logs["lr"] == opt.lr_at(step, 1e-3, 3, 10)


def test_clip_weight_zero_is_self_distillation_alone(monkeypatch):
    run, batch = tiny_run(clip_weight=0.0)
    monkeypatch.setattr(run.unwrapped.clip, "encode_text",
                        lambda ids: pytest.fail("text forward at --clip-weight 0"))
    logs = train.train_step(run, batch, 0)
    assert "clip" not in logs and torch.equal(logs["loss"], logs["distill"])
    assert all(p.grad is None for p in run.unwrapped.clip.text.parameters())
    for bad, message in (({"clip_weight": -1.0}, "--clip-weight -1.0"),
                         ({"clip_weight": 0.0, "distill_weight": 0.0}, "no loss is left")):
        with pytest.raises(train.TrainError, match=message):
            train.check_config(replace(train.RECIPES["demo"], data=[], **bad))


def test_collapse_stats_tell_one_output_for_every_image_from_a_spread():
    same = [torch.ones(4, 8)] * 2  # every image, every view: the same output
    stats = train.collapse_stats(same, same, torch.zeros(1, 8), 0.1, 0.04)
    assert math.isclose(stats["teacher_cosine"], 1, rel_tol=1e-6) and stats["teacher_spread"] == 0
    assert math.isclose(stats["student_entropy"], math.log(8), rel_tol=1e-6) and stats["center_norm"] == 0
    eye = [torch.eye(4, 8)] * 2  # orthogonal outputs: cosine 0; each row one-hot at 1/0.1 -> low entropy
    stats = train.collapse_stats(eye, eye, torch.full((1, 8), 2.0), 0.1, 0.04)
    assert abs(stats["teacher_cosine"]) < 1e-6
    assert math.isclose(stats["center_norm"], 2 * math.sqrt(8), rel_tol=1e-6)
    assert math.isclose(stats["teacher_spread"], torch.eye(4, 8).std(0).mean().item(), rel_tol=1e-6)
    p = torch.softmax(torch.eye(4, 8)[0] / 0.1, -1)
    assert math.isclose(stats["student_entropy"], -(p * p.log()).sum().item(), rel_tol=1e-5)


def test_batch_target_entropy_and_prototypes_used_tell_one_target_for_all_from_one_per_image():
    """Hand-made teacher outputs, 6 images, K = 16 prototypes, temperature 0.04: the entropy of the batch-mean
    target is ~0 (and 1 prototype used) when every image peaks at one prototype, ln 6 (6 used) when each peaks
    at its own, ln K when the teacher is uniform (1 used: the argmax of equal scores is the first)."""
    def stats(teacher: torch.Tensor, center=torch.zeros(1, 16)):
        return train.collapse_stats([teacher], [teacher, teacher], center, 0.1, 0.04)

    one = stats(torch.zeros(6, 16).index_fill_(1, torch.tensor([3]), 1.0))  # logit 1 / 0.04 at prototype 3
    assert one["teacher_batch_entropy"] < 1e-8 and one["teacher_prototypes_used"] == 1
    own = stats(torch.eye(6, 16))
    assert math.isclose(own["teacher_batch_entropy"], math.log(6), rel_tol=1e-6)
    assert own["teacher_prototypes_used"] == 6
    uniform = stats(torch.ones(6, 16))
    assert math.isclose(uniform["teacher_batch_entropy"], math.log(16), rel_tol=1e-6)
    assert uniform["teacher_prototypes_used"] == 1
    # the centre is subtracted first: every image's own peak ties with a shared one, which the centre cancels
    spike = torch.zeros(1, 16).index_fill_(1, torch.tensor([3]), 1.0)
    shared = spike + torch.eye(6, 16)
    assert stats(shared)["teacher_prototypes_used"] == 4  # images 3, 4, 5 peak at 3 (ties: the first)
    centred = stats(shared, spike)
    assert centred["teacher_prototypes_used"] == 6
    q = torch.softmax((shared - spike) / 0.04, -1).mean(0)
    assert math.isclose(centred["teacher_batch_entropy"], -(q * q.log()).sum().item(), rel_tol=1e-6)


def test_clip_view_global_without_distillation_is_two_global_crops_two_captions_no_teacher(
        tmp_path, spm_model, monkeypatch):
    """The views control: --clip-view global at --distill-weight 0 keeps the 2 global crops (the same crops
    distillation draws) with a caption each, and no head, teacher or local crop; the loss is the mean of the
    two crops' CLIP losses. Left at auto, --distill-weight 0 is open_clip's one light view."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)).save(
        tmp_path / "a.png")
    items = [{"path": tmp_path / "a.png", "captions": {"en": ["one", "two", "three"]}}]
    tokenizer = rsmclip.Tokenizer(spm_model)
    control = train.TrainConfig(distill_weight=0, clip_view="global", langs="en", local_crops=3)
    assert augment.view_layout(control.recipe()) == (2, 2) and control.recipe().local_crops == 0
    assert augment.view_layout(replace(control, clip_view="auto").recipe()) == (1, 1)
    sample = loading.MultiCropDataset(items, control, 64, tokenizer)[(0, 7)]
    distilled = loading.MultiCropDataset(items, replace(control, distill_weight=1.0), 64, tokenizer)[(0, 7)]
    assert sample["views"].shape == (2, 3, 64, 64) and sample["ids"].shape == (2, 77)
    assert sample["locals"] is None
    assert torch.equal(sample["views"], distilled["views"]) and distilled["locals"].shape[0] == 3
    run, batch = tiny_run(distill_weight=0.0, clip_view="global")
    assert run.teacher is None and run.dino is None and run.unwrapped.head is None
    assert batch["views"].shape[0] == 4 and batch["ids"].shape[0] == 4  # 2 crops x 2 images, a caption each
    model = run.unwrapped.clip
    torch.manual_seed(0)  # train_step's seed at step 0: the same text dropout masks
    with torch.no_grad():
        images = F.normalize(model.encode_image(batch["views"]), dim=-1)
        texts = F.normalize(model.encode_text(batch["ids"]), dim=-1)
        expected = sum(rsmclip.clip_loss(i, t, model.logit_scale.exp()) for i, t in
                       zip(images.chunk(2), texts.chunk(2))) / 2
    monkeypatch.setattr(train.Teacher, "forward", lambda *a: pytest.fail("a teacher forward"))
    logs = train.train_step(run, batch, 0)
    assert set(logs) & {"distill", "teacher_entropy", "head_lr"} == set()
    assert torch.allclose(logs["loss"], expected, atol=1e-5) and torch.equal(logs["loss"], logs["clip"])


def test_lang_weights_draw_each_language_in_its_proportion():
    """--lang-weights en=0.5: English half the time, the nine others sharing the rest; on a fixed seed the
    frequencies of 36,000 draws are within 4 standard errors. An image without some languages draws among
    those it has, in proportion. No weights: the draws are exactly the old uniform ones."""
    probabilities = loading.lang_probabilities(",".join(LANGS), "en=0.5")
    assert probabilities["en"] == 0.5
    assert all(math.isclose(probabilities[lang], 0.5 / 9) for lang in LANGS[1:])
    rng, n = random.Random(0), 36_000
    counts = Counter(loading.draw_language(list(LANGS), probabilities, rng) for _ in range(n))
    for lang in LANGS:
        p = probabilities[lang]
        assert abs(counts[lang] / n - p) < 4 * math.sqrt(p * (1 - p) / n), (lang, counts[lang])
    # an image with captions in English, Portuguese and German only: 0.5 : 0.0556 : 0.0556, i.e. 9/11, 1/11
    counts = Counter(loading.draw_language(["en", "pt", "de"], probabilities, rng) for _ in range(n))
    assert abs(counts["en"] / n - 9 / 11) < 0.01 and abs(counts["pt"] / n - 1 / 11) < 0.006
    assert loading.lang_probabilities("en,pt", "") == {"en": 0.5, "pt": 0.5}
    assert loading.lang_probabilities("en,pt,de", "pt=0.2,de=0.8") == {"en": 0, "pt": 0.2, "de": 0.8}
    old, new = random.Random(3), random.Random(3)
    assert [loading.draw_language(["en", "pt"], None, new) for _ in range(50)] == \
        [old.choice(["en", "pt"]) for _ in range(50)]
    for weights, words in (("en=-0.1", "not LANG=P with a probability P >= 0"), ("en", "not LANG=P"),
                           ("en=x", "not LANG=P"), ("en=0,pt=0", "add up to 0; they must add up to 1"),
                           ("xx=0.5", "unknown language xx"), ("de=0.5", "de is not one of --langs en,pt"),
                           ("en=0.7,pt=0.6", "add up to 1.3"), ("en=0.5,en=0.5", "en is given twice")):
        with pytest.raises(rsmclip.RsmclipError, match=re.escape(words)):
            loading.lang_probabilities("en,pt", weights)


def test_the_dataset_draws_caption_languages_by_lang_weights(tmp_path, spm_model):
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    items = [{"path": tmp_path / "a.png", "captions": {"en": ["english"], "pt": ["portugues"]}}]
    tokenizer = rsmclip.Tokenizer(spm_model)
    cfg = train.TrainConfig(distill_weight=0, langs="en,pt", lang_weights="pt=1")
    dataset = loading.MultiCropDataset(items, cfg, 64, tokenizer)
    assert all(torch.equal(dataset[(0, seed)]["ids"][0], tokenizer(["portugues"])[0]) for seed in range(20))
    english_only = replace(cfg, data=[str(manifest_of(tmp_path, {"en": ["a"]}))], batch_size=1)
    with pytest.raises(rsmclip.RsmclipError, match="no pt captions in the training data"):
        loading.open_data(english_only, loading.World())  # pt is drawn: it must be there
    assert loading.open_data(replace(english_only, lang_weights="en=1"), loading.World()).size == 1  # pt: 0


def manifest_of(folder: Path, captions: dict) -> Path:
    Image.new("RGB", (40, 40)).save(folder / "b.png")
    path = folder / "m.jsonl"
    path.write_text(json.dumps({"id": "b", "image": "b.png", "split": "train", "dataset": "d",
                                "captions": captions}) + "\n")
    return path


def test_weight_decay_ramp_is_dinos_cosine_on_the_decayed_groups_only():
    i = np.arange(10)  # DINO's cosine_scheduler(0.04, 0.4, ...): final + 0.5 (base - final)(1 + cos(pi i/n))
    dino = 0.4 + 0.5 * (0.04 - 0.4) * (1 + np.cos(np.pi * i / 10))
    assert np.allclose([opt.weight_decay_at(s, 0.04, 0.4, 10, "cosine") for s in range(10)], dino)
    assert opt.weight_decay_at(7, 0.2, 0.4, 10, "fixed") == 0.2
    run, batch = tiny_run(weight_decay=0.04, weight_decay_end=0.4, weight_decay_schedule="cosine")
    for step in range(3):
        logs = train.train_step(run, batch, step)
        assert math.isclose(logs["weight_decay"], dino[step])
        for group in run.optimizer.param_groups:  # biases, gains: none (DINO's regularised group only)
            assert group["weight_decay"] == (dino[step] if group["params"][0].ndim >= 2 else 0.0)


def test_per_parameter_clip_is_dinos_clip_gradients_before_the_freeze():
    """DINO's utils.clip_gradients: each parameter's gradient times clip / (its norm + 1e-6) when that is
    below 1, then the prototypes' gradients are dropped (cancel_gradients_last_layer); the global clip
    comes after the freeze. Both return the norm of all gradients before clipping."""
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
    grads = [torch.tensor([6.0, 8.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 30.0, 40.0])]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norm = opt.clip_gradients(params, [params[2]], 3.0, "parameter")
    assert math.isclose(norm, math.sqrt(100 + 1 + 2500), rel_tol=1e-6)
    reference = [g * min(1.0, 3.0 / (g.norm().item() + 1e-6)) for g in grads[:2]]  # DINO's rule
    assert torch.allclose(params[0].grad, reference[0]) and torch.equal(params[1].grad, grads[1])
    assert params[2].grad is None
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norm = opt.clip_gradients(params, [params[2]], 3.0, "global")  # frozen first: 2 tensors of norm 10, 1
    assert math.isclose(norm, math.sqrt(101), rel_tol=1e-6) and params[2].grad is None
    assert math.isclose(torch.cat([params[0].grad, params[1].grad]).norm().item(), 3.0, rel_tol=1e-5)
    assert math.isnan(opt.clip_gradients(params, [], 0.0, "parameter"))  # 0: no clip
    run, batch = tiny_run(grad_clip_mode="parameter", grad_clip=3.0, freeze_last_layer=5)
    before = [p.detach().clone() for p in run.unwrapped.head.last_layer()]
    logs = train.train_step(run, batch, 0)
    assert math.isfinite(logs["grad_norm"])
    assert all(torch.equal(a, p) for a, p in zip(before, run.unwrapped.head.last_layer()))


def test_drop_path_drops_whole_branches_in_training_only_and_never_in_the_teacher():
    torch.manual_seed(0)
    model = rsmclip.CLIP(rsmclip.PRESETS["tiny"])
    model.visual.set_drop_path(0.3)
    rates = [b.drop_path for b in model.visual.blocks]
    assert np.allclose(rates, np.linspace(0, 0.3, len(rates)))  # DINO's linspace over the depth
    block = model.visual.blocks[-1]
    branch = torch.ones(20_000, 2, 3)
    dropped = block.dropped(branch)
    kept = dropped[:, 0, 0] != 0
    assert torch.equal(dropped, kept.view(-1, 1, 1) * branch / 0.7)  # whole samples' branches; kept: scaled
    assert abs(1 - kept.double().mean().item() - 0.3) < 0.015
    pixels = torch.randn(4, 3, 64, 64)
    model.eval()
    plain = rsmclip.CLIP(rsmclip.PRESETS["tiny"])
    plain.load_state_dict(model.state_dict())
    assert torch.equal(model.encode_image(pixels), plain.eval().encode_image(pixels))  # eval: no drop
    model.train()
    assert not torch.equal(model.encode_image(pixels), plain.encode_image(pixels))
    run, batch = tiny_run(drop_path=0.1)
    assert run.unwrapped.clip.visual.blocks[-1].drop_path == 0.1
    assert all(b.drop_path == 0 for b in run.teacher.visual.blocks)  # DINO's teacher has none
    assert math.isfinite(train.train_step(run, batch, 0)["loss"])


def test_the_head_on_patch_tokens_reads_their_mean_after_ln_post(monkeypatch):
    run, batch = tiny_run(head_input="patches")
    seen = []
    monkeypatch.setattr(train.DINOHead, "forward", lambda self, x: seen.append(x) or torch.zeros(len(x), 32))
    with torch.no_grad():
        run.unwrapped(batch["views"], batch["locals"], None)
        run.teacher(batch["views"])
    visual = run.unwrapped.clip.visual
    with torch.no_grad():
        expected = [visual.ln_post(visual.forward_tokens(x)[:, 1:]).mean(1)
                    for x in (batch["views"], batch["locals"])]
    assert torch.allclose(seen[0], torch.cat(expected), atol=1e-6)
    assert torch.allclose(seen[1], expected[0], atol=1e-6)  # the teacher reads the same
    assert not torch.allclose(seen[0][:4], visual.forward_features(batch["views"]), atol=1e-3)  # not cls


def test_logits_are_fp32_under_bf16_autocast(monkeypatch):
    g = torch.Generator().manual_seed(0)
    images, texts = (F.normalize(torch.randn(16, 32, generator=g), dim=-1) for _ in range(2))
    scale = torch.tensor(100.0)
    seen = []
    cross_entropy = F.cross_entropy
    spy = lambda logits, *a, **k: seen.append(logits.dtype) or cross_entropy(logits, *a, **k)  # noqa: E731
    monkeypatch.setattr(F, "cross_entropy", spy)
    reference = rsmclip.clip_loss(images, texts, scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32 = rsmclip.clip_loss(images, texts, scale)
        bf16 = rsmclip.clip_loss(images, texts, scale, fp32=False)
    assert seen == [torch.float32] * 4 + [torch.bfloat16] * 2
    assert torch.allclose(fp32, reference, atol=1e-6)
    assert not torch.allclose(bf16.float(), reference, atol=1e-3)
    head = train.DINOHead(48, out_dim=40, hidden=64, bottleneck=16)
    x = torch.randn(7, 48, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(x).dtype == torch.float32
        head.fp32 = False
        assert head(x).dtype == torch.bfloat16
        loss, entropy = train.DINOLoss(40)([head(x)] * 3, [head(x)] * 2, 0.04)
        assert loss.dtype == entropy.dtype == torch.float32
    run, batch = tiny_run(precision="bf16")  # the training step: CLIP features and head outputs in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = run.student(batch["views"], batch["locals"], batch["ids"])
    assert [t.dtype for t in outputs] == [torch.float32] * 4


def test_freezing_keeps_every_last_layer_parameter():
    run, batch = tiny_run(norm_last_layer=False, freeze_last_layer=2)
    last = run.unwrapped.head.last_layer()
    assert all(p.requires_grad for p in last)  # with norm_last_layer false the norms train too
    before = [p.detach().clone() for p in last]
    mlp = run.unwrapped.head.mlp[0].weight.detach().clone()
    for step in range(2):
        train.train_step(run, batch, step)
    assert all(torch.equal(p, b) for p, b in zip(last, before))
    assert not torch.equal(run.unwrapped.head.mlp[0].weight, mlp)
    train.train_step(run, batch, 2)
    assert all(not torch.equal(p, b) for p, b in zip(last, before))


def test_resume_compares_run_directories_by_resolved_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = train.TrainConfig(out="runs/x", data=["d/captions.jsonl"])
    Path("runs/x").mkdir(parents=True)
    Path("runs/x/checkpoint.safetensors").write_bytes(b"")
    Path("runs/x/config.json").write_text(json.dumps({"config": train.asdict(cfg)}))
    for out in ["runs/x/", "./runs/x", str(tmp_path / "runs/x")]:
        rundir.check_resume(replace(cfg, out=out, data=["./d/captions.jsonl"]))
    with pytest.raises(rundir.RunError, match=r"other settings \(lr\)"):
        rundir.check_resume(replace(cfg, out="runs/x/", lr=1e-3))


def test_a_run_made_before_the_renames_resumes(tmp_path, monkeypatch):
    """config.json files written before `model` became `arch` and `head_dim` became `prototypes` are read
    with the new names: the same settings resume, other ones are still refused."""
    monkeypatch.chdir(tmp_path)
    cfg = train.TrainConfig(out="runs/old", data=["d/captions.jsonl"], arch="tiny", prototypes=64)
    old = {("model" if k == "arch" else "head_dim" if k == "prototypes" else k): v
           for k, v in train.asdict(cfg).items()}
    Path("runs/old").mkdir(parents=True)
    Path("runs/old/checkpoint.safetensors").write_bytes(b"")
    Path("runs/old/config.json").write_text(json.dumps({"config": old}))
    rundir.check_resume(cfg)
    with pytest.raises(rundir.RunError, match=r"other settings \(prototypes\)"):
        rundir.check_resume(replace(cfg, prototypes=128))
    assert train.resolve_config("demo", Path("runs/old/config.json"), {}).prototypes == 64  # --config too


# ----------------------------------------------------------------------------- end to end


def run_train(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


FAST = ["--langs", "en", "--batch-size", "8", "--local-crops", "2", "--prototypes", "64", "--log-every", "2",
        "--workers", "0"]
SMALL = [*FAST, "--steps", "6", "--ckpt-every", "2", "--deterministic"]


def read_model(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def demo_args(manifest):
    return ["--data", manifest, "--tokenizer", manifest.parent / "spm.model"]


def test_demo_training_saves_a_loadable_model(tmp_path, demo_manifest):
    result = run_train("--out", tmp_path / "run", *demo_args(demo_manifest), *SMALL)
    assert result.returncode == 0, result.stderr
    assert "retrieval before training" in result.stdout and "retrieval mR before" in result.stdout
    model, _, tokenizer = rsmclip.load(tmp_path / "run/model.safetensors")
    assert model.config == rsmclip.PRESETS["tiny"] and tokenizer.path.name == "spm.model"
    spm_sha = files.file_sha256(demo_manifest.parent / "spm.model")  # recorded: another one is refused
    assert rsmclip.tokenizer_sha(tmp_path / "run/model.safetensors") == spm_sha
    metrics = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6]
    assert {"loss", "clip", "distill", "lr", "head_lr", "logit_scale", "teacher_temp", "images_per_s",
            "memory_mb", "teacher_entropy", "kl", "student_entropy", "teacher_cosine", "teacher_spread",
            "center_norm"} <= set(metrics[0])
    assert 0 < metrics[0]["teacher_entropy"] <= math.log(64) + 1e-4  # --prototypes 64
    assert math.isclose(metrics[0]["kl"], metrics[0]["distill"] - metrics[0]["teacher_entropy"], abs_tol=1e-5)
    saved = json.loads((tmp_path / "run/config.json").read_text())
    assert saved["config"]["steps"] == 6 and saved["argv"][0].endswith("train.py") and "git_commit" in saved
    again = run_train("--config", tmp_path / "run/config.json", "--out", tmp_path / "rerun")
    assert again.returncode == 0, again.stderr
    a, b = read_model(tmp_path / "run/model.safetensors"), read_model(tmp_path / "rerun/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # a saved config re-runs the same training
    assert "steps/s" in result.stdout and "left" in result.stdout  # the bar's rate and time left
    assert f"wrote {tmp_path / 'run/curves.svg'}" in result.stdout  # drawn at the end of every run
    svg = ET.parse(tmp_path / "run/curves.svg").getroot()
    lines = svg.findall(f"{SVG}polyline")
    assert [len(line.get("points").split()) for line in lines] == [3] * len(lines)  # a point per logged step


def test_a_finished_run_is_left_alone_and_a_larger_steps_extends_it(tmp_path, demo_manifest):
    """Re-running a finished run changes no file (bytes and modification times); a larger --steps continues
    from its checkpoint and keeps the retrieval measured before the first step."""
    args = ["--out", tmp_path / "run", *demo_args(demo_manifest), *FAST, "--ckpt-every", "2"]
    first = run_train(*args, "--steps", "2")
    assert first.returncode == 0, first.stderr
    files = sorted((tmp_path / "run").iterdir())

    def state():
        return {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted((tmp_path / "run").iterdir())}

    before = state()
    again = run_train(*args, "--steps", "2")
    assert again.returncode == 0, again.stderr
    assert f"{tmp_path / 'run'} already finished at step 2" in again.stdout and "--steps" in again.stdout
    assert state() == before and sorted((tmp_path / "run").iterdir()) == files
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    longer = run_train(*args, "--steps", "4")
    assert longer.returncode == 0, longer.stderr
    assert "resuming at step 2" in longer.stdout
    extended = json.loads((tmp_path / "run/summary.json").read_text())
    assert extended["steps"] == 4 and extended["before"] == summary["before"] is not None
    steps = [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_the_bar_shows_steps_per_second_and_time_left_after_one_step():
    bar = Progress(cli.StepRate())
    task = bar.add_task("train", total=100, completed=10, ran=0, seconds=0.0)
    assert str(cli.StepRate().render(bar.tasks[task])) == "first step ..."
    bar.update(task, completed=11, ran=1, seconds=0.5)  # one step (a resumed run: from step 10) took 0.5 s
    assert str(cli.StepRate().render(bar.tasks[task])) == "2.00 steps/s, 0:00:44 left"
    bar.update(task, completed=40, ran=30, seconds=4000.0)
    assert str(cli.StepRate().render(bar.tasks[task])) == "0.01 steps/s, 2:13:20 left"


def write_metrics(run: Path, rows: list[dict]) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_curves_svg_has_a_panel_per_logged_quantity_and_a_point_per_row(tmp_path):
    steps = [20, 40, 60, 80]
    rows = [{"step": s, "loss": 9 - s / 40, "clip": 3 - s / 80, "distill": 6.9, "lr": 5e-4 * s / 80,
             "logit_scale": 14.3 + s / 100, "teacher_temp": 0.04 + s / 8000, "grad_norm": 1.0} for s in steps]
    rows.insert(2, {"step": 40, "val": {"en": {"mR": 3.5}, "pt": {"mR": 2.5}, "mean": {"mR": 3.0}}})
    rows.append({"step": 80, "val": {"en": {"mR": 4.0}}})
    path = curves.plot(write_metrics(tmp_path / "run", rows))
    assert path == tmp_path / "run/curves.svg"
    svg = ET.parse(path).getroot()
    titles = [t.text for t in svg.iter(f"{SVG}text") if t.get("font-weight") == "bold"]
    assert titles == [title for _, title in curves.CURVES]
    points = [[tuple(map(float, p.split(","))) for p in line.get("points").split()]
              for line in svg.iter(f"{SVG}polyline")]
    assert [len(p) for p in points] == [4, 4, 4, 4, 4, 4, 2]
    assert points[0][0][1] < points[0][-1][1]  # the loss falls: its curve goes down (SVG's y grows downward)
    assert [label for _, label in curves.nice_ticks(14.29, 14.31)] == ["14.29", "14.3", "14.31"]  # distinct
    assert [label for _, label in curves.nice_ticks(0, 600)] == ["0", "200", "400", "600"]
    clip_only = [{"step": s, "loss": 3.0, "clip": 3.0, "lr": 1e-4, "logit_scale": 14.3} for s in (5, 10)]
    svg = ET.parse(curves.plot(write_metrics(tmp_path / "clip", clip_only))).getroot()
    assert len(list(svg.iter(f"{SVG}polyline"))) == 4  # no distillation, teacher or validation panel


def test_plot_command_writes_curves_and_says_so(tmp_path, capsys):
    write_metrics(tmp_path / "run", [{"step": 1, "loss": 2.0}])
    with pytest.raises(SystemExit) as done:
        cli.run_cli(train.app, ["plot", str(tmp_path / "run")])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'run/curves.svg'}\n"
    assert len(list(ET.parse(tmp_path / "run/curves.svg").getroot().iter(f"{SVG}circle"))) == 1  # one point


def test_every_option_of_train_and_eval_says_what_it_does():
    """--help: a description for every option, and no empty default printed as `(default: )`."""
    import typer.main

    import eval as ev

    commands = [typer.main.get_command(train.app), *typer.main.get_command(ev.app).commands.values()]
    for command in commands:
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help and "(default: )" not in param.help, (command.name, param.name)


def test_two_runs_on_one_directory_one_runs_and_the_other_is_refused(tmp_path, demo_manifest):
    args = ["--out", tmp_path / "run", *demo_args(demo_manifest), *SMALL]
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    metrics, deadline = tmp_path / "run/metrics.jsonl", time.time() + 300
    while not (metrics.exists() and metrics.stat().st_size) and first.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # frozen mid-run, lock held: the second run meets it for certain
    try:
        second = run_train(*args)
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"{tmp_path / 'run'} is in use by another train.py (pid {first.pid})" in second.stderr
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [2, 4, 6]  # once each


def test_a_full_disk_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, demo_manifest):
    """On a file system with room for one checkpoint but not two (an atomic write holds the old one until
    the new one is whole), the second checkpoint fails: a message, the first checkpoint intact, and once
    there is room the same command resumes from it."""
    args = [*demo_args(demo_manifest), *SMALL]
    probe = run_train("--out", tmp_path / "probe", *args[:-5], "--steps", "2", "--ckpt-every", "2")
    assert probe.returncode == 0, probe.stderr
    size = (tmp_path / "probe/checkpoint.safetensors").stat().st_size
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o size={size * 3 // 2 + 2 ** 20} tmpfs {small}"):
        pytest.skip("mounting a small tmpfs needs root (the message itself: test_bad_inputs' unit test)")
    try:
        stopped = run_train("--out", small / "run", *args)
        assert stopped.returncode == 1 and "Traceback" not in stopped.stderr, stopped.stderr
        checkpoint = small / "run/checkpoint.safetensors"
        assert f"error: {checkpoint}: cannot write it (No space left on device; needs " in stopped.stderr
        assert ("the run stopped at step 4 and its last good checkpoint, step 2, is unchanged: free space "
                "and run the same command to resume") in stopped.stderr
        assert rundir.read_checkpoint(checkpoint)[0]["step"] == 2
        assert not [p.name for p in (small / "run").iterdir() if p.name.endswith("tmp") or "tmp" in p.name]
        assert os.system(f"mount -o remount,size={4 * size} tmpfs {small}") == 0
        resumed = run_train("--out", small / "run", *args)
        assert resumed.returncode == 0 and "resuming at step 2" in resumed.stdout, resumed.stderr
    finally:
        os.system(f"umount {small}")


def test_sigkill_and_resume_equals_an_uninterrupted_run(tmp_path, demo_manifest):
    args = [*demo_args(demo_manifest), *SMALL]
    reference = run_train("--out", tmp_path / "ref", *args)
    assert reference.returncode == 0, reference.stderr
    killed_at = kill_after_first_checkpoint(tmp_path / "cut", args, random.Random(0).uniform(0, 0.3))
    assert killed_at < 6 and not (tmp_path / "cut/model.safetensors").exists()
    # What a kill can leave besides: lines of steps after the checkpoint (they run again) and a temporary file
    with open(tmp_path / "cut/metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": killed_at + 1, "loss": 0.0}) + "\n")
        f.write('{"step": 9, "lo')  # the last one torn
    for stale in [".checkpoint.safetensors.12345.x8f2k.tmp", ".tmpSAh4ic"]:  # atomic_write's, safetensors'
        (tmp_path / "cut" / stale).write_bytes(b"\0" * 1000)
    # the killed run's lock died with it: the resume starts at once (no stale lock)
    resumed = run_train("--out", str(tmp_path / "cut") + "/", *args)  # spelled otherwise: the same directory
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {killed_at}" in resumed.stdout
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
    hidden = [p.name for p in (tmp_path / "cut").glob(".*")]
    assert steps == [2, 4, 6] and hidden == [".lock"]  # each step once, no temporaries
    a, b = read_model(tmp_path / "ref/model.safetensors"), read_model(tmp_path / "cut/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    with safe_open(str(tmp_path / "ref/checkpoint.safetensors"), "pt") as f, \
            safe_open(str(tmp_path / "cut/checkpoint.safetensors"), "pt") as g:
        # the teacher, the centre and the moments too
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())


def test_sigkill_and_resume_from_the_cache_with_tensor_augmentation(tmp_path, demo_manifest):
    """--image-cache + --augment tensor on CPU with --deterministic: a killed and resumed run equals an
    uninterrupted one bit for bit (the views' parameters are drawn per (seed, step, position) as with PIL)."""
    from data.prepare import build_cache

    build_cache(demo_manifest, tmp_path / "cache.safetensors")
    args = [*demo_args(demo_manifest), *SMALL, "--augment", "tensor", "--image-cache",
            tmp_path / "cache.safetensors"]
    reference = run_train("--out", tmp_path / "ref", *args)
    assert reference.returncode == 0, reference.stderr
    assert "augment tensor from" in reference.stdout
    kill_after_first_checkpoint(tmp_path / "cut", args)
    checkpoint = tmp_path / "cut/checkpoint.safetensors"
    resumed = run_train("--out", tmp_path / "cut", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step" in resumed.stdout
    with safe_open(str(tmp_path / "ref/checkpoint.safetensors"), "pt") as f, \
            safe_open(str(checkpoint), "pt") as g:
        assert f.keys() == g.keys() and all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())


def test_a_non_finite_loss_stops_the_run_naming_its_step(tmp_path, demo_manifest, monkeypatch):
    """The finiteness check is read on logging steps only, yet names the exact step, and no checkpoint is
    written past it."""
    real = train.compute_loss

    def poisoned(run, batch, step):
        loss, parts = real(run, batch, step)
        return (loss * float("nan") if step == 2 else loss), parts

    monkeypatch.setattr(train, "compute_loss", poisoned)
    given = {"data": [str(demo_manifest)], "tokenizer": str(demo_manifest.parent / "spm.model"),
             "out": str(tmp_path / "run"), "steps": 8, "log_every": 4, "ckpt_every": 2, "batch_size": 8,
             "local_crops": 2, "prototypes": 64, "workers": 0, "langs": "en"}
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(rundir.RunError, match=r"non-finite loss \(nan\) at step 2; the last checkpoint"):
            train.train(train.resolve_config("demo", None, given), ["train.py"])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    with safe_open(str(tmp_path / "run/checkpoint.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["state"])["step"] == 2  # written before step 2 ran; not at step 4


def test_kill_during_checkpoint_writes_never_leaves_a_broken_checkpoint(tmp_path, demo_manifest):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    checkpoint, rng = tmp_path / "run/checkpoint.safetensors", random.Random(1)
    args = [*demo_args(demo_manifest), *FAST, "--steps", "40", "--ckpt-every", "1"]
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--out", str(tmp_path / "run"),
                                 *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        deadline = time.time() + 300
        while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.0))  # checkpoints are written every step: kills land mid-write too
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with safe_open(str(checkpoint), "pt") as f:  # always the last complete checkpoint
            assert json.loads(f.metadata()["state"])["step"] >= 1
            assert all(f.get_tensor(k) is not None for k in f.keys())


def test_sigterm_saves_and_stops_cleanly(tmp_path, demo_manifest):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--out", str(tmp_path / "run"),
                             *demo_args(demo_manifest), *FAST, "--steps", "400", "--ckpt-every", "1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    metrics = tmp_path / "run/metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "stopped by signal" in err and "Traceback" not in err
    with safe_open(str(tmp_path / "run/checkpoint.safetensors"), "pt") as f:
        assert 2 <= json.loads(f.metadata()["state"])["step"] < 400


def test_bad_input_gives_clear_errors(tmp_path, demo_manifest):
    empty = tmp_path / "empty/captions.jsonl"
    empty.parent.mkdir()
    empty.write_text("")
    manifest = tmp_path / "d/captions.jsonl"
    manifest.parent.mkdir()
    Image.new("RGB", (70, 70), (10, 120, 30)).save(tmp_path / "d/a.png")
    lines = [{"id": f"x{i}", "image": "a.png" if i % 5 else "gone.png", "split": "train", "dataset": "x",
              "captions": {"en": [f"green field {i}"]}} for i in range(20)]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    tok = demo_manifest.parent / "spm.model"
    big_cfg = rsmclip.CLIPConfig.from_dict({**rsmclip.asdict(rsmclip.PRESETS["tiny"]), "embed_dim": 32})
    rsmclip.save(rsmclip.CLIP(big_cfg), tmp_path / "other.safetensors")
    common = ["--tokenizer", tok, *FAST, "--steps", "2"]
    cases = [
        (["--data", empty, "--out", tmp_path / "r1", *common], "no training images"),
        (["--data", manifest, "--out", tmp_path / "r2", *common, "--langs", "en,pt"], "no pt captions"),
        (["--data", manifest, "--out", tmp_path / "r3", *common, "--langs", "xx"], "unknown language xx"),
        (["--data", manifest, "--out", tmp_path / "r4", "--init", tmp_path / "other.safetensors", *common],
         "is not the tiny architecture"),
        (["--data", manifest, "--out", tmp_path / "r5", "--strict-images", *common],
         "unreadable training image"),
        (["--preset", "nope"], "unknown preset"),
    ]
    for args, message in cases:
        result = run_train(*args)
        assert result.returncode == 1, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    skipping = run_train("--data", manifest, "--out", tmp_path / "r6", *common)  # default: skip and count
    assert skipping.returncode == 0, skipping.stderr
    output = skipping.stdout + skipping.stderr
    assert "warning: skipped" in output and "gone.png" in output
    assert json.loads((tmp_path / "r6/summary.json").read_text())["skipped_images"] > 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("nodes", [1, 2], ids=["one node, 2 processes", "two nodes on one host"])
def test_ddp_on_two_cpu_processes_equals_one_process(tmp_path, demo_manifest, nodes):
    """torchrun with 2 processes (gloo), as one node or as two nodes meeting through the c10d rendezvous
    (two launchers, as `srun torchrun` starts them): same loss and gradients as one process on the global
    batch, the same weights after the optimizer step on both ranks and in the one process, and the same
    teacher on both ranks although rank 1 started from other weights."""
    script = ROOT / "tests/ddp_step.py"
    single_out = str(tmp_path / "single.safetensors")
    single = subprocess.run([sys.executable, str(script), str(demo_manifest), single_out],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert single.returncode == 0, single.stderr
    launch = [sys.executable, "-m", "torch.distributed.run"]
    job = [str(script), str(demo_manifest), str(tmp_path / "ddp.safetensors")]
    if nodes == 1:
        launchers = [launch + ["--nproc_per_node", "2", "--master_port", str(free_port()), *job]]
    else:
        endpoint = f"127.0.0.1:{free_port()}"
        launchers = [launch + ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", endpoint, "--rdzv-id", "test", *job]] * 2
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for cmd in launchers]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    a, b = read_model(tmp_path / "single.safetensors"), read_model(tmp_path / "ddp.safetensors")
    assert a.keys() == b.keys() and len(a) > 50
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    # Adam's first step is about lr x sign(gradient) (lr 5e-4): gradients equal to summation order give
    # weights equal to ~1e-6 (3 of 6.4M entries above 1e-6, at most 2.1e-6, when this was written)
    one = read_model(f"{single_out}.weights0")
    ranks = [read_model(f"{tmp_path}/ddp.safetensors.weights{r}") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() == one.keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in one)
    assert all(torch.allclose(ranks[0][k], one[k], atol=1e-5, rtol=0) for k in one)
    teachers = [read_model(f"{tmp_path / 'ddp.safetensors'}.teacher{rank}.safetensors") for rank in range(2)]
    single = read_model(f"{tmp_path / 'single.safetensors'}.teacher0.safetensors")
    assert all(torch.equal(teachers[0][k], teachers[1][k]) for k in single)
    assert all(torch.equal(teachers[0][k], single[k]) for k in single)


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = rsmclip.PRESETS["tiny"]
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ids = torch.full((4, 77), rsmclip.PAD)
    ids[:, :6] = torch.tensor([0, 40, 41, 42, 43, 2])
    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = rsmclip.CLIP(cfg).train()
        model.set_grad_checkpointing(enabled)
        torch.manual_seed(1)  # the same dropout masks: checkpoint replays the RNG state on recomputation
        rsmclip.clip_loss(*model(pixels, ids)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_validation_during_training_equals_eval_py(demo_manifest):
    """train.validate (batch 128) and eval.py's retrieval command path (its default batch 64) give the same
    table: a caption's embedding depends on the caption alone."""
    import eval as ev

    run, _ = tiny_run(langs="en,zh")
    run.tokenizer = rsmclip.Tokenizer(demo_manifest.parent / "spm.model")
    during = train.validate(run, str(demo_manifest), "test")
    model = run.unwrapped.clip
    after = ev.evaluate_retrieval(model, run.tokenizer, rsmclip.Preprocess(64), demo_manifest, "test",
                                  ["en", "zh"], workers=0)
    assert list(during) == ["en", "zh", "mean"]
    for lang in during:
        assert during[lang]["by_tie_rule"] == after[lang]["by_tie_rule"]
