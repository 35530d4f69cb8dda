"""Counting a piece of code's reads from a tensor's device back to the host, for the tests that bound them
(tests/unit/test_sampling.py, and on CUDA tests/gpu/test_chat_graphs.py)."""

from torch.overrides import TorchFunctionMode


class HostReads(TorchFunctionMode):
    """Records each tensor call that reads values back to the host: on a GPU, each one waits for the
    device to finish the work queued before it."""

    READS = frozenset({"tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"})

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))
