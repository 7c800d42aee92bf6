"""Feast feature repository: the single declaration of the user features and the SUM embeddings."""
