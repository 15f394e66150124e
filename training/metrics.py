"""`evaluate` metrics for `Trainer` evaluation: token perplexity and next-token accuracy.

The metric modules live in `evaluate_metrics/` inside this package and are loaded by path, so they work offline
(`evaluate.load("accuracy")` would fetch a script from the Hub). Use both hooks together, so evaluation keeps two
small tensors per batch instead of the full `(batch, seq, vocab)` logits:

```python
from remoe.training.metrics import build_compute_metrics, preprocess_logits_for_metrics

trainer = Trainer(..., compute_metrics=build_compute_metrics(), preprocess_logits_for_metrics=preprocess_logits_for_metrics)
trainer.evaluate()  # -> eval_loss, eval_perplexity, eval_next_token_accuracy, ...
```
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

METRICS_DIR = Path(__file__).resolve().parent / "evaluate_metrics"
METRIC_NAMES = ("token_perplexity", "next_token_accuracy")
IGNORE_INDEX = -100


def metric_path(name: str) -> Path:
    """Path of a packaged `evaluate` metric module (pass it to `evaluate.load`)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"metric must be one of {METRIC_NAMES}, got {name!r}")
    return METRICS_DIR / f"{name}.py"


def load_metric(name: str, **kwargs):
    """`evaluate.load` of a packaged metric module (no network)."""
    try:
        import evaluate
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the `evaluate` package is needed: pip install 'remoe[eval]'") from error
    return evaluate.load(str(metric_path(name)), **kwargs)


def preprocess_logits_for_metrics(
    logits: torch.Tensor | tuple, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce the `(B, T, V)` logits of one evaluation batch to `(B, T-1)` argmax predictions and `(B, T-1)` NLLs of
    the next labels (0 where the label is ignored), aligned with `labels[:, 1:]`."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(logits.device)
    predictions = shift_logits.argmax(dim=-1)
    nll = F.cross_entropy(
        shift_logits.float().reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(shift_labels)
    return predictions, nll


def _sequences(values: np.ndarray, mask: np.ndarray) -> list[list]:
    return [row[row_mask].tolist() for row, row_mask in zip(values, mask, strict=True)]


def build_compute_metrics() -> Callable[[Any], dict[str, float]]:
    """A `compute_metrics` for `Trainer` (with `preprocess_logits_for_metrics`): `perplexity` (exp of the mean token
    NLL, the same tokens as the loss) and `next_token_accuracy`, computed by the packaged `evaluate` modules."""
    perplexity, accuracy = load_metric("token_perplexity"), load_metric("next_token_accuracy")

    def compute_metrics(eval_prediction) -> dict[str, float]:
        predictions, nll = eval_prediction.predictions
        labels = np.asarray(eval_prediction.label_ids)[:, 1:]
        predictions, nll = np.asarray(predictions), np.asarray(nll)
        width = min(labels.shape[1], predictions.shape[1])  # batches are padded to the longest with -100
        labels, predictions, nll = labels[:, :width], predictions[:, :width], nll[:, :width]
        mask = labels != IGNORE_INDEX
        ppl = perplexity.compute(nlls=_sequences(nll, mask))
        acc = accuracy.compute(
            predictions=_sequences(predictions, mask), references=_sequences(labels, mask), ignore_index=IGNORE_INDEX
        )
        return {"perplexity": ppl["perplexity"], "next_token_accuracy": acc["next_token_accuracy"]}

    return compute_metrics
