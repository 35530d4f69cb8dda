"""`danlu env export`: the packages that matter here, pinned to the installed versions, as a pip
requirements file, a conda environment.yml, or a lock (the whole installed dependency closure)."""

from __future__ import annotations

import importlib.metadata as metadata
import platform
import re

from packaging.requirements import Requirement

from danlu import __version__
from danlu.env.probes import PACKAGES
from danlu.errors import DanluError

RUNTIME_EXTRAS = ("export", "serve")
FORMATS = ("requirements", "conda", "lock")
TORCH_INDEX = "https://download.pytorch.org/whl/{tag}"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _requirements(name: str, extras: tuple[str, ...] = ()) -> list[Requirement]:
    """What a distribution requires (with the given extras), markers evaluated for this interpreter."""
    found = []
    for text in metadata.requires(name) or []:
        requirement = Requirement(text)
        if requirement.marker is None or any(
            requirement.marker.evaluate({"extra": extra}) for extra in ("", *extras)
        ):
            found.append(requirement)
    return found


def _requires(name: str, extras: tuple[str, ...] = ()) -> list[str]:
    return [r.name for r in _requirements(name, extras)]


def _danlu_extras() -> dict[str, tuple[str, ...]]:
    """Extras danlu asks of its dependencies (uvicorn[standard]): pinned and followed as asked."""
    return {
        _canonical(r.name): tuple(sorted(r.extras))
        for r in _requirements("danlu", RUNTIME_EXTRAS)
        if r.extras
    }


def relevant_packages() -> list[str]:
    """danlu's runtime dependencies (core, export, serve) and the ML packages the doctor reports."""
    names = _requires("danlu", RUNTIME_EXTRAS) + [p for p in PACKAGES if p not in ("danlu", "pip")]
    seen, ordered = set(), []
    for name in names:
        key = _canonical(name)
        if key not in seen and _installed(name):
            seen.add(key)
            ordered.append(name)
    return ordered


def closure(names: list[str]) -> list[str]:
    """The names and everything they need, transitively, as installed."""
    seen, stack, ordered = set(), list(names), []
    extras = _danlu_extras()
    while stack:
        name = stack.pop()
        key = _canonical(name)
        if key in seen or not _installed(name):
            continue
        seen.add(key)
        ordered.append(name)
        stack.extend(_requires(name, extras.get(key, ())))
    return sorted(ordered, key=_canonical)


def torch_index_url(torch_version: str | None) -> str | None:
    """The PyTorch index a local version tag (+cpu, +cu128) comes from; None for a PyPI build."""
    if not torch_version or "+" not in torch_version:
        return None
    return TORCH_INDEX.format(tag=torch_version.split("+", 1)[1])


def pins(names: list[str]) -> list[str]:
    extras = _danlu_extras()

    def extra(name: str) -> str:
        asked = extras.get(_canonical(name))
        return f"[{','.join(asked)}]" if asked else ""

    return [f"{_canonical(name)}{extra(name)}=={_installed(name)}" for name in names]


def torch_first() -> list[str]:
    """Comment lines that say how to install this torch build first, when it comes from the PyTorch
    index: with --index-url, alone (an --extra-index-url in the file would let either index answer for
    every package)."""
    index = torch_index_url(_installed("torch"))
    if not index:
        return []
    return [
        f"# this torch build comes from {index}: install it first, from that index alone:",
        f"#   pip install --index-url {index} torch=={_installed('torch')}",
    ]


def requirements_text(names: list[str], header: str) -> str:
    return "\n".join([f"# {header}", *torch_first(), *pins(names)]) + "\n"


def export_environment(fmt: str = "requirements") -> str:
    """The text of `danlu env export --format FMT` (requirements, conda or lock)."""
    if fmt not in FORMATS:
        raise DanluError(f"unknown environment format '{fmt}'", f"use one of {', '.join(FORMATS)}")
    header = f"danlu {__version__} env export ({fmt}), Python {platform.python_version()}"
    if fmt == "requirements":
        return requirements_text(relevant_packages(), header)
    if fmt == "lock":
        return requirements_text(closure(relevant_packages()), header + ", every installed dependency")
    pip_lines = [f"    - {pin}" for pin in pins(relevant_packages())]
    python = ".".join(platform.python_version_tuple()[:2])
    return (
        "\n".join(
            [
                f"# {header}",
                *torch_first(),
                "name: danlu",
                "channels:",
                "  - conda-forge",
                "dependencies:",
                f"  - python={python}",
                "  - pip",
                "  - pip:",
                *pip_lines,
            ]
        )
        + "\n"
    )
