"""danlu doctor."""

from __future__ import annotations

import json

from danlu.cli.options import number

MARKS = {"pass": "ok  ", "warn": "WARN", "fail": "FAIL"}


def add_doctor(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="diagnose this environment (torch build, CUDA, driver, GPUs) and name the fix",
        description="Report the OS, Python and its isolation, key packages, the torch build (CUDA, cuDNN, "
        "NCCL, MPS), the GPUs and driver (from torch and nvidia-smi), and run checks that each pass, warn "
        "or fail with a one-line fix. Exit code 1 when a check fails. Paste the output into bug reports.",
    )
    p.add_argument("--json", action="store_true", help="one JSON document (keys documented in the README)")
    p.add_argument(
        "--run-checks",
        action="store_true",
        help="also compute: a matmul and a training step per device, autocast, a 2-process all-reduce",
    )
    p.add_argument("--timeout", type=number, default=60.0, help="seconds per probe (default 60)")
    p.set_defaults(run=run_doctor)


def _print(report) -> None:
    system, python, torch, smi = report["system"], report["python"], report["torch"], report["nvidia_smi"]
    iso = python["isolation"]
    where = iso["kind"] + (f" ({iso['conda_env']})" if iso["conda_env"] else "")
    lines = [
        ("danlu", report["danlu_version"]),
        ("os", f"{system['os']}, {system.get('cpu')}, {system['cpu_count']} cores"),
        ("memory", f"{system.get('ram_gib')} GiB RAM, {system.get('disk_free_gib')} GiB free disk"),
        (
            "python",
            f"{python['version']} at {python['executable']}, {where}{', container' * iso['container']}",
        ),
        ("packages", ", ".join(f"{k} {v}" for k, v in report["packages"].items())),
    ]
    if "error" in torch:
        lines.append(("torch", f"import failed: {torch['error']}"))
    else:
        build = (
            f"CUDA {torch['cuda']}" if torch["cuda"] else f"ROCm {torch['hip']}" if torch["hip"] else "CPU"
        )
        lines.append(
            (
                "torch",
                f"{torch['version']} ({build} build), cuDNN {torch['cudnn']}, NCCL {torch['nccl']}, "
                f"MPS {torch['mps']}",
            )
        )
        for i, device in enumerate(torch.get("devices", [])):
            lines.append(
                (
                    f"cuda:{i}",
                    f"{device['name']}, {device['memory_mib']} MiB, sm {device['compute_capability']}",
                )
            )
    if "error" in smi:
        lines.append(("nvidia-smi", smi["error"]))
    else:
        lines.append(("driver", f"{smi['driver_version']}, supports CUDA <= {smi['cuda_version']}"))
        for gpu in smi["gpus"]:
            lines.append(
                ("gpu", f"{gpu['name']}, {gpu['memory_mib']} MiB, compute {gpu['compute_capability']}")
            )
    deepspeed = report.get("deepspeed")
    if deepspeed is not None:
        value = deepspeed.get("error") or (
            f"{deepspeed['version']}, {deepspeed['accelerator']} accelerator over {deepspeed['backend']}; "
            f"ops that can build: {', '.join(deepspeed['ops']) or 'none (none needed)'}"
        )
        lines.append(("deepspeed", value))
    llama = report.get("llama_cpp")
    if llama is not None:
        value = llama.get("error") or f"{llama['version']}, CPU build with {' '.join(llama['cpu_features'])}"
        lines.append(("llama.cpp", value))
    env = report["cuda_environment"]
    lines.append(
        (
            "cuda env",
            f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}, nvcc {env['nvcc_version'] or 'none'}, "
            f"LD_LIBRARY_PATH cuda entries: {env['LD_LIBRARY_PATH_cuda'] or 'none'}",
        )
    )
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        print(f"{name:<{width}}  {value}")
    print("\nchecks")
    for check in report["checks"]:
        print(f"  [{MARKS[check['status']]}] {check['name']}: {check['message']}")
        if check["fix"]:
            print(f"         fix: {check['fix']}")
    if "self_test" in report:
        print("\nself-test")
        for step in report["self_test"]:
            seconds = f"{step['seconds']:.3f} s" if step["seconds"] is not None else "-"
            print(f"  [{MARKS[step['status']]}] {step['name']} ({seconds}): {step['detail']}")


def run_doctor(args) -> int:
    from danlu.env.doctor import diagnose

    report = diagnose(run_checks=args.run_checks, timeout=args.timeout)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    failed = [c for c in report["checks"] + report.get("self_test", []) if c["status"] == "fail"]
    return 1 if failed else 0
