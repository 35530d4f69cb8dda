"""Guarded probes of the environment. Each one returns data or an {"error": ...}; none raises, and anything
that runs a program or imports torch does so in a subprocess with a timeout, so a hanging nvidia-smi or
a broken torch install cannot take the doctor down with it."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PACKAGES = (
    "danlu", "torch", "torchvision", "torchaudio", "numpy", "transformers", "accelerate", "bitsandbytes",
    "onnxruntime", "onnxruntime-gpu", "llama_cpp_python", "deepspeed", "ray", "pip",
)  # fmt: skip


def run_command(args: list[str], timeout: float = 10.0) -> dict[str, Any]:
    """{"stdout": ...} or {"error": one line}: missing program, non-zero exit or timeout."""
    if shutil.which(args[0]) is None and not Path(args[0]).is_file():
        return {"error": f"{args[0]} not found on PATH", "missing": True}
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"{' '.join(args)} did not answer in {timeout:g} s", "timeout": True}
    except OSError as exc:
        return {"error": f"{args[0]} could not run: {exc}"}
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()
        return {"error": f"{args[0]} exited {result.returncode}: {last[-1] if last else 'no output'}"}
    return {"stdout": result.stdout}


def parse_nvidia_smi(banner: str) -> dict[str, str | None]:
    """Driver version and the highest CUDA version the driver supports, from plain `nvidia-smi` output."""
    driver = re.search(r"Driver Version:\s*([\d.]+)", banner)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", banner)
    return {"driver_version": driver and driver.group(1), "cuda_version": cuda and cuda.group(1)}


def parse_gpu_query(csv: str) -> list[dict[str, Any]]:
    """Rows of `nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader,nounits`."""
    gpus = []
    for line in csv.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            continue
        name, memory, capability = parts[0], parts[1], parts[2]
        gpus.append(
            {
                "name": name,
                "memory_mib": int(memory) if memory.isdigit() else None,
                "compute_capability": capability if re.fullmatch(r"\d+\.\d+", capability) else None,
            }
        )
    return gpus


def nvidia_smi(timeout: float = 10.0) -> dict[str, Any]:
    """The driver as nvidia-smi reports it; {"error": ...} without a driver or when it hangs or fails."""
    banner = run_command(["nvidia-smi"], timeout)
    if "error" in banner:
        return banner
    query = run_command(
        ["nvidia-smi", "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"], timeout
    )
    gpus = parse_gpu_query(query["stdout"]) if "stdout" in query else []
    return {**parse_nvidia_smi(banner["stdout"]), "gpus": gpus}


TORCH_PROBE = r"""
import json, sys
out = {}
try:
    import torch
    out["version"] = torch.__version__
    out["file"] = torch.__file__
    out["cuda"] = torch.version.cuda
    out["hip"] = getattr(torch.version, "hip", None)
    out["cuda_available"] = torch.cuda.is_available()
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if out["cuda_available"] else None
    except Exception:
        out["nccl"] = None
    mps = getattr(torch.backends, "mps", None)
    out["mps"] = bool(mps and mps.is_available())
    out["arch_list"] = torch.cuda.get_arch_list() if out["cuda"] else []
    out["devices"] = []
    if out["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["devices"].append({"name": p.name, "memory_mib": p.total_memory // 2**20,
                                   "compute_capability": f"{p.major}.{p.minor}"})
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
try:
    import onnxruntime
    out["onnxruntime_providers"] = onnxruntime.get_available_providers()
except Exception:
    out["onnxruntime_providers"] = None
print(json.dumps(out))
"""


def python_probe(code: str, timeout: float) -> Any:
    """Run probe code as a script in a fresh interpreter (the one danlu runs in; a file, so that
    multiprocessing can spawn from it); its last stdout line is JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "danlu_probe.py"
        script.write_text(code)
        result = run_command([sys.executable, str(script)], timeout)
    if "error" in result:
        return result
    try:
        return json.loads(result["stdout"].strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": "the probe printed no result"}


def torch_info(timeout: float = 60.0) -> dict[str, Any]:
    return python_probe(TORCH_PROBE, timeout)


BITSANDBYTES_PROBE = r"""
import json
try:
    import bitsandbytes, torch
    ok = True
    if torch.cuda.is_available():  # loading the CUDA library happens on first use
        bitsandbytes.functional.quantize_4bit(torch.ones(64, device="cuda"))
    print(json.dumps({"version": bitsandbytes.__version__, "ok": ok}))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}))
"""


def bitsandbytes_info(timeout: float = 60.0) -> dict[str, Any] | None:
    """None when bitsandbytes is not installed; else whether it loads and runs its CUDA code."""
    if "bitsandbytes" not in package_versions(("bitsandbytes",)):
        return None
    return python_probe(BITSANDBYTES_PROBE, timeout)


LLAMA_CPP_PROBE = r"""
import json
try:
    import llama_cpp
    llama_cpp.llama_backend_init()
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    features = sorted({part.split("=")[0].split(":")[-1].strip() for part in info.replace("|", ";").split(";")
                       if part.strip().endswith("= 1")})
    print(json.dumps({"version": llama_cpp.__version__, "cpu_features": features}))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}))
"""


def llama_cpp_info(timeout: float = 60.0) -> dict[str, Any] | None:
    """None when llama-cpp-python is not installed; else its version and the CPU features its build
    uses (a build that does not load, e.g. compiled for another CPU, is an error)."""
    if "llama_cpp_python" not in package_versions(("llama_cpp_python",)):
        return None
    return python_probe(LLAMA_CPP_PROBE, timeout)


DEEPSPEED_PROBE = r"""
import json, logging
logging.disable(logging.WARNING)  # DeepSpeed logs its accelerator choice at import
try:
    from danlu.training.strategies import import_deepspeed

    deepspeed = import_deepspeed()  # as training imports it: without MLflow
    import deepspeed.ops.op_builder.all_ops as all_ops
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    loadable = []
    for name, builder in sorted(all_ops.ALL_OPS.items()):
        try:
            if builder.is_compatible(verbose=False):
                loadable.append(name)
        except Exception:
            pass
    print(json.dumps({"version": deepspeed.__version__, "accelerator": accelerator.device_name(),
                      "backend": accelerator.communication_backend_name(), "ops": loadable}))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}))
"""


def deepspeed_info(timeout: float = 60.0) -> dict[str, Any] | None:
    """None when DeepSpeed is not installed; else its version, the accelerator and communication
    backend it picks, and which of its compiled ops could be built here (danlu's ZeRO needs none:
    it runs with torch's optimizers). One that does not import or find an accelerator is an error."""
    if "deepspeed" not in package_versions(("deepspeed",)):
        return None
    return python_probe(DEEPSPEED_PROBE, timeout)


def package_versions(names=PACKAGES) -> dict[str, str]:
    """Installed versions, read from package metadata (nothing is imported)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def torch_installs() -> list[str]:
    """Every installed distribution named torch on sys.path (more than one shadow each other)."""
    seen = set()
    for dist in metadata.distributions():
        if (dist.metadata["Name"] or "").lower() == "torch":
            seen.add(str(Path(str(dist.locate_file(""))).resolve()))
    return sorted(seen)


def isolation() -> dict[str, Any]:
    """How this Python is isolated: venv, conda env, container, or the system interpreter."""
    container = Path("/.dockerenv").exists() or Path("/run/.containerenv").exists()
    if not container and Path("/proc/1/cgroup").is_file():
        try:
            container = any(
                k in Path("/proc/1/cgroup").read_text() for k in ("docker", "kubepods", "containerd")
            )
        except OSError:
            container = False
    kind = (
        "venv" if sys.prefix != sys.base_prefix else "conda" if os.environ.get("CONDA_PREFIX") else "system"
    )
    return {
        "kind": kind,
        "prefix": sys.prefix,
        "conda_env": os.environ.get("CONDA_DEFAULT_ENV"),
        "container": container,
    }


def system_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "os": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        info["cpu"] = platform.processor() or None
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        info["ram_gib"] = None
    try:
        info["disk_free_gib"] = round(shutil.disk_usage(Path.cwd()).free / 2**30, 1)
    except OSError:
        info["disk_free_gib"] = None
    return info


def cuda_environment() -> dict[str, Any]:
    ld = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if "cuda" in p.lower()]
    nvcc = shutil.which("nvcc")
    version = None
    if nvcc:
        out = run_command([nvcc, "--version"], 10)
        match = re.search(r"release ([\d.]+)", out.get("stdout", ""))
        version = match and match.group(1)
    return {
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "LD_LIBRARY_PATH_cuda": ld,
        "nvcc": nvcc,
        "nvcc_version": version,
    }


# (limit, usage) files of the process's memory cgroup, v2 then v1: a container's limit, which the memory
# psutil reports (the host's /proc/meminfo) does not show
CGROUP_MEMORY = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def memory_room() -> int:
    """Bytes this process can still take: the memory available, or what is left under its cgroup's limit
    (a container's) where that is less. What danlu sizes memory by: the chunked data budget, the torch
    executor's packed layers, vLLM's CPU KV space."""
    import psutil

    room = psutil.virtual_memory().available
    for limit, usage in CGROUP_MEMORY:
        try:
            most = Path(limit).read_text().strip()
            if most != "max":
                room = min(room, int(most) - int(Path(usage).read_text()))
            break
        except (OSError, ValueError):
            continue
    return max(room, 0)
