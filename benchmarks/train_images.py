"""Training a digit classifier: the PyTorch examples/mnist recipe as tutorials write it, against danlu, on
the same image folder, side by side in one run.

The data: sklearn's 1,797 handwritten digits (8x8, 0-16) scaled to 28x28 grayscale PNGs in the
ImageFolder layout, 80% train / 20% test (no download needed).

  tutorial            a Dataset that opens each PNG per sample (ToTensor + Normalize), DataLoader batch 64,
                      the examples/mnist Net, Adadelta lr 1.0, StepLR gamma 0.7, EPOCHS epochs
  tutorial preloaded  the same, with every image decoded once into tensors (the usual first fix)
  danlu same recipe   danlu train with the same network, optimizer, schedule, batch and epochs, in fp32
                      and with its image default precision (bf16 autocast where the CPU supports it)
  danlu defaults      danlu's own defaults for model.type=cnn at a third of the epochs (time to accuracy)

Run: python benchmarks/train_images.py [--epochs 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import danlu


def write_digits(root: Path) -> tuple[Path, Path]:
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0 * 255).astype(np.uint8)
    train_idx, test_idx = train_test_split(
        np.arange(len(images)), test_size=0.2, random_state=0, stratify=digits.target
    )
    for split, indices in (("train", train_idx), ("test", test_idx)):
        for i in indices:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).resize((28, 28), Image.Resampling.BILINEAR).save(folder / f"{i}.png")
    return root / "train", root / "test"


class Net(nn.Module):
    """pytorch/examples mnist/main.py, as written there."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


def _to_tensor(image) -> torch.Tensor:
    # torchvision.transforms.ToTensor + Normalize((0.1307,), (0.3081,)), written out
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]
    return (array - 0.1307) / 0.3081


class PerSampleDataset(torch.utils.data.Dataset):
    def __init__(self, root: Path):
        self.classes = sorted(p.name for p in root.iterdir())
        self.items = [(f, self.classes.index(f.parent.name)) for f in sorted(root.rglob("*.png"))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.items[i]
        return _to_tensor(Image.open(path).convert("L")), label


def tutorial(train_root: Path, test_root: Path, epochs: int, preloaded: bool) -> tuple[float, float]:
    torch.manual_seed(1)
    train_set, test_set = PerSampleDataset(train_root), PerSampleDataset(test_root)
    if preloaded:
        train_set = torch.utils.data.TensorDataset(
            torch.stack([x for x, _ in train_set]), torch.tensor([y for _, y in train_set])
        )
    loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True)
    model = Net()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for data, target in loader:
            optimizer.zero_grad()
            loss = F.nll_loss(model(data), target)
            loss.backward()
            optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.no_grad():
        for data, target in torch.utils.data.DataLoader(test_set, batch_size=1000):
            correct += int((model(data).argmax(dim=1) == target).sum())
    return seconds, correct / len(test_set)


def danlu_run(train_root: Path, test_root: Path, out: Path, overrides: list[str]) -> tuple[float, float]:
    config = [f"data.train={train_root}", f"data.test={test_root}", "data.val_fraction=0", *overrides]
    run = danlu.train(None, config, out=out, progress=False)
    return run.report["train_seconds"], run.report["test"]["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        train_root, test_root = write_digits(Path(tmp) / "digits")
        recipe = [
            f"train.epochs={args.epochs}",
            "train.batch_size=64",
            "train.optimizer=adadelta",
            "train.lr=1.0",
            "train.weight_decay=0",
            "train.schedule=step",
            "train.step_gamma=0.7",
            "train.patience=0",
        ]
        quick = [f"train.epochs={max(1, round(args.epochs / 3))}"]
        fp32 = "train.precision=fp32"
        rows = [
            ("tutorial (per-sample Dataset)", *tutorial(train_root, test_root, args.epochs, preloaded=False)),
            ("tutorial, preloaded tensors", *tutorial(train_root, test_root, args.epochs, preloaded=True)),
            (
                "danlu, same recipe, fp32",
                *danlu_run(train_root, test_root, Path(tmp) / "fp32", [*recipe, fp32]),
            ),
            (
                "danlu, same recipe (bf16 autocast)",
                *danlu_run(train_root, test_root, Path(tmp) / "same", recipe),
            ),
            (
                f"danlu defaults, {quick[0][13:]} epochs",
                *danlu_run(train_root, test_root, Path(tmp) / "own", quick),
            ),
        ]
    threads = torch.get_num_threads()
    print(f"digits 28x28: 1,437 train / 360 test images, torch {torch.__version__}, {threads} threads")
    print(f"{'':36}{'seconds':>9}{'test accuracy':>15}{'speed-up':>10}")
    base = rows[0][1]
    for name, seconds, accuracy in rows:
        print(f"{name:36}{seconds:9.2f}{accuracy:15.3f}{base / seconds:9.2f}x")


if __name__ == "__main__":
    main()
