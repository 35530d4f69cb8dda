"""train.log_to tensorboard: event files in RUN/tensorboard/, written with torch's SummaryWriter.

Every scalar is logged at the optimizer step, so one axis holds the per-step loss and learning rate and
the per-epoch metrics; `epoch` is a scalar of its own. A resumed run purges what the stopped attempt
logged after its checkpoint (TensorBoard's purge_step), so each step appears once."""

from __future__ import annotations

from typing import Any

from danlu.tracking import flatten, numbers

# per-epoch keys that are not metrics of the epoch: the lr is logged per step
_NOT_SCALARS = ("lr",)


class TensorBoardWriter:
    name = "tensorboard"

    def __init__(self, run: Any, resumed_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resumed_step is None else resumed_step + 1
        self.writer = SummaryWriter(str(run.tensorboard), purge_step=purge, flush_secs=30)
        self.step = 0

    def epoch(self, record: dict[str, Any], step: int, per_step: list[tuple[int, float, float]]) -> None:
        for at, lr, loss in per_step:
            self.writer.add_scalar("step/loss", loss, at)
            self.writer.add_scalar("step/lr", lr, at)
        for key, value in numbers(record).items():
            if key not in _NOT_SCALARS:
                self.writer.add_scalar(key, value, step)
        self.writer.flush()
        self.step = step

    def finish(self, config: Any, run: Any, report: dict[str, Any]) -> None:
        """The config as hyperparameters beside the test metrics (TensorBoard's HPARAMS tab), the test
        metrics as scalars, and the run's plots as images."""
        import numpy as np
        from PIL import Image
        from torch.utils.tensorboard.summary import hparams

        test = {f"test/{k}": v for k, v in numbers(report.get("test") or {}).items()}
        experiment, start, end = hparams(flatten(config.model_dump(mode="json")), test)
        files = self.writer._get_file_writer()  # the writer's own file, not add_hparams' new folder
        for summary in (experiment, start, end):
            files.add_summary(summary)
        for key, value in test.items():
            self.writer.add_scalar(key, value, self.step)
        for png in sorted(run.plots.glob("*.png")):
            with Image.open(png) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"plots/{png.stem}", pixels, self.step, dataformats="HWC")
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()
