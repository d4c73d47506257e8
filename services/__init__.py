"""RAG platform services: gateway, retriever, embedder, generator."""
