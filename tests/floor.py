"""The oldest versions danlu's optional extras admit, read from pyproject.toml: `make test-floor` installs
them (`python tests/floor.py` prints the pins) into a second environment and runs the tests that touch
them there; `--check` fails unless that environment holds exactly these versions."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# the extras whose APIs moved under danlu between the versions its ranges admit: transformers (chat,
# text encoders, GGUF reading, fine-tuning), peft (LoRA), the GGUF writer, the llama.cpp bindings, the
# ONNX exporter and runtime
PACKAGES = ("transformers", "peft", "gguf", "llama-cpp-python", "onnx", "onnxruntime", "onnxscript")


def floors(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """{package: its lower bound} over every extra that names it (the highest, where several do)."""
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    found: dict[str, str] = {}
    for lines in extras.values():
        for line in lines:
            requirement = Requirement(line)
            if requirement.name not in PACKAGES:
                continue
            for spec in requirement.specifier:
                if spec.operator in (">=", "==", "~="):
                    known = found.get(requirement.name, spec.version)
                    found[requirement.name] = max(known, spec.version, key=Version)
    missing = sorted(set(PACKAGES) - set(found))
    if missing:
        raise SystemExit(f"pyproject.toml gives no lower bound for {', '.join(missing)}")
    return found


def check(expected: dict[str, str]) -> list[str]:
    """The packages whose installed version is not their floor."""
    wrong = []
    for name, version in expected.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "missing"
        if installed == "missing" or Version(installed) != Version(version):
            wrong.append(f"{name} {installed} (the floor is {version})")
    return wrong


if __name__ == "__main__":
    pins = floors()
    if "--check" in sys.argv:
        wrong = check(pins)
        if wrong:
            raise SystemExit(f"the floor environment is not at the floor versions: {'; '.join(wrong)}")
        print("floor versions:", ", ".join(f"{name} {version}" for name, version in sorted(pins.items())))
    else:
        print(" ".join(f"{name}=={version}" for name, version in sorted(pins.items())))
