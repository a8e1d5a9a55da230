"""One training step on the demo, for tests/test_train.py: run once as a single process with the global
batch, and under torchrun with half of it on each of 2 processes (gloo; one node, or two nodes on one
host). Rank 0 writes the loss (averaged over processes), the DDP-averaged gradients and the updated DINO
centre; every rank writes its teacher (OUT.teacher<rank>.safetensors) and its weights after the optimizer
step (OUT.weights<rank>). Rank 1 starts from other weights: DDP's broadcast must give every rank rank
0's student and teacher."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rundir  # noqa: E402
import train  # noqa: E402
from data import loading  # noqa: E402

GLOBAL_BATCH = 8

placed = rundir.setup_distributed()
rank, world, device = placed.rank, placed.size, placed.device
manifest = Path(sys.argv[1])  # a demo dataset
cfg = train.TrainConfig(data=[str(manifest)], tokenizer=str(manifest.parent / "spm.model"),
                        batch_size=GLOBAL_BATCH // world,
                        local_crops=2, prototypes=64, text_dropout=0.0,  # no dropout: same function
                        head_bn=False,  # batch statistics are per process on CPUs (SyncBatchNorm: GPUs only)
                        workers=0)
model, tokenizer = train.build_model(cfg, Path(cfg.tokenizer))
if rank == 1:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
run = train.build_run(cfg, model, tokenizer, device)
save_file(run.teacher.state_dict(), f"{sys.argv[2]}.teacher{rank}.safetensors")
items = loading.read_manifests(cfg.data, "train")
dataset = loading.MultiCropDataset(items, cfg, model.config.vision.image_size, tokenizer)
keys = next(iter(loading.StepSampler(len(items), cfg.batch_size, rank, world, cfg.seed, 0, 1)))
loss, parts = train.compute_loss(run, loading.collate([dataset[k] for k in keys]), step=0)
loss.backward()
loss = loss.detach()
if world > 1:
    torch.distributed.all_reduce(loss)
    loss /= world
if rank == 0:
    out = {f"grad.{n}": p.grad.contiguous() for n, p in run.unwrapped.named_parameters()
           if p.grad is not None}
    save_file(out | {"loss": loss.reshape(1), "center": run.dino.center}, sys.argv[2])
run.optimizer.step()  # the weights after the step: the same on every rank, and as one process's
save_file({k: v.contiguous() for k, v in run.unwrapped.state_dict().items()}, f"{sys.argv[2]}.weights{rank}")
if world > 1:
    del run, model, loss, parts
    rundir.teardown_distributed()
