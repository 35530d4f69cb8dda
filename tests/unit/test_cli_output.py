"""What the CLI prints (figures that read as what they are) and how `danlu chat` reads a typed line."""

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


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("/system Be brief.", "system"),
        ("/reset", "reset"),
        ("/sytem Be brief.", "sytem"),  # a mistyped command: said as such, not asked
        ("/usr/bin/env is what?", None),  # a question that starts with a path
        ("/ what?", None),
        ("what is /system?", None),
    ],
)
def test_a_chat_line_is_a_command_only_when_it_starts_with_one(line, command):
    from danlu.cli.chat import COMMAND

    found = COMMAND.match(line)
    assert (found.group(1) if found else None) == command
