"""kedit-rome: locate-then-edit knowledge editing (ROME, MEMIT, PMET, AlphaEdit, KN) and causal tracing."""

__version__ = "0.1.0"
