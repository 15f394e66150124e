"""The parallel layout of a run: the DeepSpeed config (a file, Accelerate's, or the packaged ZeRO-1 for expert
parallelism), its batch sizes and the expert-parallel size, checked against the model and the launcher's world size.

`remoe.training.run_config` calls these checks while it resolves a run; the Trainer that runs the layout is
`remoe.training.trainer.ReMoETrainer` and the sharded experts are `remoe.training.expert_parallel`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

DEFAULT_EP_DEEPSPEED_CONFIG = "zero1.json"


def packaged_deepspeed_config(name: str) -> str:
    """Path of a DeepSpeed JSON shipped in `remoe.configuration` (`configuration/deepspeed/NAME`)."""
    return str(resources.files("remoe.configuration") / "deepspeed" / name)


def load_deepspeed_config(config: str | os.PathLike | dict) -> dict:
    """The DeepSpeed config as a dict, from a JSON file or a dict, with a clear error for a missing or bad file."""
    if isinstance(config, dict):
        return config
    path = Path(config)
    if not path.is_file():
        raise ValueError(f"--deepspeed {str(path)!r}: no such file (expected a DeepSpeed JSON config)")
    try:
        loaded = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--deepspeed {str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"--deepspeed {str(path)!r} must hold a JSON object, got {type(loaded).__name__}")
    return loaded


def zero_stage(config: dict) -> int:
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeed zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage


def world_size_from_env() -> int:
    """The launcher's world size (torchrun, the deepspeed launcher and accelerate set WORLD_SIZE), 1 otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate_distributed_options(
    deepspeed: str | os.PathLike | dict | None,
    expert_parallel_size: int | None,
    num_experts: int | None,
    world_size: int | None = None,
) -> str | dict | None:
    """Check the parallel layout before any work; returns the DeepSpeed config to use (None: no DeepSpeed).

    `num_experts` is the routed experts per MoE layer (`config.num_routed_experts`, None for a dense model).
    With `expert_parallel_size > 1` and no `deepspeed`, the packaged ZeRO-1 config `zero1.json` is used.
    """
    ep_size = 1 if expert_parallel_size is None else expert_parallel_size
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
        raise ValueError(f"expert_parallel_size must be an integer >= 1, got {expert_parallel_size!r}")
    world_size = world_size_from_env() if world_size is None else world_size
    if ep_size > 1:
        if not num_experts:
            raise ValueError(f"expert_parallel_size={ep_size} needs an MoE model; router_type='dense' has no experts")
        if num_experts % ep_size:
            raise ValueError(
                f"expert_parallel_size={ep_size} must divide num_experts ({num_experts} routed experts per layer); "
                f"allowed: {[n for n in range(1, num_experts + 1) if num_experts % n == 0]}"
            )
        if world_size % ep_size:
            raise ValueError(
                f"expert_parallel_size={ep_size} must divide the world size ({world_size} processes); launch "
                f"a multiple of {ep_size} processes (torchrun --nproc_per_node, deepspeed --num_gpus)"
            )
        if deepspeed is None:
            deepspeed = packaged_deepspeed_config(DEFAULT_EP_DEEPSPEED_CONFIG)
    if deepspeed is not None:
        config = load_deepspeed_config(deepspeed)
        if zero_stage(config) == 3 and ep_size > 1:
            raise ValueError(
                f"expert_parallel_size={ep_size} is not supported with DeepSpeed ZeRO stage 3 (DeepSpeed's native MoE "
                "does not support it); use zero_optimization.stage 1 or 2, or expert_parallel_size 1"
            )
    return deepspeed


def _model_config(options: dict[str, Any], run: dict[str, dict]):
    from remoe import ReMoEConfig

    if options.get("model_name_or_path"):
        return ReMoEConfig.from_pretrained(options["model_name_or_path"])
    return ReMoEConfig(**run["model"])


def resolve_parallel_options(options: dict[str, Any], run: dict[str, dict], model_config=None) -> dict[str, Any]:
    """`{"deepspeed": config or None, "expert_parallel_size": N}` from the flags (or the run's `training` section),
    checked against the model (`model_config`, the run's `ReMoEConfig`; read from the run when not given) and the
    launcher's world size. Changes nothing in `run`."""
    training = run["training"]
    deepspeed = options.get("deepspeed") or training.get("deepspeed")
    ep_size = options.get("expert_parallel_size")
    if ep_size is None:
        ep_size = training.get("expert_parallel_size") or 1
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"expert_parallel_size must be an integer >= 1, got {ep_size!r}")
    accelerate_deepspeed, accelerate_file = accelerate_deepspeed_env()
    if deepspeed is None and accelerate_file:
        deepspeed = accelerate_file  # `accelerate launch` with a DeepSpeed config file: the same file, checked here
    if deepspeed is None and ep_size == 1:
        return {"deepspeed": None, "expert_parallel_size": 1}
    if model_config is None:
        model_config = _model_config(options, run)
    num_routed_experts = model_config.num_routed_experts if model_config.has_experts else None
    if ep_size > 1 and model_config.router_type == "lory":
        raise ValueError(
            f"expert_parallel_size={ep_size} does not apply to router_type='lory': every segment merges the "
            "parameters of all experts, so there are no (token, expert) pairs to send to the experts' ranks; use "
            "expert_parallel_size 1 (data parallel or DeepSpeed ZeRO still apply)"
        )
    if deepspeed is None and accelerate_deepspeed:
        # DeepSpeed configured inline in the accelerate config: Accelerate builds it; only its stage is checked.
        stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        validate_distributed_options({"zero_optimization": {"stage": stage}}, ep_size, num_routed_experts)
        return {"deepspeed": None, "expert_parallel_size": ep_size}
    deepspeed = validate_distributed_options(deepspeed, ep_size, num_routed_experts)
    deepspeed = resolve_batch_sizes(deepspeed, training, world_size_from_env())
    return {"deepspeed": deepspeed, "expert_parallel_size": ep_size}


def resolve_batch_sizes(deepspeed: str | os.PathLike | dict, training: dict[str, Any], world_size: int) -> str | dict:
    """Check the DeepSpeed batch sizes against the run's before any work, and leave `train_batch_size` to DeepSpeed.

    Explicit `train_micro_batch_size_per_gpu`, `gradient_accumulation_steps` and `train_batch_size` must equal
    `per_device_train_batch_size`, `gradient_accumulation_steps` and their product with the world size.
    Transformers fills `train_batch_size` (`"auto"` or not) while `TrainingArguments` is built, before it knows the
    world size, so it would count one process; DeepSpeed derives the same value itself when the key is absent.
    Returns `deepspeed` unchanged when it has no `train_batch_size`, otherwise a copy without it.
    """
    config = load_deepspeed_config(deepspeed)
    defaults = {field.name: field.default for field in dataclasses.fields(TrainingArguments)}
    micro = training.get("per_device_train_batch_size", defaults["per_device_train_batch_size"])
    accumulation = training.get("gradient_accumulation_steps", defaults["gradient_accumulation_steps"])
    expected = {
        "train_micro_batch_size_per_gpu": (micro, "per_device_train_batch_size"),
        "gradient_accumulation_steps": (accumulation, "gradient_accumulation_steps"),
        "train_batch_size": (
            micro * accumulation * world_size,
            f"per_device_train_batch_size * gradient_accumulation_steps * world size = "
            f"{micro} * {accumulation} * {world_size}",
        ),
    }
    for key, (value, source) in expected.items():
        given = config.get(key, "auto")
        if given != "auto" and given != value:
            raise ValueError(f'DeepSpeed {key}={given!r} contradicts {source} = {value}; set it to {value} or "auto"')
    if "train_batch_size" not in config:
        return deepspeed
    return {key: value for key, value in config.items() if key != "train_batch_size"}


def accelerate_deepspeed_env() -> tuple[bool, str | None]:
    """(`accelerate launch` set up DeepSpeed, its DeepSpeed config file or None)."""
    enabled = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")
    return enabled, (os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None) if enabled else None
