"""WISE: a side memory beside one MLP value matrix, with an activation router (Wang et al., NeurIPS 2024)."""
