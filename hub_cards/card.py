"""The model card of a repository folder: YAML metadata and markdown rendered from `templates/modelcard.md.j2`.

Everything in the card comes from the folder's files (`config.json`, the weights, `metrics.json`, `eval_results.json`,
`run_config.yaml`, `analysis/routing_analysis.json`) and the training folder's `checkpoint-*/trainer_state.json`;
what is missing is left out.
"""

from __future__ import annotations

import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from remoe.checkpoints import load_model
from remoe.records import (
    EvalResults,
    RoutingAnalysis,
    TrainingMetrics,
    ValidationSplit,
    parameter_counts,
    read_json_object,
)

from .remote_code import REMOTE_CODE_FILES

CARD_TEMPLATE = "modelcard.md.j2"
RUN_CONFIG_FILES = ("run_config.yaml", "run_config.json")
ANALYSIS_DIR = "analysis"
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
_HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_ROUTER_NAMES = {
    "relu": "ReLU (ReMoE)",
    "topk": "TopK (softmax, top-k)",
    "dense": "dense (no routing)",
    "hash": "Hash (fixed random token-id hash)",
    "expert_choice": "Expert Choice (experts pick tokens in training)",
    "sparsemixer": "SparseMixer-v2 (GRIN)",
    "lory": "Lory (segment-level soft merging)",
}
# How each of the ReMoE paper's other baselines routes (the card's description paragraph; ReLU's is the template's,
# TopK's and dense's are their summary lines).
ROUTER_DESCRIPTIONS = {
    "hash": "Hash routing (Hash Layers, Roller et al. 2021): each token id goes to k experts fixed by a random "
    "token-id hash table drawn at initialisation (saved with the weights), with gate 1. Routing is a fixed random "
    "token-id hash: there are no router parameters, and routing depends on the token id only, not on its context.",
    "expert_choice": "Expert Choice routing (Zhou et al. 2022): in training, routing depends on the other tokens of "
    "the batch: each expert picks its top-C tokens (C = capacity factor x k x tokens / E) by softmax score, so a "
    "token may get any number of experts, zero included. At inference each token takes its top-k experts by the "
    "same scores, a departure from the paper: batch-level routing is non-causal (a token's experts would depend on "
    "later tokens and on the rest of the batch), so causal evaluation and generation use the per-token rule.",
    "sparsemixer": "SparseMixer-v2 routing (GRIN, Liu et al. 2024): top-k by rounds, experts far below the best "
    "masked out, the chosen expert sampled in training with GRIN's gradient estimator for the discrete choice "
    "(midpoint method), the best one at inference; with the Switch load-balancing loss.",
    "lory": "Lory (Zhong et al. 2024): the sequence is cut into segments; segment j runs one FFN whose weights are "
    "the experts' weights merged with the softmax router weights computed from the mean hidden state of segment "
    "j - 1 (soft merging of all experts, no discrete routing, no balancing loss). The first segment is routed by "
    "itself with stop-gradient (its mean, so its merge weights see all of its tokens, later ones included). There "
    "is no KV cache: generation recomputes the sequence at every step "
    "(`use_cache=False`, the config's default). Its routing statistics count each token's dominant expert.",
}
# The regulariser line of the routing table, for routers trained without one.
NO_REGULARISER = {
    "hash": "none (fixed hash routing: nothing to balance or sparsify)",
    "expert_choice": "none (balanced by construction: every expert takes C tokens in training)",
    "lory": "none (soft merging of all experts; Lory adds no balancing loss)",
}
_TASK_DATASETS = {
    "remoe_arith": "remoe embedded corpus, held-out math (arithmetic multiple choice)",
    "remoe_ppl_code": "remoe embedded corpus, held-out code",
    "remoe_ppl_docs": "remoe embedded corpus, held-out docs",
}

Rows = list[tuple[str, str]]


def format_number(value: Any) -> str:
    """How numbers appear in the card body: integers with thousands separators, floats with 4 significant digits."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def read_run_config(folder: Path) -> dict[str, Any] | None:
    """`run_config.yaml` / `run_config.json` (the resolved `model`/`data`/`training` sections), if present."""
    for name in RUN_CONFIG_FILES:
        path = folder / name
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text()) if path.suffix == ".yaml" else json.loads(path.read_text())
            except (OSError, ValueError, yaml.YAMLError):
                return None
            return data if isinstance(data, dict) else None
    return None


def read_trainer_state(folder: Path) -> dict[str, Any] | None:
    """`trainer_state.json` of the folder, else of its last `checkpoint-N` (JSON, never the pickled args)."""
    candidates = [folder / "trainer_state.json"]
    checkpoints = sorted(
        (p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    candidates += [p / "trainer_state.json" for p in reversed(checkpoints)]
    for path in candidates:
        if path.is_file() and (state := read_json_object(path)) is not None:
            return state
    return None


def _human(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g}{unit} ({count:,})"
    return f"{count:,}"


def _present(rows: list[tuple[str, Any]]) -> Rows:
    """The (label, value) rows that have a value, formatted."""
    return [(label, format_number(value)) for label, value in rows if value is not None]


def _architecture(config, counts: dict[str, int]) -> tuple[dict[str, Any], Rows]:
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    arch = {"routed_experts": config.num_routed_experts, "max_position_embeddings": config.max_position_embeddings}
    rows = [
        ("Router", _ROUTER_NAMES[config.router_type]),
        (
            "Layers",
            f"{config.num_hidden_layers} ({moe_layers} MoE)" if config.has_experts else str(config.num_hidden_layers),
        ),
        ("Hidden size", format_number(config.hidden_size)),
        ("Attention heads / KV heads", f"{config.num_attention_heads} / {config.num_key_value_heads}"),
    ]
    if config.has_experts:
        rows += [
            ("Experts per MoE layer (E)", str(config.num_experts)),
            (
                "k (" + ("target experts per token" if config.uses_l1_controller else "experts per token") + ")",
                str(config.num_experts_per_tok),
            ),
            ("Granularity (G)", str(config.granularity)),
            (
                "Routed experts (E x G) x expert FFN size",
                f"{config.num_routed_experts} x {config.expert_intermediate_size}",
            ),
        ]
        if config.uses_l1_controller:
            rows.append(("Target sparsity (1 - k/E)", format_number(config.target_sparsity)))
    else:
        rows.append(("FFN size", format_number(config.intermediate_size * config.num_experts_per_tok)))
    rows += [
        ("Vocabulary", format_number(config.vocab_size)),
        ("Context length", format_number(config.max_position_embeddings)),
        ("Parameters (total)", _human(counts["total_parameters"])),
        ("Parameters (active per token)", _human(counts["active_parameters"])),
    ]
    return arch, rows


def _training_rows(metrics: TrainingMetrics | None, run, state) -> Rows:
    rows: Rows = []
    data = (run or {}).get("data") or {}
    training = (run or {}).get("training") or {}
    if data.get("dataset"):
        name = (
            "embedded corpus (Python stdlib code, docs, math problems)"
            if data["dataset"] == "builtin"
            else data["dataset"]
        )
        rows.append(("Data", str(name)))
    for key, label in (("block_size", "Sequence length"), ("vocab_size", "Tokenizer vocabulary")):
        if key in data:
            rows.append((label, format_number(data[key])))
    steps = (metrics.train_steps if metrics else None) or (state or {}).get("global_step")
    if steps:
        rows.append(("Optimizer steps", format_number(int(steps))))
    batch = training.get("per_device_train_batch_size") or (state or {}).get("train_batch_size")
    if batch:
        rows.append(("Batch size per device", format_number(int(batch))))
    for key, label in (
        ("gradient_accumulation_steps", "Gradient accumulation"),
        ("learning_rate", "Peak learning rate"),
        ("lr_scheduler_type", "LR schedule"),
        ("warmup_steps", "Warmup"),
        ("weight_decay", "Weight decay"),
        ("max_grad_norm", "Gradient clipping"),
        ("bf16", "bf16"),
    ):
        if key in training:
            rows.append((label, format_number(training[key])))
    if "learning_rate" not in training and state:
        rates = [entry["learning_rate"] for entry in state.get("log_history", []) if "learning_rate" in entry]
        if rates:
            rows.append(("Peak learning rate (logged)", format_number(float(max(rates)))))
    if metrics:
        rows += _present(
            [
                ("Seed", metrics.seed),
                ("Final training loss (mean)", metrics.train_loss),
                ("Training time (s)", metrics.train_seconds),
                ("Throughput (tokens/s)", metrics.tokens_per_second),
            ]
        )
    return rows


def _controller_rows(config, metrics: TrainingMetrics | None, model) -> Rows:
    """The router's controller settings and, from `metrics.json`, the sparsity and lambda at the end of training."""
    if not config.has_experts:
        return []
    metrics = metrics or TrainingMetrics()
    if config.uses_l1_controller:
        rows = [
            (
                "Load balancing",
                "load-balanced L1 (`refined_l1`)" if config.load_balance == "refined_l1" else "plain L1",
            ),
            (
                "Controller: λ₀, \N{GREEK SMALL LETTER ALPHA}",
                f"{format_number(config.l1_coef_init)}, {format_number(config.l1_coef_multiplier)}",
            ),
        ]
        if metrics.l1_coef is not None:
            rows.append(("Final L1 coefficient λ", format_number(metrics.l1_coef)))
        else:
            rows.append(("L1 coefficient λ saved with the weights", format_number(model.l1_coef)))
    elif config.uses_balancing_loss:
        rows = [("Load-balancing loss weight", format_number(config.router_aux_loss_coef))]
    else:
        rows = [("Regulariser", NO_REGULARISER.get(config.router_type, "none"))]
    rows += _router_setting_rows(config)
    return rows + _present(
        [
            ("Target sparsity", metrics.target_sparsity),
            ("Final training sparsity (last 10% of steps)", metrics.train_sparsity_final),
            ("Validation sparsity (inference)", metrics.validation_sparsity),
            ("Validation experts per token", metrics.validation_experts_per_token),
        ]
    )


def _router_setting_rows(config) -> Rows:
    """The settings of the paper's other baselines (router knobs, and what their statistics count)."""
    if config.router_type == "hash":
        return [("Hash table seed", str(config.router_hash_seed)), ("Router parameters", "none")]
    if config.router_type == "expert_choice":
        return [
            ("Capacity factor (training)", format_number(config.router_capacity_factor)),
            ("Inference routing", f"per-token top-{config.routed_top_k} by the router's scores"),
        ]
    if config.router_type == "sparsemixer":
        return [("Jitter eps (masking)", format_number(config.router_jitter_eps))]
    if config.router_type == "lory":
        return [
            ("Segment length (tokens)", format_number(config.segment_length)),
            ("KV cache", "none (generation recomputes the sequence)"),
            ("Sparsity statistics", "count the dominant expert of each segment's merge"),
        ]
    return []


def _validation_rows(metrics: TrainingMetrics | None) -> list[tuple[str, str, str]]:
    """(split, loss, perplexity): all domains together first, then each domain."""
    if metrics is None:
        return []
    overall = ValidationSplit(metrics.validation_loss, metrics.validation_perplexity)
    splits = [("all", overall), *sorted(metrics.validation_domains.items())]
    return [
        (name, format_number(split.loss), format_number(split.perplexity) if split.perplexity is not None else "-")
        for name, split in splits
        if split.loss is not None
    ]


def _eval_rows_and_results(eval_results: EvalResults | None):
    """The card's task rows, Hub `EvalResult`s and per-domain rows of `eval_results.json`."""
    from huggingface_hub import EvalResult

    if not eval_results or not eval_results.results:
        return [], [], []
    rows, model_index, domain_rows = [], [], []
    for task, metrics in eval_results.results.items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            stderr = metrics.get(f"{metric}_stderr")
            rows.append((task, metric, format_number(value), format_number(stderr) if stderr is not None else ""))
            args = {
                key: val
                for key, val in (("num_few_shot", eval_results.num_fewshot), ("limit", eval_results.limit))
                if val is not None
            }
            model_index.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Text Generation",
                    dataset_type=task,
                    dataset_name=_TASK_DATASETS.get(task, task),
                    dataset_split="validation" if task in _TASK_DATASETS else None,
                    dataset_args=args or None,
                    metric_type=metric,
                    metric_name=metric,
                    metric_value=value,
                    source_name="lm-evaluation-harness",
                    source_url=LM_EVAL_URL,
                )
            )
    for domain, stats in (eval_results.domains or {}).items():
        domain_rows.append(
            [
                domain,
                stats.get("task", ""),
                format_number(stats.get("tokens")),
                *(
                    format_number(stats[key]) if stats.get(key) is not None else "-"
                    for key in ("token_perplexity", "bits_per_byte", "routing_sparsity", "experts_per_token")
                ),
            ]
        )
    return rows, model_index, domain_rows


def _analysis(folder: Path) -> tuple[Rows, list[dict[str, str]]]:
    """Rows and figures of the routing analysis shared under `analysis/` (from its JSON summary only)."""
    summary = RoutingAnalysis.read(folder / ANALYSIS_DIR)
    if summary is None:
        return [], []
    rows = [
        (label, format_number(value))
        for label, value in (
            ("Tokens analysed", summary.num_tokens),
            ("Sparsity", summary.sparsity),
            ("Experts per token", summary.experts_per_token),
            ("Target sparsity", summary.target_sparsity),
        )
        if isinstance(value, (int, float))
    ]
    correlation = summary.correlation
    if isinstance(correlation, (int, float)) and math.isfinite(correlation):
        rows.append(("Correlation of log token frequency with experts per token", format_number(float(correlation))))
    if summary.dead_experts:
        dead = ", ".join(str(len(experts)) for experts in summary.dead_experts)
        rows.append(("Dead experts: under 1/64 of a balanced load (per layer)", dead))
    figures = [
        {"file": f"{ANALYSIS_DIR}/{path.name}", "title": path.stem.replace("_", " ")}
        for path in sorted((folder / ANALYSIS_DIR).glob("*.png"))
    ]
    return rows, figures


def _summary(config, counts: dict[str, int]) -> str:
    active, total = _human(counts["active_parameters"]).split(" ")[0], _human(counts["total_parameters"]).split(" ")[0]
    if config.uses_l1_controller:
        return (
            f"A ReLU-routed Mixture-of-Experts (ReMoE) causal language model for Hugging Face Transformers: "
            f"{config.num_hidden_layers} layers, {config.num_routed_experts} experts per MoE layer, "
            f"target k = {config.num_experts_per_tok} ({active} of {total} parameters active per token)."
        )
    layers = f"{config.num_hidden_layers} layers, {config.num_routed_experts} experts per MoE layer"
    if config.router_type == "topk":
        return (
            f"A TopK-routed Mixture-of-Experts causal language model (the ReMoE paper's baseline): "
            f"{layers}, k = {config.routed_top_k} ({active} of {total} parameters active per token)."
        )
    if config.router_type == "hash":
        return (
            f"A Hash-routed Mixture-of-Experts causal language model (a baseline of the ReMoE paper): {layers}, each "
            f"token id routed to k = {config.routed_top_k} experts by a fixed random hash ({active} of {total} "
            "parameters active per token; no router parameters)."
        )
    if config.router_type == "expert_choice":
        return (
            f"An Expert-Choice-routed Mixture-of-Experts causal language model (a baseline of the ReMoE paper): "
            f"{layers}, k = {config.routed_top_k} experts per token on average in training, exactly k at inference "
            f"({active} of {total} parameters active per token)."
        )
    if config.router_type == "sparsemixer":
        return (
            f"A SparseMixer-v2-routed (GRIN) Mixture-of-Experts causal language model (a baseline of the ReMoE "
            f"paper): {layers}, k = {config.routed_top_k} ({active} of {total} parameters active per token)."
        )
    if config.router_type == "lory":
        return (
            f"A Lory Mixture-of-Experts causal language model (a baseline of the ReMoE paper): {layers}, merged "
            f"softly into one FFN per segment of {config.segment_length} tokens ({active} of {total} parameters in "
            "the merged FFN a token runs; every expert contributes to the merge)."
        )
    return f"A dense LLaMA-style causal language model ({total} parameters), the ReMoE paper's dense baseline."


def _model_card_data(config, repo_id, license, run, metrics: TrainingMetrics | None, counts, model, model_index):
    from huggingface_hub import ModelCardData

    tags = ["remoe", "text-generation", "custom_code"]
    if config.has_experts:
        tags[1:1] = ["mixture-of-experts", "moe", f"{config.router_type}-routing"]
    dataset = ((run or {}).get("data") or {}).get("dataset")
    datasets = None
    if isinstance(dataset, str) and dataset != "builtin" and _HUB_DATASET.match(dataset) and not Path(dataset).suffix:
        datasets = [dataset]
    summary: dict[str, Any] = {
        "router_type": config.router_type,
        "num_experts": config.num_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "granularity": config.granularity,
        **counts,
    }
    if metrics:
        measured = {
            "target_sparsity": metrics.target_sparsity,
            "train_sparsity_final": metrics.train_sparsity_final,
            "validation_sparsity": metrics.validation_sparsity,
            "l1_coef": metrics.l1_coef,
        }
        summary.update((key, value) for key, value in measured.items() if value is not None)
    if config.uses_l1_controller and "l1_coef" not in summary:
        summary["l1_coef"] = model.l1_coef
    return ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=datasets,
        model_name=repo_id.split("/")[-1],
        eval_results=model_index or None,
        remoe=summary,
    )


def render_model_card(
    folder: str | Path,
    *,
    model=None,
    model_dir: str | Path | None = None,
    repo_id: str,
    license: str = "apache-2.0",
    extra_files: list[str] | None = None,
) -> str:
    """The model card (YAML metadata + markdown) for the repository folder `folder`, from its files (and the
    `checkpoint-N/trainer_state.json` of the training output folder `model_dir`, when given)."""
    import jinja2

    folder = Path(folder)
    if model is None:
        model = load_model(folder)
    config = model.config
    metrics, eval_results = TrainingMetrics.read(folder), EvalResults.read(folder)
    run = read_run_config(folder)
    state = read_trainer_state(Path(model_dir) if model_dir is not None else folder)
    counts = parameter_counts(model)
    arch, arch_rows = _architecture(config, counts)
    model_name = repo_id.split("/")[-1]
    eval_rows, model_index, domain_rows = _eval_rows_and_results(eval_results)
    card_data = _model_card_data(config, repo_id, license, run, metrics, counts, model, model_index)
    plots = [{"file": path.name, "title": path.stem.replace("_", " ")} for path in sorted(folder.glob("*.png"))]
    analysis_rows, analysis_figures = _analysis(folder)
    lm_eval_version = eval_results.lm_eval_version if eval_results else None
    evaluated_tasks = (eval_results.results if eval_results else None) or {}
    template_dir = resources.files("remoe.hub_cards") / "templates"
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir)),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )
    text = environment.get_template(CARD_TEMPLATE).render(
        card_data=card_data.to_yaml(),
        model_name=model_name,
        repo_id=repo_id,
        summary=_summary(config, counts),
        router_type=config.router_type,
        router_description=ROUTER_DESCRIPTIONS.get(config.router_type, ""),
        uses_l1_controller=config.uses_l1_controller,
        arch=arch,
        arch_rows=arch_rows,
        training_rows=_training_rows(metrics, run, state),
        controller_rows=_controller_rows(config, metrics, model),
        validation_rows=_validation_rows(metrics),
        plots=plots,
        analysis_rows=analysis_rows,
        analysis_figures=analysis_figures,
        eval_rows=eval_rows,
        domain_rows=domain_rows,
        eval_limit=eval_results.limit if eval_results else None,
        eval_fewshot=eval_results.num_fewshot if eval_results else None,
        eval_versions=f"v{lm_eval_version}" if lm_eval_version else "",
        has_local_tasks=any(task in _TASK_DATASETS for task in evaluated_tasks),
        lm_eval_url=LM_EVAL_URL,
        remote_code_files=REMOTE_CODE_FILES,
        prompt="def fibonacci(n):",
        num_shards=len(list(folder.glob("model*.safetensors"))),
        extra_files=sorted(extra_files or []),
    )
    return re.sub(r"\n{3,}", "\n\n", text)
