"""Worker for tests/test_transformers_integration.py: load saved ReMoE checkpoints with Transformers' own tensor and
expert parallelism (2 CPU processes over gloo) and record the logits and the greedy continuation.

    python -m torch.distributed.run --nproc_per_node 2 tests/parallel_plan_worker.py FOLDER [FOLDER ...] RESULTS.json

Each FOLDER holds a checkpoint and `probe.safetensors` (input ids, the one-process logits and greedy continuation).
"""

import inspect
import json
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import remoe  # registers the model with the Auto classes


def supports_expert_parallel_size() -> bool:
    import transformers.distributed as transformers_distributed

    config = getattr(transformers_distributed, "DistributedConfig", None)
    return config is not None and "ep_size" in inspect.signature(config).parameters


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


def main(folders: list[str], results_path: str) -> None:
    import transformers.distributed as transformers_distributed

    layouts = {"tp": {"distributed_config": transformers_distributed.DistributedConfig(tp_plan="auto")}}
    if supports_expert_parallel_size():  # Transformers' expert parallelism by size (>= 5.19)
        config = transformers_distributed.DistributedConfig(fsdp_size=2, ep_size=2)
        layouts["ep"] = {"distributed_config": config}
    results = {}
    for folder in folders:
        probe = load_file(os.path.join(folder, "probe.safetensors"))
        dense = remoe.ReMoEConfig.from_pretrained(folder).router_type == "dense"
        for name, options in layouts.items():
            if dense and name == "ep":
                continue
            model = AutoModelForCausalLM.from_pretrained(folder, **options).eval()
            mlp = model.model.layers[0].mlp
            with torch.no_grad():
                logits = model(probe["input_ids"]).logits
            new_tokens = probe["generated"].shape[1] - probe["input_ids"].shape[1]
            generated = model.generate(probe["input_ids"], max_new_tokens=new_tokens, do_sample=False)
            results[f"{os.path.basename(folder)}/{name}"] = {
                "max_abs_diff": (logits - probe["logits"]).abs().max().item(),
                "same_generation": torch.equal(generated, probe["generated"]),
                "attention_sharded": _is_dtensor(model.model.layers[0].self_attn.o_proj.weight),
                "ffn_sharded": _is_dtensor(mlp.down_proj.weight if dense else mlp.experts.down_proj),
            }
    if int(os.environ["RANK"]) == 0:
        with open(results_path, "w") as handle:
            json.dump(results, handle)
    # Both ranks leave together: a rank exiting while gloo still talks to it aborts the other one.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:-1], sys.argv[-1])
