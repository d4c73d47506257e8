"""Embedding server: OpenAI-compatible /v1/embeddings over sentence-transformers."""
