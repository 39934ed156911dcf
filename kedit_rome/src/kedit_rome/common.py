"""What ROME, MEMIT and PMET share: statistics and template settings, and building the patch."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch
from kedit_core.architecture import ArchitectureSpec
from kedit_core.method import EditContext
from kedit_core.models import model_fingerprint
from kedit_core.ops.context_templates import context_templates
from kedit_core.ops.second_moment import StatsSpec, second_moments
from kedit_core.patch import Patch
from kedit_core.request import EditRequest
from pydantic import BaseModel, Field
from torch import nn

from . import __version__

DEFAULT_CORPUS = "stats_corpus.txt.gz"


class StatsOptions(BaseModel):
    """Where the second moment ``C`` and the context templates come from."""

    #: a UTF-8 text file, one document per line (``.gz`` allowed); null: the corpus kedit-rome ships
    mom2_corpus: str | None = None
    #: corpus tokens the second moment is estimated from
    mom2_n_tokens: int = Field(default=40000, ge=1)
    #: (length in tokens, number) of context templates sampled from the model; [] for the bare prompt only
    context_template_length_params: list[tuple[int, int]] = [(10, 5)]


def corpus_path(opts: StatsOptions) -> Path:
    if opts.mom2_corpus:
        return Path(opts.mom2_corpus).expanduser()
    return Path(str(resources.files("kedit_rome") / "data" / DEFAULT_CORPUS))


def fingerprint(model: nn.Module, ctx: EditContext) -> str:
    """The unedited model's fingerprint: the session's (so sequential edits reuse caches), else computed."""
    if not ctx.model_fingerprint:
        ctx.model_fingerprint = model_fingerprint(model)
    return ctx.model_fingerprint


def second_moment_for(model: nn.Module, tokenizer: Any, arch: ArchitectureSpec, layers: list[int],
                      opts: StatsOptions, ctx: EditContext) -> dict[int, torch.Tensor]:
    spec = StatsSpec(fingerprint(model, ctx), corpus_path(opts), opts.mom2_n_tokens)
    return second_moments(ctx.cache_dir).get(model, tokenizer, arch, layers, spec, progress=True)


def templates_for(model: nn.Module, tokenizer: Any, opts: StatsOptions, ctx: EditContext) -> list[str]:
    spec = [tuple(x) for x in opts.context_template_length_params]
    return context_templates(model, tokenizer, fingerprint(model, ctx), ctx.cache_dir, spec, seed=ctx.seed)


def make_patch(method: Any, model: nn.Module, tensors: dict[str, torch.Tensor], hparams: Any,
               requests: list[EditRequest], ctx: EditContext, extra: dict | None = None) -> Patch:
    return Patch.create(
        method=method.name, kind=method.kind, model=model, tensors=tensors,
        base_model={"id": ctx.model_id, "fingerprint": ctx.model_fingerprint},
        hparams=hparams.to_dict(), requests=[r.model_dump(mode="json") for r in requests],
        plugin="kedit-rome", plugin_version=__version__, extra=extra or {},
    )


def lowrank_or_dense(arch: ArchitectureSpec, param: str, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Patch tensors for the ``[out, in]`` update ``a @ b``: low-rank factors when that is smaller."""
    d_out, r = a.shape
    d_in = b.shape[1]
    if r * (d_out + d_in) < d_out * d_in:
        pa, pb = arch.lowrank_to_param_layout(a.float(), b.float())
        return {f"lowrank/{param}/a": pa, f"lowrank/{param}/b": pb}
    return {f"delta/{param}": arch.to_param_layout((a.double() @ b.double()).float())}
