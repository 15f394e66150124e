"""Next-token accuracy of a causal language model (an `evaluate` metric module shipped with remoe).

`predictions[i][t]` is the model's argmax at position t, `references[i][t]` the token that actually follows; positions
whose reference equals `ignore_index` (padding, prompt masking) are not counted.
"""

import datasets
import evaluate
import numpy as np

_CITATION = ""

_DESCRIPTION = """Fraction of scored positions where the model's most likely next token is the actual next token."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[int]]`): per sequence, the predicted (argmax) next-token ids.
    references (`list[list[int]]`): per sequence, the actual next-token ids, aligned with `predictions`.
    ignore_index (`int`, defaults to -100): reference value of positions that are not scored.
Returns:
    next_token_accuracy (`float`): correct / scored positions.
    num_tokens (`int`): positions scored.
Examples:
    >>> metric = evaluate.load("path/to/next_token_accuracy.py")
    >>> metric.compute(predictions=[[1, 2, 3]], references=[[1, 0, -100]])
    {'next_token_accuracy': 0.5, 'num_tokens': 2}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NextTokenAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, ignore_index=-100):
        correct = scored = 0
        for pred, ref in zip(predictions, references, strict=True):
            pred, ref = np.asarray(pred), np.asarray(ref)
            if pred.shape != ref.shape:
                raise ValueError(f"next_token_accuracy: prediction length {pred.shape} != reference length {ref.shape}")
            mask = ref != ignore_index
            correct += int((pred[mask] == ref[mask]).sum())
            scored += int(mask.sum())
        if scored == 0:
            raise ValueError("next_token_accuracy: no positions to score")
        return {"next_token_accuracy": correct / scored, "num_tokens": scored}
