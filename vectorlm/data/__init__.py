"""Data stages: reading documents, tokenizing them, packing them into training rows, and batching those rows."""
