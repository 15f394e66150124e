"""Trainer callback that closes every optimizer step of the ReMoE L1 controller and logs the router's behaviour."""

from __future__ import annotations

import re

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

_PER_LAYER_METRIC = re.compile(r"^remoe/(sparsity|max_load)/layer_\d+$")


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


class ReMoEControllerCallback(TrainerCallback):
    """Updates lambda exactly once per optimizer step (after gradient accumulation) and logs `remoe/*` metrics.

    The sparsity of a step is reduced over every MoE layer, every micro-batch and every data-parallel rank.
    Logged values are averaged over the steps since the previous log, except `remoe/l1_coef` (the current lambda);
    `remoe/loss_lm` and `remoe/loss_reg` are the LM loss and the weighted regulariser (`lambda * L_reg`, or the TopK
    balancing term) apart, as in the paper's Fig. 4.
    `history` keeps one entry per optimizer step: `{"step", "remoe/sparsity", "remoe/l1_coef", ...}`.
    """

    def __init__(self, process_group=None):
        self.process_group = process_group
        self.history: list[dict[str, float]] = []
        self._pending: list[dict[str, float]] = []
        self.start_step = 0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.start_step = state.global_step  # > 0 when resuming from a checkpoint

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if model is None or not hasattr(_unwrap(model), "update_l1_coef"):
            return
        metrics = _unwrap(model).update_l1_coef(self.process_group)
        if metrics:
            self._pending.append(metrics)
            self.history.append({"step": state.global_step, **metrics})

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if not self._pending or logs is None or "loss" not in logs:
            return
        keys = dict.fromkeys(key for metrics in self._pending for key in metrics)
        averaged = {}
        for key in keys:  # a step without labels has no `remoe/loss_*`: average each key over the steps that have it
            values = [metrics[key] for metrics in self._pending if key in metrics]
            averaged[key] = sum(values) / len(values)
        averaged["remoe/l1_coef"] = self._pending[-1]["remoe/l1_coef"]
        self._pending.clear()
        logs.update(averaged)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(averaged)


class TopKWarmupCallback(TrainerCallback):
    """TopK's near-dense warmup: `top_k` experts per token for the first `steps` optimizer steps, then the config's k
    (set at the start of every step from the global step, so a resumed run routes as the uninterrupted one)."""

    def __init__(self, top_k: int, steps: int):
        self.top_k, self.steps = top_k, steps

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ):
        if model is not None:
            _unwrap(model).set_routed_top_k(self.top_k if state.global_step < self.steps else None)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if model is not None:
            _unwrap(model).set_routed_top_k(None)


def _without_per_layer_metrics(logs: dict | None) -> dict | None:
    return None if logs is None else {key: value for key, value in logs.items() if not _PER_LAYER_METRIC.match(key)}


class ConciseProgressCallback(ProgressCallback):
    """Transformers' progress bar; the console line leaves out the per-layer `remoe/*` metrics (TensorBoard has them)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=_without_per_layer_metrics(logs), **kwargs)


class ConcisePrinterCallback(PrinterCallback):
    """Transformers' log printer (without a progress bar), leaving out the per-layer `remoe/*` metrics."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=_without_per_layer_metrics(logs), **kwargs)


def add_controller_callback(trainer: Trainer, process_group=None) -> ReMoEControllerCallback:
    """Attach the controller callback ahead of the reporting callbacks so TensorBoard/W&B see its metrics, and keep
    the console log line short (its per-layer metrics stay in the reporting integrations)."""
    callback = ReMoEControllerCallback(process_group)
    trainer.callback_handler.callbacks.insert(0, callback)
    for printer, concise in ((ProgressCallback, ConciseProgressCallback), (PrinterCallback, ConcisePrinterCallback)):
        if any(type(existing) is printer for existing in trainer.callback_handler.callbacks):
            trainer.remove_callback(printer)
            trainer.add_callback(concise)
    return callback
