"""BaseTrainer: the training loop shared by methods with trained components (MEND, KE, SERAC, ...).

A method's trainer subclasses :class:`BaseTrainer` and supplies the trainable parameters and the
losses of one batch; the base class owns everything else:

- the objective ``L = edit_loss_weight * L_edit + locality_loss_weight * L_loc`` (MEND eq. 4;
  :func:`locality_kl` is the usual ``L_loc``, KL(p_base || p_edited) on unrelated inputs),
- Adam with gradient clipping, deterministic batches (epoch ``e`` is a permutation seeded with
  ``seed + e``), validation every ``val_every`` steps with early stopping after ``patience``
  validations without improvement,
- checkpoints: ``<out>/model.safetensors`` (the best parameters) + ``<out>/config.json``, and a
  resumable state under ``<out>/state/`` (parameters, Adam moments and RNG states as safetensors,
  counters as JSON -- no pickle). ``run()`` on a directory with a state resumes from it, and gives
  the same final checkpoint as an uninterrupted run with the same seed.

Methods expose training through :meth:`kedit_core.method.EditMethod.trainer`, which is what
``kedit train --method M`` calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .errors import CheckpointError, KeditError, RequestError
from .fsutil import atomic_path, atomic_write_text
from .hparams import Hyperparams

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_DIR = "state"


class TrainingHyperparams(Hyperparams):
    """Knobs of :class:`BaseTrainer`; a trained method's Hyperparams subclass this."""

    learning_rate: float = Field(default=1e-3, gt=0)
    max_steps: int = Field(default=1000, ge=1)
    train_batch_size: int = Field(default=16, ge=1)
    edit_loss_weight: float = Field(default=1.0, ge=0)
    locality_loss_weight: float = Field(default=1.0, ge=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    val_every: int = Field(default=100, ge=1)
    #: validations without improvement before stopping (early stopping)
    patience: int = Field(default=5, ge=1)
    #: steps between resumable state checkpoints
    checkpoint_every: int = Field(default=100, ge=1)
    #: share of the training records held out for validation when no validation file is given
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    seed: int = 0


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    best_step: int
    best_val_loss: float
    stopped_early: bool
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "steps": self.steps,
            "best_step": self.best_step,
            "best_val_loss": self.best_val_loss,
            "stopped_early": self.stopped_early,
            "seconds": round(self.seconds, 2),
            "history": self.history,
        }


def locality_kl(
    base_logits: torch.Tensor, edited_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(p_base || p_edited) per position, averaged over ``mask`` (the locality loss of MEND/KE)."""
    base_logp = torch.log_softmax(base_logits.float(), dim=-1)
    new_logp = torch.log_softmax(edited_logits.float(), dim=-1)
    kl = (base_logp.exp() * (base_logp - new_logp)).sum(-1)
    if mask is None:
        return kl.mean()
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


class BaseTrainer(ABC):
    """Subclass and implement :meth:`trainable` and :meth:`losses` (and usually :meth:`config`)."""

    def __init__(
        self,
        hparams: TrainingHyperparams,
        out_dir: str | Path,
        train: Sequence[Any],
        val: Sequence[Any] | None = None,
        *,
        progress: bool = True,
    ) -> None:
        if not train:
            raise KeditError("no training records")
        self.hparams = hparams
        self.out_dir = Path(out_dir)
        if val is None or len(val) == 0:
            train, val = split_validation(train, hparams.val_fraction, hparams.seed)
        self.train_data = list(train)
        self.val_data = list(val)
        self.progress = progress
        #: RNG for any randomness inside ``losses`` (negative sampling, dropout masks); saved in checkpoints
        self.rng = torch.Generator().manual_seed(hparams.seed)

    # -- what a method supplies -------------------------------------------------------------------
    @abstractmethod
    def trainable(self) -> dict[str, nn.Parameter]:
        """The parameters to train, by a stable name (the names of ``model.safetensors``)."""

    @abstractmethod
    def losses(self, batch: list[Any]) -> dict[str, torch.Tensor]:
        """Scalar losses of one batch: ``"edit"`` (required), ``"locality"`` (optional); other keys are logged."""

    def config(self) -> dict[str, Any]:
        """JSON-able description needed to rebuild the trained component (saved in ``config.json``)."""
        return {}

    def collate(self, records: list[Any]) -> list[Any]:
        """Turn a list of records into a batch (default: the list itself)."""
        return records

    # -- objective --------------------------------------------------------------------------------
    def objective(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """``edit_loss_weight * L_edit + locality_loss_weight * L_loc``."""
        if "edit" not in parts:
            raise KeditError(f"{type(self).__name__}.losses must return an 'edit' loss")
        total = self.hparams.edit_loss_weight * parts["edit"]
        if "locality" in parts:
            total = total + self.hparams.locality_loss_weight * parts["locality"]
        return total

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean losses over the validation records (``loss`` is the weighted objective)."""
        sums: dict[str, float] = {}
        n = 0
        bs = self.hparams.train_batch_size
        for start in range(0, len(self.val_data), bs):
            parts = self.losses(self.collate(self.val_data[start : start + bs]))
            parts = {**parts, "loss": self.objective(parts)}
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        return {k: v / max(1, n) for k, v in sums.items()}

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, max_steps: int | None = None, *, stop_after: int | None = None) -> TrainResult:
        """Train (resuming from ``<out>/state`` if present); write the best parameters to ``<out>``.

        ``stop_after`` ends the process-level run after that many steps without finishing (it
        simulates an interruption; the state on disk is that of the last checkpoint).
        """
        hp = self.hparams
        total = max_steps or hp.max_steps
        params = self.trainable()
        optim = torch.optim.Adam(list(params.values()), lr=hp.learning_rate)
        st = self._fresh_state(total)
        if (self.out_dir / STATE_DIR / "state.json").is_file():
            st = self._load_state(params, optim, total)
            log.info("resuming %s at step %d", self.out_dir, st["step"])
        t0 = time.perf_counter() - st["seconds"]
        bar = tqdm(total=total, initial=st["step"], desc=f"train {type(self).__name__}", disable=not self.progress)
        running: dict[str, float] = {}
        try:
            while st["step"] < total and not st["stopped_early"]:
                if stop_after is not None and st["step"] >= stop_after:
                    return self._result(st, time.perf_counter() - t0)
                batch = self.collate(self._next_records(st))
                optim.zero_grad(set_to_none=True)
                parts = self.losses(batch)
                loss = self.objective(parts)
                if not torch.isfinite(loss):
                    raise KeditError(f"training loss became {float(loss)} at step {st['step']}")
                loss.backward()
                if hp.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), hp.grad_clip)
                optim.step()
                st["step"] += 1
                for k, v in {**parts, "loss": loss}.items():
                    value = float(v.detach())
                    running[k] = 0.9 * running.get(k, value) + 0.1 * value
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in running.items()})
                if st["step"] % hp.val_every == 0 or st["step"] == total:
                    self._validation_step(st, params)
                if st["step"] % hp.checkpoint_every == 0 or st["step"] == total or st["stopped_early"]:
                    st["seconds"] = time.perf_counter() - t0
                    self._save_state(params, optim, st)
        finally:
            bar.close()
        self._write_final(st)
        return self._result(st, time.perf_counter() - t0)

    def _validation_step(self, st: dict[str, Any], params: dict[str, nn.Parameter]) -> None:
        metrics = self.validate()
        st["history"].append({"step": st["step"], **metrics})
        log.info("step %d validation %s", st["step"], metrics)
        if metrics["loss"] < st["best_val_loss"]:
            st["best_val_loss"], st["best_step"], st["bad_validations"] = metrics["loss"], st["step"], 0
            save_tensors({k: p.detach() for k, p in params.items()}, self._state_dir() / "best.safetensors")
        else:
            st["bad_validations"] += 1
            if st["bad_validations"] >= self.hparams.patience:
                st["stopped_early"] = True
                log.info("early stopping at step %d (best step %d)", st["step"], st["best_step"])

    def _next_records(self, st: dict[str, Any]) -> list[Any]:
        """The next ``train_batch_size`` records of the seeded per-epoch permutation."""
        n, bs = len(self.train_data), self.hparams.train_batch_size
        out = []
        while len(out) < bs:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.hparams.seed + st["epoch"]))
            take = order[st["cursor"] : st["cursor"] + bs - len(out)].tolist()
            out.extend(self.train_data[i] for i in take)
            st["cursor"] += len(take)
            if st["cursor"] >= n:
                st["epoch"], st["cursor"] = st["epoch"] + 1, 0
        return out

    # -- state on disk ----------------------------------------------------------------------------
    def _state_dir(self) -> Path:
        return self.out_dir / STATE_DIR

    def _fingerprint(self, total: int) -> str:
        data = json.dumps(
            {
                "hparams": self.hparams.to_dict(),
                "max_steps": total,
                "config": self.config(),
                "n_train": len(self.train_data),
                "n_val": len(self.val_data),
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(data.encode()).hexdigest()[:16]

    def _fresh_state(self, total: int) -> dict[str, Any]:
        torch.manual_seed(self.hparams.seed)
        return {
            "step": 0,
            "epoch": 0,
            "cursor": 0,
            "best_val_loss": math.inf,
            "best_step": 0,
            "bad_validations": 0,
            "stopped_early": False,
            "history": [],
            "seconds": 0.0,
            "fingerprint": self._fingerprint(total),
        }

    def _save_state(self, params: dict[str, nn.Parameter], optim: torch.optim.Optimizer, st: dict[str, Any]) -> None:
        tensors = {f"param/{k}": p.detach() for k, p in params.items()}
        names = {id(p): k for k, p in params.items()}
        index = {i: names[id(p)] for i, p in enumerate(optim.param_groups[0]["params"])}
        for i, slot in optim.state_dict()["state"].items():
            for key, value in slot.items():
                tensors[f"optim/{index[i]}/{key}"] = torch.as_tensor(value)
        tensors["rng/torch"] = torch.get_rng_state()
        tensors["rng/trainer"] = self.rng.get_state()
        save_tensors(tensors, self._state_dir() / "last.safetensors")
        atomic_write_text(self._state_dir() / "state.json", json.dumps(st, indent=1, default=str))

    def _load_state(self, params: dict[str, nn.Parameter], optim: torch.optim.Optimizer, total: int) -> dict[str, Any]:
        st = json.loads((self._state_dir() / "state.json").read_text(encoding="utf-8"))
        st["best_val_loss"] = float(st["best_val_loss"])
        if st.get("fingerprint") != self._fingerprint(total):
            raise KeditError(
                f"{self.out_dir} holds a training state for other hyperparameters or data; use a new --out"
            )
        tensors = load_file(str(self._state_dir() / "last.safetensors"))
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(tensors[f"param/{k}"])
        names = {id(p): k for k, p in params.items()}
        state = {}
        for i, p in enumerate(optim.param_groups[0]["params"]):
            prefix = f"optim/{names[id(p)]}/"
            slot = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if slot:
                state[i] = slot
        sd = optim.state_dict()
        optim.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
        torch.set_rng_state(tensors["rng/torch"])
        self.rng.set_state(tensors["rng/trainer"])
        return st

    def _write_final(self, st: dict[str, Any]) -> None:
        best = self._state_dir() / "best.safetensors"
        if not best.is_file():
            save_tensors({k: p.detach() for k, p in self.trainable().items()}, best)
        tensors = load_file(str(best))
        save_tensors(tensors, self.out_dir / MODEL_FILE)
        meta = {
            "trainer": type(self).__name__,
            "hparams": self.hparams.to_dict(),
            "config": self.config(),
            "steps": st["step"],
            "best_step": st["best_step"],
            "best_val_loss": st["best_val_loss"],
            "stopped_early": st["stopped_early"],
            "n_train": len(self.train_data),
            "n_val": len(self.val_data),
        }
        atomic_write_text(self.out_dir / CONFIG_FILE, json.dumps(meta, indent=2, default=str))

    def _result(self, st: dict[str, Any], seconds: float) -> TrainResult:
        return TrainResult(
            self.out_dir,
            st["step"],
            st["best_step"],
            float(st["best_val_loss"]),
            st["stopped_early"],
            seconds,
            list(st["history"]),
        )


def split_validation(records: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded split: ``fraction`` of the records (at least one) for validation."""
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(len(records) * fraction))) if len(records) > 1 else 0
    val = [records[i] for i in sorted(order[:n_val])]
    train = [records[i] for i in sorted(order[n_val:])]
    return train, val


def read_training_requests(path: str | Path, limit: int | None = None) -> tuple[list[Any], list[int], Path]:
    """Edit requests of a training file (a path or a shipped data set's name), one record at a time:
    (requests, indices of the malformed records skipped, the file read)."""
    from .datasets import resolve_data
    from .request import _parse_records, requests_from_records

    path = resolve_data(path)
    if not path.is_file():
        raise RequestError(f"data file not found: {path}")
    records = _parse_records(path.read_text(encoding="utf-8"), path)[:limit]
    out, skipped = [], []
    for i, rec in enumerate(records):
        try:
            out.extend(requests_from_records([rec]))
        except RequestError:
            skipped.append(i)
    return out, skipped, path


def load_training_requests(path: str | Path, limit: int | None = None) -> list[Any]:
    """Edit requests of a training file, skipping (and counting) malformed records."""
    out, skipped, path = read_training_requests(path, limit)
    if skipped:
        log.warning("%s: skipped %d malformed record(s) of %d", path, len(skipped), len(out) + len(skipped))
    if not out:
        raise RequestError(f"{path}: no usable records")
    return out


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Atomic safetensors write (contiguous CPU copies)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))


@dataclass(frozen=True)
class Checkpoint:
    """A trained checkpoint as read from disk: its tensors, its ``config.json`` and its id.

    ``id`` is the sha256 of the canonical ``config.json`` (sorted keys, no whitespace) and of every
    tensor (name, dtype, shape, bytes): everything that shapes an edit, so patches that record it
    name the editor exactly. Consumers must not change ``tensors`` in place (they may be cached).
    """

    directory: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    id: str

    @property
    def config(self) -> dict[str, Any]:
        """The ``config`` section of ``config.json`` (what rebuilds the trained component)."""
        return self.meta["config"]


def read_checkpoint(directory: str | Path) -> Checkpoint:
    """Read and check a checkpoint directory; anything malformed is a one-line :class:`CheckpointError`."""
    directory = Path(directory)
    weights, config = directory / MODEL_FILE, directory / CONFIG_FILE
    if not weights.is_file() or not config.is_file():
        raise CheckpointError(f"{directory} is not a kedit training checkpoint (needs {MODEL_FILE} and {CONFIG_FILE})")
    try:
        meta = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{config}: not valid JSON ({one_line(exc)})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{config}: needs a JSON object with a 'config' object")
    try:  # from bytes, not memory-mapped: a later rewrite of the file cannot pull the data away (SIGBUS)
        tensors = load_safetensors(weights.read_bytes())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own and builtin errors for a bad file
        raise CheckpointError(f"{weights}: not a readable safetensors file ({one_line(exc)})") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{weights}: tensor {name!r} holds NaN or infinite values")
    return Checkpoint(directory, tensors, meta, checkpoint_id(meta, tensors))


def checkpoint_id(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 (16 hex digits) of the canonical ``config.json`` and of every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(b"kedit-checkpoint-v1\0")
    h.update(json.dumps(meta, sort_keys=True, separators=(",", ":"), default=str).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A trained checkpoint: (tensors of ``model.safetensors``, ``config.json``), checked by :func:`read_checkpoint`."""
    ckpt = read_checkpoint(directory)
    return ckpt.tensors, ckpt.meta


class CheckpointCache:
    """The last checkpoint read, reused while neither file has changed (path, size, mtime, inode).

    Methods keep one per instance so that sequential edits do not re-read and re-hash the files.
    """

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._value: Checkpoint | None = None

    def read(self, directory: str | Path) -> Checkpoint:
        directory = Path(directory)
        try:
            stats = [(directory / f).stat() for f in (MODEL_FILE, CONFIG_FILE)]
        except OSError:
            return read_checkpoint(directory)  # missing files: read_checkpoint says what is wrong
        key = (str(directory.resolve()), *((s.st_size, s.st_mtime_ns, s.st_ino, s.st_dev) for s in stats))
        if key != self._key or self._value is None:
            self._value, self._key = read_checkpoint(directory), key
        return self._value


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
