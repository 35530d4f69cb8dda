"""What the CLI prints: figures that read as what they are."""

from types import SimpleNamespace

import pytest

from danlu.cli.export import signed_change
from danlu.cli.output import print_run


@pytest.mark.parametrize(
    ("change", "printed"),
    [
        (0.0, "+0.0000"),
        (-0.0, "+0.0000"),
        (-0.0004, "-0.0004"),
        (0.0123, "+0.0123"),
        (-1 / 20_000, "-0.0001"),
        (-1 / 40_000, "-2.5e-05"),
    ],
)
def test_exports_metric_change_never_reads_as_minus_zero(change, printed):
    assert signed_change(change) == printed


@pytest.mark.parametrize(("epochs", "said"), [(1, "1 epoch (best 1)"), (2, "2 epochs (best 1)")])
def test_a_runs_training_line_counts_its_epochs(capsys, epochs, said):
    report = {
        "test": None,
        "task": "classification",
        "train_seconds": 0.25,
        "epochs_run": epochs,
        "best_epoch": 1,
    }
    run = SimpleNamespace(report=report, path="runs/r", dir=SimpleNamespace(report="r.json", plots="plots"))
    print_run(run)
    assert f"training  0.2 s, {said}\n" in capsys.readouterr().out
