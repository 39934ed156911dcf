"""kedit-ft: the FT-L and FT-M fine-tuning baselines, written as a third-party plugin would be."""

__version__ = "0.1.0"
