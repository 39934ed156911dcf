"""What ROME, MEMIT, PMET and AlphaEdit share: statistics and template settings, their caches, and the update's form."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import nn

from kedit_core.architecture import ArchitectureSpec
from kedit_core.method import EditContext
from kedit_core.models import model_fingerprint

from .ops.context_templates import context_templates
from .ops.least_squares import Factorization
from .ops.null_space import NullSpaceRule, NullSpaces
from .ops.second_moment import SecondMoments, StatsSpec

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


class Statistics:
    """What a method derives from the unedited model and reuses across its edits, keyed by the model
    fingerprint: context templates (on disk, ``<cache_dir>/templates/<fingerprint>/``), second moments
    ``C`` per layer (on disk, ``<cache_dir>/stats/<fingerprint>/``, and in memory), the factorization
    of the last ``C`` solved with (in memory: a ``d_ff x d_ff`` float64 matrix), keyed by that ``C``'s
    file -- fingerprint, layer, corpus content, sample size -- and the damping, and the null-space
    projectors of ``C`` (eigendecomposition on disk next to ``C``'s file, ``P`` in memory, keyed by that
    file and the threshold). A method instance owns one, so its caches live as long as the method (an
    :class:`~kedit_core.editor.Editor` session)."""

    def __init__(self) -> None:
        self.second_moments = SecondMoments()
        self.null_spaces = NullSpaces()
        self._factor: tuple[tuple[Path, float], Factorization] | None = None

    def spec(self, model: nn.Module, opts: StatsOptions, ctx: EditContext) -> StatsSpec:
        return StatsSpec(fingerprint(model, ctx), corpus_path(opts), opts.mom2_n_tokens)

    def second_moment_file(
        self, model: nn.Module, arch: ArchitectureSpec, layer: int, opts: StatsOptions, ctx: EditContext
    ) -> Path:
        """The cache file of ``layer``'s ``C`` (what identifies it: fingerprint, layer, corpus, sample size)."""
        return self.spec(model, opts, ctx).path(Path(ctx.cache_dir).resolve(), arch.layer_path(layer, arch.mlp_out))

    def second_moment(
        self,
        model: nn.Module,
        tokenizer: Any,
        arch: ArchitectureSpec,
        layers: list[int],
        opts: StatsOptions,
        ctx: EditContext,
    ) -> dict[int, torch.Tensor]:
        """``{layer: C}`` on the model's device."""
        spec = self.spec(model, opts, ctx)
        return self.second_moments.get(model, tokenizer, arch, layers, spec, ctx.cache_dir, progress=True)

    def factorization(
        self,
        model: nn.Module,
        tokenizer: Any,
        arch: ArchitectureSpec,
        layer: int,
        opts: StatsOptions,
        ctx: EditContext,
        damping: float,
    ) -> Factorization:
        """``C + damping * mean(diag C) * I`` of ``layer``, factorized (see :class:`Factorization`)."""
        file = self.second_moment_file(model, arch, layer, opts, ctx)
        if self._factor is None or self._factor[0] != (file, damping):
            c = self.second_moment(model, tokenizer, arch, [layer], opts, ctx)[layer]
            self._factor = ((file, damping), Factorization(c, damping))
        return self._factor[1]

    def null_spaces_of(
        self,
        model: nn.Module,
        tokenizer: Any,
        arch: ArchitectureSpec,
        layers: list[int],
        opts: StatsOptions,
        ctx: EditContext,
        rule: NullSpaceRule,
    ) -> dict[int, torch.Tensor]:
        """``{layer: P}`` (CPU, float64): the projectors onto the null spaces of the layers' ``C``
        (:mod:`.ops.null_space`); the ``C`` they need first are computed together in one pass."""
        files = {layer: self.second_moment_file(model, arch, layer, opts, ctx) for layer in layers}
        missing = [layer for layer in layers if not self.null_spaces.ready(files[layer], rule)]
        c = self.second_moment(model, tokenizer, arch, missing, opts, ctx) if missing else {}
        return {layer: self.null_spaces.projector(files[layer], rule, c.get(layer)) for layer in layers}

    def templates(self, model: nn.Module, tokenizer: Any, opts: StatsOptions, ctx: EditContext) -> list[str]:
        spec = [tuple(x) for x in opts.context_template_length_params]
        return context_templates(model, tokenizer, fingerprint(model, ctx), ctx.cache_dir, spec, seed=ctx.seed)


def lowrank_or_dense(
    arch: ArchitectureSpec, param: str, a: torch.Tensor, b: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The ``[out, in]`` update ``a @ b`` of ``param`` as ``(dense, lowrank)`` entries of an
    :class:`~kedit_core.edit.Edit`: low-rank factors when they are smaller, else the dense delta."""
    d_out, r = a.shape
    d_in = b.shape[1]
    if r * (d_out + d_in) < d_out * d_in:
        return {}, {param: arch.lowrank_to_param_layout(a.float(), b.float())}
    return {param: arch.to_param_layout((a.double() @ b.double()).float())}, {}
