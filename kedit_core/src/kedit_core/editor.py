"""Editor: the facade -- load a model, compute patches with a method, apply, evaluate, revert."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import progress as steps
from .architecture import ArchitectureSpec, resolve_architecture, write_weight
from .efficiency import current_rss_mb, peak_cuda_mb, peak_rss_mb
from .errors import EditError, KeditError, RequestError
from .evaluate import Evaluator
from .evaluate.baseline import scored_baseline
from .evaluate.metrics import mean, metric_names, protocols
from .hparams import Hyperparams, read_mapping_file
from .method import EditContext, EditMethod, PatchKind
from .models import DEFAULT_MODEL, ModelInfo, cache_dir, load_model, model_fingerprint, model_key
from .patch import AppliedPatch, Patch
from .plugins import get_registry
from .preflight import check_batch_conflicts, check_lengths
from .request import EditRequest
from .runstate import RunState, run_signature

log = logging.getLogger(__name__)


@dataclass
class EditResult:
    """What ``Editor.edit`` did: the patches, metrics per request before and after, timings, memory.

    ``post`` is scored right after each request's own edit; in sequential runs ``post_final`` is
    scored on the final model after every edit (the two protocols can differ a lot).
    ``patches`` holds one patch per chunk -- except in sequential runs of a method whose patches each
    carry the whole state (``EditMethod.cumulative_patches``: GRACE, MELO), where it holds only the
    newest, which supersedes the rest (its ``parent`` names the one before).
    """

    method: str
    model: str
    requests: list[EditRequest]
    patches: list[Patch]
    pre: list[dict[str, float]] = field(default_factory=list)
    post: list[dict[str, float]] = field(default_factory=list)
    post_final: list[dict[str, float]] | None = None
    #: generation protocol: each request's continuations and degeneracy flags (``Generations.to_dict``)
    #: before, right after its edit, and on the final model of a sequential run
    generations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    edit_seconds: list[float] = field(default_factory=list)
    #: of ``edit_seconds``, the one-time work cached for later runs (key statistics, templates, ...)
    one_time_seconds: float = 0.0
    rss_mb_curve: list[tuple[int, float]] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float | None = None
    sequential: bool = False
    batch_size: int = 1
    handles: list[AppliedPatch] = field(default_factory=list, repr=False)
    #: sequential runs: each weight the run overwrote, as it was before the first edit touching it
    baseline: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def time_per_edit_s(self) -> float:
        """Mean seconds per edit, without the one-time work a later run finds cached."""
        return max(0.0, sum(self.edit_seconds) - self.one_time_seconds) / max(1, len(self.requests))

    def metrics(self, which: str = "post") -> dict[str, float]:
        rows = {"pre": self.pre, "post": self.post, "final": self.post_final or []}[which]
        out = {}
        for name in metric_names():
            value = mean([r.get(name) for r in rows])
            if value is not None:
                out[name] = value
        return out

    def degenerate(self, which: str = "post") -> list[tuple[int, list[str]]]:
        """(request index, reasons) of each request found degenerate in the generation protocol."""
        return [(i, g["flags"]) for i, g in enumerate(self.generations.get(which, [])) if g["flags"]]

    def to_report(self) -> dict[str, Any]:
        """The documented ``kedit eval --json`` contract."""
        final = self.post_final is not None
        report: dict[str, Any] = {
            "method": self.method,
            "model": self.model,
            "n": len(self.requests),
            "sequential": self.sequential,
            "batch_size": self.batch_size,
            "metrics": self.metrics("final" if final else "post"),
            "metrics_pre": self.metrics("pre"),
            "protocols": {k: v for k, v in protocols().items() if k in self.metrics("post")},
            "time_per_edit_s": self.time_per_edit_s,
            "one_time_s": self.one_time_seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "per_request": [
                {
                    "case_id": r.case_id,
                    "prompt": r.prompt,
                    "target_new": r.target_new,
                    "pre": self.pre[i] if i < len(self.pre) else {},
                    "post": self.post[i] if i < len(self.post) else {},
                    **({"final": self.post_final[i]} if final and self.post_final else {}),
                    **(
                        {"generations": {k: v[i] for k, v in self.generations.items() if i < len(v)}}
                        if self.generations
                        else {}
                    ),
                }
                for i, r in enumerate(self.requests)
            ],
        }
        if final:
            report["metrics_after_each"] = self.metrics("post")
        if self.peak_cuda_mb is not None:
            report["peak_cuda_mb"] = self.peak_cuda_mb
        if self.rss_mb_curve:
            report["rss_mb_curve"] = self.rss_mb_curve
        return report


def as_requests(requests: Any) -> list[EditRequest]:
    if isinstance(requests, (EditRequest, dict)):
        requests = [requests]
    out = []
    for i, r in enumerate(requests):
        out.append(r if isinstance(r, EditRequest) else EditRequest.create(i, **r))
    if not out:
        raise RequestError("no edit requests given")
    return out


class Editor:
    """Edit a model with one method.

    >>> editor = Editor(method="ft-m", model="gemma3-270m")          # doctest: +SKIP
    >>> result = editor.edit([{"prompt": ..., "subject": ..., "target_new": ...}])  # doctest: +SKIP
    """

    def __init__(
        self,
        method: str | EditMethod,
        model: str | nn.Module = DEFAULT_MODEL,
        tokenizer: Any = None,
        hparams: str | Path | dict | Hyperparams | None = None,
        *,
        device: str = "cpu",
        dtype: str | None = "float32",
        device_map: str | None = None,
        checkpoint: str | Path | None = None,
        progress: bool = False,
        model_info: ModelInfo | None = None,
        cache: str | Path | None = None,
    ) -> None:
        self.method = get_registry().method(method) if isinstance(method, str) else method
        key = model_key(model) if isinstance(model, str) else (model_info.key if model_info else "")
        # hyperparameters are validated before the (slow) model load
        self.hparams = self.method.load_hparams(hparams, key)
        if isinstance(model, str):
            self.model, self.tokenizer, self.model_info = load_model(
                model, device=device, dtype=dtype, device_map=device_map
            )
        else:
            if tokenizer is None:
                raise KeditError("pass the tokenizer together with a model object")
            self.model, self.tokenizer = model, tokenizer
            self.model_info = model_info or ModelInfo(id=type(model).__name__, key="", source="in-memory")
        self.arch: ArchitectureSpec = resolve_architecture(self.model)
        self.progress = progress
        self._ctx = EditContext(
            model_id=self.model_info.id,
            model_fingerprint=self.model_info.fingerprint or model_fingerprint(self.model),
            cache_dir=Path(cache) if cache else cache_dir(),
            checkpoint=Path(checkpoint) if checkpoint else None,
            progress=progress,
        )

    @classmethod
    def from_hparams(cls, path: str | Path, model: str | nn.Module = DEFAULT_MODEL, **kwargs: Any) -> Editor:
        """An editor whose method is named by the ``method`` field of a hyperparameter file."""
        data = read_mapping_file(Path(path))
        if not isinstance(data, dict) or not data.get("method"):
            raise KeditError(f"{path}: needs a 'method' field to pick the editing method")
        return cls(method=data["method"], model=model, hparams=path, **kwargs)

    # -- single steps ---------------------------------------------------------------------------
    def compute_patch(self, requests: Any, parent: Patch | None = None) -> Patch:
        """The patch for ``requests`` on the model as it is now; the model is left unchanged.

        The requests are checked first (:meth:`check_requests`); an unexpected exception of the
        method becomes an :class:`EditError` naming it, the original kept as ``__cause__``.
        """
        reqs = as_requests(requests)
        if len(reqs) > 1 and not self.method.supports_batch:
            raise KeditError(f"method {self.method.name!r} edits one request at a time (no batch editing)")
        self.check_requests(reqs, batch_size=len(reqs), generation=False)
        try:
            return self.method.compute_patch(
                self.model,
                self.tokenizer,
                reqs,
                self.hparams,
                self.arch,
                self._ctx,
                parent=parent.patch_id if parent is not None else None,
            )
        except KeditError:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise EditError(f"method {self.method.name!r} failed: {type(exc).__name__}: {first}") from exc

    def check_requests(self, requests: list[EditRequest], batch_size: int = 1, generation: bool = True) -> None:
        """Refuse, before anything is edited, texts longer than the model's positions and batches of
        ``batch_size`` that ask one prompt for two targets (:mod:`kedit_core.preflight`)."""
        generate = self.evaluator().max_new_tokens if generation else 0
        check_lengths(requests, self.tokenizer, self.arch.max_positions(self.model), generate_tokens=generate)
        if batch_size > 1:
            for lo in range(0, len(requests), batch_size):
                check_batch_conflicts(requests[lo : lo + batch_size], offset=lo)

    def trainer(self, train: list[EditRequest], val: list[EditRequest] | None, out_dir: str | Path) -> Any:
        """The trainer of a method with trained components (``requires_training``), set up on this
        editor's model, hyperparameters and context; its checkpoint goes to ``out_dir``."""
        return self.method.trainer(
            self.model, self.tokenizer, self.hparams, self.arch, self._ctx, train=train, val=val, out_dir=Path(out_dir)
        )

    def evaluator(self, generation: bool = True) -> Evaluator:
        """An evaluator of this editor's model; ``generation=False`` scores the teacher-forced protocol only."""
        return Evaluator(self.model, self.tokenizer, generation=generation)

    # -- the main entry point ---------------------------------------------------------------------
    def edit(
        self,
        requests: Any,
        *,
        sequential: bool = False,
        keep_original_weight: bool = True,
        evaluate: bool = True,
        batch_size: int | None = None,
        generation: bool = True,
        on_chunk: Callable[[int, EditResult], None] | None = None,
        run_dir: str | Path | None = None,
        baseline_dir: str | Path | None = None,
    ) -> EditResult:
        """Edit ``requests`` in chunks of ``batch_size``.

        ``sequential=False``: every chunk is computed from the unedited model, scored, reverted.
        ``sequential=True``: chunks build on each other (patches chained); scored right after each
        chunk and again on the final model. ``keep_original_weight=True`` restores the pre-edit
        weights when ``edit`` returns; ``False`` leaves the edits in the model.
        ``run_dir`` (sequential only): save progress there after every chunk and resume from it
        (:mod:`kedit_core.runstate`) -- an interrupted run started again loses and repeats no edit.
        One process at a time may use a run directory.
        ``baseline_dir``: read the unedited model's scores on these requests from there when an earlier
        run with the same model, requests and protocol left them, else write them there
        (:mod:`kedit_core.evaluate.baseline`) -- for running several methods on the same data.

        Editing is a transaction: the requests are checked before the first edit (texts longer than
        the model's positions, contradictory requests in one batch: refused with their record index),
        and should anything fail later -- a method's error, a patch that does not apply, an
        interrupt -- the model is put back bit-exactly as it was before the call and the error
        raised. A run with ``run_dir`` keeps its progress on disk up to the last saved edit; calling
        ``edit`` again with the same arguments resumes there.
        """
        reqs = as_requests(requests)
        bs = batch_size or int(getattr(self.hparams, "batch_size", 1) or 1)
        self._check_run(len(reqs), bs, sequential, keep_original_weight, run_dir)
        self.check_requests(reqs, batch_size=bs, generation=generation)
        result = EditResult(self.method.name, self.model_info.id, reqs, [], sequential=sequential, batch_size=bs)
        run = None
        if run_dir is not None:
            run = RunState(
                run_dir,
                run_signature(
                    self.method.name, self.hparams.to_dict(), self._ctx.model_fingerprint, reqs, bs, generation
                ),
            )
        with run.locked() if run is not None else contextlib.nullcontext():
            try:
                self._run(
                    result,
                    evaluate=evaluate,
                    generation=generation,
                    keep=keep_original_weight,
                    on_chunk=on_chunk,
                    run=run,
                    baseline_dir=baseline_dir,
                )
            except BaseException:
                self.restore(result)  # the transaction: the model as it was before the call
                raise
        if keep_original_weight:
            self.restore(result)
        result.peak_rss_mb = peak_rss_mb()
        result.peak_cuda_mb = peak_cuda_mb()
        return result

    def _check_run(self, n: int, bs: int, sequential: bool, keep: bool, run_dir: Any) -> None:
        if bs > 1 and not self.method.supports_batch:
            raise KeditError(f"method {self.method.name!r} does not support batch editing; use batch_size=1")
        if sequential and not self.method.supports_sequential:
            raise KeditError(f"method {self.method.name!r} does not support sequential editing")
        if not sequential and not keep and n > bs:
            raise KeditError(
                "independent edits of several chunks cannot all stay in the model; use sequential=True "
                "or one chunk (batch_size >= number of requests)"
            )
        if run_dir is not None and not sequential:
            raise KeditError("run_dir (resumable runs) needs sequential=True")

    def _run(
        self,
        result: EditResult,
        *,
        evaluate: bool,
        generation: bool,
        keep: bool,
        on_chunk: Callable[[int, EditResult], None] | None,
        run: RunState | None,
        baseline_dir: str | Path | None = None,
    ) -> None:
        """The chunks of :meth:`edit`; whatever it leaves applied is in ``result.handles``/``baseline``."""
        reqs, bs, sequential = result.requests, result.batch_size, result.sequential
        ev = self.evaluator(generation=generation)
        refs, parent, done = self._resume(result, run, evaluate)
        if refs is None and evaluate and done == 0:
            base = scored_baseline(ev, reqs, self._ctx.model_fingerprint, baseline_dir)
            result.pre, refs, result.generations["pre"] = base.pre, base.references, base.generations
        bar = tqdm(
            total=len(reqs), initial=done, desc=f"{self.method.name} edits", unit="edit", disable=not self.progress
        )
        try:
            for lo in range(done, len(reqs), bs):
                chunk = reqs[lo : lo + bs]
                t0, inside = time.perf_counter(), steps.mark()
                patch = self._chunk_patch(chunk, parent if sequential else None, lo)
                handle = (
                    self._apply_sequential(patch, result)
                    if sequential
                    else patch.apply(self.model, tokenizer=self.tokenizer)
                )
                result.handles.append(handle)  # in the result at once: should anything below fail, it is reverted
                result.edit_seconds.append(time.perf_counter() - t0)
                result.one_time_seconds += sum(s.seconds for s in steps.recorded(inside) if s.one_time)
                result.patches.append(patch)
                if evaluate:
                    result.post.extend(ev.evaluate(chunk, refs[lo : lo + len(chunk)] if refs else None))
                    result.generations.setdefault("post", []).extend(g.to_dict() for g in ev.last_generations)
                if sequential:
                    parent = patch
                elif keep or len(reqs) > bs:
                    result.handles.pop().revert()
                done = lo + len(chunk)
                result.rss_mb_curve.append((done, current_rss_mb()))
                if run is not None:
                    run.save(result, refs, done, patch, self.method.cumulative_patches)
                bar.update(len(chunk))
                if on_chunk is not None:
                    on_chunk(done, result)
            if sequential and evaluate:
                result.post_final = ev.evaluate(reqs, refs)
                result.generations["final"] = [g.to_dict() for g in ev.last_generations]
        finally:
            bar.close()

    def _resume(self, result: EditResult, run: RunState | None, evaluate: bool) -> tuple[Any, Patch | None, int]:
        """Load a saved run into ``result`` and apply its patches: (references, newest patch, requests done)."""
        saved = run.load() if run is not None else None
        if saved is None:
            return None, None, 0
        refs = RunState.references(saved) if evaluate else None
        result.pre, result.post = saved["pre"], saved["post"]
        result.generations = saved.get("generations") or {}
        result.edit_seconds = saved["edit_seconds"]
        result.one_time_seconds = saved.get("one_time_seconds", 0.0)  # run files written before it was kept
        result.rss_mb_curve = [tuple(x) for x in saved["rss_mb_curve"]]
        parent = None
        for patch in run.patches():  # the model as it was after the last saved edit
            result.handles.append(self._apply_kept(patch, result))
            result.patches.append(patch)
            parent = patch
        log.info(
            "resuming %s from %s: %d of %d requests done",
            self.method.name,
            run.dir,
            saved["done"],
            len(result.requests),
        )
        return refs, parent, saved["done"]

    def _chunk_patch(self, chunk: list[EditRequest], parent: Patch | None, lo: int) -> Patch:
        """:meth:`compute_patch` for the requests ``lo..`` of a run; a method's failure names them."""
        try:
            return self.compute_patch(chunk, parent)
        except EditError as exc:
            where = f"record {lo}" if len(chunk) == 1 else f"records {lo}-{lo + len(chunk) - 1}"
            raise EditError(f"{where}: {exc}") from exc.__cause__

    def _apply_sequential(self, patch: Patch, result: EditResult) -> AppliedPatch:
        """Apply the next patch of a sequential run.

        A method whose patches each carry the whole state (``cumulative_patches``) supersedes the
        previous patch: it is reverted and dropped before the new one goes in, so a run of any
        length holds one state, not one per edit. Should the new patch fail to apply, the previous
        one is put back and the error raised -- the model is never left without either.
        """
        if not (self.method.cumulative_patches and result.handles):
            return self._apply_kept(patch, result)
        previous = result.handles.pop()
        previous.revert()
        try:
            handle = self._apply_kept(patch, result)
        except BaseException:
            result.handles.append(self._apply_kept(previous.patch, result))
            raise
        result.patches.clear()
        return handle

    def _apply_kept(self, patch: Patch, result: EditResult) -> AppliedPatch:
        """Apply a patch that stays in the model (sequential runs) without a copy per edit: the first
        time a weight is overwritten it is snapshot into ``result.baseline`` -- memory stays one copy
        per touched weight however many edits the run makes."""
        if patch.kind is not PatchKind.WEIGHT_DELTA:
            return patch.apply(self.model, tokenizer=self.tokenizer)
        return patch.apply(self.model, tokenizer=self.tokenizer, keep_copy=False, snapshot=result.baseline)

    def restore(self, result: EditResult) -> None:
        """Revert every patch ``result`` left applied (newest first), bit-exactly."""
        while result.handles:
            handle = result.handles.pop()
            if handle.copyless:
                handle.release()
            else:
                handle.revert()
        with torch.no_grad():
            for name, value in result.baseline.items():
                write_weight(self.model, name, value)
        result.baseline.clear()
