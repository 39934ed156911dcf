"""kedit-grace: GRACE (codebook adaptor) and MELO (routed dynamic LoRA) for lifelong sequential editing."""

__version__ = "0.1.0"
