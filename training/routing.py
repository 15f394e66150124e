"""What the router does on held-out text: sparsity and experts per token, for `metrics.json`.

The routing rule itself (`active_experts`, `expert_token_counts`, `layer_sparsity`) belongs to the model file, so the
controller, evaluation, `remoe analyze`, BTX and `remoe generate` all count experts the same way.
"""

from __future__ import annotations

import torch

from remoe import ReMoEForCausalLM
from remoe.modeling_remoe import active_experts, expert_token_counts, layer_sparsity

__all__ = ["active_experts", "routing_sparsity"]


@torch.no_grad()
def routing_sparsity(model: ReMoEForCausalLM, input_ids: list[list[int]], batch_size: int = 16) -> dict[str, float]:
    """Inference-time routing on `input_ids` blocks: fraction of zero gates per layer and mean experts per token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counts, total = None, 0
    for start in range(0, len(input_ids), batch_size):
        batch = torch.tensor(input_ids[start : start + batch_size], device=device)
        router_logits = model(batch, output_router_logits=True, use_cache=False).router_logits
        batch_counts = expert_token_counts(router_logits, model.config).double()
        counts = batch_counts if counts is None else counts + batch_counts
        total += batch.numel()
    model.train(was_training)
    per_layer = layer_sparsity(counts, total).tolist()
    metrics = {"validation_sparsity": sum(per_layer) / len(per_layer)}
    metrics["validation_experts_per_token"] = (1.0 - metrics["validation_sparsity"]) * model.config.num_routed_experts
    metrics.update({f"validation_sparsity_layer_{layer}": value for layer, value in enumerate(per_layer)})
    return metrics
