"""Packaged presets: model sizes with their training recipes (YAML)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

PRESET_SECTIONS = ("model", "data", "training")


def available_presets() -> list[str]:
    """Names of the packaged presets."""
    folder = resources.files(__name__) / "presets"
    return sorted(entry.name.removesuffix(".yaml") for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def load_preset(name_or_path: str | Path) -> dict[str, dict]:
    """A packaged preset by name (`tiny`, `182m`, ...) or a YAML file with `model`, `data` and `training` sections."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"config file {str(path)!r} cannot be read as UTF-8 text ({error})") from error
    elif str(name_or_path) in available_presets():
        text = (resources.files(__name__) / "presets" / f"{name_or_path}.yaml").read_text()
    else:
        raise ValueError(f"preset must be one of {available_presets()} or a .yaml file, got {str(name_or_path)!r}")
    try:
        preset = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{name_or_path}: invalid YAML{at}: {problem}") from error
    if preset is None:
        preset = {}
    if not isinstance(preset, dict):
        raise ValueError(
            f"{name_or_path}: must be a YAML mapping with sections {', '.join(PRESET_SECTIONS)}, "
            f"got a {type(preset).__name__}"
        )
    unknown = sorted(str(key) for key in set(preset) - set(PRESET_SECTIONS))
    if unknown:
        raise ValueError(f"{name_or_path}: top-level keys must be among {PRESET_SECTIONS}, got {unknown}")
    for section in PRESET_SECTIONS:
        values = preset.get(section)
        if values is not None and not isinstance(values, dict):
            raise ValueError(
                f"{name_or_path}: section {section!r} must be a mapping of key: value, got a {type(values).__name__}"
            )
    return {section: dict(preset.get(section) or {}) for section in PRESET_SECTIONS}
