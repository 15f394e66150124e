"""The Hub repository folder of a checkpoint, and its upload with `huggingface_hub`.

The folder holds sharded safetensors, `config.json` with `auto_map`, the remote-code files, the tokenizer,
`generation_config.json`, the metrics files, run configuration and plots found in the checkpoint folder, the
`remoe analyze` summary and figures under `analysis/`, and the model card as `README.md`. Nothing pickled is shared.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import tempfile
from pathlib import Path

from remoe.checkpoints import CheckpointError, check_checkpoint, load_model, load_tokenizer
from remoe.records import EvalResults, RoutingAnalysis, TrainingMetrics

from .card import ANALYSIS_DIR, RUN_CONFIG_FILES, render_model_card
from .remote_code import REMOTE_CODE_FILES, check_remote_code

METRICS_FILES = (TrainingMetrics.FILENAME, EvalResults.FILENAME)
ANALYSIS_SUMMARY = RoutingAnalysis.FILENAME
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
DEFAULT_MAX_SHARD_SIZE = "5GB"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

# How this process loaded the tokenizer (Transformers saves them into tokenizer_config.json), not part of the tokenizer:
# a published copy must not depend on the publisher's HF_HUB_OFFLINE.
TOKENIZER_LOADING_KEYS = ("local_files_only", "is_local")


class PushError(ValueError):
    """Bad input for `remoe push` (raised before any upload), or a failed Hub call (with the server's message)."""


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


def check_max_shard_size(max_shard_size: str | int) -> int:
    """`--max_shard_size` in bytes (> 0), parsed as `remoe upcycle` / `convert` parse it ("5GB", "500MB", "2GiB",
    a number of bytes)."""
    from remoe.conversion import parse_size

    try:
        return parse_size(max_shard_size)
    except ValueError as error:
        raise PushError(str(error)) from error


def check_model_dir(model_dir: str | Path) -> Path:
    """The checkpoint folder, checked like every remoe command checks one (`remoe.checkpoints.check_checkpoint`)."""
    try:
        check_checkpoint(model_dir)
    except CheckpointError as error:
        raise PushError(f"model_dir: {error}") from error
    return Path(model_dir)


def _check_shipped_code(model) -> None:
    """The model's remote-code files, where `save_pretrained` will copy them from, are model-only code: checked
    before anything is written (the copies in the repository folder are checked again)."""
    source_dir = Path(inspect.getfile(type(model))).parent
    problems = [problem for name in REMOTE_CODE_FILES for problem in check_remote_code(source_dir / name)]
    if problems:
        raise PushError("remote code is not model-only code: " + "; ".join(problems))


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
    shard_bytes = check_max_shard_size(max_shard_size)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PushError(f"output folder {str(out_dir)!r} exists and is not empty")
    from transformers import GenerationConfig

    model = load_model(model_dir, dtype="auto")
    try:
        tokenizer = load_tokenizer(model_dir)
    except CheckpointError as error:
        raise PushError(f"model_dir: {error}") from error
    _check_shipped_code(model)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size=shard_bytes)
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


def _drop_loading_state(tokenizer_config: Path) -> None:
    if not tokenizer_config.is_file():
        return
    values = json.loads(tokenizer_config.read_text())
    kept = {key: value for key, value in values.items() if key not in TOKENIZER_LOADING_KEYS}
    if kept != values:
        tokenizer_config.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n")


def _analysis_files(analysis_dir: Path) -> list[Path]:
    """`routing_analysis.json` and the figures it lists (all PNGs of the folder when it lists none)."""
    summary = RoutingAnalysis.read(analysis_dir)
    figures = summary.figures if summary else None
    if isinstance(figures, list) and figures:
        paths = [analysis_dir / str(name) for name in figures if (analysis_dir / str(name)).is_file()]
    else:
        paths = sorted(analysis_dir.glob("*.png"))
    return [analysis_dir / ANALYSIS_SUMMARY, *paths]


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

    With `dry_run=OUT` the folder is written to OUT and nothing is sent. The repo id, `max_shard_size`, the
    checkpoint folder and the token are checked before any work. Returns the commit URL (or the folder path for a dry run).
    """
    check_repo_id(repo_id)
    check_max_shard_size(max_shard_size)
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
