"""The family contract: every registered family is a `Family` whose hooks the rest of danlu can call,
`data.family: auto` picks the family that claims the source, and nothing outside `families/` probes a
family's module or names a family."""

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

import danlu
from danlu import families
from danlu.config import DataConfig, validate
from danlu.errors import DanluError
from danlu.families.contract import Family
from danlu.families.export import ExportSpec

SRC = Path(danlu.__file__).parent
SPEC_HOOKS = ["example_inputs", "input_names", "onnx_feeds", "script_args"]


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_a_family_is_a_typed_contract_with_every_hook(name):
    family = families.get(name)
    assert isinstance(family, Family) and family.name == name
    for f in dataclasses.fields(Family):
        value = getattr(family, f.name)
        if f.name.endswith(("_part", "by_length", "file_fingerprint", "plan_frames", "form_items")):
            assert value is None or callable(value), f.name
        elif "Callable" in str(f.type):
            assert value is None or callable(value), f"{name}.{f.name}"
    if isinstance(family.exporter, type):  # served by its predictions handler, exported by its ExportSpec
        assert issubclass(family.exporter, ExportSpec)
        for hook in SPEC_HOOKS:  # the spec's own hooks: the base class only raises
            assert getattr(family.exporter, hook) is not getattr(ExportSpec, hook), f"{name} lacks {hook}"
    else:  # a chat model: row-by-row prediction and ONNX export are refused in one line
        with pytest.raises(DanluError, match="danlu chat RUN"):
            family.exporter(None)
    load = inspect.signature(family.load).parameters
    assert list(load)[:6] == ["config", "device", "state", "cache", "model", "train"]  # the trainer's call


def test_auto_picks_the_family_that_claims_the_source(tmp_path):
    folder = tmp_path / "digits" / "0"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"")
    assert families.name_for(DataConfig(train="data.csv", target="y")) == "tabular"
    assert families.name_for(DataConfig(train="data.csv", target="y", text="review")) == "text"
    assert families.name_for(DataConfig(train=str(tmp_path / "digits"))) == "image"
    assert families.name_for(DataConfig(train="data.csv", target="y", family="image")) == "image"


def test_config_values_come_from_the_registry():
    with pytest.raises(DanluError, match=r"unknown family 'imag'.*did you mean 'image'"):
        validate({"data": {"train": "x.csv", "target": "y", "family": "imag"}})
    config = validate({"data": {"train": "x.csv", "target": "y"}, "model": {"type": "resnet"}})
    with pytest.raises(DanluError, match=r"model.type=resnet is not a tabular model.*auto, mlp"):
        families.resolve_family(config)


# OpenAI's message content parts are typed "text" (and embedding inputs "text" or "image"): the
# protocol's words, not a family's name
PROTOCOL = {Path("serve/chat/templates.py"), Path("serve/embeddings.py")}


def _outside_families() -> list[Path]:
    paths = [p for p in SRC.rglob("*.py") if "families" not in p.relative_to(SRC).parts]
    return [p for p in paths if p.relative_to(SRC) not in PROTOCOL]


def _names_a_family(node: ast.AST, names: set[str]) -> bool:
    """A comparison with a family's name (`family == "text"`, `kind in ("image", ...)`) or a Literal of
    them: a branch that a new family would miss."""
    if isinstance(node, ast.Compare):
        parts = [node.left, *node.comparators]
    elif isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("Literal"):
        parts = [node.slice]
    else:
        return False
    constants = [c.value for part in parts for c in ast.walk(part) if isinstance(c, ast.Constant)]
    return any(value in names for value in constants)


def test_no_code_outside_families_probes_a_family_or_names_one():
    """getattr/hasattr on a family, its state, items or parts is how optional hooks were found before
    the contract; a family's name in code outside families/ is a branch a new family would miss."""
    names = set(families.FAMILIES)
    found = []
    page = (SRC / "serve" / "static" / "index.html").read_text()
    found += [f"index.html: '{n}'" for n in names if f'"{n}"' in page or f"'{n}'" in page]
    for path in _outside_families():
        for node in ast.walk(ast.parse(path.read_text())):
            if _names_a_family(node, names):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr"):
                target = ast.unparse(node.args[0])
                if any(word in target for word in ("family", "state", "part", "items", "spec")):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found
