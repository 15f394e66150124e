"""`ReMoETrainer`: `transformers.Trainer` with expert parallelism and checkpoints that are complete or ignored.

Checkpoints are written by the Trainer itself into `checkpoint-N/`. Once every rank has finished writing its part (a
barrier in `on_save`), rank 0 syncs the folder to disk and writes `remoe_checkpoint_complete.json` into it last: the
file names and sizes of the checkpoint. Resuming (`--resume_from_checkpoint`, `ReMoETrainer.train(resume_from_checkpoint=
True)`) takes the newest *complete* checkpoint and checks its files against the marker; `save_total_limit` is applied
to complete checkpoints only, after the new one is marked, so a crash while saving never costs an earlier checkpoint; a
folder a crash left unmarked is removed when training starts again.

`save_model()` (the final model) writes into `<output_dir>/.staging/model` and then moves the files into
`output_dir`, config.json last, so a crash never leaves new weights under an old config. With expert parallelism both
gather every rank's experts first: checkpoints and the final model are plain Transformers checkpoints.

Only public Trainer API is overridden (`train`, `save_model`, `create_optimizer`) or used (callbacks).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from remoe.checkpoints import replace_folder

STAGING_DIR = ".staging"
CHECKPOINT_COMPLETE = "remoe_checkpoint_complete.json"
_CHECKPOINT_FOLDER = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _checkpoint_folders(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """`(step, folder)` of every `checkpoint-N` folder in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in root.iterdir() if (match := _CHECKPOINT_FOLDER.match(path.name))]
    return sorted(item for item in found if item[1].is_dir())


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    return (Path(folder) / CHECKPOINT_COMPLETE).is_file()


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` of `output_dir` that every rank finished writing, or None."""
    complete = [folder for _, folder in _checkpoint_folders(output_dir) if is_complete_checkpoint(folder)]
    return str(complete[-1]) if complete else None


def check_complete_checkpoint(folder: str | os.PathLike) -> None:
    """Raise `ValueError` naming the folder when it is not a complete checkpoint or a file differs from its marker."""
    folder = Path(folder)
    marker = folder / CHECKPOINT_COMPLETE
    if not marker.is_file():
        raise ValueError(
            f"{folder} is not a complete checkpoint (no {CHECKPOINT_COMPLETE}: its save was interrupted, or it was not "
            "written by remoe); resume from another checkpoint-N or start a new run"
        )
    try:
        expected = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{marker} is damaged ({error}); resume from another checkpoint") from error
    for name, size in expected.items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"checkpoint {folder} is damaged: {name} is missing; resume from another checkpoint")
        if path.stat().st_size != size:
            raise ValueError(
                f"checkpoint {folder} is damaged: {name} has {path.stat().st_size} bytes, {size} were written; "
                "resume from another checkpoint"
            )


def remove_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """Delete the `checkpoint-N` folders of `output_dir` that were never marked complete; returns their names."""
    removed = []
    for _, folder in _checkpoint_folders(output_dir):
        if not is_complete_checkpoint(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def _sync_files(folder: Path) -> dict[str, int]:
    """fsync every file under `folder` (so the marker never lands before the data) and return their sizes."""
    sizes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != CHECKPOINT_COMPLETE:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            sizes[str(path.relative_to(folder))] = path.stat().st_size
    return sizes


def _write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(temporary, "w") as handle:
        json.dump(payload, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class CheckpointCompletionCallback(TrainerCallback):
    """Marks each checkpoint complete after every rank has written it, then rotates complete checkpoints only."""

    def __init__(self, save_total_limit: int | None):
        self.save_total_limit = save_total_limit

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if args.should_save:
            remove_incomplete_checkpoints(args.output_dir)  # saves that a crash interrupted
        _barrier()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        _barrier()  # every rank has written its part: weights, DeepSpeed shards, RNG state
        if args.should_save and folder.is_dir():
            files = _sync_files(folder)
            _write_json_atomically(folder / CHECKPOINT_COMPLETE, {"step": state.global_step, "files": files})
            rotate_checkpoints(
                output_dir=args.output_dir,
                save_total_limit=self.save_total_limit,
                best_model_checkpoint=state.best_model_checkpoint,
                use_mtime=False,
            )
        _barrier()


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
            replace_folder(source, destination)
        else:
            os.replace(source, destination)
    shutil.rmtree(staged, ignore_errors=True)


def _split_moe_param_groups(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Split `optimizer`'s param groups (in place, before its first step) into non-MoE groups and one group per
    DeepSpeed expert-parallel group, as DeepSpeed's ZeRO optimizers require."""
    from deepspeed.moe.utils import is_moe_param_group, split_params_into_different_moe_groups_for_optimizer

    groups = optimizer.param_groups
    is_expert = [getattr(p, "allreduce", True) is False for group in groups for p in group["params"]]
    if any(is_moe_param_group(group) for group in groups) or not any(is_expert):
        return optimizer
    named = [{**group, "name": group.get("name") or f"group_{index}"} for index, group in enumerate(groups)]
    optimizer.param_groups = [
        group for group in split_params_into_different_moe_groups_for_optimizer(named) if group["params"]
    ]
    return optimizer


class ReMoETrainer(Trainer):
    """`Trainer` with DeepSpeed expert parallelism, plain-Transformers saving and complete-or-ignored checkpoints.

    `expert_parallel_size=N` shards every MoE layer's experts over DeepSpeed's expert-parallel groups (see
    `expert_parallel.py`) and, when the Trainer builds the optimizer, splits its groups into DeepSpeed MoE / non-MoE
    groups (with an `optimizer` block in the DeepSpeed config, DeepSpeed splits them). `args.save_total_limit` is
    applied by `CheckpointCompletionCallback` after a checkpoint is marked complete (see the module doc).
    """

    def __init__(self, model=None, args=None, *trainer_args, expert_parallel_size: int = 1, **kwargs):
        self.expert_parallel_size = expert_parallel_size
        if expert_parallel_size > 1:
            if args is None or not (args.deepspeed or getattr(args, "deepspeed_plugin", None)):
                raise ValueError(f"expert_parallel_size={expert_parallel_size} needs a DeepSpeed config (--deepspeed)")
            from .expert_parallel import enable_expert_parallel

            _ = args.device  # initialises the process group (DeepSpeed's) before the expert-parallel groups
            enable_expert_parallel(model, expert_parallel_size)
        save_total_limit = None
        if args is not None:
            # Rotation moves to the callback, after the new checkpoint is complete: the Trainer's own rotation runs
            # before that and could delete the last complete checkpoint for one a crash then leaves unfinished.
            save_total_limit, args.save_total_limit = args.save_total_limit, None
        super().__init__(model, args, *trainer_args, **kwargs)
        self.add_callback(CheckpointCompletionCallback(save_total_limit))

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` takes the newest complete checkpoint of `output_dir`."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint-N in {self.args.output_dir} to resume from")
        if resume_from_checkpoint:
            check_complete_checkpoint(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.expert_parallel_size > 1:
            self.optimizer = _split_moe_param_groups(optimizer)
        return self.optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save a plain Transformers checkpoint (all experts) that `from_pretrained` loads in one process.

        Inside a checkpoint (`_internal_call`) it writes into the checkpoint folder; a direct call stages the files in
        `<output_dir>/.staging/model` and then moves them into `output_dir`, config.json last.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if _internal_call:
            self._save_all_experts(output_dir, _internal_call=True)
            return
        staged = os.path.join(output_dir, STAGING_DIR, "model")
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)
        _barrier()
        try:
            self._save_all_experts(staged, _internal_call=False)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)  # a half-written model must not stay behind (e.g. a full disk)
            raise
        _barrier()
        if self.args.should_save:
            _publish_files(staged, output_dir)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(staged))
        _barrier()

    def _save_all_experts(self, output_dir: str, _internal_call: bool) -> None:
        if self.expert_parallel_size == 1:
            super().save_model(output_dir, _internal_call=_internal_call)
            return
        from .expert_parallel import full_experts_view

        # Every rank contributes its experts; the saving rank holds all of them while the Trainer saves.
        with full_experts_view(self.model, materialize=self.args.should_save):
            super().save_model(output_dir, _internal_call=_internal_call)


def build_trainer(model, args, *, expert_parallel_size: int | None = None, **trainer_kwargs: Any) -> ReMoETrainer:
    """A `ReMoETrainer` for `model`; `args.deepspeed` (if any) was checked by `validate_distributed_options`."""
    return ReMoETrainer(model, args, expert_parallel_size=expert_parallel_size or 1, **trainer_kwargs)
