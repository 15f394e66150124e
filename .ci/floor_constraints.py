"""Print pip constraints that pin every dependency of pyproject.toml to the lowest release it declares.

    python .ci/floor_constraints.py > floor.txt && pip install -e ".[test,triton,eval,peft]" -c floor.txt

The floor CI job installs with these, so the declared range is tested at both ends. Test tools (the `test` extra) are
left at their latest release: they are not part of the supported range.
"""

import re
import sys
from pathlib import Path

import tomllib

pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
project = pyproject["project"]
requirements = list(project["dependencies"])
for extra, extra_requirements in project["optional-dependencies"].items():
    if extra != "test":
        requirements += extra_requirements

pins = {}
for requirement in requirements:
    match = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+?)(\[[^\]]*\])?\s*>=\s*([^,;\s]+).*", requirement)
    if match is None:
        sys.exit(f"{requirement!r}: every dependency needs a lower bound (>=) for the floor job")
    name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
    pins[name] = match.group(3)
print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))
