"""Math shared by two or more method packages (and by the evaluator).

- :mod:`.logits`: final hidden states and the output layer (the model's device, logits at positions);
- :mod:`.tokens`: prompt/target encoding and the subject's last token;
- :mod:`.hooks`: reading a module's input or output and ending a forward pass early;
- :mod:`.prefix`: replaying the layers below an intervention inside an optimization loop;
- :mod:`.sampling`: text sampled from the model itself (context templates, generic inputs).

Math a single family uses lives in that family's package (ROME/MEMIT/PMET/KN: ``kedit_rome.ops``).
Submodules are imported explicitly (``from kedit_core.ops.tokens import encode_pairs``) so that
importing ``kedit_core.ops`` does no work.
"""
