"""kefu retrieval service: the knowledge base (stream KB), chunking, embeddings, faiss + BM25 search."""
