"""Initial router weights of a new MoE: random, or from the mean hidden state of each expert's domain (centroid).

The centroid init runs one model (any causal LM whose decoder layers are `model.model.layers[i].mlp`) on a group of
texts per expert and turns the per-layer mean FFN inputs into router rows (`centroid_router`). Gathering the texts
(files, dataset domains) is the command line's job (`remoe.training.btx`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

ROUTER_INITS = ("random", "centroid")


def random_router(num_experts: int, hidden_size: int, std: float, seed: int, layer: int) -> torch.Tensor:
    """Normal router rows (num_experts, hidden_size) of one layer, reproducible from `seed` and `layer`."""
    generator = torch.Generator().manual_seed(seed * 100_003 + layer)
    return torch.randn(num_experts, hidden_size, generator=generator) * std


@torch.no_grad()
def hidden_state_centroids(
    model_path: str | os.PathLike,
    texts: Sequence[Sequence[str]],
    *,
    tokenizer_path: str | os.PathLike | None = None,
    max_tokens: int = 4096,
    block_size: int = 256,
) -> torch.Tensor:
    """Mean FFN input (the post-attention-norm hidden state) of every layer, per group of texts: (groups, L, H), fp32.

    Runs the model at `model_path` (any causal LM whose decoder layers are `model.model.layers[i].mlp`) on at most
    `max_tokens` tokens of each group.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_path = tokenizer_path or model_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except (OSError, ValueError) as error:
        raise ValueError(f"centroid router init needs a tokenizer in {str(tokenizer_path)!r}: {error}") from error
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")  # sums are accumulated in float64
    model.eval()
    layers = model.model.layers
    hidden = model.config.hidden_size
    block_size = min(block_size, model.config.max_position_embeddings)
    sums = torch.zeros(len(texts), len(layers), hidden, dtype=torch.float64)
    counts = torch.zeros(len(texts), dtype=torch.float64)
    group = 0

    def capture(layer_idx: int):
        def hook(module, args):
            sums[group, layer_idx] += args[0].reshape(-1, hidden).to(torch.float64).sum(dim=0)

        return hook

    handles = [layer.mlp.register_forward_pre_hook(capture(i)) for i, layer in enumerate(layers)]
    try:
        for group, group_texts in enumerate(tqdm(texts, desc="Router centroids", unit="group")):
            ids: list[int] = []
            for text in group_texts:
                ids += tokenizer(text, add_special_tokens=False)["input_ids"]
                if tokenizer.eos_token_id is not None:
                    ids.append(tokenizer.eos_token_id)
                if len(ids) >= max_tokens:
                    break
            ids = ids[:max_tokens]
            if not ids:
                raise ValueError(f"centroid router init: text group {group} is empty")
            for start in range(0, len(ids), block_size):
                block = torch.tensor([ids[start : start + block_size]])
                model(block, use_cache=False)
                counts[group] += block.shape[1]
    finally:
        for handle in handles:
            handle.remove()
    return (sums / counts[:, None, None]).to(torch.float32)


def centroid_router(domain_centroids: torch.Tensor, generalist: torch.Tensor | None = None) -> torch.Tensor:
    """Router rows (experts, H) for one layer from the mean hidden state of each expert's domain.

    Expert i's row points along its domain's deviation from the mean of the domains, scaled so that its logit on its
    own domain's mean hidden state is `target` (1, or 0.5 when a generalist shares the work): ReLU gates start active
    for the expert's own domain and mostly inactive for the others. A generalist (the seed) row points along the mean
    of all domains with the same own-mean logit, so it starts active for every token.
    """
    target = 1.0 if generalist is None else 0.5
    mean = domain_centroids.mean(dim=0)
    rows = []
    for centroid in domain_centroids:
        direction = centroid - mean if len(domain_centroids) > 1 else centroid
        direction = direction / direction.norm().clamp_min(1e-12)
        projection = direction @ centroid
        if projection <= 1e-6 * centroid.norm():  # degenerate: fall back to the centroid's own direction
            direction, projection = centroid / centroid.norm().clamp_min(1e-12), centroid.norm()
        rows.append(direction * (target / projection.clamp_min(1e-12)))
    if generalist is not None:
        rows.append(generalist * (target / (generalist @ generalist).clamp_min(1e-12)))
    return torch.stack(rows)


def centroid_routers(
    model_path: str | os.PathLike, texts: Sequence[Sequence[str]], *, generalist: bool, max_tokens: int
) -> torch.Tensor:
    """Router rows of every layer, (L, experts, H): one expert per group of `texts`, plus with `generalist` a last
    expert for all the texts together (the seed), from the hidden states of the model at `model_path`."""
    groups = [list(group) for group in texts]
    if generalist:
        groups.append([text for group in texts for text in group])
    centroids = hidden_state_centroids(model_path, groups, max_tokens=max_tokens)  # (groups, L, H)
    domain = centroids[: len(texts)]
    seed = centroids[-1] if generalist else None
    return torch.stack(
        [
            centroid_router(domain[:, layer], None if seed is None else seed[layer])
            for layer in range(centroids.shape[1])
        ]
    )
