"""`danlu doctor --run-checks`: does this environment really compute? Each step runs in a subprocess with
a timeout and is timed: a matmul and a tiny training step per device, bf16/fp16 autocast where
supported, and a gloo all-reduce between two local processes."""

from __future__ import annotations

from typing import Any

from danlu.env.probes import python_probe

COMPUTE = r"""
import json, time, torch
results = []
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
mps = getattr(torch.backends, "mps", None)
if mps and mps.is_available():
    devices.append("mps")
def timed(name, fn):
    start = time.perf_counter()
    try:
        detail = fn()
        results.append({"name": name, "status": "pass", "seconds": round(time.perf_counter() - start, 4),
                        "detail": detail})
    except Exception as exc:
        results.append({"name": name, "status": "fail", "seconds": round(time.perf_counter() - start, 4),
                        "detail": f"{type(exc).__name__}: {exc}".splitlines()[0]})
def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()
for device in devices:
    def matmul(device=device):
        a = torch.randn(1024, 1024, device=device)
        b = a @ a
        sync(device)
        return f"1024x1024 matmul, |b| = {float(b.norm()):.1f}"
    def train_step(device=device):
        layers = [torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)]
        model = torch.nn.Sequential(*layers).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x, y = torch.randn(256, 32, device=device), torch.randint(0, 2, (256,), device=device)
        losses = []
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        if not losses[-1] < losses[0]:
            raise RuntimeError(f"loss did not fall: {losses}")
        return f"5 AdamW steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    timed(f"matmul on {device}", matmul)
    timed(f"training step on {device}", train_step)
    if device == "cuda":
        dtypes = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])
        for dtype in dtypes:
            def autocast_step(dtype=dtype):
                model = torch.nn.Linear(64, 64).cuda()
                with torch.autocast("cuda", dtype=dtype):
                    out = model(torch.randn(32, 64, device="cuda"))
                out.float().sum().backward()
                sync("cuda")
                return f"autocast {str(dtype).split('.')[-1]} output {out.dtype}"
            timed(f"{str(dtype).split('.')[-1]} autocast on cuda", autocast_step)
print(json.dumps(results))
"""

ALL_REDUCE = r"""
import json, os, socket, time, torch, torch.distributed as dist, torch.multiprocessing as mp
def worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    queue.put(float(t))
    dist.destroy_process_group()
if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(worker, args=(port, queue), nprocs=2, start_method="spawn")
    values = sorted(queue.get(timeout=5) for _ in range(2))
    ok = values == [3.0, 3.0]
    seconds = round(time.perf_counter() - start, 4)
    print(json.dumps([{"name": "gloo all-reduce, 2 processes", "status": "pass" if ok else "fail",
                       "seconds": seconds, "detail": f"sums {values} (expected 3.0)"}]))
"""


def self_test(timeout: float = 120.0) -> list[dict[str, Any]]:
    """The timed functional checks; a probe that fails or hangs is one failed entry, never an exception."""
    results = []
    for name, code in (("compute", COMPUTE), ("all-reduce", ALL_REDUCE)):
        outcome = python_probe(code, timeout)
        if isinstance(outcome, list):
            results.extend(outcome)
        else:
            results.append({"name": name, "status": "fail", "seconds": None, "detail": outcome.get("error")})
    return results
