"""Math shared by two or more method packages (and by the evaluator).

Submodules are imported explicitly (``from kedit_core.ops.tokens import encode_pairs``) so that
importing ``kedit_core.ops`` does no work.
"""
