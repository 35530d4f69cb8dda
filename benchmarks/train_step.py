"""What one optimizer step of the tutorial network costs on this machine, piece by piece.

The tutorial workload (a 10-20-3 MLP, cross-entropy, Adam, batch 1024) is bound by per-step costs,
not arithmetic (about 1.6 MFLOP a step). This prints microseconds per step for: the eager step cut
into cumulative pieces, the same arithmetic with hand-written gradients and no autograd (the eager
kernels alone), the step under torch.compile (with its compile time), and sklearn's MLPClassifier per
step (its fit time over its steps), all on the same batch size and network.

    python benchmarks/train_step.py [--steps 3000] [--no-compile]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

# a fresh compile cache: the compile time printed is what a first run pays
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="danlu-inductor-")

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from timing import per_call
from torch import nn

ROWS, BATCH = 80_000, 1024


class HandWrittenMLPLoss(torch.autograd.Function):
    """An experiment, not in danlu: the 10-20-3 MLP's cross-entropy and all its gradients as one autograd
    node, with the softmax over the batch dimension: what a hand-written fused step would save."""

    @staticmethod
    def forward(ctx, x, y, w1, b1, w2, b2):
        h = torch.addmm(b1, x, w1.t()).relu_()
        log_p = torch.log_softmax(torch.addmm(b2, h, w2.t()).t(), 0)  # [classes, rows]
        ctx.save_for_backward(x, y, h, log_p, w2)
        return -log_p.gather(0, y.unsqueeze(0)).sum() / x.shape[0]

    @staticmethod
    def backward(ctx, grad):
        x, y, h, log_p, w2 = ctx.saved_tensors
        p = log_p.exp()
        p.scatter_add_(0, y.unsqueeze(0), torch.full_like(p[:1], -1.0)).mul_(grad / x.shape[0])
        gh = torch.ops.aten.threshold_backward(p.t().mm(w2), h, 0)
        return None, None, gh.t().mm(x), gh.sum(0), p.mm(h), p.sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = torch.randn(BATCH, 10), torch.randint(0, 3, (BATCH,))
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    def forward():
        return model(x)

    def loss():
        return F.cross_entropy(model(x), y)

    def backward():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def step():
        backward()
        optimizer.step()

    w1, b1, w2, b2 = (p.detach().clone() for p in model.parameters())
    rows = torch.arange(BATCH)

    def kernels_only():
        """The same forward and gradients with no autograd: the eager kernels' own cost."""
        z1 = torch.addmm(b1, x, w1.t())
        h = z1.relu()
        p = torch.softmax(torch.addmm(b2, h, w2.t()), 1)
        p[rows, y] -= 1
        p /= BATCH
        gw2, gb2 = p.t() @ h, p.sum(0)
        gh = (p @ w2).mul_(z1 > 0)
        return gw2, gb2, gh.t() @ x, gh.sum(0)

    def kernels_class_major():
        """As kernels_only, with the softmax over the batch: torch's CPU softmax over a last dimension
        of 3 runs row by row."""
        z1 = torch.addmm(b1, x, w1.t())
        h = z1.relu()
        p = torch.softmax(torch.addmm(b2, h, w2.t()).t(), 0)  # [classes, rows]
        p[y, rows] -= 1
        p /= BATCH
        gw2, gb2 = p @ h, p.sum(1)
        gh = torch.ops.aten.threshold_backward(p.t() @ w2, h, 0)
        return gw2, gb2, gh.t() @ x, gh.sum(0)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, 10-20-3 MLP")
    print(f"{'':56}{'us per step':>12}")
    for name, fn in (
        ("forward", forward),
        ("+ cross-entropy", loss),
        ("+ zero_grad and backward", backward),
        ("+ fused Adam step: the whole eager step", step),
        ("the same arithmetic, hand-written gradients, no autograd", kernels_only),
        ("  and the softmax over the batch dimension", kernels_class_major),
    ):
        print(f"{name:56}{per_call(fn, args.steps):>12.1f}")

    def hand_written_step():
        optimizer.zero_grad(set_to_none=True)
        HandWrittenMLPLoss.apply(x, y, *model.parameters()).backward()
        optimizer.step()

    print(f"{'the whole step, loss and gradients as one autograd node':56}", end="")
    print(f"{per_call(hand_written_step, args.steps):>12.1f}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    label = f"the whole eager step on {torch.get_num_threads()} thread(s)"
    print(f"{label:56}{per_call(step, args.steps):>12.1f}")
    torch.set_num_threads(threads)
    if not args.no_compile:
        compiled_loss = torch.compile(lambda: F.cross_entropy(model(x), y))

        def compiled_step():
            optimizer.zero_grad(set_to_none=True)
            compiled_loss().backward()
            optimizer.step()

        start = time.perf_counter()
        compiled_step()
        compile_s = time.perf_counter() - start
        print(f"{f'torch.compile (forward + backward), after {compile_s:.1f} s compiling':56}", end="")
        print(f"{per_call(compiled_step, args.steps):>12.1f}")
    rng = np.random.default_rng(0)
    xs, ys = rng.standard_normal((ROWS, 10), dtype=np.float32), rng.integers(0, 3, ROWS)
    epochs = 20
    sk = MLPClassifier(
        hidden_layer_sizes=(20,), learning_rate_init=1e-3, alpha=0.0, batch_size=BATCH, max_iter=epochs,
        tol=0.0, n_iter_no_change=epochs + 1, random_state=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        sk.fit(xs, ys)
    steps = epochs * -(-ROWS // BATCH)
    sklearn_us = (time.perf_counter() - start) / steps * 1e6
    print(f"{'sklearn MLPClassifier, whole fit / its steps':56}{sklearn_us:>12.1f}")


if __name__ == "__main__":
    main()
