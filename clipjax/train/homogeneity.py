"""Caption word overlap within a batch against across recent batches: sees batches of one
category when neither labels nor identical captions show it.

Captions of one category written in varied phrasings ("a photo of a sneaker.", "this is a
sneaker.") share the category's words. Each caption becomes a bag of its token ids (counts,
padding left out, L2-normalised); the mean cosine between captions of one batch is compared with
the mean cosine between captions of different recent batches. For batches drawn at random from
the data both estimate the same number; batches of one category lift the first above the second.
The measure reads only token ids, so the model's state does not enter it (a collapsed model,
which embeds every caption alike, does not look like a sorted stream). Captions of a category
that share no words with each other are not seen.
"""

from __future__ import annotations

import collections

import numpy as np

PAD = 0  # the tokenizer's padding id
MIN_BATCHES = 8  # fewer recent batches: no judgement


class CaptionOverlap:
    """The token rows of the last `window` host batches (at most `rows` captions of each)."""

    def __init__(self, window: int = 64, rows: int = 64):
        if window < 2 or rows < 2:
            raise ValueError(f"CaptionOverlap: window and rows must be >= 2, got {window}, {rows}")
        self.rows = rows
        self._batches: collections.deque[np.ndarray] = collections.deque(maxlen=window)

    def observe(self, text: np.ndarray) -> None:
        """One host batch's token ids [b, L] (batches of one caption or other shapes: ignored)."""
        text = np.asarray(text)
        if text.ndim == 2 and np.issubdtype(text.dtype, np.integer) and len(text) >= 2:
            self._batches.append(np.array(text[: self.rows], np.int64))

    @property
    def batches(self) -> int:
        return len(self._batches)

    def similarity(self) -> tuple[float, float] | None:
        """(mean cosine of caption pairs within a batch, mean cosine of caption pairs from two
        different batches) over the window, or None with fewer than two batches."""
        if len(self._batches) < 2:
            return None
        sizes = np.array([len(t) for t in self._batches])
        tokens = np.concatenate(list(self._batches))
        row = np.repeat(np.arange(len(tokens)), tokens.shape[1])
        tok = tokens.reshape(-1)
        keep = tok != PAD
        ids, tok_col = np.unique(tok[keep], return_inverse=True)
        # token counts per (caption, token id), each caption's vector scaled to length 1
        pair, tf = np.unique(row[keep] * len(ids) + tok_col, return_counts=True)
        r, c = pair // len(ids), pair % len(ids)
        norm = np.sqrt(np.bincount(r, tf * tf, minlength=len(tokens)).astype(np.float64))
        batch_of_row = np.repeat(np.arange(len(sizes)), sizes)
        sums = np.zeros((len(sizes), len(ids)))
        np.add.at(sums, (batch_of_row[r], c), tf / norm[r])
        n = np.bincount(batch_of_row[norm > 0], minlength=len(sizes)).astype(np.float64)
        within_pairs, across_pairs = np.sum(n * (n - 1)), n.sum() ** 2 - np.sum(n * n)
        if within_pairs == 0 or across_pairs == 0:
            return None
        gram = sums @ sums.T
        within = (np.trace(gram) - n.sum()) / within_pairs  # less each caption with itself
        across = (gram.sum() - np.trace(gram)) / across_pairs
        return float(within), float(across)


def overlap_excess(within: float, across: float) -> float:
    """How much of the gap to identical captions the in-batch overlap closes beyond the
    across-batch one: (within - across) / (1 - across); about 0 for random batches."""
    return (within - across) / max(1.0 - across, 1e-6)
