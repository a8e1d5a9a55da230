"""Greedy generation speed: translate.py's decoder vs transformers' `generate`, same random weights.

    python -m bench.generate_speed                      # ~100M-parameter Llama on CPU (fp32)
    python -m bench.generate_speed --shape 7b           # Llama-2-7B shape (Tower) on CUDA (bf16)

Prompts are shaped like Tower's (BOS, an instruction shared by the batch, a caption of varying length,
the chat suffix), left-padded for transformers. Two workloads, the same work on both sides:
  translation  each row stops after its own number of tokens, drawn from [new/4, new], as translations
               of different captions end at different places (transformers: a per-row stopping criterion;
               it keeps finished rows in the batch, translate.py drops them)
  fixed        every row generates exactly --new-tokens tokens (raw decoder throughput)
tokens/s = generated tokens / wall time, prefill included (it is part of translating a caption). Each
measurement alternates the two sides --repeats times and keeps the fastest, which damps noise from
other processes; a warm-up batch runs first. Random weights never emit a stop token.
"""
from __future__ import annotations

import time
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

import cli
import translate as T

SHAPES = {  # Llama-2 style (MHA, untied embeddings), as TowerInstruct-7B
    "100m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                 num_attention_heads=12, num_key_value_heads=12),
    "7b": dict(vocab_size=32007, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32),
}


def build(shape: str, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM  # oracle only, never imported by translate.py
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, architectures=["LlamaForCausalLM"])
    torch.manual_seed(seed)
    with torch.device(device):
        hf = LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None  # every row generates exactly --new-tokens
    hf.generation_config.pad_token_id = 0
    c = T.ModelConfig.from_hf(cfg.to_dict())
    layout = T.hf_layout(c)
    tensors = ((n, t, "transformers") for n, t in hf.state_dict().items() if n in layout)
    ours = T.from_tensors(c, tensors, device, dtype)
    return hf, ours, sum(p.numel() for p in hf.parameters())


def prompts_for(batch: int, caption_len: int, vocab: int, seed: int) -> list[list[int]]:
    """Shaped like Tower prompts: BOS, a 20-token instruction shared by the batch, a caption of
    caption_len/2..caption_len tokens, a 10-token suffix ("\nPortuguese:<|im_end|>\n<|im_start|>...")."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    head, tail = draw(20), draw(10)
    lens = torch.randint(caption_len // 2, caption_len + 1, (batch,), generator=g).tolist()
    return [[1] + head + draw(n) + tail for n in lens]


def time_ours(model, prompts, budgets, sync) -> tuple[float, list[list[int]]]:
    sync()
    t = time.perf_counter()
    out = T.generate(model, prompts, budgets, stop_ids=set())
    sync()
    return time.perf_counter() - t, out


@torch.inference_mode()
def time_hf(model, prompts, budgets, sync) -> tuple[float, list[list[int]]]:
    from transformers import StoppingCriteria, StoppingCriteriaList

    L, dev = max(map(len, prompts)), model.device
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):], mask[b, L - len(p):] = torch.tensor(p), 1
    limit = torch.tensor(budgets, device=dev)

    class RowBudget(StoppingCriteria):  # what an EOS at token budgets[b] would do to row b
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids.shape[1] - L >= limit

    sync()
    t = time.perf_counter()
    out = model.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max(budgets),
                         do_sample=False, stopping_criteria=StoppingCriteriaList([RowBudget()]))
    sync()
    return time.perf_counter() - t, [row[L:L + n] for row, n in zip(out.tolist(), budgets)]


def main(
    shape: Annotated[str, typer.Option(help="100m or 7b (default: 100m on CPU, 7b on CUDA)")] = "",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,16,64",
    new_tokens: Annotated[int, typer.Option(help="tokens generated per row (the most, in translation)")] = 32,
    caption_len: Annotated[int, typer.Option(help="longest caption in tokens; others 50-100% of it")] = 32,
    workloads: Annotated[str, typer.Option(help="translation and/or fixed")] = "translation,fixed",
    repeats: Annotated[int, typer.Option(min=1, help="alternating runs; the fastest counts")] = 2,
    threads: Annotated[int, typer.Option(help="CPU threads (0 = torch default)")] = 0,
    seed: Annotated[int, typer.Option(help="seed of the random weights and prompts")] = 0,
):
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    shape = shape or ("7b" if dev.type == "cuda" else "100m")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    console = Console()
    hf, ours, n_params = build(shape, dev, dtype, seed)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {torch.get_num_threads()} threads"
    console.print(f"{shape}: {n_params / 1e6:.0f}M parameters, {dtype}, {name}, torch {torch.__version__}; "
                  f"prompts {31 + caption_len // 2}-{31 + caption_len} tokens, up to {new_tokens} new tokens")
    warm = prompts_for(2, 8, hf.config.vocab_size, seed)
    time_ours(ours, warm, [2, 2], sync), time_hf(hf, warm, [2, 2], sync)
    for workload in workloads.split(","):
        table = Table(title=f"{workload}: generated tokens/s, best of {repeats}")
        for col in ("batch", "translate.py", "transformers", "ratio", "same tokens"):
            table.add_column(col, justify="right")
        for b in (int(x) for x in batch_sizes.split(",")):
            prompts = prompts_for(b, caption_len, hf.config.vocab_size, seed + b)
            g = torch.Generator().manual_seed(seed + b)
            budgets = (torch.randint(max(1, new_tokens // 4), new_tokens + 1, (b,), generator=g).tolist()
                       if workload == "translation" else [new_tokens] * b)
            t_ours = t_hf = float("inf")
            for _ in range(repeats):
                dt, out_ours = time_ours(ours, prompts, budgets, sync)
                t_ours = min(t_ours, dt)
                dt, out_hf = time_hf(hf, prompts, budgets, sync)
                t_hf = min(t_hf, dt)
            same = sum(a == h for a, h in zip(out_ours, out_hf))
            ours_tps, hf_tps = sum(budgets) / t_ours, sum(budgets) / t_hf
            ratio = f"{ours_tps / hf_tps:.2f}x"
            console.print(f"{workload} batch {b}: ours {ours_tps:.1f} tok/s, transformers "
                          f"{hf_tps:.1f} tok/s, ratio {ratio}, same tokens {same}/{b}")
            table.add_row(str(b), f"{ours_tps:.1f}", f"{hf_tps:.1f}", ratio, f"{same}/{b}")
        console.print(table)


if __name__ == "__main__":
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(main)
    cli.run_cli(app)
