"""`danlu doctor` for real on this machine (CPU only in CI)."""

import json

import pytest

from tests.conftest import run_cli

KEYS = {
    "danlu_version", "system", "python", "packages", "torch", "torch_installs", "nvidia_smi",
    "cuda_environment", "bitsandbytes", "llama_cpp", "deepspeed", "checks",
}  # fmt: skip


def test_doctor_json_has_the_documented_keys_and_the_python_api_reports_the_same():
    result = run_cli("doctor", "--json")
    report = json.loads(result.stdout)
    assert set(report) == KEYS
    assert report["torch"]["version"].startswith("2.")
    assert report["python"]["isolation"]["kind"] in ("venv", "conda", "system")
    assert all(c["status"] in ("pass", "warn", "fail") for c in report["checks"])
    assert result.returncode == (1 if any(c["status"] == "fail" for c in report["checks"]) else 0)
    import danlu  # the Python API's report: the same keys and checks

    same = danlu.doctor()
    assert set(same) == KEYS and same["torch"]["version"] == report["torch"]["version"]
    assert same["checks"] == report["checks"]


def test_doctor_text_names_torch_and_the_checks():
    result = run_cli("doctor")
    assert result.returncode in (0, 1), result.stderr
    assert "torch" in result.stdout and "checks" in result.stdout


def test_doctor_reports_the_llama_cpp_build_and_deepspeeds_accelerator():
    pytest.importorskip("llama_cpp")
    report = json.loads(run_cli("doctor", "--json").stdout)
    assert report["llama_cpp"]["version"] == __import__("llama_cpp").__version__
    assert "AVX" in report["llama_cpp"]["cpu_features"] or "NEON" in report["llama_cpp"]["cpu_features"]
    from importlib import metadata

    deepspeed = report["deepspeed"]  # make setup installs it: CI sees what this machine picks
    assert deepspeed["version"] == metadata.version("deepspeed")
    import torch

    expected = ("cuda", "nccl") if torch.cuda.is_available() else ("cpu", "gloo")
    assert (deepspeed["accelerator"], deepspeed["backend"]) == expected
    assert "cpu_adam" in deepspeed["ops"]


@pytest.mark.slow
def test_doctor_self_test_computes_on_the_cpu_and_all_reduces():
    result = run_cli("doctor", "--run-checks", "--json", timeout=240)
    steps = {s["name"]: s for s in json.loads(result.stdout)["self_test"]}
    assert steps["matmul on cpu"]["status"] == "pass"
    assert steps["training step on cpu"]["status"] == "pass"
    assert steps["gloo all-reduce, 2 processes"]["status"] == "pass"
    assert steps["gloo all-reduce, 2 processes"]["detail"].startswith("sums [3.0, 3.0]")
