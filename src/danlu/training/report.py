"""The end of a run: best weights -> model.safetensors, test metrics, plots, and report.json (last)."""

from __future__ import annotations

import logging
from typing import Any

from danlu import __version__
from danlu.config import SCHEMA_VERSION, Config
from danlu.evaluation.metrics import summary
from danlu.models.weights import save_weights
from danlu.run import RunDir, atomic_write_json
from danlu.training.trainer import Setup, evaluate_part

log = logging.getLogger("danlu")


def write_plots(run: RunDir, stream: Any, metrics: dict[str, Any]) -> None:
    from danlu.evaluation import plots  # matplotlib: only rank 0 at the end of a run needs it

    history = run.read_metrics()
    if history:
        plots.learning_curves(history, run.plots / "learning_curves.png")
    if stream.task == "classification":
        plots.confusion_matrix(
            metrics["confusion_matrix"], stream.classes, run.plots / "confusion_matrix.png"
        )
    elif stream.task == "regression":
        plots.predicted_vs_actual(*stream.sample, run.plots / "predicted_vs_actual.png")


def _family_stats(s: Setup, held_out: Any) -> dict[str, Any]:
    """The family's figures of its training data (texts: padding share, tokens per second) and of the
    held-out rows (image probes: zero-shot accuracy), under its name."""
    stats = s.family.train_stats(s.data.train, s.state.epoch, s.state.train_seconds)
    if held_out is not None:
        stats = {**stats, **s.family.held_out_stats(s.data.state, held_out)}
    return {s.family.name: stats} if stats else {}


def finish(config: Config, run: RunDir, s: Setup) -> dict[str, Any]:
    """Write the inference artifacts and the report from the final set-up (trainer.final_setup's); the
    run is complete when this returns."""
    tc = config.train
    if not s.family.writes_weights:
        save_weights(s.bare_model, run.weights)
    s.family.write_artifacts(run, s.bare_model, s.data.state)  # texts, causal LMs: RUN/hf

    state = s.data.state
    held_out, split_name = (
        (s.data.test, "test") if s.data.test is not None else (s.data.validation, "validation")
    )
    report: dict[str, Any] = {"family": s.family.name, "task": state.task, "test": None}
    if held_out is None:
        log.warning("no test or validation rows: report.json has no held-out metrics")
    else:
        _, stream = evaluate_part(s.bare_model, held_out, s.family, state, s.device, s.precision)
        metrics = stream.result()
        headline = {k: v for k, v in metrics.items() if k not in ("per_class", "confusion_matrix")}
        report["test"] = headline
        report["test_split"] = split_name
        if state.task == "classification":
            report["test_details"] = {k: metrics[k] for k in ("per_class", "confusion_matrix")}
        write_plots(run, stream, metrics)
        s.family.report_plots(run, s.bare_model, held_out, state, s.device)  # images: misclassified.png
        log.debug(
            "%s metrics: %s",
            split_name,
            {k: round(v, 4) for k, v in summary(state.task, headline).items() if v is not None},
        )
    report.update(
        {
            "train_seconds": round(s.state.train_seconds, 3),
            "epochs_run": s.state.epoch,
            "best_epoch": s.state.best_epoch,
            "stopped_early": s.state.stopped_early,
            "monitor": tc.monitor,
            "rows": {
                name: (part.n_rows if part is not None else 0)
                for name, part in (
                    ("train", s.data.train),
                    ("validation", s.data.validation),
                    ("test", s.data.test),
                )
            },
            "batch_size": s.batch_size,
            "device": str(s.device),
            "precision": s.precision,
            "processes": s.world.size,
            "in_memory": s.data.in_memory,
            **_family_stats(s, held_out),
            "classes": state.classes,
            "danlu_version": __version__,
            "schema_version": SCHEMA_VERSION,
        }
    )
    atomic_write_json(run.report, report)  # last: the run is complete from here on
    return report
