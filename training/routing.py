"""What the router does on held-out text: sparsity and experts per token; parameter counts."""

from __future__ import annotations

import torch

from remoe import ReMoEForCausalLM


@torch.no_grad()
def routing_sparsity(model: ReMoEForCausalLM, input_ids: list[list[int]], batch_size: int = 16) -> dict[str, float]:
    """Inference-time routing on `input_ids` blocks: fraction of zero gates per layer and mean experts per token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    active, total = None, 0
    for start in range(0, len(input_ids), batch_size):
        batch = torch.tensor(input_ids[start : start + batch_size], device=device)
        router_logits = model(batch, output_router_logits=True, use_cache=False).router_logits
        counts = torch.stack([active_experts(logits, model.config).sum().double() for logits in router_logits])
        active = counts if active is None else active + counts
        total += batch.numel()
    model.train(was_training)
    num_experts = model.config.num_routed_experts
    per_layer = (1.0 - active / (total * num_experts)).tolist()
    metrics = {"validation_sparsity": sum(per_layer) / len(per_layer)}
    metrics["validation_experts_per_token"] = (1.0 - metrics["validation_sparsity"]) * num_experts
    metrics.update({f"validation_sparsity_layer_{layer}": value for layer, value in enumerate(per_layer)})
    return metrics


def active_experts(router_logits: torch.Tensor, config) -> torch.Tensor:
    """Which experts each token uses, `(T, E)` booleans: positive ReLU gates, or the top-k of the router logits."""
    if config.router_type == "relu":
        return router_logits > 0
    top = torch.topk(router_logits, config.routed_top_k, dim=-1).indices
    return torch.zeros_like(router_logits, dtype=torch.bool).scatter_(-1, top, True)


def parameter_counts(model: ReMoEForCausalLM) -> dict[str, int]:
    """Total parameters and parameters active per token (k of E experts, embeddings included)."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    config = model.config
    active = total - experts + experts * config.num_experts_per_tok // config.num_experts
    return {"total_parameters": total, "active_parameters": active}
