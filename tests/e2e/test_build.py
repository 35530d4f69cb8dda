"""danlu's own package metadata builds cleanly with the build backend pip picks."""

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_the_wheel_builds_without_deprecation_warnings(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for warning in re.finditer(r".*(\w+Warning:|[Dd]eprecat).*", output):
        pytest.fail(f"the build warns: {warning.group(0).strip()}")
    assert list(tmp_path.glob("danlu-*.whl"))
