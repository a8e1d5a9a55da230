"""rsmclip.py against open_clip (model, weights, preprocessing) and the HF tokenizer, on seeded random
weights. open_clip and transformers are the oracles; what must be equal:

* the model: `encode_image`, `encode_text`, logits and the CLIP loss (and its gradients) of our CLIP equal
  open_clip's `CLIP`/`CustomTextCLIP` for `xlm-roberta-base-ViT-B-32` (open_clip/model.py,
  transformer.py's `VisionTransformer`, hf_model.py's `HFTextEncoder` with `MeanPooler` and the
  "mlp" projection; loss.py's `ClipLoss`) on the same weights, in fp32;
* the weights: every tensor maps one-to-one to open_clip's state-dict names (a strict load both ways),
  parameter counts equal;
* the tokenizer: ids equal open_clip's `HFTokenizer` (tokenizer.py: ftfy + whitespace cleaning, then
  the XLM-R fast tokenizer: <s> pieces </s>, padding with id 1, 77 positions);
* preprocessing: equal to open_clip's `image_transform(is_train=False)` (transform.py: bicubic resize of
  the shorter side, centre crop, OpenAI CLIP mean/std)."""
import io
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import open_clip
import pytest
import torch
from conftest import CORPUS
from PIL import Image
from safetensors.torch import load_file, save_file

import rsmclip
from bench.openclip_oracle import fill_with_noise, paired_models

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOL = 1e-4

# ----------------------------------------------------------------------------- model parity


def random_ids(cfg, lengths, seed=0):
    """Token ids as the tokenizer makes them: <s> ... </s> then pads, of the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), cfg.context_length), rsmclip.PAD)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(4, cfg.text.vocab_size, (n,), generator=g)
        ids[row, 0], ids[row, n - 1] = rsmclip.BOS, rsmclip.EOS
    return ids


def check_parity(cfg, batch, lengths, seed=0):
    ours, theirs = paired_models(cfg, seed)
    g = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ids = random_ids(cfg, lengths, seed)
    with torch.no_grad():
        errors = {
            "encode_image": (ours.encode_image(pixels) - theirs.encode_image(pixels)).abs().max(),
            "encode_text": (ours.encode_text(ids) - theirs.encode_text(ids)).abs().max(),
        }
        i1, t1, s1 = ours(pixels, ids)
        i2, t2, s2 = theirs(pixels, ids)
        errors["logits"] = (s1 * i1 @ t1.T - s2 * i2 @ t2.T).abs().max()
        loss_ref = open_clip.ClipLoss()(i2, t2, s2)
        errors["loss"] = (rsmclip.clip_loss(i1, t1, s1) - loss_ref).abs()
    for name, err in errors.items():
        assert err < TOL, f"{name}: max |ours - open_clip| = {err:.3g}"
    return ours, theirs, errors


def test_tiny_parity_with_openclip():
    # Lengths mix short, long and a full 77 so trimming, masking and the no-mask path all run.
    check_parity(rsmclip.PRESETS["tiny"], batch=4, lengths=[5, 77, 20, 9])
    check_parity(rsmclip.PRESETS["tiny"], batch=2, lengths=[12, 12], seed=3)  # equal lengths: no mask


def test_tiny_gradients_match_openclip():
    cfg = rsmclip.PRESETS["tiny"]
    ours, theirs = paired_models(cfg, seed=5)
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    ids = random_ids(cfg, [7, 30, 15, 4], seed=5)
    rsmclip.clip_loss(*ours(pixels, ids)).backward()
    open_clip.ClipLoss()(*theirs(pixels, ids)).backward()
    ours_grads = rsmclip.to_openclip_state_dict({k: p.grad for k, p in ours.named_parameters()}, cfg)
    for name, p in theirs.named_parameters():
        # Relative to the tensor's scale, not element-wise: a gradient summed over every token (the token
        # type row) has small elements whose fp32 rounding depends on the CPU's kernels.
        assert (ours_grads[name] - p.grad).abs().max() <= 1e-6 + 1e-4 * p.grad.abs().max(), name


def test_full_xlmr_b32_parity_with_openclip():
    cfg = rsmclip.PRESETS["xlmr-b32"]
    ours, theirs, errors = check_parity(cfg, batch=3, lengths=[14, 31, 77])
    counts = rsmclip.count_parameters(ours)
    assert counts == {"visual": 87_849_216, "text": 278_272_256, "total": 366_121_473}
    assert sum(p.numel() for p in theirs.parameters()) == counts["total"]
    print({k: f"{float(v):.2e}" for k, v in errors.items()})


def test_training_mode_has_text_dropout_only():
    model = rsmclip.CLIP(rsmclip.PRESETS["tiny"]).train()
    pixels, ids = torch.randn(2, 3, 64, 64), random_ids(model.config, [9, 20])
    assert torch.equal(model.encode_image(pixels), model.encode_image(pixels))
    assert not torch.equal(model.encode_text(ids), model.encode_text(ids))
    model.eval()
    assert torch.equal(model.encode_text(ids), model.encode_text(ids))


def test_positional_embedding_interpolation_matches_timm():
    from timm.layers import (
        resample_abs_pos_embed,  # an independent implementation (timm comes with open_clip)
    )

    model = fill_with_noise(rsmclip.CLIP(rsmclip.PRESETS["tiny"])).eval()
    vit = model.visual
    assert vit.pos_embed_for(8, 8) is vit.pos_embed
    for grid in [(3, 3), (4, 6), (12, 12)]:
        ref = resample_abs_pos_embed(vit.pos_embed[None], new_size=grid, old_size=(8, 8), num_prefix_tokens=1,
                                     interpolation="bicubic", antialias=False)[0]
        assert torch.allclose(vit.pos_embed_for(*grid), ref, atol=1e-6)
    with torch.no_grad():  # a 24-px local crop of a 64-px/patch-8 model: a 3x3 grid, as 96 px is for ViT-B/32
        assert model.encode_image(torch.randn(3, 3, 24, 24)).shape == (3, 64)


# ----------------------------------------------------------------------------- weights


def test_openclip_export_loads_strictly_in_openclip(tmp_path):
    cfg = rsmclip.PRESETS["tiny"]
    ours, theirs = paired_models(cfg, seed=2)
    rsmclip.save(ours, tmp_path / "oc.safetensors", openclip_names=True)
    fresh = paired_models(cfg, seed=99)[1]
    fresh.load_state_dict(load_file(tmp_path / "oc.safetensors"), strict=True)
    pixels, ids = torch.randn(2, 3, 64, 64), random_ids(cfg, [6, 11])
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(pixels), theirs.encode_image(pixels))
        assert torch.equal(fresh.encode_text(ids), theirs.encode_text(ids))


def test_real_openclip_checkpoint_variants_convert(tmp_path, spm_model):
    """The public checkpoint is a torch pickle with a stale position_ids buffer; DDP runs add `module.`,
    some scripts wrap in {"state_dict"} and save logit_scale as [1]. All must load, and the pickle only
    through convert (weights_only)."""
    cfg = rsmclip.PRESETS["tiny"]
    ours, theirs = paired_models(cfg, seed=4)
    sd = theirs.state_dict()
    sd["text.transformer.embeddings.position_ids"] = torch.arange(514)[None]
    sd["logit_scale"] = sd["logit_scale"].reshape(1)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ckpt.pt")
    with pytest.raises(rsmclip.WeightsError, match="pickled checkpoint; convert it once"):
        rsmclip.load(tmp_path / "ckpt.pt")
    rsmclip.convert(tmp_path / "ckpt.pt", tmp_path / "model.safetensors")
    shutil.copy(spm_model, tmp_path / "spm.model")
    # open_clip's public file has no config: the shapes give it (heads assume width 64, so compare weights)
    cfg2, loaded = rsmclip.read_weights(tmp_path / "model.safetensors")
    assert cfg2.vision.width == cfg.vision.width and cfg2.text.layers == cfg.text.layers
    for k, v in ours.state_dict().items():
        assert torch.equal(loaded[k], v), k
    rsmclip.save(ours, tmp_path / "ours.safetensors")
    model, _, _ = rsmclip.load(tmp_path / "ours.safetensors")
    assert model.config == cfg and not model.training
    with pytest.raises(rsmclip.WeightsError, match="not a loadable weights-only"):
        (tmp_path / "evil.bin").write_bytes(b"\x80\x04\x95" + b"cos\nsystem\n(S'echo hi'\ntR." + b"\x00" * 8)
        rsmclip.convert(tmp_path / "evil.bin", tmp_path / "evil.safetensors")


def test_bad_weights_files_give_clear_errors(tmp_path, spm_model):
    cfg = rsmclip.PRESETS["tiny"]
    model = rsmclip.CLIP(cfg)
    good = tmp_path / "good.safetensors"
    rsmclip.save(model, good)
    with pytest.raises(rsmclip.WeightsError, match="no such weights file"):
        rsmclip.read_weights(tmp_path / "missing.safetensors")
    with pytest.raises(rsmclip.WeightsError, match="is a directory.*good.safetensors"):
        rsmclip.read_weights(tmp_path)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(rsmclip.WeightsError, match="truncated or corrupt"):
        rsmclip.read_weights(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(rsmclip.WeightsError, match="truncated or corrupt"):
        rsmclip.read_weights(tmp_path / "junk.safetensors")
    # an open_clip file that lacks tensors / has extra ones / has other shapes: every problem named
    sd = rsmclip.to_openclip_state_dict(model.state_dict(), cfg)
    del sd["visual.ln_post.bias"]
    sd["text.pooler.dense.weight"] = torch.zeros(2, 2)
    sd["text.proj.2.weight"] = torch.zeros(32, 96)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "bad.safetensors")
    with pytest.raises(rsmclip.WeightsError) as err:
        rsmclip.read_weights(tmp_path / "bad.safetensors")
    message = str(err.value)
    assert "1 missing: visual.ln_post.bias" in message and "1 unexpected: text.pooler.dense.weight" in message
    assert "1 mis-shaped: text.proj.2.weight [32, 96] (model [64, 96])" in message
    # a checkpoint of another architecture (open_clip's OpenAI-style ViT-B-32 text tower)
    save_file({"visual.conv1.weight": torch.zeros(8, 3, 4, 4), "token_embedding.weight": torch.zeros(5, 8)},
              tmp_path / "other.safetensors")
    with pytest.raises(rsmclip.WeightsError, match="not an xlm-roberta ViT CLIP checkpoint"):
        rsmclip.read_weights(tmp_path / "other.safetensors")
    # our format whose config disagrees with its tensors
    xl = rsmclip.PRESETS["xlmr-b32"]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "lie.safetensors",
              metadata={"format": "rsmclip", "config": rsmclip.json.dumps(rsmclip.asdict(xl))})
    with pytest.raises(rsmclip.WeightsError, match="mis-shaped"):
        rsmclip.read_weights(tmp_path / "lie.safetensors")
    # a tokenizer bigger than the model's vocabulary belongs to other weights
    big = tmp_path / "big.model"
    shutil.copy(spm_model, big)
    small = rsmclip.CLIPConfig.from_dict({**rsmclip.asdict(cfg),
                                          "text": {**rsmclip.asdict(cfg.text), "vocab_size": 10}})
    rsmclip.save(rsmclip.CLIP(small), tmp_path / "small.safetensors")
    with pytest.raises(rsmclip.RsmclipError, match="belongs to other weights"):
        rsmclip.load(tmp_path / "small.safetensors", tokenizer=big)
    with pytest.raises(rsmclip.RsmclipError, match="tokenizer .*no such file"):
        rsmclip.load(good)


# ----------------------------------------------------------------------------- tokenizer

def openclip_tokenizer(hf_tokenizer):
    """open_clip's own HFTokenizer (its cleaning + the HF call), given the HF tokenizer it would download."""
    with mock.patch("transformers.AutoTokenizer.from_pretrained", return_value=hf_tokenizer):
        return open_clip.tokenizer.HFTokenizer("xlm-roberta-base")


def test_tokenizer_ids_equal_openclip_small_model(spm_model, tmp_path):
    from transformers import XLMRobertaTokenizer

    shutil.copy(spm_model, tmp_path / "sentencepiece.bpe.model")
    # converted to a fast tokenizer
    oracle = openclip_tokenizer(XLMRobertaTokenizer.from_pretrained(tmp_path))
    ours = rsmclip.Tokenizer(spm_model)
    expected = oracle(CORPUS)
    assert expected.shape == (len(CORPUS), 77) and (expected == rsmclip.UNK).any()
    assert torch.equal(ours(CORPUS), expected)
    assert ours("x").tolist() == ours(["x"]).tolist()


@pytest.mark.skipif(not (SHARED / "assets/xlmr/tokenizer.json").exists(),
                    reason="../shared/assets/xlmr absent")
def test_tokenizer_ids_equal_openclip_real_xlmr_vocabulary(tmp_path):
    from transformers import XLMRobertaTokenizer

    shutil.copy(SHARED / "assets/xlmr/tokenizer.json", tmp_path / "tokenizer.json")
    oracle = openclip_tokenizer(XLMRobertaTokenizer.from_pretrained(tmp_path))
    ours = rsmclip.Tokenizer(SHARED / "assets/xlmr/sentencepiece.bpe.model")
    assert ours.vocab_size == 250002
    assert ours("Hello world")[0, :5].tolist() == [0, 35378, 8999, 2, 1]
    expected = oracle(CORPUS)
    got = ours(CORPUS)
    for text, a, b in zip(CORPUS, got, expected):
        assert a.tolist() == b.tolist(), repr(text)
    assert (got[-2] != rsmclip.PAD).all() and got[-2, -1] == rsmclip.EOS  # truncated, </s> kept


def test_tokenizer_rejects_bad_files(tmp_path):
    with pytest.raises(rsmclip.RsmclipError, match="no such file"):
        rsmclip.Tokenizer(tmp_path / "none.model")
    (tmp_path / "bad.model").write_bytes(b"garbage")
    with pytest.raises(rsmclip.RsmclipError, match="not a SentencePiece model"):
        rsmclip.Tokenizer(tmp_path / "bad.model")


# ----------------------------------------------------------------------------- preprocessing


def openclip_transform(size):
    return open_clip.image_transform(size, is_train=False, mean=rsmclip.CLIP_MEAN, std=rsmclip.CLIP_STD)


def noise_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if channels == 1 else a, mode)


@pytest.mark.parametrize("size", [(224, 224), (300, 257), (257, 300), (100, 50), (1001, 37), (225, 224),
                                  (256, 256)])
def test_preprocess_equals_openclip(size):
    image = noise_image(*size)
    ours = rsmclip.Preprocess(224)(image)
    assert torch.equal(ours, openclip_transform(224)(image))


def test_preprocess_files_and_modes(tmp_path):
    pp, ref = rsmclip.Preprocess(224), openclip_transform(224)
    rgb = noise_image(256, 256, seed=1)
    rgb.save(tmp_path / "scene.tif")  # remote-sensing sets ship TIFF
    assert torch.equal(pp(tmp_path / "scene.tif"), ref(Image.open(tmp_path / "scene.tif")))
    assert torch.equal(pp(str(tmp_path / "scene.tif")), ref(rgb))
    grey = noise_image(300, 240, "L")
    assert torch.equal(pp(grey), ref(grey))  # channel-wise resize: converting first changes nothing
    rgba = noise_image(240, 240, "RGBA")
    assert torch.equal(pp(rgba), pp(rgba.convert("RGB")))  # alpha dropped, as open_clip does
    # 16-bit (e.g. 12-bit sensor data): stretched, not clipped to white as PIL's convert would
    a = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "sixteen.tif")
    assert Image.open(tmp_path / "sixteen.tif").mode.startswith("I;16")
    rgb16 = rsmclip.open_image(tmp_path / "sixteen.tif")
    assert rgb16.mode == "RGB" and np.asarray(rgb16).min() == 0 and np.asarray(rgb16).max() == 255
    flat = Image.fromarray(np.full((8, 8), 7.5, dtype=np.float32), "F")
    assert np.asarray(rsmclip.to_rgb(flat)).max() == 0
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(rsmclip.ImageError, match="broken.jpg: cannot read image"):
        pp(tmp_path / "broken.jpg")
    with pytest.raises(rsmclip.ImageError, match="no such image file"):
        pp(tmp_path / "absent.png")
    with pytest.raises(rsmclip.ImageError, match="is a directory"):
        pp(tmp_path)
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:400])
    with pytest.raises(rsmclip.ImageError, match="cut.png: cannot read image"):
        pp(tmp_path / "cut.png")


def write_tiff(path: Path, a: np.ndarray, deflate: bool = False, big_endian: bool = False):
    """A baseline TIFF of a [H, W, bands] array, pixel-interleaved, one strip: PIL writes no 16-bit
    multi-band or float multi-band TIFF, which is what sensors ship."""
    import struct
    import zlib

    h, w, c = a.shape
    e = ">" if big_endian else "<"
    data = a.astype(a.dtype.newbyteorder(e)).tobytes()
    data = zlib.compress(data) if deflate else data
    bits = struct.pack(e + "H" * c, *[a.dtype.itemsize * 8] * c)
    kinds = struct.pack(e + "H" * c, *[3 if a.dtype.kind == "f" else 1] * c)
    ifd_at = 8 + len(data) + 2 * len(bits)
    short = lambda tag, v: struct.pack(e + "HHIHH", tag, 3, 1, v, 0)  # noqa: E731
    entries = [struct.pack(e + "HHII", 256, 4, 1, w), struct.pack(e + "HHII", 257, 4, 1, h),
               struct.pack(e + "HHII", 258, 3, c, 8 + len(data)), short(259, 8 if deflate else 1),
               short(262, 2), struct.pack(e + "HHII", 273, 4, 1, 8), short(277, c),
               struct.pack(e + "HHII", 278, 4, 1, h), struct.pack(e + "HHII", 279, 4, 1, len(data)),
               short(284, 1)]
    entries += [short(338, 0)] if c > 3 else []
    entries.append(struct.pack(e + "HHII", 339, 3, c, 8 + len(data) + len(bits)))
    ifd = struct.pack(e + "H", len(entries)) + b"".join(entries) + struct.pack(e + "I", 0)
    head = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(e + "I", ifd_at)
    path.write_bytes(head + data + bits + kinds + ifd)
    return path


@pytest.mark.parametrize("bands,big_endian", [(3, False), (3, True), (4, False)])
def test_sixteen_bit_multiband_tiffs_are_stretched_per_band(tmp_path, bands, big_endian):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4096, (40, 50, bands)).astype(np.uint16)  # 12-bit data in 16-bit samples
    a[..., 1] //= 4  # a dim band stays visible: each band has its own stretch
    image = rsmclip.open_image(write_tiff(tmp_path / "s.tif", a, big_endian=big_endian))
    out = np.asarray(image)
    assert image.mode == "RGB" and out.shape == (40, 50, 3)
    for b in range(3):  # each band from its 1st to its 99th percentile (PIL alone gives at most 15)
        lo, hi = np.percentile(a[..., b], [1, 99])
        ref = np.clip(np.round((a[..., b] - lo) * 255 / (hi - lo)), 0, 255)
        assert np.abs(out[..., b].astype(float) - ref).max() <= 1 and out[..., b].max() == 255
    with pytest.raises(rsmclip.ImageError,
                       match="compressed or band-separated TIFF with 16-bit.*COMPRESS=NONE"):
        rsmclip.open_image(write_tiff(tmp_path / "z.tif", a, deflate=True))


def test_float_images_with_nan_and_inf_are_not_black():
    a = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    a[0, 0], a[0, 1], a[0, 2] = np.nan, np.inf, -np.inf
    out = np.asarray(rsmclip.to_rgb(Image.fromarray(a, "F")))
    assert out[..., 0].max() == 255 and out[16:, :, 0].mean() > 150  # the bright half is bright
    assert (out[0, :3] == 0).all()  # non-finite pixels are black, the rest keeps its scale


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # raised while making the file
@pytest.mark.parametrize("size,words", [((1, 10000), "aspect ratio above 20:1"),
                                        ((12000, 12000), "above the limit of 100 megapixels")])
def test_huge_or_thin_images_are_refused_before_decoding(tmp_path, size, words):
    Image.new("1", size).save(tmp_path / "x.png")  # a few kB on disk
    with pytest.raises(rsmclip.ImageError, match=words):
        rsmclip.open_image(tmp_path / "x.png")
