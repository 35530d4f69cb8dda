"""How texts are batched for an encoder: longest first, a batch cut where padding would more than double
a text, and the vectors put back in input order."""

import numpy as np

from danlu.embeddings.encoders import by_length, in_input_order


def test_batches_hold_texts_of_similar_length_and_come_back_in_order():
    texts = ["x" * 10, "x" * 100, "x" * 35, "x" * 90, "x" * 40, "x" * 51]
    assert [[len(t) for t in batch] for batch in by_length(texts, 32)] == [[100, 90, 51], [40, 35], [10]]
    assert [[len(t) for t in batch] for batch in by_length(texts, 2)] == [[100, 90], [51, 40], [35], [10]]
    flat = [len(t) for batch in by_length(texts, 32) for t in batch]
    restored = in_input_order(np.array(flat, dtype=np.float32)[:, None], texts)
    assert restored[:, 0].tolist() == [len(t) for t in texts]
