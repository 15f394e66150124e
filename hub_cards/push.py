"""`remoe push`: turn a checkpoint folder into a Hub repository folder (model card included) and upload it.

The work is done by `upload` (the folder and the upload), `card` (the model card) and `remote_code` (the check of the
shipped model files); this module is the command and keeps the names other code imports from it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .card import format_number, render_model_card
from .remote_code import REMOTE_CODE_FILES, check_remote_code
from .upload import PushError, prepare_repo_folder, push

__all__ = [
    "REMOTE_CODE_FILES",
    "PushError",
    "check_remote_code",
    "format_number",
    "prepare_repo_folder",
    "push",
    "render_model_card",
    "run",
]


def run(args: argparse.Namespace) -> None:
    """`remoe push`: the parsed command line."""
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
