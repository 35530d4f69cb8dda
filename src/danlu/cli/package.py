"""danlu package and danlu env export."""

from __future__ import annotations

from danlu.cli.options import add_trust_model_code


def add_package(sub) -> None:
    p = sub.add_parser(
        "package",
        help="write a Dockerfile and Kubernetes manifests that serve a run or a chat model",
        description="Write a Docker build context (Dockerfile, pinned requirements.txt, environment.yml, "
        ".dockerignore, the run or the model, and danlu's source) and Kubernetes manifests (Deployment, "
        "Service, optionally a HorizontalPodAutoscaler) that run `danlu serve` on it. SOURCE is a run "
        "directory or a local chat model (a directory with a *ForCausalLM config.json, or a .gguf file).",
    )
    p.add_argument("source", metavar="SOURCE", help="run directory, chat model directory or .gguf file")
    p.add_argument("--out", required=True, help="a new or empty directory")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--gpu", dest="gpu", action="store_true", default=None, help="NVIDIA CUDA runtime image"
    )
    where.add_argument("--cpu", dest="gpu", action="store_false", help="slim Python image")
    p.add_argument("--replicas", type=int, default=1, help="Deployment replicas (default 1)")
    p.add_argument("--max-replicas", type=int, help="also write an HPA scaling up to this many on CPU load")
    p.add_argument("--image", help="image name (default danlu-<run name>:<danlu version>)")
    p.add_argument(
        "--engine", choices=["torch", "onnx"], default="torch", help="runs: the engine danlu serve uses"
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="chat models: weights' dtype in the image (auto: float32 on CPU, bfloat16/float16 on CUDA)",
    )
    p.add_argument(
        "--quantize", choices=["int8", "nf4"], help="chat models: quantized weights (nf4 needs --gpu)"
    )
    p.add_argument("--template", help="chat models: a built-in template name or a Jinja file (copied in)")
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        help="chat models: the server's KV cache budget in tokens (danlu serve --max-batch-tokens), which "
        "the pod's memory request counts on a CPU (default: the server's, 16384 or the model's context)",
    )
    add_trust_model_code(p)
    p.set_defaults(run=run_package)


def run_package(args) -> int:
    from danlu.env.package import PackageOptions, package_run

    options = PackageOptions(
        gpu=args.gpu,
        replicas=args.replicas,
        max_replicas=args.max_replicas,
        image=args.image,
        engine=args.engine,
        dtype=args.dtype,
        quantize=args.quantize,
        template=args.template,
        trust_model_code=args.trust_model_code,
        max_batch_tokens=args.max_batch_tokens,
    )
    result = package_run(args.source, args.out, options, progress=not args.quiet)
    kind = f"GPU, CUDA {result['cuda']}" if result["gpu"] else "CPU"
    print(f"wrote {result['out']} ({kind}): {', '.join(result['files'])}, {result['payload']}/, danlu/")
    if result["left_out"]:
        shown = ", ".join(result["left_out"][:12]) + (" ..." if len(result["left_out"]) > 12 else "")
        print(f"  left out of {result['payload']}/ (not needed to serve): {shown}")
    if result["memory_parts"]:
        names = {
            "weights": "weights",
            "kv_cache": "KV cache",
            "packed": "packed layers",
            "runtime": "runtime",
        }
        parts = " + ".join(f"{names[k]} {result['memory_parts'][k] / 2**20:,.0f} MiB" for k in names)
        print(f"  pod memory: request {result['memory'][0]} = {parts}; limit {result['memory'][1]}")
    print(f"  docker build -t {result['image']} {result['out']}")
    print(f"  docker run {'--gpus all ' if result['gpu'] else ''}-p 8000:8000 {result['image']}")
    secret = result["secret"]
    print(f'  kubectl create secret generic {secret} --from-literal=api-key="$(openssl rand -hex 32)"')
    print(f"  kubectl apply -f {result['out']}/k8s/")
    return 0


def add_env(sub) -> None:
    p = sub.add_parser("env", help="environment tools: `danlu env export`")
    verbs = p.add_subparsers(dest="env_command", metavar="COMMAND", required=True)
    export = verbs.add_parser(
        "export",
        help="print this environment's relevant packages, pinned",
        description="Print danlu's runtime dependencies and the ML packages installed here, pinned to their "
        "installed versions: a pip requirements file, a conda environment.yml, or a lock of every installed "
        "dependency. Recreate with `pip install -r FILE` or `conda env create -f FILE`.",
    )
    export.add_argument("--format", choices=["requirements", "conda", "lock"], default="requirements")
    export.set_defaults(run=run_env_export)


def run_env_export(args) -> int:
    from danlu.env.freeze import export_environment

    print(export_environment(args.format), end="")
    return 0
