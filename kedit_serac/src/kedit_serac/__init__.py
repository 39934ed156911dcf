"""kedit-serac: SERAC (Mitchell et al. 2022b) and IKE (Zheng et al. 2023), memory-based editors."""

__version__ = "0.1.0"
