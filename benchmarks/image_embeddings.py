"""Image embeddings: danlu's batched path against the tutorial's one-image-at-a-time loop, side by side in
one run, on the same CLIP-sized model, with the same vectors (cosine >= 0.9999).

The model: a randomly initialised CLIPModel with transformers' default CLIPConfig, which is ViT-B/32's
shape (224x224 in 32x32 patches, 12 layers of width 768, projected to 512): the real model's cost, no
download. The images: --images JPEG photographs' worth of pixels (640x480 smooth random gradients and
noise, quality 90), written once to a temporary folder.

  tutorial   for path in paths: image = Image.open(path); inputs = processor(images=image,
             return_tensors="pt"); with torch.no_grad(): model.get_image_features(**inputs)
  danlu      danlu.load(DIR).embed_images(paths, batch_size=32) (danlu embed's path), in float32 and,
             on a CPU with native bfloat16, with dtype="bfloat16"

images per second, best of --rounds in turns.

Run: python benchmarks/image_embeddings.py [--images 128] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def photos(folder: Path, count: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    paths = []
    for i in range(count):
        slopes = rng.uniform(0.1, 0.4, (3, 2))
        base = np.stack([(x * a + y * b + 60 * c) % 256 for c, (a, b) in enumerate(slopes)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, (480, 640, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def clip_b32(folder: Path) -> Path:
    """A random ViT-B/32-shaped CLIPModel with CLIP's image processor and a tokenizer, saved."""
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: tests' helpers
    from tests.embedding_models import tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    config = transformers.CLIPConfig(text_config={"vocab_size": len(tokenizer), **ids})
    transformers.CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    transformers.CLIPImageProcessor().save_pretrained(folder)
    return folder


def tutorial(folder: Path):
    import torch
    import transformers
    from PIL import Image

    model = transformers.CLIPModel.from_pretrained(folder).eval()
    processor = transformers.CLIPImageProcessor.from_pretrained(folder)

    def embed(paths: list[str]) -> np.ndarray:
        rows = []
        for path in paths:
            image = Image.open(path)
            inputs = processor(images=image, return_tensors="pt")
            with torch.no_grad():
                features = model.get_image_features(**inputs)
            features = features if isinstance(features, torch.Tensor) else features.pooler_output
            rows.append(features[0].numpy())
        return np.stack(rows)

    return embed


def timed(embed, paths: list[str], rounds: int) -> tuple[float, np.ndarray]:
    best, vectors = 0.0, None
    for _ in range(rounds):
        start = time.perf_counter()
        vectors = embed(paths)
        best = max(best, len(paths) / (time.perf_counter() - start))
    return best, vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import torch
    from PIL import Image

    import danlu

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = photos(folder, args.images)
        model_dir = clip_b32(folder / "clip-b32")
        theirs = tutorial(model_dir)
        ours = {"danlu float32": danlu.load(model_dir)}
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            ours["danlu bfloat16"] = danlu.load(model_dir, dtype="bfloat16")
        print(f"{len(paths)} JPEG images of 640x480, ViT-B/32-shaped CLIP, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; images/s, best of {args.rounds} (least cosine with "
              "the tutorial's vectors)")  # fmt: skip
        loop, reference = timed(theirs, paths, args.rounds)
        reference = reference / np.linalg.norm(reference, axis=1, keepdims=True)
        print(f"{'tutorial loop':>22} {loop:>8.1f}")
        for name, encoder in ours.items():
            rate, vectors = timed(lambda p, e=encoder: e.embed_images(p, batch_size=32), paths, args.rounds)
            cosine = float((vectors * reference).sum(axis=1).min())
            print(f"{name + ' batch 32':>22} {rate:>8.1f} {rate / loop:>5.2f}x ({cosine:.6f})")
        # the ceiling: the model's forward pass alone, on pixels already made, at batch 32 and batch 1
        model = ours["danlu float32"].model
        pixels = ours["danlu float32"].image_processor(
            images=[Image.open(p).convert("RGB") for p in paths[:32]], return_tensors="pt"
        )["pixel_values"]
        with torch.inference_mode():
            model.get_image_features(pixel_values=pixels)
            start = time.perf_counter()
            model.get_image_features(pixel_values=pixels)
            batched = (time.perf_counter() - start) / len(pixels)
            start = time.perf_counter()
            for i in range(8):
                model.get_image_features(pixel_values=pixels[i : i + 1])
            alone = (time.perf_counter() - start) / 8
        print(f"forward pass alone, float32: {1000 * batched:.0f} ms an image at batch 32, "
              f"{1000 * alone:.0f} ms at batch 1: batching cannot give more than {alone / batched:.2f}x; "
              f"the tutorial loop takes {1000 / loop:.0f} ms an image in all")  # fmt: skip


if __name__ == "__main__":
    main()
