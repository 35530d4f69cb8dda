"""Image plots: a grid of images with their labels (misclassified test images, or predictions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from danlu.data.batches import run_model

GRID = 36  # images in a grid
# images per forward pass when evaluating (a CNN's activations for 64 28x28 images: about 20 MB)
EVAL_BATCH = 64


def image_grid(images: np.ndarray, captions: list[str], path: Path, title: str) -> None:
    """uint8 images [n, h, w, c] with a caption each, as a PNG."""
    from matplotlib.figure import Figure

    from danlu.evaluation.plots import _save

    n = max(1, min(len(images), GRID))
    columns = min(6, n)
    rows = -(-n // columns)
    figure = Figure(figsize=(1.8 * columns, 2.0 * rows + 0.4))
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images[:n], captions[:n], strict=False):
        ax.imshow(
            image[:, :, 0] if image.shape[2] == 1 else image, cmap="gray" if image.shape[2] == 1 else None
        )
        ax.set_title(caption, fontsize=8)
    figure.suptitle(title)
    _save(figure, path)


@torch.no_grad()
def misclassified(model, part, state, device, path: Path) -> int:
    """Draw up to GRID held-out images the model gets wrong, titled "true -> predicted"; returns how many
    were wrong in all. Classification only."""
    model.eval()
    wrong_images, captions, total = [], [], 0
    for batch in part.batches(EVAL_BATCH):
        predicted = run_model(model, batch.to(device)).argmax(dim=1).cpu()
        wrong = (predicted != batch.target.cpu()).nonzero().flatten()
        total += len(wrong)
        for i in wrong[: GRID - len(wrong_images)].tolist():
            wrong_images.append(batch.inputs["images"][i].cpu().permute(1, 2, 0).numpy())
            true, guess = state.labels(np.array([int(batch.target[i]), int(predicted[i])]))
            captions.append(f"{true} -> {guess}")
    title = f"misclassified: {total} of {part.n_rows}" + (" (first 36)" if total > GRID else "")
    empty = np.zeros((1, state.height, state.width, state.channels), np.uint8)
    image_grid(np.stack(wrong_images) if wrong_images else empty, captions or ["none"], path, title)
    return total
