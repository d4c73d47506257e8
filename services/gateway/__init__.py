"""The public API: Cognito JWTs, documents, search and RAG chat."""
