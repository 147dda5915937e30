"""CSA, the cosine-similarity attack (Ko et al., ICCV 2023, section 3.2).

score = cos(f_img(x), f_txt(t)) under the target model: training pulls matched pairs together, so
members score higher. Higher score = more likely member.
"""

from __future__ import annotations

import numpy as np


def cosine_similarity(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of matched image and text embeddings (n x d each)."""
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"embedding shapes differ: {image_emb.shape} vs {text_emb.shape}")
    a = image_emb / np.linalg.norm(image_emb, axis=1, keepdims=True)
    b = text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True)
    return np.einsum("ij,ij->i", a, b)


def csa_scores(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Membership score of each record: its image-text cosine similarity."""
    return cosine_similarity(image_emb, text_emb)
