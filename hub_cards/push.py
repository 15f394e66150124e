"""`remoe push`: turn a checkpoint folder into a Hub repository folder (model card included) and upload it.

The repository folder holds sharded safetensors, `config.json` with `auto_map`, the two remote-code files
(`configuration_remoe.py`, `modeling_remoe.py`), the tokenizer, `generation_config.json`, the metrics files and plots
found in the checkpoint folder, and a `README.md` rendered from `templates/modelcard.md.j2`. Everything in the card
comes from those files (`config.json`, weights, `metrics.json`, `eval_results.json`, `run_config.yaml`,
`checkpoint-*/trainer_state.json`); what is missing is left out.

This module imports the model package (`remoe`) but not `remoe.training`.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from remoe.checkpoints import CheckpointError, check_checkpoint, load_model, load_tokenizer

REMOTE_CODE_FILES = ("configuration_remoe.py", "modeling_remoe.py")
CARD_TEMPLATE = "modelcard.md.j2"
METRICS_FILES = ("metrics.json", "eval_results.json")
RUN_CONFIG_FILES = ("run_config.yaml", "run_config.json")
ANALYSIS_DIR = "analysis"
ANALYSIS_SUMMARY = "routing_analysis.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
DEFAULT_MAX_SHARD_SIZE = "5GB"
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

# Remote code may import only these modules (plus relative imports and `remoe.*` inside `try/except ImportError`).
ALLOWED_IMPORTS = frozenset(
    {
        "__future__",
        "abc",
        "collections",
        "collections.abc",
        "contextlib",
        "copy",
        "dataclasses",
        "enum",
        "functools",
        "huggingface_hub.dataclasses",
        "itertools",
        "math",
        "numbers",
        "operator",
        "types",
        "typing",
        "warnings",
    }
)
ALLOWED_IMPORT_ROOTS = ("torch", "transformers")
FORBIDDEN_SUBMODULES = ("torch.hub", "torch.utils.model_zoo", "torch.serialization", "transformers.utils.hub")
FORBIDDEN_NAMES = frozenset(
    {
        "open",
        "exec",
        "eval",
        "compile",
        "__import__",
        "input",
        "breakpoint",
        "globals",
        "hf_hub_download",
        "snapshot_download",
        "cached_file",
        "urlopen",
    }
)
FORBIDDEN_ATTRIBUTES = frozenset(
    {
        "load",
        "save",
        "hub",
        "system",
        "popen",
        "Popen",
        "urlopen",
        "from_pretrained",
        "hf_hub_download",
        "snapshot_download",
        "cached_file",
        "read_text",
        "write_text",
        "read_bytes",
        "write_bytes",
    }
)


class PushError(ValueError):
    """Bad input for `remoe push` (raised before any upload), or a failed Hub call (with the server's message)."""


# ------------------------------------------------------------------------------------------------- validation


def check_repo_id(repo_id: str) -> str:
    """`ORG/NAME` with letters, digits, `-`, `_`, `.` (Hub rules: no `--` or `..`, not ending in `.git`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    message = (
        f"repo_id must look like ORG/NAME (letters, digits, '-', '_', '.'; no '--' or '..'; at most 96 "
        f"characters), got {repo_id!r}"
    )
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise PushError(message)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PushError(f"{message}: {error}") from error
    return repo_id


def resolve_token(token: str | None = None) -> str:
    """The given token, else `HF_TOKEN`, else the token saved by `hf auth login`; a clear error when there is none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PushError(
            "no Hugging Face token: set the HF_TOKEN environment variable, run `hf auth login`, or pass --token "
            "(nothing was uploaded)"
        )
    return token


def check_model_dir(model_dir: str | Path) -> Path:
    """The checkpoint folder, checked like every remoe command checks one (`remoe.checkpoints.check_checkpoint`)."""
    try:
        check_checkpoint(model_dir)
    except CheckpointError as error:
        raise PushError(f"model_dir: {error}") from error
    return Path(model_dir)


def check_remote_code(path: str | Path) -> list[str]:
    """Problems found in a remote-code file (empty list: model code only).

    The file may import only torch, transformers, a few pure standard-library modules (`ALLOWED_IMPORTS`) and its
    sibling files; `remoe.*` only inside `try: ... except ImportError:`. It may not call `open`, `exec`, `eval`,
    `compile`, `__import__` and the like, nor access `*.load`, `*.save`, `*.hub`, `*.from_pretrained`, `*.system`,
    Hub download helpers or file read/write methods: no network, file, subprocess or unpickling code.
    """
    path = Path(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    guarded: set[int] = set()  # ids of import nodes inside `try/except ImportError`
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_catches_import_error(handler) for handler in node.handlers):
            guarded.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    problems = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not _import_allowed(alias.name, id(node) in guarded):
                    problems.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and not _import_allowed(node.module or "", id(node) in guarded):
                problems.append(f"{where}: from {node.module} import ...")
            for alias in node.names:
                if alias.name in FORBIDDEN_NAMES or alias.name in FORBIDDEN_ATTRIBUTES - {"load", "save"}:
                    problems.append(f"{where}: imports {alias.name}")
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES:
            problems.append(f"{where}: uses {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRIBUTES:
            problems.append(f"{where}: uses .{node.attr}")
    return problems


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(name, ast.Name) and name.id in ("ImportError", "ModuleNotFoundError") for name in names)


def _import_allowed(module: str, guarded: bool) -> bool:
    if module.startswith(FORBIDDEN_SUBMODULES):
        return False
    root = module.split(".")[0]
    if module in ALLOWED_IMPORTS or root in ALLOWED_IMPORT_ROOTS:
        return True
    return guarded and root == "remoe"


# ---------------------------------------------------------------------------------------- repository folder


def prepare_repo_folder(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    analysis_dir: str | Path | None = None,
) -> Path:
    """Write the repository folder for `model_dir` into `out_dir` (which must be absent or empty) and return it.

    `analysis_dir` is a `remoe analyze` output folder (default: `MODEL_DIR/analysis` or `MODEL_DIR` when it holds
    `routing_analysis.json`); its summary and figures go to `analysis/` in the repository.
    """
    model_dir, out_dir = check_model_dir(model_dir), Path(out_dir)
    analysis_dir = find_analysis_dir(model_dir, analysis_dir)
    if repo_id is not None:
        check_repo_id(repo_id)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PushError(f"output folder {str(out_dir)!r} exists and is not empty")
    from transformers import GenerationConfig

    model = load_model(model_dir, dtype="auto")
    try:
        tokenizer = load_tokenizer(model_dir)
    except CheckpointError as error:
        raise PushError(f"model_dir: {error}") from error

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
    _drop_loading_state(out_dir / "tokenizer_config.json")
    if not (out_dir / "generation_config.json").is_file():
        GenerationConfig.from_model_config(model.config).save_pretrained(out_dir)
    extra_files = []
    analysis_files = _analysis_files(analysis_dir) if analysis_dir is not None else []
    top_plots = sorted(p.name for p in model_dir.glob("*.png") if p not in analysis_files)
    for name in (*METRICS_FILES, *RUN_CONFIG_FILES, *top_plots):
        if (model_dir / name).is_file() and not (out_dir / name).exists():
            shutil.copy2(model_dir / name, out_dir / name)
            extra_files.append(name)
    if analysis_files:
        (out_dir / ANALYSIS_DIR).mkdir()
        for path in analysis_files:
            shutil.copy2(path, out_dir / ANALYSIS_DIR / path.name)
        extra_files.append(f"{ANALYSIS_DIR}/")

    missing = [name for name in REMOTE_CODE_FILES if not (out_dir / name).is_file()]
    if missing:
        raise PushError(f"save_pretrained did not write the remote-code files {missing} (is `remoe` imported?)")
    problems = [problem for name in REMOTE_CODE_FILES for problem in check_remote_code(out_dir / name)]
    if problems:
        raise PushError("remote code is not model-only code: " + "; ".join(problems))
    pickled = [p.name for p in out_dir.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise PushError(f"refusing to share pickled files {pickled}: safetensors only")

    card = render_model_card(
        out_dir,
        model=model,
        model_dir=model_dir,
        repo_id=repo_id or model_dir.resolve().name,
        license=license,
        extra_files=extra_files,
    )
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    return out_dir


def find_analysis_dir(model_dir: Path, analysis_dir: str | Path | None = None) -> Path | None:
    """The `remoe analyze` output folder to share: the given one, else `MODEL_DIR/analysis`, else `MODEL_DIR` when it
    holds `routing_analysis.json`; None when there is none."""
    if analysis_dir is not None:
        analysis_dir = Path(analysis_dir)
        if not (analysis_dir / ANALYSIS_SUMMARY).is_file():
            raise PushError(f"analysis_dir: {str(analysis_dir)!r} has no {ANALYSIS_SUMMARY} (run `remoe analyze`)")
        return analysis_dir
    for candidate in (model_dir / ANALYSIS_DIR, model_dir):
        if (candidate / ANALYSIS_SUMMARY).is_file():
            return candidate
    return None


# How this process loaded the tokenizer (Transformers saves them into tokenizer_config.json), not part of the tokenizer:
# a published copy must not depend on the publisher's HF_HUB_OFFLINE.
TOKENIZER_LOADING_KEYS = ("local_files_only", "is_local")


def _drop_loading_state(tokenizer_config: Path) -> None:
    if not tokenizer_config.is_file():
        return
    values = json.loads(tokenizer_config.read_text())
    kept = {key: value for key, value in values.items() if key not in TOKENIZER_LOADING_KEYS}
    if kept != values:
        tokenizer_config.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n")


def _analysis_files(analysis_dir: Path) -> list[Path]:
    """`routing_analysis.json` and the figures it lists (all PNGs of the folder when it lists none)."""
    summary = _read_json(analysis_dir / ANALYSIS_SUMMARY) or {}
    figures = summary.get("figures")
    if isinstance(figures, list) and figures:
        paths = [analysis_dir / str(name) for name in figures if (analysis_dir / str(name)).is_file()]
    else:
        paths = sorted(analysis_dir.glob("*.png"))
    return [analysis_dir / ANALYSIS_SUMMARY, *paths]


# --------------------------------------------------------------------------------------------------- model card


def format_number(value: Any) -> str:
    """How numbers appear in the card body: integers with thousands separators, floats with 4 significant digits."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
        if path.is_file() and (state := _read_json(path)) is not None:
            return state
    return None


def parameter_counts(model) -> dict[str, int]:
    """Total parameters and parameters active per token (k of E experts; the same rule as `remoe train`)."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    config = model.config
    active = total - experts + experts * config.num_experts_per_tok // config.num_experts
    return {"total_parameters": total, "active_parameters": active}


def _human(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g}{unit} ({count:,})"
    return f"{count:,}"


def _architecture(config, counts: dict[str, int]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    router = {"relu": "ReLU (ReMoE)", "topk": "TopK (softmax, top-k)", "dense": "dense (no routing)"}[
        config.router_type
    ]
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    arch = {
        "routed_experts": config.num_experts * config.granularity,
        "max_position_embeddings": config.max_position_embeddings,
    }
    rows = [
        ("Router", router),
        (
            "Layers",
            f"{config.num_hidden_layers} ({moe_layers} MoE)"
            if config.router_type != "dense"
            else str(config.num_hidden_layers),
        ),
        ("Hidden size", format_number(config.hidden_size)),
        ("Attention heads / KV heads", f"{config.num_attention_heads} / {config.num_key_value_heads}"),
    ]
    if config.router_type != "dense":
        rows += [
            ("Experts per MoE layer (E)", str(config.num_experts)),
            (
                "k (" + ("target experts per token" if config.router_type == "relu" else "experts per token") + ")",
                str(config.num_experts_per_tok),
            ),
            ("Granularity (G)", str(config.granularity)),
            (
                "Routed experts (E x G) x expert FFN size",
                f"{arch['routed_experts']} x {config.intermediate_size // config.granularity}",
            ),
        ]
        if config.router_type == "relu":
            rows.append(
                ("Target sparsity (1 - k/E)", format_number(1.0 - config.num_experts_per_tok / config.num_experts))
            )
    else:
        rows.append(("FFN size", format_number(config.intermediate_size * config.num_experts_per_tok)))
    rows += [
        ("Vocabulary", format_number(config.vocab_size)),
        ("Context length", format_number(config.max_position_embeddings)),
        ("Parameters (total)", _human(counts["total_parameters"])),
        ("Parameters (active per token)", _human(counts["active_parameters"])),
    ]
    return arch, rows


def _training_rows(metrics, run, state) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
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
    steps = (metrics or {}).get("train_steps") or (state or {}).get("global_step")
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
    for key, label in (
        ("seed", "Seed"),
        ("train_loss", "Final training loss (mean)"),
        ("train_seconds", "Training time (s)"),
        ("tokens_per_second", "Throughput (tokens/s)"),
    ):
        if metrics and metrics.get(key) is not None:
            rows.append((label, format_number(metrics[key])))
    return rows


def _controller_rows(config, metrics, model) -> list[tuple[str, str]]:
    """The router's controller settings and, from `metrics.json`, the sparsity and lambda at the end of training."""
    if config.router_type == "dense":
        return []
    metrics = metrics or {}
    if config.router_type == "relu":
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
        if metrics.get("l1_coef") is not None:
            rows.append(("Final L1 coefficient λ", format_number(metrics["l1_coef"])))
        else:
            rows.append(("L1 coefficient λ saved with the weights", format_number(model.l1_coef)))
    else:
        rows = [("Load-balancing loss weight", format_number(config.router_aux_loss_coef))]
    for key, label in (
        ("target_sparsity", "Target sparsity"),
        ("train_sparsity_final", "Final training sparsity (last 10% of steps)"),
        ("validation_sparsity", "Validation sparsity (inference)"),
        ("validation_experts_per_token", "Validation experts per token"),
    ):
        if metrics.get(key) is not None:
            rows.append((label, format_number(metrics[key])))
    return rows


def _validation_rows(metrics) -> list[tuple[str, str, str]]:
    rows = []
    keys = sorted(k for k in (metrics or {}) if k.startswith("validation") and k.endswith("_loss"))
    for key in sorted(keys, key=lambda k: k != "validation_loss"):  # "all" first, then the domains
        stem = key.removesuffix("_loss")
        name = "all" if stem == "validation" else stem.removeprefix("validation_")
        ppl = metrics.get(f"{stem}_perplexity")
        rows.append((name, format_number(metrics[key]), format_number(ppl) if ppl is not None else "-"))
    return rows


def _eval_rows_and_results(eval_results, model_name: str):
    from huggingface_hub import EvalResult

    if not eval_results or not eval_results.get("results"):
        return [], [], []
    config = eval_results.get("config") or {}
    rows, model_index, domain_rows = [], [], []
    limit, fewshot = config.get("limit"), config.get("num_fewshot")
    for task, metrics in eval_results["results"].items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            stderr = metrics.get(f"{metric}_stderr")
            rows.append((task, metric, format_number(value), format_number(stderr) if stderr is not None else ""))
            args = {key: val for key, val in (("num_few_shot", fewshot), ("limit", limit)) if val is not None}
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
    for domain, stats in (eval_results.get("domains") or {}).items():
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


def _analysis(folder: Path) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """Rows and figures of the routing analysis shared under `analysis/` (from its JSON summary only)."""
    summary = _read_json(folder / ANALYSIS_DIR / ANALYSIS_SUMMARY)
    if summary is None:
        return [], []
    rows = []
    for key, label in (
        ("num_tokens", "Tokens analysed"),
        ("sparsity", "Sparsity"),
        ("experts_per_token", "Experts per token"),
        ("target_sparsity", "Target sparsity"),
    ):
        if isinstance(summary.get(key), (int, float)):
            rows.append((label, format_number(summary[key])))
    correlation = (summary.get("frequency_correlation") or {}).get("value")
    if isinstance(correlation, (int, float)) and math.isfinite(correlation):
        rows.append(("Correlation of log token frequency with experts per token", format_number(float(correlation))))
    layers = summary.get("layers") or []
    dead = [len(layer.get("dead_experts") or []) for layer in layers if isinstance(layer, dict)]
    if dead:
        rows.append(("Experts that received no token (per layer)", ", ".join(map(str, dead))))
    figures = [
        {"file": f"{ANALYSIS_DIR}/{path.name}", "title": path.stem.replace("_", " ")}
        for path in sorted((folder / ANALYSIS_DIR).glob("*.png"))
    ]
    return rows, figures


_TASK_DATASETS = {
    "remoe_arith": "remoe embedded corpus, held-out math (arithmetic multiple choice)",
    "remoe_ppl_code": "remoe embedded corpus, held-out code",
    "remoe_ppl_docs": "remoe embedded corpus, held-out docs",
}


def _summary(config, counts) -> str:
    active, total = _human(counts["active_parameters"]).split(" ")[0], _human(counts["total_parameters"]).split(" ")[0]
    if config.router_type == "relu":
        return (
            f"A ReLU-routed Mixture-of-Experts (ReMoE) causal language model for Hugging Face Transformers: "
            f"{config.num_hidden_layers} layers, {config.num_experts * config.granularity} experts per MoE layer, "
            f"target k = {config.num_experts_per_tok} ({active} of {total} parameters active per token)."
        )
    if config.router_type == "topk":
        return (
            f"A TopK-routed Mixture-of-Experts causal language model (the ReMoE paper's baseline): "
            f"{config.num_hidden_layers} layers, {config.num_experts * config.granularity} experts per MoE layer, "
            f"k = {config.num_experts_per_tok * config.granularity} ({active} of {total} parameters active per token)."
        )
    return f"A dense LLaMA-style causal language model ({total} parameters), the ReMoE paper's dense baseline."


def _model_card_data(config, repo_id, license, run, metrics, counts, model, model_index):
    from huggingface_hub import ModelCardData

    tags = ["remoe", "text-generation", "custom_code"]
    if config.router_type != "dense":
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
    for key in ("target_sparsity", "train_sparsity_final", "validation_sparsity", "l1_coef"):
        if metrics and metrics.get(key) is not None:
            summary[key] = metrics[key]
    if config.router_type == "relu" and "l1_coef" not in summary:
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
    metrics, eval_results = _read_json(folder / "metrics.json"), _read_json(folder / "eval_results.json")
    run = read_run_config(folder)
    state = read_trainer_state(Path(model_dir) if model_dir is not None else folder)
    counts = parameter_counts(model)
    arch, arch_rows = _architecture(config, counts)
    model_name = repo_id.split("/")[-1]
    eval_rows, model_index, domain_rows = _eval_rows_and_results(eval_results, model_name)
    card_data = _model_card_data(config, repo_id, license, run, metrics, counts, model, model_index)
    plots = [{"file": path.name, "title": path.stem.replace("_", " ")} for path in sorted(folder.glob("*.png"))]
    analysis_rows, analysis_figures = _analysis(folder)
    eval_config = (eval_results or {}).get("config") or {}
    versions = (eval_results or {}).get("versions") or {}
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
        eval_limit=eval_config.get("limit"),
        eval_fewshot=eval_config.get("num_fewshot"),
        eval_versions=f"v{versions['lm_eval']}" if versions.get("lm_eval") else "",
        has_local_tasks=any(task in _TASK_DATASETS for task in (eval_results or {}).get("results", {})),
        lm_eval_url=LM_EVAL_URL,
        remote_code_files=REMOTE_CODE_FILES,
        prompt="def fibonacci(n):",
        num_shards=len(list(folder.glob("model*.safetensors"))),
        extra_files=sorted(extra_files or []),
    )
    return re.sub(r"\n{3,}", "\n\n", text)


# ------------------------------------------------------------------------------------------------------ upload


def push(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    dry_run: str | Path | None = None,
    license: str = "apache-2.0",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    commit_message: str | None = None,
    endpoint: str | None = None,
    analysis_dir: str | Path | None = None,
) -> str:
    """Prepare the repository folder and upload it (`create_repo(exist_ok=True)` + `upload_folder`).

    With `dry_run=OUT` the folder is written to OUT and nothing is sent. The repo id, the checkpoint folder and the
    token are checked before any work. Returns the commit URL (or the folder path for a dry run).
    """
    check_repo_id(repo_id)
    find_analysis_dir(check_model_dir(model_dir), analysis_dir)
    options = {"repo_id": repo_id, "license": license, "max_shard_size": max_shard_size, "analysis_dir": analysis_dir}
    if dry_run is not None:
        return str(prepare_repo_folder(model_dir, dry_run, **options))
    token = resolve_token(token)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    with tempfile.TemporaryDirectory(prefix="remoe-push-") as tmp:
        folder = prepare_repo_folder(model_dir, Path(tmp) / "repo", **options)
        api = HfApi(endpoint=endpoint, token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type="model",
                commit_message=commit_message or f"Upload {Path(model_dir).resolve().name} with remoe push",
            )
        except HfHubHTTPError as error:
            raise PushError(f"upload to {repo_id!r} failed: {error}") from error
    return commit.commit_url


def run(args: argparse.Namespace) -> None:
    result = push(
        args.model_dir,
        args.repo_id,
        private=args.private,
        token=args.token,
        dry_run=args.dry_run,
        license=args.license,
        max_shard_size=args.max_shard_size,
        commit_message=args.commit_message,
        analysis_dir=args.analysis_dir,
    )
    if args.dry_run:
        files = sorted(str(p.relative_to(result)) for p in Path(result).rglob("*") if p.is_file())
        print(f"repository folder for {args.repo_id} written to {result} (nothing uploaded):")
        print("\n".join(f"  {name}" for name in files))
    else:
        print(f"pushed {args.model_dir} to {args.repo_id}: {result}")
