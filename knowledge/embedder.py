"""The knowledge base embeds with the model runtime's sentence-transformers wrapper."""

from bot.models.embedding import DEFAULT_MODEL, Embedder, resolve_model

__all__ = ["DEFAULT_MODEL", "Embedder", "resolve_model"]
