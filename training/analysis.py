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

from remoe.checkpoints import check_checkpoint, expected_tensor_shapes, load_model, load_tokenizer
from remoe.modeling_remoe import active_experts
from remoe.records import RoutingAnalysis

from .data import load_text_dataset, pack_dataset
from .run_config import check_writable_folder

DEAD_EXPERT_FRACTION = 1 / 64  # of the tokens an expert would get under perfect balance
TOP_TOKENS = 10  # most frequent tokens listed per expert
# What the routing statistics count where they are not per-token routing decisions of a trained router (figure
# labels and the printed report); `active_experts` in the model file is the rule.
ROUTING_NOTES = {
    "lory": "Lory merges all experts softly per segment; the statistics count each token's dominant expert "
    "(the largest merge weight of its segment)",
    "expert_choice": "Expert Choice at inference: each token takes its top-k experts by the router's scores (in "
    "training each expert picks its top-C tokens of the batch)",
    "hash": "Hash routing: each token id's experts are fixed by a random table (no router parameters)",
    "sparsemixer": "SparseMixer-v2 at inference: each token takes its top-k experts (training samples them)",
}
_FIGURE_NOTES = {"lory": "dominant expert", "expert_choice": "inference top-k"}


class RoutingRecorder:
    """Accumulates which experts each token uses, per layer, over batches of (token ids, domain).

    With `top_tokens_layer` it also counts the token ids routed to each expert of that MoE layer; `add_comparison`
    counts the (token, layer) routing decisions that differ from another checkpoint's."""

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        vocab_size: int,
        domains: list[str],
        top_tokens_layer: int | None = None,
    ):
        self.domains = domains
        self.expert_tokens = np.zeros((num_layers, num_experts), dtype=np.int64)
        self.domain_expert_tokens = np.zeros((len(domains), num_layers, num_experts), dtype=np.int64)
        self.domain_tokens = np.zeros(len(domains), dtype=np.int64)
        self.experts_per_token_histogram = np.zeros((num_layers, num_experts + 1), dtype=np.int64)
        self.experts_by_token_id = np.zeros(vocab_size, dtype=np.float64)  # experts summed over layers
        self.token_id_count = np.zeros(vocab_size, dtype=np.int64)
        self.num_tokens = 0
        self.top_tokens_layer = top_tokens_layer
        self.expert_token_ids = (
            np.zeros((num_experts, vocab_size), dtype=np.int64) if top_tokens_layer is not None else None
        )
        self.flips = np.zeros(num_layers, dtype=np.int64)
        self.compared_tokens = 0

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
        if self.expert_token_ids is not None:
            experts, positions = np.nonzero(active[self.top_tokens_layer].T)  # (expert, token position) pairs
            np.add.at(self.expert_token_ids, (experts, token_ids[positions]), 1)

    def add_comparison(self, active: np.ndarray, other: np.ndarray) -> None:
        """`active`, `other (L, T, E)`: the same tokens routed by two checkpoints; a decision differs when the set of
        active experts of a (token, layer) differs."""
        self.flips += (active != other).any(axis=2).sum(axis=1)
        self.compared_tokens += active.shape[1]


def _active_experts(model, input_ids: torch.Tensor) -> np.ndarray:
    """`(L, B, S, E)` booleans: the experts each token of `input_ids (B, S)` uses in each MoE layer."""
    config = model.config
    router_logits = model(input_ids, output_router_logits=True, use_cache=False).router_logits
    active = torch.stack([active_experts(logits, config) for logits in router_logits])  # (L, B*S, E)
    return active.view(config.num_moe_layers, *input_ids.shape, -1).cpu().numpy()


@torch.no_grad()
def record_routing(
    model, blocks, batch_size: int = 8, top_tokens_layer: int | None = None, compare_model=None
) -> RoutingRecorder:
    """Run `blocks` (rows with `input_ids` and `domain`) through the model and record every routing decision; with
    `compare_model` (same architecture) also through that one, counting the decisions that differ."""
    config = model.config
    domains = sorted(set(blocks["domain"]))
    recorder = RoutingRecorder(
        config.num_moe_layers, config.num_routed_experts, config.vocab_size, domains, top_tokens_layer
    )
    device = next(model.parameters()).device
    model.eval()
    if compare_model is not None:
        compare_model.eval()
    for start in tqdm(range(0, len(blocks), batch_size), desc="Routing", unit="batch"):
        rows = blocks[start : start + batch_size]
        input_ids = torch.tensor(rows["input_ids"], dtype=torch.long, device=device)
        active = _active_experts(model, input_ids)
        other = None
        if compare_model is not None:
            other_device = next(compare_model.parameters()).device
            other = _active_experts(compare_model, input_ids.to(other_device))
        for row, (ids, domain) in enumerate(zip(input_ids.cpu().numpy(), rows["domain"], strict=True)):
            recorder.add(ids, domain, active[:, row])
            if other is not None:
                recorder.add_comparison(active[:, row], other[:, row])
    return recorder


def dead_experts(expert_tokens: np.ndarray, fraction: float = DEAD_EXPERT_FRACTION) -> list[int]:
    """Experts of one layer (`expert_tokens (E,)`: tokens routed to each) that are dead: they receive fewer than
    `fraction` of the tokens an expert would get under perfect balance, i.e. of the layer's routed (token, expert)
    pairs divided evenly over its E experts (`expert_load < fraction`). An expert with no token is always dead."""
    balanced = expert_tokens.sum() / expert_tokens.size
    return [int(e) for e in np.flatnonzero((expert_tokens < fraction * balanced) | (expert_tokens == 0))]


def summarize(recorder: RoutingRecorder, config, min_count: int = 5, tokenizer=None) -> dict:
    """The JSON summary: per-layer sparsity, experts per token, load, dead experts, domain shares, rare vs frequent;
    the top tokens of each expert when the recorder counted them (decoded with `tokenizer` when given) and the
    routing stability against another checkpoint when it compared one."""
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
    summary = {
        "router_type": config.router_type,
        "num_experts": num_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "target_sparsity": config.target_sparsity if config.uses_l1_controller else None,
        "num_tokens": int(recorder.num_tokens),
        "sparsity": float(sparsity.mean()),
        "experts_per_token": float(layer_tokens.sum() / (recorder.num_tokens * num_layers)),
        "dead_expert_threshold": {
            "fraction_of_balanced_load": DEAD_EXPERT_FRACTION,
            "description": "an expert of a layer is dead when it receives fewer than 1/64 of the tokens it would get "
            "under perfect balance (the layer's routed (token, expert) pairs / E), i.e. expert_load < 1/64; "
            "experts_with_no_token lists those with none at all",
        },
        "layers": [
            {
                "layer": layer,
                "sparsity": float(sparsity[layer]),
                "experts_per_token_histogram": recorder.experts_per_token_histogram[layer].tolist(),
                "tokens_with_no_expert": float(recorder.experts_per_token_histogram[layer][0] / recorder.num_tokens),
                "expert_load": load[layer].tolist(),
                "max_over_mean_load": float(load[layer].max()),
                "dead_experts": dead_experts(recorder.expert_tokens[layer]),
                "experts_with_no_token": [int(e) for e in np.flatnonzero(recorder.expert_tokens[layer] == 0)],
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
    if recorder.expert_token_ids is not None:
        summary["top_tokens"] = _top_tokens(recorder, tokenizer)
    if recorder.compared_tokens:
        per_layer = recorder.flips / recorder.compared_tokens
        summary["routing_stability"] = {
            "description": "flip rate: fraction of (token, layer) routing decisions (the set of active experts of a "
            "token in an MoE layer) that differ between this checkpoint and compare_to on the same held-out tokens",
            "flip_rate": float(per_layer.mean()),
            "flip_rate_per_layer": per_layer.tolist(),
            "num_decisions": int(recorder.compared_tokens * num_layers),
        }
    return summary


def _top_tokens(recorder: RoutingRecorder, tokenizer=None, top: int = TOP_TOKENS) -> dict:
    """The `top` token ids most often routed to each expert of `recorder.top_tokens_layer`, with their counts."""
    counts = recorder.expert_token_ids
    experts = []
    for expert_counts in counts:
        ids = [int(i) for i in np.argsort(-expert_counts, kind="stable")[:top] if expert_counts[i] > 0]
        experts.append(
            [
                {
                    "token_id": token_id,
                    "token": tokenizer.decode([token_id]) if tokenizer is not None else None,
                    "count": int(expert_counts[token_id]),
                    "share_of_token": float(expert_counts[token_id] / recorder.token_id_count[token_id]),
                }
                for token_id in ids
            ]
        )
    return {
        "layer": recorder.top_tokens_layer,
        "description": f"per expert of MoE layer {recorder.top_tokens_layer}, the {top} tokens routed to it most often "
        "(count: occurrences routed to the expert; share_of_token: that count over all occurrences of the token)",
        "experts": experts,
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
    if summary["router_type"] in _FIGURE_NOTES:
        label += f", {_FIGURE_NOTES[summary['router_type']]}"

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


def check_comparable(config, other_config, compare_to: str) -> None:
    """A one-line `ValueError` naming `--compare_to` unless both checkpoints have the same architecture: the same
    tensors (names and shapes), router type and experts per token."""
    for name in ("router_type", "num_experts_per_tok", "vocab_size"):
        if getattr(config, name) != getattr(other_config, name):
            raise ValueError(
                f"--compare_to {compare_to}: {name} is {getattr(other_config, name)!r} there and "
                f"{getattr(config, name)!r} in the analysed model; compare checkpoints of the same architecture"
            )
    shapes, other_shapes = expected_tensor_shapes(config)[0], expected_tensor_shapes(other_config)[0]
    different = sorted(name for name in set(shapes) | set(other_shapes) if shapes.get(name) != other_shapes.get(name))
    if different:
        raise ValueError(
            f"--compare_to {compare_to}: another architecture ({different[0]} is {other_shapes.get(different[0])} "
            f"there and {shapes.get(different[0])} in the analysed model); compare checkpoints of the same architecture"
        )


def _load_comparison(compare_to: str, config, tokenizer):
    """The checked model in `compare_to`; its tokenizer, when it has one, must be the analysed model's."""
    try:
        other_config = check_checkpoint(compare_to)
    except ValueError as error:
        raise ValueError(f"--compare_to: {error}") from error
    check_comparable(config, other_config, compare_to)
    has_tokenizer = any(Path(compare_to, name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    if has_tokenizer and load_tokenizer(compare_to).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"--compare_to {compare_to}: its tokenizer differs from the analysed model's")
    return load_model(compare_to)


def analyze(
    model_dir: str,
    output_dir: str,
    dataset: str = "builtin",
    max_blocks_per_domain: int = 32,
    block_size: int | None = None,
    batch_size: int = 8,
    compare_to: str | None = None,
    top_tokens_layer: int | None = None,
) -> dict:
    """Analyse the routing of the checkpoint in `model_dir` on the validation split of `dataset`.

    `top_tokens_layer` (an MoE layer index, default the middle one) is the layer whose experts' most frequent tokens
    are listed; `compare_to` a checkpoint of the same architecture whose routing of the same blocks is compared."""
    config = check_checkpoint(model_dir)
    if not config.has_experts:
        raise ValueError(
            f"{model_dir}: remoe analyze needs a ReMoE model with experts (any router_type but dense), not dense"
        )
    if max_blocks_per_domain < 1 or batch_size < 1:
        raise ValueError(
            f"max_blocks_per_domain and batch_size must be >= 1, got {max_blocks_per_domain}, {batch_size}"
        )
    top_tokens_layer = config.num_moe_layers // 2 if top_tokens_layer is None else top_tokens_layer
    if not 0 <= top_tokens_layer < config.num_moe_layers:
        raise ValueError(
            f"--top_tokens_layer must be an MoE layer index in 0..{config.num_moe_layers - 1}, got {top_tokens_layer}"
        )
    check_writable_folder(output_dir, "--output_dir")
    tokenizer = load_tokenizer(model_dir)
    other = _load_comparison(compare_to, config, tokenizer) if compare_to is not None else None
    model = load_model(model_dir)
    block_size = block_size or min(model.config.max_position_embeddings, 512)
    validation = load_text_dataset(dataset)["validation"]
    blocks = pack_dataset(validation, tokenizer, block_size)
    keep = []
    for domain in sorted(set(blocks["domain"])):
        indices = [i for i, d in enumerate(blocks["domain"]) if d == domain]
        keep.extend(indices[:max_blocks_per_domain])
    recorder = record_routing(
        model, blocks.select(keep), batch_size=batch_size, top_tokens_layer=top_tokens_layer, compare_model=other
    )
    summary = summarize(recorder, model.config, tokenizer=tokenizer)
    if other is not None:
        summary["routing_stability"]["compare_to"] = str(compare_to)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    summary["figures"] = [path.name for path in plot_figures(recorder, summary, output)]
    RoutingAnalysis.from_dict(summary, strict=True).write(output)
    print(
        f"sparsity {summary['sparsity']:.4f}, experts/token {summary['experts_per_token']:.3f}, "
        f"rare-vs-frequent correlation {summary['frequency_correlation']['value']:.3f}; wrote {output}"
    )
    print(report_lines(summary))
    return summary


def report_lines(summary: dict, tokens_shown: int = 5) -> str:
    """The printed part of the summary: dead experts per layer, the flip rate, each expert's top tokens."""
    dead = ", ".join(str(len(layer["dead_experts"])) for layer in summary["layers"])
    lines = [f"dead experts per layer (under 1/64 of a balanced load): {dead}"]
    if summary.get("router_type") in ROUTING_NOTES:
        lines.insert(0, f"note: {ROUTING_NOTES[summary['router_type']]}")
    stability = summary.get("routing_stability")
    if stability:
        per_layer = " ".join(f"{rate:.3f}" for rate in stability["flip_rate_per_layer"])
        lines.append(
            f"routing flip rate against {stability.get('compare_to', 'the other checkpoint')}: "
            f"{stability['flip_rate']:.4f} (per layer {per_layer})"
        )
    top = summary.get("top_tokens")
    if top:
        lines.append(f"top tokens per expert, MoE layer {top['layer']}:")
        for expert, tokens in enumerate(top["experts"]):
            shown = " ".join(
                f"{entry['token_id'] if entry['token'] is None else entry['token']!r}:{entry['count']}"
                for entry in tokens[:tokens_shown]
            )
            lines.append(f"  expert {expert}: {shown or '-'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    analyze(
        args.model_dir,
        args.output_dir,
        dataset=args.dataset,
        max_blocks_per_domain=args.max_blocks_per_domain,
        block_size=args.block_size,
        batch_size=args.batch_size,
        compare_to=args.compare_to,
        top_tokens_layer=args.top_tokens_layer,
    )
