"""Worker for tests/test_distributed.py: `remoe.training.train.train(options)` under torchrun (or one process).

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_workers.py OPTIONS.json RESULTS_DIR

OPTIONS.json holds the `train()` options plus `probe`: token ids (B, S) whose logits and loss each run records right
after the model is set up (B split over the ranks, like a global batch) and after training (the whole batch on every
rank). Each rank writes RESULTS_DIR/rank<R>.pt with those, its lambda history, and the batches it trained on.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer

import remoe.training.train as train_module


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def _probe(model, probe: torch.Tensor, split: bool) -> dict:
    """Logits and LM loss of `probe`; with `split`, rank r runs rows r::world and the results are gathered."""
    rank, world = _rank_and_world()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = probe[rank::world] if split else probe
    output = model(rows.to(device), labels=rows.to(device))
    logits, loss = output.logits.float().cpu(), output.loss.float().cpu()
    if split and world > 1:
        parts = [torch.empty_like(logits) for _ in range(world)]
        dist.all_gather(parts, logits)
        logits = torch.stack(parts, dim=1).reshape(-1, *logits.shape[1:])  # back to the rows' original order
        losses = [torch.empty_like(loss) for _ in range(world)]
        dist.all_gather(losses, loss)
        loss = torch.stack(losses).mean()  # equal token counts per rank: the global batch's mean
    model.train(was_training)
    return {"logits": logits, "loss": loss}


def skip_deepspeed_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first use (minutes on a clean 2-core
    machine); the tests run plain gloo collectives instead, which is what that op accelerates. The module comes from
    `import_module`: the attribute `deepspeed.comm.torch` is the `torch` module that `deepspeed.comm` imports."""
    try:
        deepspeed_torch_backend = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    assert hasattr(deepspeed_torch_backend, "TorchBackend"), deepspeed_torch_backend
    deepspeed_torch_backend.build_shm_op = lambda: None


def main(options_path: str, results_dir: str) -> None:
    skip_deepspeed_shm_op()
    options = json.loads(Path(options_path).read_text())
    probe = torch.tensor(options.pop("probe"))
    record: dict = {"batches": []}

    original_build_trainer = train_module.build_trainer

    def build_trainer(model, args, **kwargs):
        trainer = original_build_trainer(model, args, **kwargs)
        record["initial"] = _probe(model, probe, split=True)
        record["trainer"] = trainer
        return trainer

    original_add_callback = train_module.add_controller_callback

    def add_controller_callback(trainer, process_group=None):
        record["callback"] = original_add_callback(trainer, process_group)
        return record["callback"]

    original_training_step = Trainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        record["batches"].append(inputs["input_ids"].cpu().tolist())
        return original_training_step(self, model, inputs, *args, **kwargs)

    train_module.build_trainer = build_trainer
    train_module.add_controller_callback = add_controller_callback
    Trainer.training_step = training_step

    metrics = train_module.train(options)
    model = record["trainer"].model
    rank, world = _rank_and_world()
    result = {
        "rank": rank,
        "world_size": world,
        "metrics": metrics,
        "initial": record["initial"],
        "final": _probe(model, probe, split=False),
        "history": record["callback"].history,
        "l1_coef": model.controller.l1_coef.item(),
        "batches": record["batches"],
    }
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    torch.save(result, Path(results_dir) / f"rank{rank}.pt")
    if world > 1:
        dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
