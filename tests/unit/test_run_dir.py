"""run.py: atomic writes, and a run directory that danlu replaces only when it can prove it wrote it."""

import os

import pytest

from danlu.errors import DanluError
from danlu.run import RunDir, atomic_write, atomic_write_json, atomic_write_text


def make_run(path, complete=True):
    (path / "checkpoints").mkdir(parents=True)
    (path / "checkpoints" / "last.pt").write_bytes(b"state")
    (path / "config.yaml").write_text("data: {}\n")
    (path / "plots").mkdir()
    (path / "metrics.jsonl").write_text("{}\n")
    if complete:
        (path / "report.json").write_text("{}\n")
    return RunDir(path)


def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_text(target, "old")

    def fail(f):
        f.write(b"half of the new")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.json"]


def test_json_is_strict(tmp_path):
    with pytest.raises(ValueError, match="JSON compliant"):
        atomic_write_json(tmp_path / "r.json", {"r2": float("nan")})
    assert not (tmp_path / "r.json").exists()


def test_an_own_run_is_replaced_and_only_its_entries_go(tmp_path):
    run = make_run(tmp_path / "run")
    (tmp_path / "run" / ".report.json.abc123.tmp").write_text("left by a killed write")
    assert run.is_own_run()
    with pytest.raises(DanluError, match="already exists"):
        run.prepare_new(overwrite=False)
    assert run.prepare_new(overwrite=True) is False  # it existed
    assert tree(tmp_path / "run") == []


@pytest.mark.parametrize("complete", [True, False])
def test_a_run_holding_a_users_file_is_refused_whole(tmp_path, complete):
    run = make_run(tmp_path / "run", complete)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    before = tree(tmp_path / "run")
    with pytest.raises(DanluError, match=r"files danlu did not write \(notes\.txt\)"):
        run.prepare_new(overwrite=True)
    assert tree(tmp_path / "run") == before


@pytest.mark.parametrize(
    "setup",
    [
        lambda p: (p / "thesis.txt").write_text("mine"),
        lambda p: (p / "config.yaml").write_text("not danlu's"),  # a config alone proves nothing
        lambda p: (p / "sub").mkdir(),
    ],
)
def test_a_directory_that_is_not_a_run_is_never_replaced(tmp_path, setup):
    folder = tmp_path / "folder"
    folder.mkdir()
    setup(folder)
    before = tree(folder)
    with pytest.raises(DanluError, match="is not a danlu run"):
        RunDir(folder).prepare_new(overwrite=True)
    assert tree(folder) == before


def test_an_empty_directory_is_used_and_kept_after_a_failed_setup(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    run = RunDir(folder)
    created = run.prepare_new(overwrite=False)
    (folder / "config.yaml").write_text("x")
    run.discard(created)
    assert folder.is_dir() and tree(folder) == []  # the user's directory stays
    new = RunDir(tmp_path / "new")
    new.discard(new.prepare_new(overwrite=False))
    assert not new.path.exists()  # one danlu made goes


def test_a_file_is_not_a_run_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DanluError, match="is a file"):
        RunDir(tmp_path / "f").check_new(overwrite=True)


def test_completeness_and_resumability(tmp_path):
    run = make_run(tmp_path / "run", complete=False)
    run.require_resumable()
    with pytest.raises(DanluError, match="not a finished run"):
        run.require_complete()
    (run.path / "report.json").write_text('{"task": "regression"}')
    assert run.read_report() == {"task": "regression"}
    with pytest.raises(DanluError, match="already complete"):
        run.require_resumable()


def test_a_run_stopped_before_its_first_checkpoint_is_still_danlus(tmp_path, mixed_csv, monkeypatch):
    import danlu
    from danlu.training import trainer

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if stopped in the first epoch

    out, data = tmp_path / "run", [f"data.train={mixed_csv}", "data.target=label", "train.epochs=1"]
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "train_epoch", killed)
        with pytest.raises(KeyboardInterrupt):
            danlu.train(None, data, out=out, progress=False)
    run = RunDir(out)
    assert run.is_own_run() and not run.last_checkpoint.exists()
    with pytest.raises(DanluError, match="stopped before its first checkpoint"):
        run.require_resumable()
    assert danlu.train(None, data, out=out, overwrite=True, progress=False).report["epochs_run"] == 1


def test_a_folder_danlu_filled_loses_only_the_files_its_manifest_names(tmp_path):
    import json

    from danlu.run import MANIFEST

    run = make_run(tmp_path / "run")
    hf = tmp_path / "run" / "hf"
    hf.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (hf / name).write_text(name)
    (hf / MANIFEST).write_text(json.dumps(["config.json", "tokenizer.json", "model.safetensors"]))
    (hf / "README.md").write_text("my model card")
    (tmp_path / "run" / ".hf.writing.tmp").mkdir()  # a write that was stopped half-way
    (tmp_path / "run" / ".hf.writing.tmp" / "config.json").write_text("{}")
    run.prepare_new(overwrite=True)
    assert tree(tmp_path / "run") == ["hf", "hf/README.md"]


def test_a_sharded_checkpoints_files_go_and_a_users_file_beside_them_stays(tmp_path):
    run = make_run(tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    for folder in ("shards-000004", ".shards-000005.writing.tmp"):  # done, and stopped half-way
        (checkpoints / folder).mkdir()
        for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):
            (checkpoints / folder / name).write_bytes(b"shard")
    (checkpoints / "shards-000004" / "notes.txt").write_text("mine")
    zero = checkpoints / "shards-000006"  # ZeRO fragments, one file per rank
    zero.mkdir()
    for name in ("zero-00000-of-00002.safetensors", "zero-00001-of-00002.safetensors"):
        (zero / name).write_bytes(b"fragments")
    (zero / "zero-1-of-2.safetensors").write_bytes(b"not a name danlu writes")
    (checkpoints / "shards-mine").mkdir()  # not a name danlu gives its folders
    (checkpoints / "shards-mine" / "__0_0.distcp").write_bytes(b"someone else's")
    run.remove_entries()
    assert tree(tmp_path / "run") == [
        "checkpoints",
        "checkpoints/shards-000004",
        "checkpoints/shards-000004/notes.txt",
        "checkpoints/shards-000006",
        "checkpoints/shards-000006/zero-1-of-2.safetensors",
        "checkpoints/shards-mine",
        "checkpoints/shards-mine/__0_0.distcp",
    ]


def test_an_unnamed_shard_folder_loses_only_danlus_files(tmp_path):
    from danlu.run import remove_shards

    folder = tmp_path / "run" / "checkpoints" / "shards-000003"  # as save_sharded clears one
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(b"shard")
    (folder / "notes.txt").write_text("mine")
    assert remove_shards(folder) == ["shards-000003/notes.txt"]
    assert tree(folder) == ["notes.txt"]
    (folder / "notes.txt").unlink()
    assert remove_shards(folder) == [] and not folder.exists()


def test_tracking_files_go_with_the_run_and_a_users_file_in_tensorboard_stays(tmp_path):
    run = make_run(tmp_path / "run")
    board = tmp_path / "run" / "tensorboard"
    board.mkdir()
    (board / "events.out.tfevents.1796487245.host.14799.0").write_bytes(b"events")
    (board / "my-notes.txt").write_text("mine")
    (tmp_path / "run" / "tracking.json").write_text("{}")
    (tmp_path / "run" / "trial.json").write_text("{}")
    run.prepare_new(overwrite=True)
    assert tree(tmp_path / "run") == ["tensorboard", "tensorboard/my-notes.txt"]


@pytest.mark.parametrize("content", [b'{"family": "tab', b"\xff\xfe{}", b"", b"{} {}"])
def test_a_damaged_json_file_of_a_run_is_one_line_naming_it(tmp_path, content):
    """A run's JSON files are written atomically, so a damaged one was cut short or altered since (a copy
    that stopped, an edit): each reader names the file with the fix, not a JSONDecodeError."""
    from danlu.run import DAMAGED

    run = make_run(tmp_path / "run")
    for name, read in (
        ("report.json", run.read_report),
        ("preprocess.json", run.read_preprocess),
        ("metrics.jsonl", run.read_metrics),
    ):
        (run.path / name).write_bytes(content if name != "metrics.jsonl" else b"{}\n" + content + b"\n{}\n")
        if name == "metrics.jsonl" and not content:
            assert read() == [{}, {}]  # a blank line is no line
            continue
        with pytest.raises(DanluError) as error:
            read()
        if b"\xff" in content:
            assert str(error.value).startswith(f"'{run.path / name}' is not UTF-8 text (it holds byte 0xff")
        else:
            line = " line 2" if name == "metrics.jsonl" else ""
            assert str(error.value).startswith(f"cannot read '{run.path / name}'{line}: not JSON (")
        assert error.value.hint == DAMAGED


def test_runs_lists_a_run_with_a_damaged_report_as_damaged(tmp_path):
    from danlu.tracking.runs import compare, list_runs

    make_run(tmp_path / "good").report.write_text('{"epochs_run": 3, "task": "classification"}')
    make_run(tmp_path / "cut").report.write_text('{"epochs_')
    make_run(tmp_path / "stopped", complete=False).metrics.write_text('{"epoch": 1}\n{"ep\n{"epoch": 3}\n')
    rows = {row["path"]: row for row in list_runs(tmp_path)}
    assert [rows[str(tmp_path / n)]["state"] for n in ("cut", "good", "stopped")] == [
        "damaged",
        "complete",
        "damaged",
    ]
    assert rows[str(tmp_path / "good")]["epochs"] == 3 and rows[str(tmp_path / "cut")]["epochs"] is None
    with pytest.raises(DanluError, match=r"cannot read '.*cut/report\.json': not JSON"):
        compare(tmp_path / "good", tmp_path / "cut")


def test_a_metrics_line_cut_as_it_was_written_is_no_record(tmp_path):
    """metrics.jsonl is appended a line at a time: a run killed mid-line leaves its last line without an
    end, which resume rewrites. That line is left out; a damaged line anywhere else is still an error."""
    run = make_run(tmp_path / "run", complete=False)
    run.metrics.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')
    assert run.read_metrics() == [{"epoch": 1}, {"epoch": 2}]
    run.metrics.write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(DanluError, match="line 2: not JSON"):
        run.read_metrics()
