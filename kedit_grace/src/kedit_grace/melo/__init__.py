"""MELO: Model Editing with neuron-indexed dynamic LoRA (Yu et al., AAAI 2024)."""
