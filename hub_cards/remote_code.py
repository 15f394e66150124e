"""The check that the model files shipped as remote code are model code only.

A repository folder carries `configuration_remoe.py` and `modeling_remoe.py` so that Transformers loads it with
`trust_remote_code=True`; before any push they are read (never run) and refused when they could touch files, the
network, subprocesses or pickles.
"""

from __future__ import annotations

import ast
from pathlib import Path

REMOTE_CODE_FILES = ("configuration_remoe.py", "modeling_remoe.py")

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
        "fractions",
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


def check_remote_code(path: str | Path) -> list[str]:
    """Problems found in a remote-code file (empty list: model code only).

    The file may import only torch, transformers, a few pure standard-library modules (`ALLOWED_IMPORTS`) and its
    sibling files; `remoe.*` only inside `try: ... except ImportError:`. It may not call `open`, `exec`, `eval`,
    `compile`, `__import__` and the like, nor access `*.load`, `*.save`, `*.hub`, `*.from_pretrained` (but for
    `super().from_pretrained`), `*.system`,
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
        elif isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRIBUTES and not _calls_own_loader(node):
            problems.append(f"{where}: uses .{node.attr}")
    return problems


def _calls_own_loader(node: ast.Attribute) -> bool:
    """`super().from_pretrained`: a model class passing its own loading on to Transformers' (ReMoE's override only
    makes safetensors the default), which is what loading the model runs anyway."""
    call = node.value
    return (
        node.attr == "from_pretrained"
        and isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id == "super"
        and not call.args
    )


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
