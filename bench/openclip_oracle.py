"""open_clip's xlm-roberta ViT CLIP built offline for any rsmclip config, and paired with ours on the same
seeded noise: the oracle of the tests and the peer of the benchmarks (both import it from here).

open_clip would fetch the xlm-roberta-base config from the hub; we register a model config of the
same shape and hand it a transformers XLMRobertaConfig built from ours (open_clip's hf_model.py builds its
text tower from AutoConfig.from_pretrained(hf_model_name), which we patch). open_clip and transformers
(test and benchmark dependencies, never the toolkit's) are imported where a model is built."""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from unittest import mock

import torch

import rsmclip


def hf_text_config(cfg: rsmclip.CLIPConfig):
    import transformers

    t = cfg.text
    return transformers.XLMRobertaConfig(
        vocab_size=t.vocab_size, hidden_size=t.width, num_hidden_layers=t.layers,
        num_attention_heads=t.width // t.head_width, intermediate_size=t.intermediate, hidden_act="gelu",
        hidden_dropout_prob=t.dropout, attention_probs_dropout_prob=t.dropout,
        max_position_embeddings=t.max_positions, type_vocab_size=1, layer_norm_eps=1e-5,
        pad_token_id=1, bos_token_id=0, eos_token_id=2)


def make_openclip_model(cfg: rsmclip.CLIPConfig):
    import open_clip

    v = cfg.vision
    name = f"rsmclip-oracle-{abs(hash(json.dumps(dataclasses.asdict(cfg), sort_keys=True)))}"
    model_cfg = {"embed_dim": cfg.embed_dim,
                 "vision_cfg": {"image_size": v.image_size, "layers": v.layers, "width": v.width,
                                "patch_size": v.patch_size, "head_width": v.head_width,
                                "mlp_ratio": v.mlp_ratio},
                 "text_cfg": {"hf_model_name": "xlm-roberta-base", "hf_tokenizer_name": "xlm-roberta-base",
                              "hf_pooler_type": "mean_pooler", "hf_proj_type": "mlp"}}
    with tempfile.TemporaryDirectory() as d:
        Path(d, f"{name}.json").write_text(json.dumps(model_cfg))
        open_clip.add_model_config(d)
    with mock.patch.object(open_clip.hf_model.AutoConfig, "from_pretrained",
                           return_value=hf_text_config(cfg)):
        return open_clip.create_model(name, pretrained=None, pretrained_text=False)


def fill_with_noise(model: torch.nn.Module, seed: int = 0, std: float = 0.02):
    """Overwrite every parameter with seeded noise: norm weights near 1, biases non-zero, so a dropped
    bias or a swapped tensor shows up (default inits hide both)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name == "logit_scale":
                p.copy_(torch.tensor(3.0) + 0.1 * noise)
            elif ".ln" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(std * noise)
    return model


def paired_models(cfg: rsmclip.CLIPConfig, seed: int = 0):
    """Our model with seeded noise, and open_clip's with the same weights (strict load), both in eval()."""
    ours = fill_with_noise(rsmclip.CLIP(cfg), seed).eval()
    theirs = make_openclip_model(cfg)
    theirs.load_state_dict(rsmclip.to_openclip_state_dict(ours.state_dict(), cfg), strict=True)
    return ours, theirs.eval()
