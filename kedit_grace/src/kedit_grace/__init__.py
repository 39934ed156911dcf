"""kedit-grace: GRACE (codebook adaptor), MELO (routed dynamic LoRA) and WISE (routed side memory) for
lifelong sequential editing."""

__version__ = "0.1.0"
