"""Knowledge: documents to chunks to embeddings to a FAISS index, and search."""
