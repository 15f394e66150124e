"""Branch-Train-MiX and its neighbours on the command line and as Python functions.

- `remoe btx branch SEED --domains code docs math`: one `remoe train` job per domain (or per `--datasets` path),
  each continuing the seed; a Llama / Mistral / Qwen2 seed is first converted to a dense ReMoE checkpoint.
- `remoe btx mix EXPERT... --output_dir OUT`: merge the experts into one ReLU- or TopK-routed MoE
  (`remoe.conversion.btx_mix`).
- `remoe btx finetune MIXED --output_dir OUT`: MoE finetuning on the union of the data (controller for ReLU, Switch
  load balancing for TopK), optionally with frozen experts.
- `remoe btx eval MODEL... [--btm BRANCH]`: per-domain validation loss and per-domain routing shares, as a markdown
  table; `--btm` adds the Branch-Train-Merge baseline (`evaluate_btm`: the branch models as a top-k ensemble).

`remoe upcycle` and `remoe convert` are in `remoe.training.convert`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from remoe import conversion
from remoe.checkpoints import check_checkpoint, load_any_model, load_tokenizer
from remoe.configuration_remoe import ReMoEConfig
from remoe.modeling_remoe import expert_token_counts

from .convert import CONTROLLER_OPTIONS, TOPK_ROUTING_OPTIONS, WRITER_OPTIONS, cli_options
from .run_config import (
    CONTINUATION_FLAGS,
    DATA_FLAGS,
    TRAINING_FLAGS,
    apply_continuation_overrides,
    check_output_dir,
    plan_run,
    resolve_run,
)

BRANCH_FILE = "btx_branch.json"
JOB_FILE = "btx_job.json"
# `remoe train` options that a branch / finetune job passes through (the architecture comes from the checkpoint).
TRAIN_PASSTHROUGH = (
    "config",
    "preset",
    *TRAINING_FLAGS,
    *(name for name in DATA_FLAGS if name not in ("domains", "vocab_size")),
    *CONTINUATION_FLAGS,
)


# ----------------------------------------------------------------------------------------------------------------------
# branch
# ----------------------------------------------------------------------------------------------------------------------


def _job_command(job: dict[str, Any]) -> str:
    """The `remoe train` command line of a job dict."""
    words = ["remoe", "train"]
    for key, value in job.items():
        if value is False and key in TOPK_ROUTING_OPTIONS:
            words.append(f"--no_{key}")
        if value is None or value is False:
            continue
        words.append(f"--{key}")
        if isinstance(value, (list, tuple)):
            words += [str(v) for v in value]
        elif value is not True:
            words.append(str(value))
    return shlex.join(words)


def _check_train_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(name for name, value in options.items() if value is not None and name not in TRAIN_PASSTHROUGH)
    if unknown:
        raise ValueError(
            f"options {unknown} cannot be set for a job that continues a checkpoint; allowed: {list(TRAIN_PASSTHROUGH)}"
        )
    return {name: value for name, value in options.items() if value is not None}


def _validate_run_options(options: dict[str, Any]) -> None:
    """The preset/config, data and training sections must be valid before any conversion or training starts (the
    model's routing settings are the checkpoint's, checked where they are applied)."""
    resolve_run({key: value for key, value in options.items() if key not in CONTINUATION_FLAGS})


def branch(
    seed_model: str | Path,
    output_dir: str | Path,
    *,
    domains: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    train_options: dict[str, Any] | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Write one `remoe train` job per domain (or per dataset) continuing `seed_model`, and run them in order.

    Every job writes `OUTPUT_DIR/expert-NAME` (a dense ReMoE checkpoint with metrics.json); `OUTPUT_DIR/btx_branch.json`
    lists the jobs with their command lines (each can run on its own machine), `OUTPUT_DIR/branch_jobs.sh` holds the
    commands. With `dry_run` only the files are written. A Llama / Mistral / Qwen2 seed is first converted to a dense
    ReMoE checkpoint in `OUTPUT_DIR/seed`. Returns the branch description (with each job's metrics when run).
    """
    output_dir = Path(output_dir)
    if bool(domains) == bool(datasets):
        raise ValueError("branch needs either --domains (one expert per domain) or --datasets (one per expert)")
    options = _check_train_options(dict(train_options or {}))
    if datasets and options.get("dataset"):
        raise ValueError("--datasets sets one dataset per expert; leave --dataset out")
    names = list(domains) if domains else [_dataset_name(path) for path in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"expert names must be unique, got {names}")
    _validate_run_options(options)

    checkpoint = conversion.SafetensorsCheckpoint(seed_model)
    arch = conversion.read_architecture(checkpoint)
    if arch.moe_layout:
        raise ValueError(f"the seed {str(seed_model)!r} must be a dense checkpoint, got an MoE ({arch.model_type})")
    conversion.check_source_tensors(checkpoint, arch)
    # The seed every job continues: a ReMoE seed as it is, another one as the dense ReMoE it is converted to below.
    seed_config = conversion.dense_remoe_config(checkpoint, arch) if arch.model_type != "remoe" else None
    checkpoint.close()
    has_tokenizer = any((Path(seed_model) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    if not has_tokenizer and not options.get("tokenizer"):
        raise ValueError(f"the seed {str(seed_model)!r} has no tokenizer; pass --tokenizer (a tokenizer folder)")
    seed_dir = Path(seed_model) if seed_config is None else output_dir / "seed"

    jobs = []
    for index, name in enumerate(names):
        job = {**options, "model_name_or_path": str(seed_dir), "output_dir": str(output_dir / f"expert-{name}")}
        if domains:
            job["domains"] = [name]
        else:
            job["dataset"] = str(datasets[index])
        jobs.append({"name": name, "domain": name if domains else None, "job": job, "command": _job_command(job)})
    # Every job's inputs are checked before the seed is converted or any expert trains (also for a dry run).
    if options.get("tokenizer"):
        from .data import load_tokenizer_source

        load_tokenizer_source(options["tokenizer"])
    checked_datasets: dict[tuple[str, str], set[str] | None] = {}
    for job in jobs:
        _check_job(job, seed_config, from_datasets=bool(datasets), checked_datasets=checked_datasets)

    if seed_config is not None and (not dry_run or not seed_dir.exists()):
        conversion.to_dense_remoe(seed_model, seed_dir, overwrite=True)

    description = {"seed_model": str(seed_model), "seed_remoe": str(seed_dir), "experts": jobs}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / BRANCH_FILE).write_text(json.dumps(description, indent=2) + "\n")
    script = ["#!/bin/sh", "# One job per expert; they are independent and can run on different machines.", "set -e"]
    (output_dir / "branch_jobs.sh").write_text("\n".join(script + [job["command"] for job in jobs]) + "\n")
    if dry_run:
        for job in jobs:
            _write_job_file(job)
        return description

    from .train import train

    for job in jobs:
        expert_dir = Path(job["job"]["output_dir"])
        if expert_dir.is_dir() and [path.name for path in expert_dir.iterdir()] == [JOB_FILE]:
            (expert_dir / JOB_FILE).unlink()  # the job file of a dry run: the folder is still the job's own
        print(f"\nremoe btx branch: training expert {job['name']!r}\n  {job['command']}")
        job["metrics"] = train(dict(job["job"]))
        _write_job_file(job)
    (output_dir / BRANCH_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return description


def _check_job(
    job: dict[str, Any],
    seed_config: ReMoEConfig | None,
    *,
    from_datasets: bool,
    checked_datasets: dict[tuple[str, str], set[str] | None],
) -> None:
    """The checks `remoe train` runs before any work, for one branch job, before the seed is converted.

    A ReMoE seed is the job's checkpoint: `plan_run` checks the job as `remoe train` would. Another seed is converted
    later into a dense ReMoE with `seed_config`: the job's sections, the continuation flags against that config, the
    block size and the output folder are checked here. Then the job's dataset: a local file or folder (its files
    read as `remoe train` reads them), a Hub dataset id, and its domains (`checked_datasets`: the datasets seen so
    far, with their domains once read)."""
    options = dict(job["job"])
    expert_dir = Path(options["output_dir"])
    where = f"expert {job['name']!r}"
    existing = sorted(path.name for path in expert_dir.iterdir()) if expert_dir.is_dir() else []
    if existing == [JOB_FILE]:
        options["overwrite"] = True  # a dry run's job file: the folder is still the job's own (see `branch`)
    elif existing:
        shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
        raise ValueError(
            f"{where}: {str(expert_dir)!r} already holds files ({shown}); choose another --output_dir, or remove "
            "that folder to train the expert again"
        )
    if seed_config is None:
        try:
            run = plan_run(options).sections
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from error
    else:
        run = resolve_run(
            {key: value for key, value in options.items() if key not in (*CONTINUATION_FLAGS, "model_name_or_path")}
        )
        _check_continuation(options, run, seed_config, where)
        check_output_dir(expert_dir, run, resume=None, overwrite=bool(options.get("overwrite")))
    _check_dataset(run["data"], "--datasets" if from_datasets else "--dataset", where, checked_datasets)


def _check_continuation(options: dict[str, Any], run: dict[str, dict], seed_config: ReMoEConfig, where: str) -> None:
    """The continuation flags (`--l1_coef_init`, ...) and the block size against the seed's ReMoE config, as
    `remoe train --model_name_or_path` checks them."""
    config = copy.deepcopy(seed_config)
    apply_continuation_overrides(config, options, run, where)
    block_size = run["data"]["block_size"]
    if block_size > config.max_position_embeddings:
        raise ValueError(
            f"{where}: data.block_size ({block_size}) exceeds the seed's max_position_embeddings "
            f"({config.max_position_embeddings}); use a block size of at most {config.max_position_embeddings}"
        )


def _check_dataset(
    data: dict[str, Any], flag: str, where: str, checked_datasets: dict[tuple[str, str], set[str] | None]
) -> None:
    """A job's dataset must be readable (or a Hub dataset id) and hold its domains, before any job starts."""
    from .data import _EXTENSIONS, DOMAINS, HUB_ID, _local_data_files, check_text_file, load_text_dataset

    dataset, text_column = data["dataset"], data.get("text_column", "text")
    key = (dataset, text_column)
    if key not in checked_datasets:
        path = Path(dataset).expanduser()
        if dataset == "builtin":
            checked_datasets[key] = set(DOMAINS)
        elif path.exists():
            try:
                builder, data_files = _local_data_files(path)
                for files in data_files.values():
                    for file in files:
                        check_text_file(Path(file), builder, text_column)
            except ValueError as error:
                raise ValueError(f"{flag} ({where}): {error}") from error
            checked_datasets[key] = None
        elif HUB_ID.match(dataset) and path.suffix.lower() not in _EXTENSIONS:
            checked_datasets[key] = None  # a Hub dataset id: read by the job (it may need the network)
        else:
            raise ValueError(
                f"{flag} {dataset!r} ({where}): no such file or directory, and not a Hugging Face Hub dataset id"
            )
    domains = data.get("domains")
    if not domains:
        return
    if checked_datasets[key] is None:  # the domains of a local or Hub dataset: read once, as the job will
        corpus = load_text_dataset(dataset, text_column=text_column, seed=42)
        checked_datasets[key] = set(corpus["train"]["domain"])
    unknown = sorted(set(domains) - checked_datasets[key])
    if unknown:
        source = "the embedded corpus" if dataset == "builtin" else f"dataset {dataset!r}"
        raise ValueError(f"--domains {unknown} not in {source}; available: {sorted(checked_datasets[key])}")


def _write_job_file(job: dict[str, Any]) -> None:
    """`expert-NAME/btx_job.json`: how the expert was (or will be) trained; `mix` reads its domain from it."""
    expert_dir = Path(job["job"]["output_dir"])
    expert_dir.mkdir(parents=True, exist_ok=True)
    (expert_dir / JOB_FILE).write_text(json.dumps(job, indent=2) + "\n")


def _dataset_name(path: str) -> str:
    resolved = Path(path)
    return resolved.stem if resolved.suffix else resolved.name


def _branch_sources(sources: Sequence[str]) -> tuple[list[str], dict[str, Any] | None]:
    """A single branch folder (with btx_branch.json) stands for its experts."""
    if len(sources) == 1 and (Path(sources[0]) / BRANCH_FILE).is_file():
        description = json.loads((Path(sources[0]) / BRANCH_FILE).read_text())
        return [job["job"]["output_dir"] for job in description["experts"]], description
    return list(sources), None


def _source_job(source: str) -> dict[str, Any] | None:
    path = Path(source) / JOB_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------------------------------------------------
# mix
# ----------------------------------------------------------------------------------------------------------------------


def read_texts(path: str | Path, max_chars: int = 400_000) -> list[str]:
    """Texts of a .txt (paragraphs), .json/.jsonl (`text` field) file, up to about `max_chars` characters."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"router text file {str(path)!r} does not exist")
    if path.suffix in (".json", ".jsonl"):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        texts = [json.loads(line)["text"] for line in lines]
    else:
        texts = [part for part in path.read_text().split("\n\n") if part.strip()]
    return _cap(texts, max_chars)


def _cap(texts: Sequence[str], max_chars: int) -> list[str]:
    out, total = [], 0
    for text in texts:
        if total >= max_chars:
            break
        out.append(text)
        total += len(text)
    return out


def domain_texts(
    dataset: str, domain: str | None, *, max_chars: int = 400_000, seed: int = 42, text_column: str = "text"
) -> list[str]:
    """Training texts of one domain (all rows when `domain` is None) of `dataset` (`builtin` or a path/Hub name)."""
    from .data import load_text_dataset

    train = load_text_dataset(dataset, text_column=text_column, seed=seed)["train"]
    if domain is not None:
        available = set(train["domain"])
        if domain not in available:
            raise ValueError(f"domain {domain!r} not in dataset {dataset!r}; available: {sorted(available)}")
        train = train.filter(lambda row: row["domain"] == domain)
    return _cap(train.shuffle(seed=seed)["text"], max_chars)


def mix(
    sources: Sequence[str],
    output_dir: str | Path,
    *,
    router_texts: Sequence[str] | None = None,
    domains: Sequence[str] | None = None,
    dataset: str | None = None,
    seed_model: str | None = None,
    expert_names: Sequence[str] | None = None,
    router_init: str = "random",
    **options: Any,
) -> Path:
    """`btx_mix` with the conveniences of the command line: a branch folder stands for its experts (and its seed), and
    `router_init="centroid"` takes the texts from `router_texts` files, from `domains` of `dataset`, or from the
    domain / dataset each expert was trained on (its `btx_job.json`). The texts are read once every check of
    `btx_mix` has passed; `router_texts`, `domains` and `dataset` are refused without the centroid init."""
    sources, description = _branch_sources(sources)
    jobs = [_source_job(source) for source in sources]
    if description is not None and seed_model is None:
        seed_model = description["seed_remoe"]
    job_names = [job["name"] for job in jobs] if all(job is not None for job in jobs) else None
    if expert_names is None and job_names is not None and len(set(job_names)) == len(job_names):
        expert_names = job_names
    if router_init != "centroid":
        given = [flag for flag, value in (("--router_texts", router_texts), ("--domains", domains)) if value]
        given += ["--dataset"] if dataset is not None else []
        if given:
            raise ValueError(
                f"{', '.join(given)} choose the texts of the centroid router init: add --router_init centroid "
                f"(router_init {router_init!r} does not use them)"
            )
    texts = None
    if router_init == "centroid":
        if router_texts:
            if len(router_texts) != len(sources):
                raise ValueError(f"--router_texts needs one file per source ({len(sources)}), got {len(router_texts)}")
            for path in router_texts:
                if not Path(path).is_file():
                    raise ValueError(f"--router_texts: router text file {str(path)!r} does not exist")

            def texts() -> list[list[str]]:
                return [read_texts(path) for path in router_texts]

        elif domains:
            if len(domains) != len(sources):
                raise ValueError(f"--domains needs one domain per source ({len(sources)}), got {len(domains)}")

            def texts() -> list[list[str]]:
                return [domain_texts(dataset or "builtin", domain) for domain in domains]

        elif all(job is not None for job in jobs):

            def texts() -> list[list[str]]:
                return [
                    domain_texts(job["job"].get("dataset", "builtin"), job["domain"], seed=job["job"].get("seed", 42))
                    for job in jobs
                ]

        else:
            raise ValueError(
                "router_init='centroid' needs --router_texts (one file per source), --domains (one per source) or "
                "sources written by `remoe btx branch`"
            )
    return conversion.btx_mix(
        sources,
        output_dir,
        seed_model=seed_model,
        expert_names=expert_names,
        router_init=router_init,
        router_texts=texts,
        **options,
    )


# ----------------------------------------------------------------------------------------------------------------------
# finetune
# ----------------------------------------------------------------------------------------------------------------------


def finetune(
    model_dir: str | Path,
    output_dir: str | Path,
    *,
    train_options: dict[str, Any] | None = None,
    domains: Sequence[str] | None = None,
    freeze_experts: bool = False,
) -> dict[str, Any]:
    """Continue a mixed (or upcycled / converted) MoE on the union of the domain data with `remoe train`.

    ReLU models train with the L1 controller, TopK models with the Switch load-balancing loss; `freeze_experts` trains
    everything but the expert FFNs. A TopK model keeps its `router_renormalize` and `router_sampling` unless
    `train_options` sets them. Returns the metrics (also in OUTPUT_DIR/metrics.json).
    """

    from .train import train

    options = _check_train_options(dict(train_options or {}))
    config = check_checkpoint(model_dir)
    if not config.has_experts:
        raise ValueError(f"{str(model_dir)!r} is a dense ReMoE; finetune an MoE made by `remoe btx mix` or `upcycle`")
    for name in TOPK_ROUTING_OPTIONS:
        if options.get(name) and config.router_type != "topk":
            raise ValueError(f"--{name} applies to TopK models; {str(model_dir)!r} is {config.router_type!r}-routed")
    _validate_run_options(options)
    job = {**options, "model_name_or_path": str(model_dir), "output_dir": str(output_dir)}
    if domains:
        job["domains"] = list(domains)
    if freeze_experts:
        job["freeze_experts"] = True
    print(f"remoe btx finetune: {_job_command(job)}")
    metrics = train(job)
    info_file = Path(model_dir) / conversion.CONVERSION_INFO_FILE
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        info["finetuned_from"] = str(model_dir)
        (Path(output_dir) / conversion.CONVERSION_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# evaluation: per-domain loss and routing shares
# ----------------------------------------------------------------------------------------------------------------------


def expert_groups(model_dir: str | Path, num_routed_experts: int) -> tuple[list[str], list[list[int]]]:
    """Expert names and their routed experts (a split expert has several), from remoe_conversion.json if present."""
    info_file = Path(model_dir) / conversion.CONVERSION_INFO_FILE
    if info_file.is_file():
        experts = json.loads(info_file.read_text()).get("experts")
        if experts:
            return [e["name"] for e in experts], [e["routed_experts"] for e in experts]
    return [f"e{i}" for i in range(num_routed_experts)], [[i] for i in range(num_routed_experts)]


def _domain_blocks(tokenizer, dataset: str, block_size: int, count: int, seed: int) -> dict[str, list[list[int]]]:
    """The first `count` packed validation blocks of each domain (the blocks `remoe train` evaluates come first)."""
    from .data import load_text_dataset, pack_dataset

    validation = pack_dataset(load_text_dataset(dataset, seed=seed)["validation"], tokenizer, block_size)
    blocks = {}
    for domain in sorted(set(validation["domain"])):
        subset = validation.filter(lambda row, d=domain: row["domain"] == d)
        blocks[domain] = subset.select(range(min(count, len(subset))))["input_ids"]
    return blocks


@torch.no_grad()
def evaluate_domains(
    model_dir: str | Path,
    *,
    dataset: str = "builtin",
    block_size: int = 128,
    max_eval_blocks: int = 64,
    batch_size: int = 16,
    seed: int = 42,
) -> dict[str, Any]:
    """Validation loss per domain (the first `max_eval_blocks` packed blocks of each, as `remoe train` evaluates) and,
    for MoE models, the share of each expert in each domain's routed (token, expert) pairs, averaged over layers."""
    model = load_any_model(model_dir, dtype=torch.float32).eval()
    validation = _domain_blocks(load_tokenizer(model_dir), dataset, block_size, max_eval_blocks, seed)
    config = model.config
    is_moe = getattr(config, "has_experts", False)  # a dense source may be a Llama-family model
    names, groups = expert_groups(model_dir, config.num_routed_experts) if is_moe else ([], [])
    results: dict[str, Any] = {"model": str(model_dir), "losses": {}, "routing_shares": {}, "experts_per_token": {}}
    for domain, blocks in validation.items():
        loss_sum, counts, active_tokens = 0.0, None, 0
        for start in range(0, len(blocks), batch_size):
            batch = torch.tensor(blocks[start : start + batch_size])
            output = model(batch, use_cache=False, output_router_logits=is_moe)
            # The LM loss only (with router logits requested, MoE models add their auxiliary loss to `loss`).
            logits = output.logits[:, :-1].flatten(0, 1).float()
            loss_sum += torch.nn.functional.cross_entropy(logits, batch[:, 1:].flatten()).item() * len(batch)
            if is_moe:
                layer_counts = expert_token_counts(output.router_logits, config).double()
                counts = layer_counts if counts is None else counts + layer_counts
                active_tokens += batch.numel()
        results["losses"][domain] = loss_sum / len(blocks)
        if is_moe:
            shares = (counts / counts.sum(dim=1, keepdim=True).clamp_min(1)).mean(dim=0)
            results["routing_shares"][domain] = {
                name: float(shares[group].sum()) for name, group in zip(names, groups, strict=True)
            }
            results["experts_per_token"][domain] = float(counts.sum(dim=1).mean() / active_tokens)
    results["losses"]["average"] = sum(results["losses"].values()) / len(results["losses"])
    return results


# ----------------------------------------------------------------------------------------------------------------------
# the Branch-Train-Merge baseline: the branch models as an ensemble
# ----------------------------------------------------------------------------------------------------------------------

BTM_PRIORS = ("uniform", "cached")


def btm_mixture(
    target_log_probs: torch.Tensor, log_prior: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """BTM's ensemble at every position of every block.

    `target_log_probs` (M, B, N): `log p_j(x_{t+1} | x_<=t)` of model j for the N = T - 1 predicted tokens of B
    blocks; `log_prior` (M,): `log P(j)` (unnormalised is fine). The domain posterior for predicting `x_{t+1}` is
    Bayes' rule over the models' likelihoods of the prefix, `P(j | x_<=t) ∝ P(j) prod_{s=1..t} p_j(x_s | x_<s)` (the
    first token has no prediction and counts the same for every model). The `top_k` models of highest posterior are
    kept (ties, e.g. the first position under a uniform prior, keep the lower index), their posteriors renormalised
    to weights `w_j`, and the mixture is `p(x_{t+1}) = sum_j w_j p_j(x_{t+1} | x_<=t)`.

    Returns (the mixture's log-probabilities of the targets (B, N), the log-weights (M, B, N), -inf where not kept).
    """
    prefix = torch.nn.functional.pad(target_log_probs.cumsum(dim=-1)[..., :-1], (1, 0))
    log_posterior = log_prior.reshape(-1, 1, 1) + prefix
    kept = log_posterior.sort(dim=0, descending=True, stable=True).indices[:top_k]
    mask = torch.zeros_like(log_posterior, dtype=torch.bool).scatter_(0, kept, True)
    log_weights = log_posterior.masked_fill(~mask, float("-inf")).log_softmax(dim=0)
    return (log_weights + target_log_probs).logsumexp(dim=0), log_weights


def _target_log_probs(model, blocks: list[list[int]], batch_size: int) -> torch.Tensor:
    """`log p(x_{t+1} | x_<=t)` of every token of each block but the first: (blocks, T - 1), fp32."""
    out = []
    for start in range(0, len(blocks), batch_size):
        batch = torch.tensor(blocks[start : start + batch_size])
        log_probs = model(batch, use_cache=False).logits[:, :-1].float().log_softmax(dim=-1)
        out.append(log_probs.gather(-1, batch[:, 1:, None]).squeeze(-1))
    return torch.cat(out)


def _btm_members(members: Sequence[str | Path], seed_as_expert: bool) -> tuple[list[str], list[str]]:
    """(model folders, names) of the ensemble: the given folders, or a branch folder's experts (and its seed)."""
    paths, description = _branch_sources([str(member) for member in members])
    jobs = [_source_job(path) for path in paths]
    names = [job["name"] if job else Path(path).name for job, path in zip(jobs, paths, strict=True)]
    if seed_as_expert:
        if description is None:
            raise ValueError("--btm_seed_as_expert needs one `remoe btx branch` folder for --btm (or list the seed)")
        paths, names = [*paths, description["seed_remoe"]], [*names, "seed"]
    if len(set(names)) < len(names):
        names = [f"{index}-{name}" for index, name in enumerate(names)]
    if len(paths) < 2:
        raise ValueError(f"--btm needs at least 2 models (or a `remoe btx branch` folder), got {len(paths)}")
    return paths, names


def _log_prior(prior: str | Sequence[float], count: int) -> torch.Tensor | None:
    """An explicit prior's log (normalised); None for "uniform" / "cached", which `evaluate_btm` computes."""
    if isinstance(prior, str):
        if prior not in BTM_PRIORS:
            raise ValueError(f"prior (--btm_prior) must be one of {BTM_PRIORS} or {count} weights, got {prior!r}")
        return None
    weights = torch.tensor([float(w) for w in prior], dtype=torch.float64)
    if len(weights) != count or not (torch.isfinite(weights).all() and (weights > 0).all()):
        raise ValueError(f"prior (--btm_prior) needs {count} finite weights > 0 (one per model), got {list(prior)!r}")
    return (weights / weights.sum()).log().float()


@torch.no_grad()
def evaluate_btm(
    members: str | Path | Sequence[str | Path],
    *,
    top_k: int = 2,
    prior: str | Sequence[float] = "uniform",
    prior_blocks: int = 16,
    seed_as_expert: bool = False,
    dataset: str = "builtin",
    block_size: int = 128,
    max_eval_blocks: int = 64,
    batch_size: int = 16,
    seed: int = 42,
) -> dict[str, Any]:
    """Per-domain validation loss of the Branch-Train-Merge baseline (Li et al. 2022): the branch models as an
    ensemble, on the blocks `evaluate_domains` uses.

    What is computed, per block and position t (`btm_mixture`): every member's probability of the next token; the
    domain posterior `P(j | x_<=t) ∝ P(j) * p_j(x_1..x_t | x_0)` (Bayes' rule over the members' likelihoods of the
    block's prefix: BTM's domain posterior, with no trained classifier); the `top_k` members of highest posterior,
    their posteriors renormalised; the loss is `-log sum_j w_j p_j(x_{t+1} | x_<=t)` (the next-token probabilities
    mixed), averaged over the tokens of the domain. The prior `P(j)`: `"uniform"`; `"cached"` (BTM's cached prior):
    per evaluated domain, the mean posterior given the whole block (from a uniform prior) over up to `prior_blocks`
    held-out validation blocks of that domain (those after the evaluated ones; this uses the domain label of the
    evaluated text, as BTM's per-domain prior does); or one explicit weight per member. Every member runs on every
    token (the posterior needs all likelihoods); `top_k` limits the models mixed.

    `members`: dense model folders sharing one tokenizer, or one `remoe btx branch` folder (its experts; with
    `seed_as_expert` also its seed). Returns a dict shaped like `evaluate_domains`' (`losses`; `routing_shares`: the
    share of each member among each domain's kept (token, member) pairs; `experts_per_token`: members mixed per
    token) plus `members`, `top_k`, `prior`, `mean_weights` and `priors` (per domain).
    """
    if isinstance(members, (str, Path)):
        members = [members]
    paths, names = _btm_members(members, seed_as_expert)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= len(paths):
        raise ValueError(
            f"top_k (--btm_top_k) must be an integer between 1 and the number of models ({len(paths)}), got {top_k!r}"
        )
    explicit = _log_prior(prior, len(paths))
    if prior == "cached" and (isinstance(prior_blocks, bool) or not isinstance(prior_blocks, int) or prior_blocks < 1):
        raise ValueError(f"prior_blocks (--btm_prior_blocks) must be an integer >= 1, got {prior_blocks!r}")
    tokenizer = load_tokenizer(paths[0])
    for path in paths[1:]:
        if load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"--btm: {path!r} has another tokenizer than {paths[0]!r}; BTM ensembles share one")
    held_out = prior_blocks if prior == "cached" else 0
    blocks = _domain_blocks(tokenizer, dataset, block_size, max_eval_blocks + held_out, seed)
    if held_out:
        for domain, domain_blocks in blocks.items():
            if len(domain_blocks) <= max_eval_blocks:
                raise ValueError(
                    f"--btm_prior cached: domain {domain!r} has no validation blocks beyond the {len(domain_blocks)} "
                    "evaluated ones; lower --max_eval_blocks"
                )
    log_probs: dict[str, list[torch.Tensor]] = {domain: [] for domain in blocks}  # per domain, one (B, N) per member
    for path in paths:  # one model in memory at a time
        model = load_any_model(path, dtype=torch.float32).eval()
        for domain, domain_blocks in blocks.items():
            log_probs[domain].append(_target_log_probs(model, domain_blocks, batch_size))
        del model
    results: dict[str, Any] = {
        "model": f"btm-top{top_k}" + (f"-{prior}" if isinstance(prior, str) and prior != "uniform" else ""),
        "members": dict(zip(names, paths, strict=True)),
        "top_k": top_k,
        "prior": prior if isinstance(prior, str) else list(prior),
        "losses": {},
        "routing_shares": {},
        "experts_per_token": {},
        "mean_weights": {},
        "priors": {},
    }
    for domain, per_member in log_probs.items():
        stacked = torch.stack(per_member)  # (M, B, N)
        evaluated = stacked[:, :max_eval_blocks]
        if explicit is not None:
            log_prior = explicit
        elif held_out:
            log_prior = stacked[:, max_eval_blocks:].sum(dim=-1).log_softmax(dim=0).exp().mean(dim=1).log()
        else:
            log_prior = torch.full((len(paths),), -math.log(len(paths)))
        mixture, log_weights = btm_mixture(evaluated, log_prior, top_k)
        weights, kept = log_weights.exp(), torch.isfinite(log_weights).flatten(1).double().sum(dim=1)
        results["losses"][domain] = float(-mixture.double().mean())
        results["routing_shares"][domain] = dict(zip(names, (kept / kept.sum()).tolist(), strict=True))
        results["experts_per_token"][domain] = float(top_k)
        results["mean_weights"][domain] = dict(
            zip(names, weights.flatten(1).double().mean(dim=1).tolist(), strict=True)
        )
        results["priors"][domain] = dict(zip(names, log_prior.double().exp().tolist(), strict=True))
    results["losses"]["average"] = sum(results["losses"].values()) / len(results["losses"])
    return results


def loss_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per model, per-domain validation loss and the average."""
    domains = [d for d in next(iter(results.values()))["losses"] if d != "average"]
    lines = ["| model | " + " | ".join(domains) + " | average |", "|---" * (len(domains) + 2) + "|"]
    for name, result in results.items():
        values = [result["losses"][d] for d in [*domains, "average"]]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines)


def routing_table(result: dict[str, Any]) -> str:
    """Markdown: for each domain, the share of its routed (token, expert) pairs that each expert receives."""
    shares = result["routing_shares"]
    if not shares:
        return ""
    experts = list(next(iter(shares.values())))
    lines = ["| domain | " + " | ".join(experts) + " | experts/token |", "|---" * (len(experts) + 2) + "|"]
    for domain, row in shares.items():
        cells = " | ".join(f"{row[e]:.2f}" for e in experts)
        lines.append(f"| {domain} | {cells} | {result['experts_per_token'][domain]:.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------------


def run_branch(args: argparse.Namespace) -> None:
    options = cli_options(args, TRAIN_PASSTHROUGH)
    result = branch(
        args.seed_model,
        args.output_dir,
        domains=args.domains,
        datasets=args.datasets,
        train_options=options,
        dry_run=args.dry_run,
    )
    print(f"\nremoe btx branch: {len(result['experts'])} expert jobs in {args.output_dir}/{BRANCH_FILE}")
    for job in result["experts"]:
        loss = job.get("metrics", {}).get("validation_loss")
        shown = f"  validation_loss {loss:.4f}" if loss is not None else ""
        print(f"  {job['name']}: {job['job']['output_dir']}{shown}")


def run_mix(args: argparse.Namespace) -> None:
    names = (
        "seed_as_expert",
        "router_type",
        "num_experts_per_tok",
        *TOPK_ROUTING_OPTIONS,
        "shared",
        "split",
        "blend",
        "router_std",
        "router_max_tokens",
        "seed",
        *WRITER_OPTIONS,
        *CONTROLLER_OPTIONS,
    )
    out = mix(
        args.sources,
        args.output_dir,
        router_texts=args.router_texts,
        domains=args.domains,
        dataset=args.dataset,
        seed_model=args.seed_model,
        expert_names=args.expert_names,
        router_init=args.router_init,
        **cli_options(args, names),
    )
    print(f"remoe btx mix: wrote {out}")


def run_finetune(args: argparse.Namespace) -> None:
    options = cli_options(args, (*TRAIN_PASSTHROUGH, "dataset"))
    finetune(
        args.model, args.output_dir, train_options=options, domains=args.domains, freeze_experts=args.freeze_experts
    )


def run_eval(args: argparse.Namespace) -> None:
    btm_options = cli_options(args, ("btm_top_k", "btm_prior", "btm_prior_blocks"))
    if args.btm_seed_as_expert:
        btm_options["btm_seed_as_expert"] = True
    if not args.btm and btm_options:
        raise ValueError(f"--{next(iter(btm_options))} needs --btm MODEL... (the ensemble's models)")
    if not args.models and not args.btm:
        raise ValueError("btx eval needs model folders and/or --btm MODEL... (a BTM ensemble)")
    data = {"dataset": args.dataset, "block_size": args.block_size, "max_eval_blocks": args.max_eval_blocks}
    results = {}
    for model in args.models:
        results[Path(model).name] = evaluate_domains(model, **data)
    if args.btm:
        btm = evaluate_btm(args.btm, **{name[4:]: value for name, value in btm_options.items()}, **data)
        results[btm["model"]] = btm
    print(loss_table(results))
    for name, result in results.items():
        if result["routing_shares"]:
            print(f"\nrouting shares of {name} (share of each domain's routed token-expert pairs):\n")
            print(routing_table(result))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(results, indent=2) + "\n")
