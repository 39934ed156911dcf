"""GRACE: General Retrieval Adaptors for Continual Editing (Hartvigsen et al., NeurIPS 2023)."""
