"""Math only the locate-then-edit methods use, one step of the papers per module.

- :mod:`.context_templates`: prefixes sampled from the model (ROME Sec. 3.1);
- :mod:`.keys`: keys ``k*``, the down-projection input at the subject's last token (ROME Eq. 3);
- :mod:`.second_moment`: ``C = E[k k^T]`` over a corpus, cached on disk (ROME Eq. 2, MEMIT Eq. 11);
- :mod:`.least_squares`: the rank-one (ROME Eq. 2), batched (MEMIT Eq. 14) and null-space projected
  (AlphaEdit) updates;
- :mod:`.null_space`: the projector ``P`` onto the null space of the preserved keys (AlphaEdit), cached;
- :mod:`.suffix`: forward passes that recompute only the positions after an intervention;
- :mod:`.head_loss`: target NLL and essence KL through the output layer in one pass over its weight.

Shared with other families, in :mod:`kedit_core.ops`: logits, tokens, hooks and prefix caching.
Submodules are imported explicitly, so importing ``kedit_rome.ops`` does no work.
"""
