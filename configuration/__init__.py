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
        text = path.read_text()
    elif str(name_or_path) in available_presets():
        text = (resources.files(__name__) / "presets" / f"{name_or_path}.yaml").read_text()
    else:
        raise ValueError(f"preset must be one of {available_presets()} or a .yaml file, got {str(name_or_path)!r}")
    preset = yaml.safe_load(text) or {}
    unknown = set(preset) - set(PRESET_SECTIONS)
    if not isinstance(preset, dict) or unknown:
        raise ValueError(f"{name_or_path}: top-level keys must be among {PRESET_SECTIONS}, got {sorted(unknown)}")
    return {section: dict(preset.get(section) or {}) for section in PRESET_SECTIONS}
