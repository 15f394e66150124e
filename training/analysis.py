"""`remoe analyze`: what the router does on held-out text, per layer, with figures fit for a model card."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm.auto import tqdm

from remoe.checkpoints import check_checkpoint, load_model, load_tokenizer
from remoe.modeling_remoe import active_experts
from remoe.records import RoutingAnalysis

from .data import load_text_dataset, pack_dataset
from .run_config import check_writable_folder


class RoutingRecorder:
    """Accumulates which experts each token uses, per layer, over batches of (token ids, domain)."""

    def __init__(self, num_layers: int, num_experts: int, vocab_size: int, domains: list[str]):
        self.domains = domains
        self.expert_tokens = np.zeros((num_layers, num_experts), dtype=np.int64)
        self.domain_expert_tokens = np.zeros((len(domains), num_layers, num_experts), dtype=np.int64)
        self.domain_tokens = np.zeros(len(domains), dtype=np.int64)
        self.experts_per_token_histogram = np.zeros((num_layers, num_experts + 1), dtype=np.int64)
        self.experts_by_token_id = np.zeros(vocab_size, dtype=np.float64)  # experts summed over layers
        self.token_id_count = np.zeros(vocab_size, dtype=np.int64)
        self.num_tokens = 0

    def add(self, token_ids: np.ndarray, domain: str, active: np.ndarray) -> None:
        """`token_ids (T,)`, `active (L, T, E)` booleans for one block of one domain."""
        domain_index = self.domains.index(domain)
        per_token = active.sum(axis=2)  # (L, T)
        self.expert_tokens += active.sum(axis=1)
        self.domain_expert_tokens[domain_index] += active.sum(axis=1)
        self.domain_tokens[domain_index] += token_ids.size
        for layer, counts in enumerate(per_token):
            self.experts_per_token_histogram[layer] += np.bincount(counts, minlength=active.shape[2] + 1)
        np.add.at(self.experts_by_token_id, token_ids, per_token.sum(axis=0))
        np.add.at(self.token_id_count, token_ids, 1)
        self.num_tokens += token_ids.size


@torch.no_grad()
def record_routing(model, blocks, batch_size: int = 8) -> RoutingRecorder:
    """Run `blocks` (rows with `input_ids` and `domain`) through the model and record every routing decision."""
    config = model.config
    domains = sorted(set(blocks["domain"]))
    num_layers = config.num_moe_layers
    recorder = RoutingRecorder(num_layers, config.num_routed_experts, config.vocab_size, domains)
    device = next(model.parameters()).device
    model.eval()
    for start in tqdm(range(0, len(blocks), batch_size), desc="Routing", unit="batch"):
        rows = blocks[start : start + batch_size]
        input_ids = torch.tensor(rows["input_ids"], dtype=torch.long, device=device)
        router_logits = model(input_ids, output_router_logits=True, use_cache=False).router_logits
        active = torch.stack([active_experts(logits, config) for logits in router_logits])  # (L, B*S, E)
        active = active.view(num_layers, *input_ids.shape, -1).cpu().numpy()
        for row, (ids, domain) in enumerate(zip(input_ids.cpu().numpy(), rows["domain"], strict=True)):
            recorder.add(ids, domain, active[:, row])
    return recorder


def summarize(recorder: RoutingRecorder, config, min_count: int = 5) -> dict:
    """The JSON summary: per-layer sparsity, experts per token, load, dead experts, domain shares, rare vs frequent."""
    num_experts = config.num_routed_experts
    layer_tokens = recorder.expert_tokens.sum(axis=1)
    sparsity = 1.0 - layer_tokens / (recorder.num_tokens * num_experts)
    load = recorder.expert_tokens / np.maximum(recorder.expert_tokens.mean(axis=1, keepdims=True), 1e-12)
    shares = recorder.domain_expert_tokens / np.maximum(
        recorder.domain_expert_tokens.sum(axis=2, keepdims=True), 1
    )  # (D, L, E): fraction of a domain's routed tokens going to each expert
    frequency, mean_experts = _experts_against_frequency(recorder, min_count)
    correlation = float(np.corrcoef(np.log(frequency), mean_experts)[0, 1]) if len(frequency) > 2 else float("nan")
    num_layers = len(sparsity)
    return {
        "router_type": config.router_type,
        "num_experts": num_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "target_sparsity": config.target_sparsity if config.uses_l1_controller else None,
        "num_tokens": int(recorder.num_tokens),
        "sparsity": float(sparsity.mean()),
        "experts_per_token": float(layer_tokens.sum() / (recorder.num_tokens * num_layers)),
        "layers": [
            {
                "layer": layer,
                "sparsity": float(sparsity[layer]),
                "experts_per_token_histogram": recorder.experts_per_token_histogram[layer].tolist(),
                "tokens_with_no_expert": float(recorder.experts_per_token_histogram[layer][0] / recorder.num_tokens),
                "expert_load": load[layer].tolist(),
                "max_over_mean_load": float(load[layer].max()),
                "dead_experts": [int(e) for e in np.flatnonzero(recorder.expert_tokens[layer] == 0)],
                "domain_expert_share": {
                    domain: shares[index, layer].tolist() for index, domain in enumerate(recorder.domains)
                },
            }
            for layer in range(num_layers)
        ],
        "frequency_correlation": {
            "description": "Pearson correlation of log token frequency with mean experts per occurrence "
            f"(token ids seen at least {min_count} times); negative: rare tokens get more experts",
            "value": correlation,
            "num_token_ids": len(frequency),
        },
    }


def _experts_against_frequency(recorder: RoutingRecorder, min_count: int) -> tuple[np.ndarray, np.ndarray]:
    seen = recorder.token_id_count >= min_count
    num_layers = recorder.expert_tokens.shape[0]
    frequency = recorder.token_id_count[seen] / recorder.num_tokens
    mean_experts = recorder.experts_by_token_id[seen] / (recorder.token_id_count[seen] * num_layers)
    return frequency, mean_experts


def _expert_ticks(axis, num_experts: int, fontsize: int = 8) -> None:
    """A tick and label for every expert (every k-th one when there are more than 16)."""
    step = max(1, math.ceil(num_experts / 16))
    ticks = list(range(0, num_experts, step))
    axis.set_xticks(ticks, [str(tick) for tick in ticks], fontsize=fontsize)


def plot_figures(recorder: RoutingRecorder, summary: dict, output_dir: Path, min_count: int = 5) -> list[Path]:
    """Write the analysis PNGs and return their paths."""
    paths = []
    layers = summary["layers"]
    label = f"{summary['router_type']} router, E={summary['num_experts']}"

    fig, axis = plt.subplots(figsize=(7, 3.5))
    axis.bar(range(len(layers)), [layer["sparsity"] for layer in layers], color="#2ca02c")
    if summary["target_sparsity"] is not None:
        axis.axhline(summary["target_sparsity"], color="black", linestyle="--", label="target 1 - k/E")
        axis.legend(loc="lower right")
    axis.set(xlabel="layer", ylabel="sparsity", title=f"Routing sparsity per layer ({label})", ylim=(0, 1))
    axis.set_xticks(range(len(layers)))
    paths.append(_save(fig, output_dir / "sparsity_per_layer.png"))

    fig, axis = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(layers)
    for index, layer in enumerate(layers):
        histogram = np.array(layer["experts_per_token_histogram"]) / summary["num_tokens"]
        axis.bar(np.arange(len(histogram)) + index * width, histogram, width=width, label=f"layer {index}")
    axis.set(xlabel="experts used by a token", ylabel="fraction of tokens", title=f"Experts per token ({label})")
    axis.legend(fontsize=7, ncol=2)
    paths.append(_save(fig, output_dir / "experts_per_token.png"))

    frequency, mean_experts = _experts_against_frequency(recorder, min_count)
    fig, axis = plt.subplots(figsize=(7, 3.5))
    axis.scatter(frequency, mean_experts, s=4, alpha=0.4, color="#1f77b4", label="token id")
    if len(frequency) > 2:
        edges = np.logspace(np.log10(frequency.min()), np.log10(frequency.max()), 12)
        which = np.clip(np.digitize(frequency, edges) - 1, 0, len(edges) - 2)
        centers = [math.sqrt(edges[i] * edges[i + 1]) for i in range(len(edges) - 1) if (which == i).any()]
        means = [mean_experts[which == i].mean() for i in range(len(edges) - 1) if (which == i).any()]
        axis.plot(centers, means, color="#d62728", marker="o", label="binned mean")
    axis.set_xscale("log")
    axis.set(xlabel="token frequency in the analysed text", ylabel="experts per occurrence (mean over layers)")
    axis.set_title(f"Experts against token frequency (r = {summary['frequency_correlation']['value']:.2f})")
    axis.legend(fontsize=8)
    paths.append(_save(fig, output_dir / "experts_vs_frequency.png"))

    fig, axis = plt.subplots(figsize=(7, 0.5 + 0.45 * len(layers)))
    image = axis.imshow([layer["expert_load"] for layer in layers], aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=axis, label="load / mean load")
    axis.set(xlabel="expert", ylabel="layer", title=f"Expert load ({label})")
    _expert_ticks(axis, summary["num_experts"])
    axis.set_yticks(range(len(layers)))
    paths.append(_save(fig, output_dir / "expert_load.png"))

    domains = recorder.domains
    fig, axes = plt.subplots(1, len(layers), figsize=(2.2 * len(layers) + 1.5, 0.6 + 0.5 * len(domains)), squeeze=False)
    for index, (axis, layer) in enumerate(zip(axes[0], layers, strict=True)):
        matrix = np.array([layer["domain_expert_share"][domain] for domain in domains])
        image = axis.imshow(matrix, aspect="auto", cmap="magma", vmin=0, vmax=max(matrix.max(), 1e-9))
        axis.set_title(f"layer {index}", fontsize=9)
        axis.set_xlabel("expert", fontsize=8)
        _expert_ticks(axis, matrix.shape[1], fontsize=7)
        axis.set_yticks(range(len(domains)), domains if index == 0 else [""] * len(domains), fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), label="share of the domain's routed tokens")
    fig.suptitle(f"Domain x expert activation ({label})", y=1.12)
    paths.append(_save(fig, output_dir / "domain_expert_heatmap.png", tight=False))
    return paths


def _save(fig, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def analyze(
    model_dir: str,
    output_dir: str,
    dataset: str = "builtin",
    max_blocks_per_domain: int = 32,
    block_size: int | None = None,
    batch_size: int = 8,
) -> dict:
    """Analyse the routing of the checkpoint in `model_dir` on the validation split of `dataset`."""
    config = check_checkpoint(model_dir)
    if not config.has_experts:
        raise ValueError(f"{model_dir}: remoe analyze needs a ReMoE model with router_type relu or topk, not dense")
    if max_blocks_per_domain < 1 or batch_size < 1:
        raise ValueError(
            f"max_blocks_per_domain and batch_size must be >= 1, got {max_blocks_per_domain}, {batch_size}"
        )
    check_writable_folder(output_dir, "--output_dir")
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    block_size = block_size or min(model.config.max_position_embeddings, 512)
    validation = load_text_dataset(dataset)["validation"]
    blocks = pack_dataset(validation, tokenizer, block_size)
    keep = []
    for domain in sorted(set(blocks["domain"])):
        indices = [i for i, d in enumerate(blocks["domain"]) if d == domain]
        keep.extend(indices[:max_blocks_per_domain])
    recorder = record_routing(model, blocks.select(keep), batch_size=batch_size)
    summary = summarize(recorder, model.config)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    summary["figures"] = [path.name for path in plot_figures(recorder, summary, output)]
    RoutingAnalysis.from_dict(summary, strict=True).write(output)
    print(
        f"sparsity {summary['sparsity']:.4f}, experts/token {summary['experts_per_token']:.3f}, "
        f"rare-vs-frequent correlation {summary['frequency_correlation']['value']:.3f}; wrote {output}"
    )
    return summary


def run(args: argparse.Namespace) -> None:
    analyze(
        args.model_dir,
        args.output_dir,
        dataset=args.dataset,
        max_blocks_per_domain=args.max_blocks_per_domain,
        block_size=args.block_size,
        batch_size=args.batch_size,
    )
