"""Distributed training wiring: DeepSpeed config checks, expert parallelism in the Trainer, atomic checkpoints.

`ReMoETrainer` is a `transformers.Trainer` that

- shards the experts over DeepSpeed's expert-parallel groups (`expert_parallel_size=N`, see `expert_parallel.py`);
- splits the optimizer's param groups into DeepSpeed MoE / non-MoE groups when it builds the optimizer itself (when
  the DeepSpeed config has an `optimizer` block, DeepSpeed splits them);
- always saves a plain Transformers checkpoint (safetensors, all experts gathered from every expert-parallel rank),
  both in `checkpoint-N/` and for `save_model()`;
- writes every checkpoint into `<output_dir>/.staging/checkpoint-N` and renames it into place only when every rank has
  finished writing, so a crash while saving never leaves a `checkpoint-N` folder behind (`get_last_checkpoint` and
  `--resume_from_checkpoint` only ever see complete checkpoints).

Resume is the Trainer's own: model, optimizer and scheduler (DeepSpeed's per-rank files, one file per expert), the
controller's lambda (the `controller.l1_coef` buffer is model state), the data position and every rank's RNG state.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

STAGING_DIR = ".staging"
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


def _routed_experts(options: dict[str, Any], run: dict[str, dict]) -> int | None:
    from remoe import ReMoEConfig

    if options.get("model_name_or_path"):
        config = ReMoEConfig.from_pretrained(options["model_name_or_path"])
    else:
        config = ReMoEConfig(**run["model"])
    return None if config.router_type == "dense" else config.num_routed_experts


def resolve_parallel_options(options: dict[str, Any], run: dict[str, dict]) -> dict[str, Any]:
    """`{"deepspeed": config or None, "expert_parallel_size": N}` from the flags (or the run's `training` section),
    checked against the model and the launcher's world size. Removes both keys from `run["training"]`."""
    training = run["training"]
    deepspeed = options.get("deepspeed") or training.pop("deepspeed", None)
    ep_size = options.get("expert_parallel_size")
    if ep_size is None:
        ep_size = training.pop("expert_parallel_size", None) or 1
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"expert_parallel_size must be an integer >= 1, got {ep_size!r}")
    training.pop("deepspeed", None)
    training.pop("expert_parallel_size", None)
    accelerate_deepspeed, accelerate_file = accelerate_deepspeed_env()
    if deepspeed is None and accelerate_file:
        deepspeed = accelerate_file  # `accelerate launch` with a DeepSpeed config file: the same file, checked here
    if deepspeed is None and ep_size == 1:
        return {"deepspeed": None, "expert_parallel_size": 1}
    if deepspeed is None and accelerate_deepspeed:
        # DeepSpeed configured inline in the accelerate config: Accelerate builds it; only its stage is checked.
        stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        deepspeed = {"zero_optimization": {"stage": stage}}
        validate_distributed_options(deepspeed, ep_size, _routed_experts(options, run))
        return {"deepspeed": None, "expert_parallel_size": ep_size}
    deepspeed = validate_distributed_options(deepspeed, ep_size, _routed_experts(options, run))
    return {"deepspeed": deepspeed, "expert_parallel_size": ep_size}


def accelerate_deepspeed_env() -> tuple[bool, str | None]:
    """(`accelerate launch` set up DeepSpeed, its DeepSpeed config file or None)."""
    enabled = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")
    return enabled, (os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None) if enabled else None


def pack_iterable(dataset, tokenizer, block_size: int, *, keep_domain: bool = False, batch_size: int = 1000):
    """Streaming packing: tokenize `batch_size` documents at a time, append eos, concatenate per domain and cut into
    blocks of `block_size` ids (each batch's remainder is dropped, as in Transformers' `run_clm.py`)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one to pack documents")

    def pack(batch: dict) -> dict:
        ids = tokenizer([t or "" for t in batch["text"]], add_special_tokens=False, verbose=False)["input_ids"]
        streams: dict[str, list[int]] = {}
        for domain, document in zip(batch["domain"], ids, strict=True):
            streams.setdefault(domain, []).extend([*document, eos])
        blocks, domains = [], []
        for domain, stream in streams.items():
            count = len(stream) // block_size
            blocks += [stream[i * block_size : (i + 1) * block_size] for i in range(count)]
            domains += [domain] * count
        return {"input_ids": blocks, "domain": domains} if keep_domain else {"input_ids": blocks}

    return dataset.map(pack, batched=True, batch_size=batch_size, remove_columns=["text", "domain"])


def streaming_packed_splits(corpus, tokenizer, block_size: int, max_eval_blocks: int, seed: int) -> dict:
    """`--streaming`: the train split stays an `IterableDataset` (shuffled through a buffer and packed on the fly;
    the Trainer's data loader reads it on rank 0 and dispatches each rank its own batches, so no sample is seen
    twice); the first `4 * max_eval_blocks` packed validation blocks are kept in memory for the final evaluation."""
    import datasets

    train = pack_iterable(corpus["train"].shuffle(seed=seed, buffer_size=10_000), tokenizer, block_size)
    if next(iter(train), None) is None:
        raise ValueError(f"the streaming dataset is empty or has fewer than block_size={block_size} tokens")
    validation_blocks = pack_iterable(corpus["validation"], tokenizer, block_size, keep_domain=True)
    rows = list(itertools.islice(validation_blocks, 4 * max_eval_blocks))
    if not rows:
        raise ValueError(f"the streaming validation split has fewer than block_size={block_size} tokens")
    features = datasets.Features(
        {"input_ids": datasets.List(datasets.Value("int32")), "domain": datasets.Value("string")}
    )
    return {"train": train, "validation": datasets.Dataset.from_list(rows, features=features)}


def _is_moe_param(parameter: torch.Tensor) -> bool:
    return getattr(parameter, "allreduce", True) is False


def split_moe_param_groups(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Split `optimizer`'s param groups (in place, before its first step) into non-MoE groups and one group per
    DeepSpeed expert-parallel group, as DeepSpeed's ZeRO optimizers require."""
    from deepspeed.moe.utils import is_moe_param_group, split_params_into_different_moe_groups_for_optimizer

    groups = optimizer.param_groups
    if any(is_moe_param_group(group) for group in groups) or not any(
        _is_moe_param(p) for group in groups for p in group["params"]
    ):
        return optimizer
    named = [{**group, "name": group.get("name") or f"group_{index}"} for index, group in enumerate(groups)]
    optimizer.param_groups = [
        group for group in split_params_into_different_moe_groups_for_optimizer(named) if group["params"]
    ]
    return optimizer


def _replace_dir(source: str, target: str) -> None:
    """Rename `source` to `target`; an existing `target` is moved aside first and deleted after."""
    trash = None
    if os.path.lexists(target):
        trash = os.path.join(os.path.dirname(target), f".trash-{os.path.basename(target)}-{uuid.uuid4().hex[:8]}")
        os.replace(target, trash)
    os.replace(source, target)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _remove_if_empty(folder: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(folder)


_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")


def _publish_files(staged: str, target: str) -> None:
    """Move every entry of `staged` into `target`. An earlier save's config.json goes first and the new one comes
    last, so a save interrupted halfway leaves a folder without config (never old config over new weights)."""
    os.makedirs(target, exist_ok=True)
    entries = sorted(os.listdir(staged), key=lambda name: (name == "config.json", name))
    if "config.json" in entries and os.path.isfile(os.path.join(target, "config.json")):
        os.remove(os.path.join(target, "config.json"))
    if any(_WEIGHT_FILE.fullmatch(name) for name in entries):
        for name in os.listdir(target):  # weights of an earlier save that this one does not overwrite
            if _WEIGHT_FILE.fullmatch(name) and name not in entries and os.path.isfile(os.path.join(target, name)):
                os.remove(os.path.join(target, name))
    for name in entries:
        source, destination = os.path.join(staged, name), os.path.join(target, name)
        if os.path.isdir(source):
            _replace_dir(source, destination)
        else:
            os.replace(source, destination)
    shutil.rmtree(staged, ignore_errors=True)


class ReMoETrainer(Trainer):
    """`Trainer` with DeepSpeed expert parallelism, EP-aware saving and atomic checkpoints (see the module doc)."""

    def __init__(self, model=None, args=None, *trainer_args, expert_parallel_size: int = 1, **kwargs):
        self.expert_parallel_size = expert_parallel_size
        if expert_parallel_size > 1:
            if args is None or not (args.deepspeed or getattr(args, "deepspeed_plugin", None)):
                raise ValueError(f"expert_parallel_size={expert_parallel_size} needs a DeepSpeed config (--deepspeed)")
            from .expert_parallel import enable_expert_parallel

            _ = args.device  # initialises the process group (DeepSpeed's) before the expert-parallel groups
            enable_expert_parallel(model, expert_parallel_size)
        super().__init__(model, args, *trainer_args, **kwargs)

    # -- optimizer -----------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.expert_parallel_size > 1:
            self.optimizer = split_moe_param_groups(optimizer)
        return self.optimizer

    # -- saving --------------------------------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()

    def _write_model(self, output_dir: str) -> None:
        if self.expert_parallel_size > 1:
            from .expert_parallel import full_experts_view

            with full_experts_view(self.model, materialize=self.args.should_save):
                if self.args.should_save:
                    self._save(output_dir)  # the model's own state dict: plain Transformers names and shapes
        else:
            super().save_model(output_dir, _internal_call=True)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save a plain Transformers checkpoint (all experts) that `from_pretrained` loads in one process.

        Inside a checkpoint the whole folder is staged (`_save_checkpoint`); a direct call writes into
        `<output_dir>/.staging/model` and then moves the files into `output_dir`, config.json last.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if _internal_call:
            self._write_model(output_dir)
            return
        staged = os.path.join(output_dir, STAGING_DIR, "model")
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)
        self._barrier()
        self._write_model(staged)
        self._barrier()
        if self.args.should_save:
            _publish_files(staged, output_dir)
            _remove_if_empty(os.path.dirname(staged))
        self._barrier()

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        staging_root = os.path.join(run_dir, STAGING_DIR)
        folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(staging_root, folder), os.path.join(run_dir, folder)
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)  # a partial checkpoint of a crashed run
        self._barrier()
        self._get_output_dir = lambda trial=None: staging_root  # every file of the checkpoint goes to `staged`
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self._barrier()  # every rank has written its part (DeepSpeed shards, RNG state)
        if self.args.should_save:
            best = self.state.best_model_checkpoint
            if best and os.path.dirname(best) == staging_root:
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
            _replace_dir(staged, final)
            _remove_if_empty(staging_root)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self._barrier()


def build_trainer(
    model,
    args,
    *,
    expert_parallel_size: int | None = None,
    **trainer_kwargs: Any,
) -> ReMoETrainer:
    """A `ReMoETrainer` for `model`; `args.deepspeed` (if any) was checked by `validate_distributed_options`."""
    return ReMoETrainer(model, args, expert_parallel_size=expert_parallel_size or 1, **trainer_kwargs)
