"""danlu doctor: what this environment is (probes.py), what is wrong with it and the exact fix (checks),
and optionally whether it really computes (self_test). `diagnose()` returns one dict: the `--json` output."""

from __future__ import annotations

import json
import platform
import sys
from importlib import resources
from typing import Any

from danlu import __version__
from danlu.env import probes

PASS, WARN, FAIL = "pass", "warn", "fail"


def compat_table() -> dict[str, Any]:
    return json.loads(resources.files("danlu.env").joinpath("compat.json").read_text())


def _minor(version: str | None) -> str | None:
    """'2.13.0+cu130' -> '2.13'."""
    if not version:
        return None
    parts = version.split("+")[0].split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 else None


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def _install_command(torch_minor: str | None, driver_cuda: str | None, table: dict[str, Any]) -> str | None:
    """pip install line for the newest CUDA build of this torch that the driver can run."""
    entry = table["torch"].get(torch_minor or "")
    if entry is None:
        return None
    builds = [c for c in entry["cuda"] if driver_cuda is None or _key(c) <= _key(driver_cuda)]
    if not builds:
        return None
    tag = "cu" + builds[-1].replace(".", "")
    version = next(v for v in [torch_minor] if v)
    return (
        f"pip install --force-reinstall torch=={version}.* --index-url {table['index_url'].format(tag=tag)}"
    )


LOADS = (  # (report key, check name, fix) of optional packages probed in a subprocess
    ("bitsandbytes", "bitsandbytes loads",
     "pip install -U bitsandbytes (its wheels bundle the CUDA kernels; needs a CUDA torch)"),
    ("deepspeed", "DeepSpeed loads",
     "pip install --force-reinstall 'deepspeed>=0.19.8' (danlu's ZeRO builds none of its ops); on a machine "
     "without GPUs set DS_ACCELERATOR=cpu"),
    ("llama_cpp", "llama-cpp-python loads",
     "pip install --force-reinstall --no-cache-dir 'llama-cpp-python>=0.3.16,<0.4' (builds llama.cpp for "
     "this machine; GGUF files are served with torch meanwhile)"),
)  # fmt: skip


def _check(name: str, status: str, message: str, fix: str | None = None) -> dict[str, Any]:
    return {"name": name, "status": status, "message": message, "fix": fix}


def evaluate_checks(report: dict[str, Any], table: dict[str, Any]) -> list[dict[str, Any]]:
    """Pure: the checks for a report as `diagnose` builds it (also fed recorded reports in tests)."""
    checks = []
    torch, smi, packages = report["torch"], report["nvidia_smi"], report["packages"]
    gpus = smi.get("gpus", []) if "error" not in smi else []
    driver_cuda = smi.get("cuda_version") if "error" not in smi else None
    torch_minor = _minor(torch.get("version"))

    if "error" in torch:
        checks.append(_check("torch import", FAIL, torch["error"], "pip install --force-reinstall torch"))
        return checks
    installs = report.get("torch_installs", [])
    if len(installs) > 1:
        checks.append(
            _check(
                "one torch install",
                FAIL,
                f"{len(installs)} torch installs shadow each other: {', '.join(installs)}",
                "pip uninstall -y torch (repeat until none is left), then install one build",
            )
        )
    if "error" in smi and smi.get("timeout"):
        checks.append(
            _check("nvidia-smi", WARN, smi["error"], "the driver may be hung: check `dmesg`, reboot")
        )
    elif "error" in smi and not smi.get("missing"):
        checks.append(
            _check("nvidia-smi", WARN, smi["error"], "reinstall the NVIDIA driver or check its logs")
        )

    if gpus and not torch.get("cuda") and not torch.get("hip"):
        checks.append(
            _check(
                "GPU build of torch",
                FAIL,
                f"{len(gpus)} NVIDIA GPU(s) found but torch {torch['version']} is a CPU build",
                _install_command(torch_minor, driver_cuda, table),
            )
        )
    elif torch.get("cuda") and driver_cuda:
        built, supported = torch["cuda"], driver_cuda
        if _key(built)[:1] > _key(supported)[:1]:
            status = FAIL  # a newer major version than the driver knows does not run at all
        elif _key(built) > _key(supported):
            status = WARN  # minor version compatibility runs most, not all (no PTX JIT)
        else:
            status = PASS
        minimum = table["cuda_min_driver"].get(_minor(built) or "")
        fix = None
        if status != PASS:
            fix = (f"upgrade the driver to >= {minimum}, or " if minimum else "upgrade the driver, or ") + (
                _install_command(torch_minor, driver_cuda, table) or f"a torch built for CUDA <= {supported}"
            )
        checks.append(
            _check(
                "CUDA runtime vs driver",
                status,
                f"torch uses CUDA {built}; driver {smi.get('driver_version')} supports CUDA <= {supported}",
                fix,
            )
        )
    elif torch.get("cuda") and not gpus:
        checks.append(
            _check("GPU", WARN, f"torch is built for CUDA {torch['cuda']} but no NVIDIA GPU was found")
        )

    arch_list = torch.get("arch_list") or []
    for gpu in gpus:
        capability = gpu.get("compute_capability")
        if not capability or not arch_list:
            continue
        sm = "sm_" + capability.replace(".", "")
        ptx = [a for a in arch_list if a.startswith("compute_") and int(a[8:]) <= int(sm[3:])]
        ok = sm in arch_list or bool(ptx)
        checks.append(
            _check(
                f"{gpu['name']} ({sm}) supported",
                PASS if ok else FAIL,
                f"torch's kernels cover {', '.join(arch_list)}",
                None if ok else "install a newer torch (or CUDA build) that lists " + sm,
            )
        )

    entry = table["torch"].get(torch_minor or "")
    vision = packages.get("torchvision")
    if entry and vision and _minor(vision) != entry["torchvision"]:
        checks.append(
            _check(
                "torchvision matches torch",
                FAIL,
                f"torchvision {vision} belongs to a different torch than {torch['version']}",
                f"pip install torchvision=={entry['torchvision']}.*",
            )
        )
    audio = packages.get("torchaudio")
    if audio and torch_minor and _minor(audio) != torch_minor:
        checks.append(
            _check(
                "torchaudio matches torch",
                FAIL,
                f"torchaudio {audio} belongs to a different torch than {torch['version']}",
                f"pip install torchaudio=={torch_minor}.*",
            )
        )

    for key, name, fix in LOADS:  # optional packages: installed but not loading
        probe = report.get(key)
        if probe is not None and "error" in probe:
            checks.append(_check(name, FAIL, probe["error"], fix))
    providers = torch.get("onnxruntime_providers")
    if providers is not None:
        gpu_provider = "CUDAExecutionProvider" in providers
        if gpus and not gpu_provider:
            checks.append(
                _check(
                    "onnxruntime on the GPU",
                    WARN,
                    f"a GPU is present but onnxruntime offers only {', '.join(providers)}",
                    "pip uninstall -y onnxruntime && pip install onnxruntime-gpu",
                )
            )
        elif gpu_provider and not gpus:
            checks.append(
                _check(
                    "onnxruntime providers", WARN, "onnxruntime-gpu is installed but no NVIDIA GPU was found"
                )
            )
    if not any(c["status"] != PASS for c in checks):
        checks.append(_check("environment", PASS, "no problems found"))
    return checks


def diagnose(run_checks: bool = False, timeout: float = 60.0) -> dict[str, Any]:
    """The whole report; never raises (each probe reports its own error)."""
    report: dict[str, Any] = {
        "danlu_version": __version__,
        "system": probes.system_info(),
        "python": {
            "version": platform.python_version(),
            "executable": sys.executable,
            "isolation": probes.isolation(),
        },
        "packages": probes.package_versions(),
        "torch": probes.torch_info(timeout),
        "torch_installs": probes.torch_installs(),
        "nvidia_smi": probes.nvidia_smi(min(timeout, 15.0)),
        "cuda_environment": probes.cuda_environment(),
        "bitsandbytes": probes.bitsandbytes_info(timeout),
        "llama_cpp": probes.llama_cpp_info(timeout),
        "deepspeed": probes.deepspeed_info(timeout),
    }
    report["checks"] = evaluate_checks(report, compat_table())
    if run_checks:
        from danlu.env.selftest import self_test

        report["self_test"] = self_test(timeout)
    return report
