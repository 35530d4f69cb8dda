"""The doctor's parsing and checks on recorded real outputs (tests/fixtures/doctor, from an H100 machine:
`nvidia-smi`, its --query-gpu CSV and `danlu doctor --run-checks --json`). The failure scenarios start
from that recorded report and change the one fact each case is about."""

import copy
import json
import os
import stat
from pathlib import Path

import pytest

from danlu.env import probes
from danlu.env.doctor import compat_table, evaluate_checks

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "doctor"
H100 = json.loads((FIXTURES / "doctor_h100.json").read_text())


def by_name(checks):
    return {c["name"]: c for c in checks}


def scenario(**changes):
    report = copy.deepcopy(H100)
    for path, value in changes.items():
        section, key = path.split("__")
        report[section][key] = value
    return report


def test_recorded_nvidia_smi_output_parses():
    banner = probes.parse_nvidia_smi((FIXTURES / "nvidia_smi_h100.txt").read_text())
    assert banner == {"driver_version": "580.159.04", "cuda_version": "13.0"}
    gpus = probes.parse_gpu_query((FIXTURES / "nvidia_smi_query_h100.csv").read_text())
    assert gpus == [{"name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "compute_capability": "9.0"}]


def test_the_recorded_h100_machine_passes_except_the_cpu_onnxruntime():
    checks = by_name(evaluate_checks(H100, compat_table()))
    assert checks["CUDA runtime vs driver"]["status"] == "pass"
    assert checks["NVIDIA H100 80GB HBM3 (sm_90) supported"]["status"] == "pass"
    assert checks["onnxruntime on the GPU"]["status"] == "warn"
    assert "onnxruntime-gpu" in checks["onnxruntime on the GPU"]["fix"]


def test_a_cpu_torch_on_a_gpu_machine_names_the_cuda_index():
    report = scenario(torch__cuda=None, torch__version="2.11.0+cpu", torch__arch_list=[])
    check = by_name(evaluate_checks(report, compat_table()))["GPU build of torch"]
    assert check["status"] == "fail"
    assert check["fix"] == (
        "pip install --force-reinstall torch==2.11.* --index-url https://download.pytorch.org/whl/cu130"
    )


def test_a_driver_too_old_for_torchs_cuda_fails_with_both_fixes():
    report = scenario(nvidia_smi__cuda_version="12.8", nvidia_smi__driver_version="570.86.10")
    check = by_name(evaluate_checks(report, compat_table()))["CUDA runtime vs driver"]
    assert check["status"] == "fail"
    assert ">= 580.65.06" in check["fix"] and "whl/cu128" in check["fix"]


def test_a_newer_minor_cuda_than_the_driver_is_a_warning():
    report = scenario(torch__cuda="12.8", torch__version="2.11.0+cu128", nvidia_smi__cuda_version="12.6")
    check = by_name(evaluate_checks(report, compat_table()))["CUDA runtime vs driver"]
    assert check["status"] == "warn" and "whl/cu126" in check["fix"]


def test_a_gpu_architecture_missing_from_torchs_kernels_fails():
    report = scenario(torch__arch_list=["sm_75", "sm_80", "sm_86"])
    check = by_name(evaluate_checks(report, compat_table()))["NVIDIA H100 80GB HBM3 (sm_90) supported"]
    assert check["status"] == "fail" and "sm_90" in check["fix"]
    ptx = scenario(torch__arch_list=["sm_80", "compute_80"])  # PTX for an older arch JIT-compiles
    assert (
        by_name(evaluate_checks(ptx, compat_table()))["NVIDIA H100 80GB HBM3 (sm_90) supported"]["status"]
        == "pass"
    )


def test_torchvision_and_torchaudio_from_another_torch_fail():
    report = scenario(packages__torchvision="0.24.1", packages__torchaudio="2.9.1")
    checks = by_name(evaluate_checks(report, compat_table()))
    assert checks["torchvision matches torch"]["fix"] == "pip install torchvision==0.26.*"
    assert checks["torchaudio matches torch"]["fix"] == "pip install torchaudio==2.11.*"


def test_no_gpu_and_a_cpu_torch_is_healthy():
    report = scenario(torch__cuda=None, torch__version="2.11.0+cpu", torch__arch_list=[])
    report["nvidia_smi"] = {"error": "nvidia-smi not found on PATH", "missing": True}
    report["torch"]["onnxruntime_providers"] = ["CPUExecutionProvider"]
    assert [c["name"] for c in evaluate_checks(report, compat_table())] == ["environment"]


@pytest.mark.parametrize(
    ("change", "name", "status"),
    [
        (
            {"nvidia_smi": {"error": "nvidia-smi did not answer in 10 s", "timeout": True}},
            "nvidia-smi",
            "warn",
        ),
        ({"nvidia_smi": {"error": "nvidia-smi exited 9: NVIDIA-SMI has failed"}}, "nvidia-smi", "warn"),
        (
            {"torch": {"error": "ImportError: libcudnn.so.9: cannot open shared object file"}},
            "torch import",
            "fail",
        ),
        (
            {"torch_installs": ["/usr/lib/python3/dist-packages", "/home/u/.local/lib"]},
            "one torch install",
            "fail",
        ),
        ({"bitsandbytes": {"error": "RuntimeError: CUDA Setup failed"}}, "bitsandbytes loads", "fail"),
        (
            {"llama_cpp": {"error": "OSError: libllama.so: cannot open shared object file"}},
            "llama-cpp-python loads",
            "fail",
        ),
        (
            {"deepspeed": {"error": "RuntimeError: DS_ACCELERATOR must be one of cuda, cpu, xpu, npu, mps"}},
            "DeepSpeed loads",
            "fail",
        ),
    ],
)
def test_broken_pieces_are_named(change, name, status):
    report = {**copy.deepcopy(H100), **change}
    check = by_name(evaluate_checks(report, compat_table()))[name]
    assert check["status"] == status and check["message"]


def test_compat_table_covers_every_supported_torch():
    table = compat_table()
    assert [f"2.{minor}" for minor in range(2, 15)] == list(table["torch"])  # pyproject: torch>=2.2,<2.15
    for entry in table["torch"].values():
        assert entry["torchvision"].startswith("0.")
        assert all(cuda in table["cuda_min_driver"] for cuda in entry["cuda"])


def fake_program(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_nvidia_smi_probe_reads_the_real_recorded_output(tmp_path, monkeypatch):
    banner, query = FIXTURES / "nvidia_smi_h100.txt", FIXTURES / "nvidia_smi_query_h100.csv"
    fake_program(tmp_path, "nvidia-smi", f'if [ -n "$1" ]; then cat "{query}"; else cat "{banner}"; fi')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    info = probes.nvidia_smi()
    assert info["cuda_version"] == "13.0" and info["gpus"][0]["compute_capability"] == "9.0"


def test_a_hanging_or_failing_nvidia_smi_is_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    fake_program(tmp_path, "nvidia-smi", "sleep 5")
    assert probes.nvidia_smi(timeout=0.5)["timeout"] is True
    fake_program(
        tmp_path, "nvidia-smi", "echo 'NVIDIA-SMI has failed because it could not communicate' >&2; exit 9"
    )
    assert "exited 9" in probes.nvidia_smi()["error"]
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert probes.nvidia_smi()["missing"] is True
