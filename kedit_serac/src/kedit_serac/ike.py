"""IKE (Zheng et al. 2023, "Can We Edit Factual Knowledge by In-Context Learning?").

No weights change: every input x is answered by the base model reading the in-context prompt of
the edit (:mod:`.demonstrations`),

    f(x) = p_base( · | C(f*, t*) ⊕ x ),

for the inputs in the edit's scope; every other input runs on the base model with no context at
all. The scope (hparams ``scope``, :mod:`.scope_gate`) is ``"subject"``: the inputs that name the
edited subject (with several edits, the most specific subject named, then the nearest fact), or
``"all"``: every input, as in the paper, each reading the context of the edit whose fact is nearest
to it in sentence-embedding space (unrelated inputs then read the context too: on Gemma 3 270M the
CounterFact neighbourhood score falls from 0.88 to 0.16).

The demonstration pool is a data file of edit records: hparams ``pool``, or ``--checkpoint FILE``, else
the pool shipped in the package (training records only).
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated, Literal

import torch
from pydantic import Field

from kedit_core.architecture import ArchitectureSpec
from kedit_core.edit import Edit
from kedit_core.errors import PatchError
from kedit_core.hparams import Hyperparams
from kedit_core.method import Detach, EditContext, EditMethod, ModelContext, PatchKind
from kedit_core.patch import Patch
from kedit_core.request import EditRequest
from kedit_core.trainer import load_training_requests

from .demonstrations import LABEL, DemonstrationPool, kind_counts, new_fact
from .encoder import ENCODER_ID, shared_encoder
from .memory import Memory, attach_memory, require_tokenizer
from .scope_gate import subject_router
from .serac import identity_params

PACKAGED_POOL = "ike_pool.json"


class IKEHyperparams(Hyperparams):
    #: demonstrations retrieved per edit
    k: int = Field(default=32, ge=0)
    #: copy : update : retain demonstrations among the k
    ratio: tuple[float, float, float] = (1.0, 3.0, 4.0)
    #: the line between the new fact and the prompt (demonstrations and input alike)
    label: str = LABEL
    #: close the demonstrations with the copy demonstration of the new fact itself
    copy_new_fact: bool = True
    #: data file of demonstration records (CounterFact/EasyEdit/ZsRE); ``--checkpoint FILE`` also sets it;
    #: default: the packaged pool (2,000 CounterFact + 998 zsRE training records)
    pool: str | None = None
    #: use the first N records of the pool (all when unset)
    pool_limit: int | None = Field(default=None, ge=1)
    #: which inputs read an edit's context: those naming the edited subject ("subject"; the others
    #: run on the base model unchanged), or every input ("all", the paper)
    scope: Literal["subject", "all"] = "subject"
    #: texts that end the continuation of an input reading an edit's context, in ``generate``: the
    #: demonstrations' separator and the head of a new demonstration (the model otherwise writes the
    #: in-context format on after its answer); empty: no stop
    stops: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=lambda: ["\n\n", "New Fact:"])
    batch_size: int = Field(default=1, ge=1)


class IKE(EditMethod):
    name = "ike"
    hparams_class = IKEHyperparams
    supports_batch = True
    supports_sequential = True
    requires_training = False
    edit_area = "in-context"
    kind = PatchKind.MEMORY
    preset_package = "kedit_serac"

    def compute_edit(
        self,
        model,
        tokenizer,
        requests: list[EditRequest],
        hparams: IKEHyperparams,
        arch: ArchitectureSpec,
        ctx: EditContext,
    ) -> Edit:
        encoder = shared_encoder()
        pool_file = hparams.pool or (str(ctx.checkpoint) if ctx.checkpoint is not None else packaged_pool())
        pool = self._pool(pool_file, hparams.pool_limit, hparams.label, ctx)
        counts = kind_counts(hparams.k, hparams.ratio)
        contexts = [pool.context(encoder, r, counts, hparams.copy_new_fact) for r in requests]
        keys = encoder.embed([new_fact(r.prompt, r.target_new) for r in requests])
        return Edit(
            state={"memory": {"keys": keys}},
            fingerprint_params=identity_params(model),
            extra={
                "encoder": ENCODER_ID,
                "contexts": contexts,
                "scope": hparams.scope,
                "stops": list(hparams.stops),
                "subjects": [r.subject for r in requests],
                "pool": {"source": pool_file or "", "records": len(pool)},
            },
        )

    def _pool(self, pool_file: str | None, limit: int | None, label: str, ctx: EditContext) -> DemonstrationPool:
        """The demonstration pool, built once per method object (embeddings cached on disk)."""
        key = (pool_file, limit, label, str(ctx.cache_dir))
        pools = self.__dict__.setdefault("_pools", {})
        if key not in pools:
            records = load_training_requests(pool_file, limit) if pool_file else []
            pools[key] = DemonstrationPool.build(records, shared_encoder(), ctx.cache_dir / "ike", label)
        return pools[key]

    def attach(self, target: ModelContext, patch: Patch) -> Detach:
        tokenizer = require_tokenizer(target.tokenizer, f"IKE patch {patch.patch_id}")
        keys = patch.state_groups().get("memory", {}).get("keys")
        extra = patch.metadata.get("extra", {})
        contexts = list(extra.get("contexts", []))
        if keys is None or keys.shape[0] != len(contexts) or not contexts:
            raise PatchError(f"IKE patch {patch.patch_id} needs one memory key per context")
        scope = extra.get("scope", "all")  # patches written before the scope gate read every input
        stops = extra.get("stops", [])  # patches written before the stops run on
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise PatchError(f"IKE patch {patch.patch_id}: stops must be a list of non-empty texts")
        if scope == "all":
            return attach_memory(target.model, tokenizer, Memory(contexts, nearest_router(keys), tuple(stops)))
        subjects = extra.get("subjects")
        if scope != "subject" or not isinstance(subjects, list) or len(subjects) != len(contexts):
            raise PatchError(f"IKE patch {patch.patch_id}: scope {scope!r} needs one subject per context")
        route = subject_router([str(s) for s in subjects], keys, lambda texts: shared_encoder().embed(texts))
        return attach_memory(target.model, tokenizer, Memory(contexts, route, tuple(stops)))


def packaged_pool() -> str:
    """The demonstration pool shipped with the package (``benchmarks/make_ike_pool.py`` writes it)."""
    return str(resources.files("kedit_serac") / "pools" / PACKAGED_POOL)


def nearest_router(keys: torch.Tensor):
    """``route(texts)``: every text reads the context of its nearest edit."""
    encoder = shared_encoder()

    @torch.no_grad()
    def route(texts: list[str]) -> list[tuple[int, float] | None]:
        if keys.shape[0] == 1:
            return [(0, 1.0)] * len(texts)
        sims = encoder.embed(texts) @ keys.T
        best, idx = sims.max(dim=1)
        return [(int(i), float(s)) for s, i in zip(best.tolist(), idx.tolist(), strict=True)]

    return route
