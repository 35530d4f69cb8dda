"""The Python API, mirroring the CLI: train, evaluate, load (-> Predictor), predict_file, quickstart;
serve is danlu.serve.start.serve (`danlu.serve(...)`), which imports nothing heavy before its checks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from danlu import families
from danlu.config import Config, as_config, read_yaml, resolve_paths, validate
from danlu.embeddings.detect import DEFAULT_TEMPLATE
from danlu.errors import DanluError
from danlu.families import resolve_family
from danlu.run import PREDICTIONS, RunDir, atomic_write

if TYPE_CHECKING:
    import pandas as pd

    from danlu.families.contract import Family
    from danlu.predictor import Predictor

log = logging.getLogger("danlu")
SKIPPED_NAMED = 5  # unreadable images named in the warning; the rest are counted


class Run:
    """A finished run directory: its report, config, per-epoch metrics and a Predictor."""

    def __init__(self, path: str | Path):
        self.dir = RunDir(path)
        self.dir.require_complete()

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def path(self) -> Path:
        return self.dir.path

    @property
    def report(self) -> dict[str, Any]:
        return self.dir.read_report()

    @property
    def config(self) -> Config:
        return validate(read_yaml(self.dir.config))

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return self.dir.read_metrics()

    def predictor(
        self, device: str = "cpu", engine: str = "torch", trust_model_code: bool = False
    ) -> Predictor:
        return _predictor(self.path, device, engine, trust_model_code)


def _predictor(
    run_dir: str | Path, device: str = "cpu", engine: str = "torch", trust_model_code: bool = False
) -> Predictor:
    """Predictor.load, imported here: `import danlu.api` loads no torch, so the commands' checks of their
    arguments answer before it does."""
    from danlu.predictor import Predictor

    return Predictor.load(run_dir, device, engine, trust_model_code)


def train(
    config: Config | dict | str | Path | None = None,
    overrides: Iterable[str] = (),
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any], Path | None], None] | None = None,
    nproc: int | None = None,
    max_restarts: int = 0,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int = 29500,
    backend: str = "torchrun",
    workers: int | None = None,
    ray_address: str | None = None,
    ray_storage: str | None = None,
) -> Run:
    """Train from a config (object, dict or YAML path) into a run directory, or resume one.

    In this process, or in several, as `danlu train`'s flags of the same names start them:
    nproc=N trains in N torchrun processes on this machine (max_restarts, and nnodes, node_rank,
    master_addr and master_port for several machines); backend="ray" trains on `workers` Ray Train
    workers (default 2; a local Ray, or the cluster at ray_address; ray_storage for Ray's checkpoints).

    on_epoch(record, checkpoint_dir): called after every epoch on every process of this one's run (Ray
    Train reporting); checkpoint_dir is the run's checkpoints/ on rank 0 when the epoch wrote one, else
    None. Not with nproc or backend="ray": their processes cannot call back into this one.

    Raises:
        DanluError: bad config or data, an existing run directory (unless overwrite), nothing to resume,
            or the processes started failed (their output says why).
    """
    from danlu.training import distributed
    from danlu.training.launch import Launch

    launch = Launch(
        nproc=nproc,
        max_restarts=max_restarts,
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        backend=backend,
        workers=workers,
        ray_address=ray_address,
        ray_storage=ray_storage,
    )
    launch.check()
    if launch.several:
        return _train_in_processes(config, overrides, out, resume, overwrite, progress, on_epoch, launch)

    world = distributed.world_from_env()  # one process, or a rank started by torchrun / Ray Train
    try:
        if resume is None and distributed.restarted():
            # torchrun --max-restarts started this worker group again: carry on from the last checkpoint
            target = RunDir(
                out if out is not None else resolve_paths(as_config(config, overrides), Path.cwd()).output
            )
            if target.last_checkpoint.is_file() and not target.is_complete():
                resume, config, overrides, out = target.path, None, (), None
            else:
                overwrite = True  # it died before its first checkpoint: start it again
        run = _train_and_finish(config, overrides, out, resume, overwrite, world, progress, on_epoch)
    finally:
        distributed.stop()  # after the trainer's objects (DDP holds the group) are released
    return Run(run.path)


def _train_in_processes(config, overrides, out, resume, overwrite: bool, progress: bool, on_epoch, launch):
    from danlu.training import launch as launching

    if on_epoch is not None:
        raise DanluError(
            "on_epoch is called in this process; nproc's or Ray's processes cannot call it",
            "read each epoch from RUN/metrics.jsonl, or train in this process (no nproc, no backend)",
        )
    cfg = launching.checked_config(config, overrides, out, resume, overwrite)
    if launch.backend == "ray":
        return launching.ray(launch, cfg, out, resume, overwrite)[0]
    source = config if isinstance(config, (str, Path)) else None  # else cfg is written for the processes
    flags = [] if progress else ["--quiet"]
    given = list(overrides) if source is not None else []
    code = launching.torchrun(launch, cfg, source, given, out, resume, overwrite, flags)
    if code != 0:
        raise DanluError(f"the training processes failed (torchrun exited {code})", "their output says why")
    return Run(resume if resume is not None else (out if out is not None else cfg.output))


def _train_and_finish(config, overrides, out, resume, overwrite: bool, world, progress: bool, on_epoch):
    from danlu.tracking import end_status, open_trackers
    from danlu.training import distributed
    from danlu.training.report import finish
    from danlu.training.trainer import final_setup, fit

    run, cfg, setup = _run_setup(config, overrides, out, resume, overwrite, world)
    resumed_step = setup.state.step if resume is not None else None
    trackers = open_trackers(cfg, run, world.main, resumed_step)
    try:
        fit(cfg, run, setup, progress=progress, on_epoch=on_epoch, trackers=trackers)
        final = final_setup(cfg, run, setup)  # every rank: a sharded model is gathered
        if final is not None:
            trackers.finish(cfg, run, finish(cfg, run, final))
    except BaseException as error:
        trackers.close(end_status(error))
        raise
    trackers.close()
    distributed.barrier(world)  # the report exists on every rank's return
    return run


def tune(
    config: Config | dict | str | Path,
    space: dict | str | Path,
    overrides: Iterable[str] = (),
    *,
    trials: int = 20,
    out: str | Path | None = None,
    timeout: float | None = None,
    jobs: int = 1,
    backend: str = "optuna",
    sampler: str = "tpe",
    prune: bool = True,
    seed: int = 0,
    ray_address: str | None = None,
) -> Any:
    """danlu tune: search the space (a YAML file or mapping of config keys to ranges and choices) over
    runs of `config` in `out` (default: the config's output + "-tune"); returns
    danlu.tracking.tune.TuneResult (the trials, the best one, its config in OUT/best.yaml).

    An Optuna study in OUT/study.db: TPE (sampler="random": Optuna's RandomSampler), median pruning on
    train.monitor after every epoch (prune=False: none), `jobs` processes sharing it; backend="ray": the
    same on Ray Tune. A search in an existing OUT continues where it stopped.

    Raises:
        DanluError: a bad config or space (before any trial runs), an OUT that holds something else.
    """
    from danlu.tracking import tune as search
    from danlu.tracking.space import parse_space, read_space_file

    cfg = as_config(config, overrides)
    if trials < 1 or jobs < 1 or (timeout is not None and timeout <= 0):
        raise DanluError("--trials and --jobs must be at least 1, --timeout above 0", "e.g. --trials 30")
    if backend not in ("optuna", "ray") or sampler not in ("tpe", "random"):
        raise DanluError(
            f"unknown backend {backend!r} or sampler {sampler!r}", "backend optuna|ray, sampler tpe|random"
        )
    target = Path(out if out is not None else f"{cfg.output}-tune")
    raw_space = space if isinstance(space, dict) else read_space_file(space)
    spec = search.SearchSpec(
        base=search.base_config(cfg),
        space=raw_space,
        out=str(target.resolve()),
        trials=trials,
        timeout_s=timeout,
        sampler=sampler,
        prune=prune,
        seed=seed,
        monitor=cfg.train.monitor,
    )
    parse_space(raw_space, spec.base, "the search space")  # one line before any trial runs
    search.check_out(target, backend)
    target.mkdir(parents=True, exist_ok=True)
    if backend == "ray":
        from danlu.tracking.ray_tune import tune_with_ray

        result = tune_with_ray(spec, jobs, ray_address)
    else:
        search.start_tracking(spec, target.name, search.open_study(spec))
        search.run_jobs(spec, jobs)
        result = search.finish_search(spec)
    search.end_tracking(spec, result)
    return result


def runs(folder: str | Path = "runs") -> list[dict[str, Any]]:
    """danlu runs: a row per run directory under `folder` (path, state, family, task, test, seconds,
    epochs, when). Raises DanluError for a folder that does not exist."""
    from danlu.tracking.runs import list_runs

    return list_runs(folder)


def compare(run_a: str | Path, run_b: str | Path) -> dict[str, Any]:
    """danlu runs compare: {"runs", "config": {key: [a, b]} where they differ, "metrics": {name: [a, b]}}.
    Raises DanluError unless both are finished runs."""
    from danlu.tracking.runs import compare as compare_runs

    return compare_runs(run_a, run_b)


def show_sample(config: Config | dict | str | Path, overrides: Iterable[str] = ()) -> str:
    """One training row as the model will see it (a language model's conversation with its trained
    tokens marked), without training.

    Raises:
        DanluError: a bad config, or a family with nothing to show.
    """
    cfg = resolve_family(resolve_paths(as_config(config, overrides), Path.cwd()))
    family = families.get(cfg.data.family)
    if family.sample_text is None:
        raise DanluError(
            f"--show-sample shows the trained tokens of a language model's conversations; this is a "
            f"{cfg.data.family} run",
            "leave it out",
        )
    return family.sample_text(cfg)


def _run_setup(config, overrides, out, resume, overwrite: bool, world):
    """The run directory, typed config and trainer set-up, new or resumed, on every rank."""
    from danlu.tracking import check_installed
    from danlu.training import distributed
    from danlu.training.launch import resume_alone
    from danlu.training.trainer import new_setup, resumed_setup

    if resume is not None:
        resume_alone(config, overrides, out)
        run = RunDir(resume)
        run.require_resumable()
        cfg = resolve_family(validate(read_yaml(run.config)))
        check_installed(cfg.train.log_to)
        device = distributed.start(world, cfg.train.device, cfg.train.dist_timeout)
        distributed.check_same_config(world, run.config.read_text())
        return run, cfg, resumed_setup(cfg, run, world, device)
    cfg = as_config(config, overrides)
    if out is not None:
        cfg = cfg.model_copy(update={"output": str(out)})
    cfg = resolve_family(resolve_paths(cfg, Path.cwd()))
    check_installed(cfg.train.log_to)
    device = distributed.start(world, cfg.train.device, cfg.train.dist_timeout)
    distributed.check_same_config(world, cfg.model_dump_json())
    run = RunDir(cfg.output)
    created = run.prepare_new(overwrite) if world.main else False
    distributed.barrier(world)  # rank 0 made the directory
    try:
        setup = new_setup(cfg, run, world, device)
    except BaseException:
        if world.main:
            run.discard(created)  # nothing trained yet: leave nothing behind
        raise
    return run, cfg, setup


def load(
    run_dir: str | Path,
    device: str = "cpu",
    engine: str = "torch",
    trust_model_code: bool = False,
    dtype: str = "float32",
) -> Any:
    """A Predictor for a finished run directory, on the torch model or its ONNX export (engine="onnx").
    A run whose model comes from code (model.target) loads only with trust_model_code=True. A model
    directory that is no run, a CLIP/SigLIP or encoder-only text model, loads as its encoder
    (danlu.embeddings: embed_texts, and for image-text models embed_images and zero_shot), in float32
    or (dtype="bfloat16", checked against float32 at load) with bfloat16 matrix products."""
    from danlu.embeddings.detect import is_encoder_model

    if is_encoder_model(run_dir):
        from danlu.embeddings import load_encoder

        return load_encoder(run_dir, dtype)
    return _predictor(run_dir, device, engine, trust_model_code)


def embed(
    model: str | Path,
    inputs: str | Path,
    out: str | Path,
    column: str | None = None,
    normalize: bool | None = None,
    truncate: str = "end",
    batch_size: int = 32,
    dtype: str = "float32",
) -> Any:
    """danlu embed: INPUTS' vectors (images or texts, see danlu.embeddings.files) by a local encoder into
    OUT (.npy with OUT.ids.json, or .parquet), in input order; returns danlu.embeddings.files.Embedded
    (the vectors, and how many texts were truncated).

    Raises:
        DanluError: a model, input or output danlu cannot use, or a text over the limit (truncate="error").
    """
    from danlu.embeddings.detect import local_model_dir
    from danlu.embeddings.files import check_output, embed_items, read_items, write_vectors

    check_output(out)  # before anything loads (torch among it)
    if batch_size < 1:
        raise DanluError("--batch-size must be at least 1", "e.g. --batch-size 32")
    local_model_dir(model)
    from danlu.embeddings import load_encoder

    items = read_items(inputs, column)
    encoder = load_encoder(model, dtype)
    done = embed_items(encoder, items, normalize, truncate, batch_size)
    write_vectors(done.vectors, items.ids, out)
    return done


def zero_shot(
    model: str | Path,
    images: str | Path,
    out: str | Path,
    labels: str | Iterable[str] | None = None,
    labels_file: str | Path | None = None,
    templates: Iterable[str] = (DEFAULT_TEMPLATE,),
    column: str | None = None,
    batch_size: int = 32,
    plot: str | Path | None = None,
    dtype: str = "float32",
) -> Any:
    """`danlu predict CLIP_MODEL IMAGES --labels ...`: each image's probability for each label (a CLIP or
    SigLIP directory; labels named at run time, each prompt template filled with the label and averaged)
    into OUT (.csv or .parquet: path, the top label, proba_<label> per label), in input order; `plot`
    draws the first images with their top label. Returns the DataFrame.

    Raises:
        DanluError: a model without an image tower, no labels or a duplicate, a template without {}, or
            an input or output danlu cannot use.
    """
    from danlu.embeddings.detect import local_model_dir
    from danlu.embeddings.files import (
        check_templates,
        parse_labels,
        plot_zero_shot,
        read_items,
        write_frame,
        zero_shot_items,
    )

    named = parse_labels(labels if isinstance(labels, str) or labels is None else list(labels), labels_file)
    templates = list(templates) or [DEFAULT_TEMPLATE]
    check_templates(templates)
    _output_suffix(out)  # before anything loads (torch among it)
    if batch_size < 1:
        raise DanluError("--batch-size must be at least 1", "e.g. --batch-size 32")
    local_model_dir(model)
    from danlu.embeddings import load_encoder

    items = read_items(images, column)
    encoder = load_encoder(model, dtype)
    frame = zero_shot_items(encoder, items, named, templates, batch_size)
    write_frame(frame, out)
    if plot is not None:
        plot_zero_shot(frame, items, plot)
    return frame


def _metrics_over(predictor: Predictor, chunks: Iterable[Any]) -> dict[str, Any]:
    from danlu.evaluation.metrics import MetricStream

    state = predictor.state
    stream = MetricStream(state.task, state.classes)
    for items in chunks:
        stream.update(predictor.family.targets(state, items), predictor.decoded(items))
    if stream.n == 0:
        raise DanluError("no rows to evaluate", "pass data with at least one row")
    return stream.result()


def held_out_items(predictor: Predictor, run_dir: str | Path) -> tuple[str, Iterable[Any]]:
    """The split a run reported its metrics on ("test" or "validation") and its rows, from the run
    directory (stored rows, or the recorded rows of a data file that must be unchanged).

    Raises:
        DanluError: the run held no rows out, or its data file moved or changed.
    """
    from danlu.data import heldout

    run = RunDir(run_dir)
    split, items = heldout.items(run, predictor.family, predictor.state)
    if split == "none":
        raise DanluError(
            f"run '{run.path}' held no rows out (data.val_fraction and data.test_fraction were 0)",
            f"pass a labelled file: `danlu evaluate {run.path} DATA`",
        )
    return split, items


def evaluate(
    run_dir: str | Path,
    data: str | Path | None = None,
    trust_model_code: bool = False,
    skip_bad_images: bool = False,
) -> dict[str, Any]:
    """Metrics of a finished run on DATA, or on the held-out rows recorded in its run directory (a
    fine-tuned language model: loss per trained token before and after, and scored answers).
    skip_bad_images (image runs, with DATA): leave out images that cannot be read, with a warning naming
    them, instead of stopping at the first."""
    whole = _whole_run(run_dir)
    if whole is not None:
        _check_skip(whole[0], skip_bad_images)
        family, state, run = whole
        return family.evaluate_run(run, family, state, data)
    predictor = _predictor(run_dir, trust_model_code=trust_model_code)
    if data is not None:
        return _metrics_over(predictor, _read(predictor, data, None, skip_bad_images))
    return _metrics_over(predictor, held_out_items(predictor, run_dir)[1])


def _check_skip(family: Family, skip_bad_images: bool) -> None:
    if skip_bad_images and not family.skips_unreadable:
        raise DanluError(
            f"skipping unreadable images is for image runs; this is a {family.name} run",
            "leave out --skip-bad-images",
        )


def _read(predictor: Predictor, data: str | Path, chunk_rows: int | None, skip_bad_images: bool):
    """DATA's items for a predictor, in chunks (the family's own size when chunk_rows is None). With
    skip_bad_images, images that cannot be read are left out and named in one warning at the end."""
    family = predictor.family
    _check_skip(family, skip_bad_images)
    size = {} if chunk_rows is None else {"chunk_rows": chunk_rows}
    if not skip_bad_images:
        return family.read(str(data), predictor.state, **size)
    return _skipping(family.read, str(data), predictor.state, size)


def _skipping(read, data: str, state: Any, size: dict) -> Iterator[Any]:
    skipped: list[str] = []
    yielded = False
    for items in read(data, state, skipped=skipped, **size):
        yielded = True
        yield items
    if skipped:
        shown = ", ".join(skipped[:SKIPPED_NAMED]) + (", ..." if len(skipped) > SKIPPED_NAMED else "")
        log.warning(
            "skipped %d unreadable image%s: %s", len(skipped), "" if len(skipped) == 1 else "s", shown
        )
    if not yielded:
        raise DanluError(f"no image in '{data}' could be read", "check the files, or pass other data")


def _whole_run(run_dir: str | Path):
    """(family, state, RunDir) of a finished run whose family evaluates and predicts whole runs, else None."""
    run = RunDir(run_dir)
    run.require_complete()
    family, state = families.state_from_json(run.read_preprocess(), run.path)
    return (family, state, run) if family.evaluate_run is not None else None


def _output_suffix(out: str | Path) -> str:
    suffix = Path(out).suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise DanluError(f"output '{out}' must end in .csv or .parquet", "e.g. -o predictions.csv")
    return suffix


def write_predictions(predictor: Predictor, chunks: Iterable[Any], out: str | Path) -> int:
    """Stream a family's items through a predictor into OUT (.csv or .parquet), rows in order; returns
    rows written. The file appears only when complete: a failure half-way leaves no partial output.
    """
    suffix = _output_suffix(out)
    rows = 0

    def write(file) -> None:
        nonlocal rows
        writer = None
        try:
            for i, items in enumerate(chunks):
                frame = predictor.predict_frame(items)
                rows += len(frame)
                if suffix == ".csv":
                    frame.to_csv(file, header=i == 0, index=False)
                else:
                    import pyarrow.parquet as pq

                    table = _arrow_table(frame, writer.schema if writer is not None else None)
                    writer = writer or pq.ParquetWriter(file, table.schema)
                    writer.write_table(table)
        finally:  # also on a failure: the temporary file goes, and its writer with it
            if writer is not None:
                writer.close()

    atomic_write(Path(out), write)
    return rows


def _arrow_table(frame: pd.DataFrame, schema: Any = None) -> Any:
    """A chunk of predictions as an Arrow table, in the first chunk's schema when one is given. A column
    passed through from the input with values of several types (numbers and text) is written as text, as
    a CSV holds it; a column whose type changes between chunks is one line naming it."""
    import pyarrow as pa

    try:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        mixed = [c for c in frame.columns if frame[c].dtype == object]
        frame = frame.assign(
            **{c: frame[c].map(lambda v: v if v is None or v != v else str(v)) for c in mixed}
        )
        table = pa.Table.from_pandas(frame, preserve_index=False)
    if schema is None:  # a column with no value in the first chunk: text, as later values may be
        schema = pa.schema(
            [f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in table.schema]
        )
    if table.schema.equals(schema):
        return table
    try:
        return table.cast(schema)
    except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
        name = next(f.name for f in table.schema if f.type != schema.field(f.name).type)
        was, now = schema.field(name).type, table.schema.field(name).type
        raise DanluError(
            f"column '{name}' is {was} in the first rows and {now} later: one Parquet file holds one type",
            "write the predictions to .csv, or raise --chunk-rows above the file's rows (its types are then "
            "the whole file's)",
        ) from None


def predict_file(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    chunk_rows: int = 100_000,
    engine: str = "torch",
    trust_model_code: bool = False,
    skip_bad_images: bool = False,
) -> int:
    """Stream DATA through a run's model into OUT (.csv or .parquet), rows in input order; returns rows.
    A fine-tuned language model answers DATA's conversations into OUT (.jsonl). skip_bad_images (image
    runs): images that cannot be read have no row, and one warning names them, instead of stopping at
    the first."""
    whole = _whole_run(run_dir)
    if whole is not None:
        _check_skip(whole[0], skip_bad_images)
        return whole[0].predict_run(whole[2], data, out)
    _output_suffix(out)  # fail before loading anything
    predictor = _predictor(run_dir, engine=engine, trust_model_code=trust_model_code)
    return write_predictions(predictor, _read(predictor, data, chunk_rows, skip_bad_images), out)


def plot_predictions(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    trust_model_code: bool = False,
    skip_bad_images: bool = False,
) -> None:
    """A PNG grid of DATA's first images with their predicted labels (image runs); skip_bad_images: as
    predict_file's.

    Raises:
        DanluError: the run is not an image run.
    """
    predictor = _predictor(run_dir, trust_model_code=trust_model_code)
    draw = predictor.family.plot_predictions
    if draw is None:
        raise DanluError(
            f"--plot draws images; {run_dir} is a {predictor.family.name} run", "leave out --plot"
        )
    items = next(iter(_read(predictor, data, 36, skip_bad_images)))
    draw(predictor.state, items, predictor.decoded(items), Path(out))


QUICKSTART = {
    # The tutorial workload: make_classification (100k rows, 10 features, 3 classes), a 10-20-3 MLP,
    # Adam at 1e-3, batch 1024, 101 epochs; danlu adds a validation split and the best checkpoint.
    "data": {"train": "synthetic:classification", "val_fraction": 0.1, "test_fraction": 0.2},
    "model": {"hidden": [20], "dropout": 0.0, "normalization": "none"},
    "train": {
        "epochs": 101,
        "batch_size": 1024,
        "optimizer": "adam",
        "lr": 1e-3,
        "weight_decay": 0.0,
        "schedule": "none",
        "patience": 0,
        "eval_every": 5,
    },
    "output": "runs/quickstart",
}


def quickstart(
    out: str | Path | None = None, overrides: Iterable[str] = (), progress: bool = True
) -> tuple[Run, Path]:
    """Train, evaluate and predict the tutorial workload end to end; returns the run and predictions path."""
    config = as_config(QUICKSTART, overrides)
    run = train(config, out=out, overwrite=True, progress=progress)
    predictions = run.path / PREDICTIONS
    predictor = run.predictor()
    write_predictions(predictor, held_out_items(predictor, run.path)[1], predictions)
    return run, predictions


def doctor(run_checks: bool = False, timeout: float = 60.0) -> dict[str, Any]:
    """`danlu doctor`: this environment's report (torch build, CUDA, driver, GPUs, packages) and its
    "checks", each {name, status: pass | warn | fail, message, fix}; with run_checks, "self_test": a tiny
    model trained and served on each device, each step timed. Probes are time-limited (timeout, seconds)."""
    from danlu.env.doctor import diagnose

    return diagnose(run_checks=run_checks, timeout=timeout)


def package(source: str | Path, out: str | Path, progress: bool = True, **options: Any) -> dict[str, Any]:
    """`danlu package`: a Docker build context and Kubernetes manifests in OUT (new or empty) that serve a
    run directory or a local chat model; returns what was written. progress: a bar while a model's
    weights (64 MiB or more) are copied. options: the fields of
    danlu.env.package.PackageOptions (gpu, replicas, max_replicas, image, engine, dtype, quantize,
    template, max_batch_tokens, trust_model_code, cpu_request, cpu_limit, memory_request, memory_limit)."""
    from dataclasses import fields

    from danlu.env.package import PackageOptions, package_run

    known = [f.name for f in fields(PackageOptions)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise DanluError(f"unknown package option '{unknown[0]}'", f"use one of {', '.join(known)}")
    return package_run(source, out, PackageOptions(**options), progress)
