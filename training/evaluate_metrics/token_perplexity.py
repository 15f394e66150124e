"""Token perplexity from per-token negative log-likelihoods (an `evaluate` metric module shipped with remoe).

Unlike the Hub's `perplexity` metric, this one runs no model: it aggregates the NLLs the model already produced
during `Trainer` evaluation (see `remoe.training.metrics.preprocess_logits_for_metrics`), so it works offline.
"""

import datasets
import evaluate
import numpy as np

_CITATION = ""

_DESCRIPTION = """Perplexity exp(mean NLL) over every scored token of every sequence, and the mean NLL (loss, nats)."""

_KWARGS_DESCRIPTION = """
Args:
    nlls (`list[list[float]]`): per sequence, the negative log-likelihood (nats) of each scored token.
Returns:
    perplexity (`float`): exp of the mean NLL over all tokens.
    loss (`float`): the mean NLL over all tokens.
    num_tokens (`int`): tokens scored.
Examples:
    >>> metric = evaluate.load("path/to/token_perplexity.py")
    >>> metric.compute(nlls=[[1.0, 1.0], [1.0]])
    {'perplexity': 2.718281828459045, 'loss': 1.0, 'num_tokens': 3}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TokenPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nlls": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, nlls):
        flat = np.concatenate([np.asarray(seq, dtype=np.float64) for seq in nlls]) if nlls else np.zeros(0)
        if flat.size == 0:
            raise ValueError("token_perplexity: no tokens to score")
        loss = float(flat.mean())
        return {"perplexity": float(np.exp(loss)), "loss": loss, "num_tokens": int(flat.size)}
