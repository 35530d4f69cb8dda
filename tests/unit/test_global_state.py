"""Global state danlu touches for a moment (sys.path, logging.disable) is given back as it was."""

import logging
import sys

import pytest

from danlu.config import ModelConfig
from danlu.errors import DanluError
from danlu.models.custom import build_custom
from danlu.quiet import quiet


@pytest.mark.parametrize("caller_level", [logging.NOTSET, logging.CRITICAL])
def test_quiet_export_keeps_the_callers_logging_disable(caller_level):
    logging.disable(caller_level)
    try:
        with quiet():
            assert logging.root.manager.disable >= logging.WARNING
        assert logging.root.manager.disable == caller_level
    finally:
        logging.disable(logging.NOTSET)


def test_importing_a_model_from_the_working_directory_leaves_sys_path_alone(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "from torch import nn\n"
        "class Net(nn.Linear):\n"
        "    def __init__(self, in_features, out_features):\n"
        "        super().__init__(in_features, out_features)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_nets", raising=False)
    while str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))
    before = list(sys.path)
    model = build_custom(ModelConfig(target="my_nets:Net"), in_features=3, out_features=2)
    assert model.out_features == 2  # imported from the working directory
    assert sys.path == before
    with pytest.raises(DanluError, match="cannot import module"):
        build_custom(ModelConfig(target="not_there:Net"), in_features=3, out_features=2)
    assert sys.path == before
