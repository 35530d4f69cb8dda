"""Three ways to a classifier for the same image folder, accuracy and seconds in one table:

  cnn from scratch   danlu train on the folder with the image family's defaults (the tutorial's CNN)
  linear probe       danlu train with model.pretrained = a CLIP directory: a linear head on the frozen
                     image tower's features (computed once, cached)
  zero-shot          the same CLIP model with no training: the class names in "a photo of a {}." (from
                     the probe's report.json, on the same held-out images)

The folder: --images 64x64 RGB pictures of three shapes (a bar, a column, a diagonal) drawn with noise.
The CLIP model: randomly initialised, of ViT-B/32's shape (transformers' default CLIPConfig: the real
model's cost; no CLIP weights install from PyPI). Its seconds are what a real ViT-B/32 costs; its
accuracies are not what trained weights give (random features still separate simple shapes for a probe;
zero-shot with random weights is chance).

Run: python benchmarks/probe.py [--images 600]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: tests' helpers
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from image_embeddings import clip_b32

    import danlu
    from tests.images import image_folder

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = image_folder(root / "shapes", n=args.images, size=64, rgb=True)
        clip = clip_b32(root / "clip-b32")
        data = {"train": str(folder), "test_fraction": 0.2, "val_fraction": 0.1}
        rows = []
        for name, model, train in (
            ("cnn from scratch", {}, {}),
            ("linear probe", {"pretrained": str(clip)}, {"epochs": 30, "lr": 0.01}),
        ):
            start = time.perf_counter()
            run = danlu.train(
                {"data": data, "model": model, "train": train, "output": str(root / name)}, progress=False
            )
            rows.append((name, run.report["test"]["accuracy"], time.perf_counter() - start))
            if model:
                zero = run.report["image"]
                rows.append(("zero-shot (same model)", zero["zero_shot_accuracy"], None))
        print(f"{args.images} images of 64x64 (3 classes), {run.report['rows']['test']} held out; 2 cores")
        print(f"{'':>24} {'test accuracy':>14} {'seconds':>9}")
        for name, accuracy, seconds in rows:
            print(f"{name:>24} {accuracy:>14.3f} {'' if seconds is None else f'{seconds:.1f}':>9}")


if __name__ == "__main__":
    main()
