"""Downstream evaluation: cached features, linear probe, k-NN, FAISS retrieval, fine-tuning."""
