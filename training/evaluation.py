"""`remoe eval`: lm-evaluation-harness on a checkpoint, with per-domain perplexity and routing sparsity alongside.

The local tasks (`configuration/lm_eval_tasks/remoe/`) are built from the held-out (validation) split of the embedded
corpus on first use, so they run without network:

- `remoe_arith`: 4-way multiple choice on the arithmetic word problems of the `math` domain (chance: 0.25);
- `remoe_ppl_code`, `remoe_ppl_docs`: `loglikelihood_rolling` perplexity on the held-out `code` and `docs` documents.

Tags: `remoe` (all three) and `remoe_ppl` (the two perplexity tasks). Standard lm-eval task names work too when their
data is reachable. The same task folder works with the plain `lm_eval` command through `--include_path`
(see `task_include_path()`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import math
import random
import re
from importlib import resources
from pathlib import Path
from typing import Any

import datasets
import torch

from remoe.checkpoints import check_checkpoint
from remoe.configuration_remoe import ReMoEConfig
from remoe.modeling_remoe import expert_token_counts, layer_sparsity
from remoe.records import EvalResults

from .data import DOMAINS, build_embedded_corpus, default_cache_dir
from .generate import check_inference_device
from .run_config import check_writable_folder

LOCAL_TASKS: dict[str, str] = {"remoe_arith": "math", "remoe_ppl_code": "code", "remoe_ppl_docs": "docs"}
LOCAL_TAGS: dict[str, tuple[str, ...]] = {
    "remoe": tuple(LOCAL_TASKS),
    "remoe_ppl": ("remoe_ppl_code", "remoe_ppl_docs"),
}
ARITH_NUM_CHOICES = 4
RESULTS_FILENAME = EvalResults.FILENAME
logger = logging.getLogger(__name__)
_QUESTION = re.compile(r"^Question: (?P<question>.+)$", re.MULTILINE)
_NUMERIC_ANSWER = re.compile(r"^Answer: (?P<answer>-?\d+)$", re.MULTILINE)


# ---------------------------------------------------------------------------------------------------- task data


def task_include_path() -> Path:
    """The packaged lm-eval task folder, for `TaskManager(include_path=...)` or `lm_eval --include_path`."""
    return Path(str(resources.files("remoe.configuration") / "lm_eval_tasks"))


_TASK_DATA: dict[tuple, datasets.Dataset] = {}  # (kind, corpus folder, ...) -> dataset, built once per process


def _corpus_key(cache_dir: str | Path | None) -> str:
    return str((Path(cache_dir) if cache_dir is not None else default_cache_dir()).expanduser().resolve())


def heldout_documents(domain: str, cache_dir: str | Path | None = None) -> datasets.Dataset:
    """The validation documents of one embedded-corpus domain, in corpus order: columns `id`, `text`."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    key = ("heldout", _corpus_key(cache_dir), domain)
    if key not in _TASK_DATA:
        validation = build_embedded_corpus(cache_dir)["validation"]
        indices = [i for i, name in enumerate(validation["domain"]) if name == domain]
        texts = validation.select(indices)["text"]
        ids = [f"{domain}/validation/{i}" for i in range(len(texts))]
        _TASK_DATA[key] = datasets.Dataset.from_dict({"id": ids, "text": texts})
    return _TASK_DATA[key]


def _distractors(gold: int, rng: random.Random, count: int) -> list[int]:
    """`count` wrong answers near `gold`, of the same printed width when there are enough such numbers."""
    near = [gold + delta for delta in range(-10, 11) if delta]
    same_width = [value for value in near if len(str(value)) == len(str(gold))]
    return rng.sample(same_width if len(same_width) >= count else near, count)


def arithmetic_items(cache_dir: str | Path | None = None, num_choices: int = ARITH_NUM_CHOICES) -> datasets.Dataset:
    """Multiple-choice items from the held-out math documents whose answer is an integer.

    Columns: `id`, `question`, `query` ("Question: ...\\nAnswer:"), `choices` (numbers as strings, shuffled), `gold`
    (index of the right choice) and `answer`. Distractors and order come from a RNG seeded by the question text, so
    the items are the same on every machine that builds the same corpus.
    """
    if num_choices < 2:
        raise ValueError(f"num_choices must be >= 2, got {num_choices}")
    key = ("arith", _corpus_key(cache_dir), num_choices)
    if key not in _TASK_DATA:
        _TASK_DATA[key] = _arithmetic_items(heldout_documents("math", cache_dir), num_choices)
    return _TASK_DATA[key]


def _arithmetic_items(math_docs: datasets.Dataset, num_choices: int) -> datasets.Dataset:
    rows: dict[str, list] = {key: [] for key in ("id", "question", "query", "choices", "gold", "answer")}
    for doc_id, text in zip(math_docs["id"], math_docs["text"], strict=True):
        question, answer = _QUESTION.search(text), _NUMERIC_ANSWER.search(text)
        if question is None or answer is None:  # e.g. "x = 3" (algebra) answers
            continue
        gold = int(answer["answer"])
        rng = random.Random(f"remoe-arith-v1:{question['question']}")
        choices = [gold, *_distractors(gold, rng, num_choices - 1)]
        rng.shuffle(choices)
        rows["id"].append(doc_id)
        rows["question"].append(question["question"])
        rows["query"].append(f"Question: {question['question']}\nAnswer:")
        rows["choices"].append([str(value) for value in choices])
        rows["gold"].append(choices.index(gold))
        rows["answer"].append(str(gold))
    return datasets.Dataset.from_dict(rows)


def evaluated_texts(task: str, limit: int | None = None, cache_dir: str | Path | None = None) -> list[str]:
    """The texts a local task scores (first `limit` documents, as lm-eval's `--limit`): the document for the
    perplexity tasks, the question with its gold answer for `remoe_arith`."""
    if task == "remoe_arith":
        items = arithmetic_items(cache_dir)
        items = items.select(range(min(limit, len(items)))) if limit else items
        return [f"{q} {c[g]}" for q, c, g in zip(items["query"], items["choices"], items["gold"], strict=True)]
    docs = heldout_documents(LOCAL_TASKS[task], cache_dir)
    return docs.select(range(min(limit, len(docs))))["text"] if limit else docs["text"]


# ---------------------------------------------------------------------------------- perplexity and routing stats


def _rolling_windows(token_ids: list[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows of `loglikelihood_rolling`: (model input, target ids scored by its last
    positions), exactly as `HFLM._loglikelihood_tokens` builds them."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = []
    for context, target in map(
        make_disjoint_window, get_rolling_token_windows(token_ids, prefix_token, max_length, context_len=1)
    ):
        windows.append(((context + target)[-(max_length + 1) :][:-1], target))
    return windows


@torch.no_grad()
def text_statistics(
    model,
    tokenizer,
    texts: list[str],
    *,
    max_length: int,
    batch_size: int = 8,
    prefix_token_id: int | None = None,
) -> dict[str, Any]:
    """Token perplexity, bits per byte and (for routed ReMoE models) routing sparsity of `texts`.

    Tokens are scored with the disjoint rolling windows of lm-eval's `loglikelihood_rolling` (the first token is
    predicted from `prefix_token_id`, default bos, else eos), so `nll_sum` is minus the sum of lm-eval's rolling
    loglikelihoods. Sparsity counts the zero gates of every input position (1 - active / (positions * experts)).
    """
    if prefix_token_id is None:
        prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    config = model.config
    routed = getattr(config, "model_type", None) == "remoe" and getattr(config, "router_type", "dense") != "dense"
    device = next(model.parameters()).device
    samples: list[tuple[list[int], list[int]]] = []  # (input ids, scored target ids)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        samples += _rolling_windows(ids, prefix_token_id, max_length)
    samples.sort(key=lambda sample: -len(sample[0]))

    nll_sum, num_tokens, positions = 0.0, 0, 0
    active: torch.Tensor | None = None
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        width = max(len(inputs) for inputs, _ in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (inputs, _) in enumerate(batch):
            input_ids[row, : len(inputs)] = torch.tensor(inputs)
            attention_mask[row, : len(inputs)] = 1
        kwargs = {"output_router_logits": True} if routed else {}
        outputs = model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False, **kwargs
        )
        for row, (inputs, targets) in enumerate(batch):  # one row at a time: no (B, T, V) float copy
            scored = outputs.logits[row, len(inputs) - len(targets) : len(inputs)].float()
            target_ids = torch.tensor(targets, device=scored.device)
            nll = torch.logsumexp(scored, dim=-1) - scored.gather(-1, target_ids[:, None]).squeeze(-1)
            nll_sum += nll.sum().item()
            num_tokens += len(targets)
        if routed:
            valid = attention_mask.reshape(-1).bool().to(device)
            counts = expert_token_counts(tuple(logits[valid] for logits in outputs.router_logits), config).double()
            active = counts if active is None else active + counts
            positions += int(valid.sum())

    num_bytes = sum(len(text.encode("utf-8")) for text in texts)
    stats: dict[str, Any] = {"documents": len(texts), "tokens": num_tokens, "bytes": num_bytes, "nll_sum": nll_sum}
    if num_tokens:
        stats["loss"] = nll_sum / num_tokens
        stats["token_perplexity"] = math.exp(stats["loss"])
    if num_bytes:
        stats["bits_per_byte"] = nll_sum / num_bytes / math.log(2)
    if routed and active is not None and positions:
        per_layer, sparsity, experts_per_token = _routing_summary(active, positions, config)
        stats["routed_positions"] = positions
        stats["routing_sparsity"] = sparsity
        stats["experts_per_token"] = experts_per_token
        stats["routing_sparsity_per_layer"] = per_layer
        stats["_active"] = active  # (L, E) counts, summed over domains by `evaluate_checkpoint`, then dropped
    return stats


# ------------------------------------------------------------------------------------------------- remoe eval


def _split_names(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    names = tasks.split(",") if isinstance(tasks, str) else [n for item in tasks for n in str(item).split(",")]
    return [name.strip() for name in names if name.strip()]


def _task_manager(names: list[str], include_path: list[str]):
    """A TaskManager over the packaged tasks (+ `include_path`). lm-eval's ~15k built-in tasks are indexed (several
    seconds) only when a requested name is not found among ours; unknown names raise ValueError before any work."""
    from lm_eval.tasks import TaskManager

    paths = [str(task_include_path()), *include_path]
    manager = TaskManager(include_path=paths, include_defaults=False)
    missing = [name for name in names if name not in manager.all_tasks]
    if any(not name.startswith("remoe") for name in missing):  # `remoe*` names are ours: no need to look further
        manager = TaskManager(include_path=paths, include_defaults=True)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"tasks: unknown lm-eval task(s) {unknown}; local tasks: {sorted(LOCAL_TASKS)}, local tags: "
            f"{sorted(LOCAL_TAGS)}, or any task/group/tag name known to lm-eval (`lm_eval ls tasks`)"
        )
    return manager


def _clean_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's {"acc,none": v, "acc_stderr,none": s, "alias": ...} -> {"acc": v, "acc_stderr": s} (numbers only)."""
    out = {}
    for key, value in metrics.items():
        if "," not in key or isinstance(value, str) or value is None:
            continue
        metric, filter_name = key.split(",", 1)
        out[metric if filter_name == "none" else f"{metric}/{filter_name}"] = float(value)
    return out


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def _check_include_paths(include_path: list[str] | tuple[str, ...]) -> list[str]:
    """Every `--include_path` must be a task folder or YAML file (lm-eval skips a missing one without a word)."""
    for path in include_path:
        if not Path(path).exists():
            raise ValueError(f"--include_path {str(path)!r}: no such folder or file (an lm-eval task folder or YAML)")
    return [str(path) for path in include_path]


def _check_local_fewshot(names: list[str], num_fewshot: int | None) -> None:
    """The local tasks draw their few-shot examples from their own documents (they have no other split), never the
    evaluated one: `--num_fewshot` must leave one."""
    if not num_fewshot:
        return
    tasks = sorted({task for name in names for task in LOCAL_TAGS.get(name, (name,)) if task in LOCAL_TASKS})
    if not tasks:
        return
    counts = {task: len(evaluated_texts(task)) for task in tasks}
    task = min(counts, key=counts.get)
    if num_fewshot >= counts[task]:
        raise ValueError(
            f"--num_fewshot {num_fewshot}: task {task} draws its few-shot examples from its other "
            f"{counts[task] - 1} documents; use --num_fewshot {counts[task] - 1} or less"
        )


def _simple_evaluate(lm_eval, num_fewshot: int | None, **kwargs: Any) -> dict[str, Any]:
    """`lm_eval.simple_evaluate`, with the failure of a few-shot count larger than a task's documents naming
    `--num_fewshot` (lm-eval only says "Sample larger than population")."""
    try:
        return lm_eval.simple_evaluate(num_fewshot=num_fewshot, **kwargs)
    except ValueError as error:
        if num_fewshot and "larger than population" in str(error):
            raise ValueError(
                f"--num_fewshot {num_fewshot}: a task has fewer documents to draw that many few-shot examples from "
                f"({error}); use a smaller --num_fewshot"
            ) from error
        raise


def _check_eval_args(
    model_dir: Path, limit: int | None, batch_size: int, num_fewshot: int | None, max_length: int | None
) -> ReMoEConfig:
    config = check_checkpoint(model_dir)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (documents per task), got {limit}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if max_length is not None and max_length > config.max_position_embeddings:
        logger.warning(
            "--max_length %d is longer than the %d positions %s was trained for; scores past them are extrapolation",
            max_length,
            config.max_position_embeddings,
            model_dir,
        )
    return config


def _results_path(model_dir: Path, output_path: str | Path | None) -> Path:
    """Where the results JSON goes (a folder gets `eval_results.json`), checked writable before any evaluation
    (its folder is created when the results are written)."""
    path = Path(output_path) if output_path else model_dir / RESULTS_FILENAME
    if path.is_dir():
        path = path / RESULTS_FILENAME
    check_writable_folder(path.parent, "--output_path", create=False)
    return path


def evaluate_checkpoint(
    model_dir: str | Path,
    tasks: str | list[str] = "remoe",
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "auto",
    max_length: int | None = None,
    trust_remote_code: bool = False,
    experts_implementation: str | None = None,
    include_path: list[str] | tuple[str, ...] = (),
    output_path: str | Path | None = None,
    seed: int = 0,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run `lm_eval.simple_evaluate` with lm-eval's `hf` model (HFLM) on a checkpoint folder and return the results.

    The results (also written to `output_path`, default `MODEL_DIR/eval_results.json`) hold the cleaned lm-eval
    metrics per task (`results`), and for the local tasks the token perplexity, bits per byte and routing sparsity
    of the text each task scored (`domains`, keyed by corpus domain), with the sparsity over all of it (`routing`).
    """
    model_dir = Path(model_dir)
    names = _split_names(tasks)
    if not names:
        raise ValueError("tasks: give at least one task name, e.g. --tasks remoe")
    config = _check_eval_args(model_dir, limit, batch_size, num_fewshot, max_length)
    include_path = _check_include_paths(include_path)
    device = check_inference_device(device)
    if config.router_type == "lory" and batch_size > 1:
        # Lory's segments (the first one routed by its own mean) leave padding out only where the model is given the
        # attention mask, and lm-eval's HFLM calls a causal model without one: batches of one pad nothing.
        logger.warning("router_type='lory': evaluating one sequence at a time (--batch_size 1), not %d", batch_size)
        batch_size = 1
    results_path = _results_path(model_dir, output_path)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ValueError(f"remoe eval needs lm-eval: pip install 'remoe[eval]' ({error})") from error
    import remoe  # registers model_type "remoe" with the Auto classes

    manager = _task_manager(names, include_path)
    _check_local_fewshot(names, num_fewshot)
    model_kwargs: dict[str, Any] = {}
    if experts_implementation is not None:
        model_kwargs["experts_implementation"] = experts_implementation
    lm = HFLM(
        pretrained=str(model_dir),
        backend="causal",
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        max_length=max_length,
        trust_remote_code=trust_remote_code,
        **model_kwargs,
    )
    raw = _simple_evaluate(
        lm_eval,
        num_fewshot,
        model=lm,
        tasks=names,
        task_manager=manager,
        limit=limit,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    results: dict[str, Any] = {
        "model": str(model_dir),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"remoe": remoe.__version__, "lm_eval": _version("lm_eval")},
        "config": {
            "tasks": names,
            "limit": limit,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "device": device,
            "dtype": dtype,
            "max_length": lm.max_length,
            "seed": seed,
        },
        "results": {task: _clean_metrics(values) for task, values in raw["results"].items()},
        "n_samples": {task: dict(counts) for task, counts in raw.get("n-samples", {}).items()},
        "task_versions": dict(raw.get("versions", {})),
    }
    if raw.get("groups"):
        results["groups"] = {group: _clean_metrics(values) for group, values in raw["groups"].items()}

    evaluated = [task for task in LOCAL_TASKS if task in results["results"]]
    if evaluated:
        results.update(_domain_results(lm, evaluated, limit, batch_size))
    results = _finite_or_none(results)

    results_path.parent.mkdir(parents=True, exist_ok=True)
    EvalResults.from_dict(results, strict=True).write(results_path)
    if verbose:
        print(format_results(results, raw))
        print(f"results written to {results_path}")
    return results


def _routing_summary(tokens_per_expert: torch.Tensor, positions: int, config) -> tuple[list[float], float, float]:
    """(sparsity per layer, mean sparsity, experts per token) from `(L, E)` counts over `positions` tokens."""
    per_layer = layer_sparsity(tokens_per_expert, positions).tolist()
    sparsity = sum(per_layer) / len(per_layer)
    return per_layer, sparsity, (1.0 - sparsity) * config.num_routed_experts


def _domain_results(lm, tasks: list[str], limit: int | None, batch_size: int) -> dict[str, Any]:
    model, tokenizer = lm.model, lm.tokenizer
    model.eval()
    domains: dict[str, Any] = {}
    total_active, total_positions = None, 0
    for task in tasks:
        stats = text_statistics(
            model,
            tokenizer,
            evaluated_texts(task, limit),
            max_length=lm.max_length,
            batch_size=batch_size,
            prefix_token_id=lm.prefix_token_id,
        )
        active = stats.pop("_active", None)
        if active is not None:
            total_active = active if total_active is None else total_active + active
            total_positions += stats["routed_positions"]
        domains[LOCAL_TASKS[task]] = {"task": task, **stats}
    out: dict[str, Any] = {"domains": domains}
    config = model.config
    if total_active is not None and total_positions:
        per_layer, sparsity, experts_per_token = _routing_summary(total_active, total_positions, config)
        out["routing"] = {
            "router_type": config.router_type,
            "sparsity": sparsity,
            "experts_per_token": experts_per_token,
            "target_sparsity": config.target_sparsity if config.uses_l1_controller else None,
            "sparsity_per_layer": per_layer,
            "positions": total_positions,
        }
    return out


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def format_results(results: dict[str, Any], raw: dict[str, Any] | None = None) -> str:
    """lm-eval's markdown table (when the raw results are given) followed by the per-domain table."""
    lines = []
    if raw is not None:
        from lm_eval.utils import make_table

        lines.append(make_table(raw))
        if raw.get("groups"):
            lines.append(make_table(raw, "groups"))
    else:
        lines += ["|Task|Metric|Value|", "|---|---|---:|"]
        for task, metrics in results["results"].items():
            lines += [f"|{task}|{name}|{value:.4f}|" for name, value in metrics.items() if value is not None]
        lines.append("")
    if results.get("domains"):
        lines.append("|Domain|Task|Docs|Tokens|Token ppl|Bits/byte|Sparsity|Experts/token|")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for domain, stats in results["domains"].items():
            cells = [_fmt(stats.get(key)) for key in ("token_perplexity", "bits_per_byte", "routing_sparsity")]
            cells.append(_fmt(stats.get("experts_per_token")))
            lines.append(f"|{domain}|{stats['task']}|{stats['documents']}|{stats['tokens']}|{'|'.join(cells)}|")
        if results.get("routing"):
            routing = results["routing"]
            target = routing.get("target_sparsity")
            lines.append(
                f"\nrouting sparsity of the evaluated text: {routing['sparsity']:.4f} "
                f"({routing['experts_per_token']:.3f} experts per token"
                + (f"; target {target:.4f})" if target is not None else ")")
                + (" (lory: the dominant expert of each merge)" if routing.get("router_type") == "lory" else "")
            )
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def run(args: argparse.Namespace) -> None:
    evaluate_checkpoint(
        args.model_dir,
        args.tasks,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        max_length=args.max_length,
        trust_remote_code=args.trust_remote_code,
        experts_implementation=args.experts_implementation,
        include_path=args.include_path,
        output_path=args.output_path,
        seed=args.seed,
    )
