"""The Strategy every editing method implements: requests in, an :class:`~kedit_core.edit.Edit` out.

The method computes typed tensors (:meth:`EditMethod.compute_edit`); the core turns them into a
:class:`~kedit_core.patch.Patch` with its provenance (:func:`~kedit_core.edit.build_patch`), applies it,
or hands a module-state / memory patch to :meth:`EditMethod.attach` with a :class:`ModelContext`.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from .errors import HparamsError, KeditError, PatchError
from .hparams import Hyperparams, preset_files

if TYPE_CHECKING:
    from torch import nn

    from .architecture import ArchitectureSpec
    from .edit import Edit
    from .patch import Patch
    from .request import EditRequest
    from .trainer import BaseTrainer


class PatchKind(str, enum.Enum):
    """What a method's patch changes: base weights, wrapped modules, or an external memory."""

    WEIGHT_DELTA = "weight_delta"
    MODULE_STATE = "module_state"
    MEMORY = "memory"


@dataclass
class EditContext:
    """Runtime facts a method may need beyond the model and its hyperparameters."""

    model_id: str = "unknown"
    model_fingerprint: str = ""
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "kedit")
    checkpoint: Path | None = None
    progress: bool = False
    seed: int = 0


@dataclass
class ModelContext:
    """The model a patch is attached to, with what a method needs to reach into it."""

    model: nn.Module
    arch: ArchitectureSpec
    #: the model's tokenizer; None when the caller has none (methods that need it refuse the patch)
    tokenizer: Any = None


class Detach(Protocol):
    def __call__(self) -> None: ...


class EditMethod(ABC):
    """Base class of editing methods. Subclasses set the class attributes and ``compute_patch``."""

    name: ClassVar[str]
    hparams_class: ClassVar[type[Hyperparams]] = Hyperparams
    supports_batch: ClassVar[bool] = False
    supports_sequential: ClassVar[bool] = True
    requires_training: ClassVar[bool] = False
    #: each patch of a sequential chain carries the whole state (the newest alone reproduces the chain)
    cumulative_patches: ClassVar[bool] = False
    #: what the edit changes, for tables: "FFN", "FFN+attention", "codebook", "memory", "in-context", ...
    edit_area: ClassVar[str] = "FFN"
    kind: ClassVar[PatchKind] = PatchKind.WEIGHT_DELTA
    #: the :class:`~kedit_core.architecture.ArchitectureSpec` role (``"mlp_out"``, ``"attn"``, ...) of the
    #: modules this method's patches wrap. Before ``attach`` runs, core refuses a patch whose ``modules`` are
    #: not modules of that role or not exactly the modules whose parameters it fingerprints. ``None``: the
    #: method wraps no module (memory methods); core then refuses any patch that names modules, and every
    #: module-state patch.
    wraps: ClassVar[str | None] = None
    #: the package whose ``hparams/<name>/<model>.yaml`` files are this method's presets
    preset_package: ClassVar[str | None] = None

    @abstractmethod
    def compute_edit(
        self,
        model: nn.Module,
        tokenizer: Any,
        requests: list[EditRequest],
        hparams: Hyperparams,
        arch: ArchitectureSpec,
        ctx: EditContext,
    ) -> Edit:
        """Compute the edit for ``requests``; must leave ``model`` exactly as it found it."""

    def compute_patch(
        self,
        model: nn.Module,
        tokenizer: Any,
        requests: list[EditRequest],
        hparams: Hyperparams,
        arch: ArchitectureSpec,
        ctx: EditContext,
        parent: str | None = None,
    ) -> Patch:
        """The core's side, not for methods to override: :meth:`compute_edit`, then the patch with its
        provenance (:func:`~kedit_core.edit.build_patch`), fingerprinted on ``model`` as it is."""
        from .edit import build_patch

        edit = self.compute_edit(model, tokenizer, requests, hparams, arch, ctx)
        return build_patch(edit, method=self, model=model, hparams=hparams, requests=requests, ctx=ctx, parent=parent)

    def attach(self, target: ModelContext, patch: Patch) -> Detach:
        """Install a module-state or memory patch on ``target.model``; return a callable that removes it.

        Must validate everything before changing the model (the core has already checked that the
        patch's modules are this method's kind, see :attr:`wraps`). Weight-delta methods never need it.
        """
        raise PatchError(f"method {self.name!r} does not apply {patch.kind.value} patches")

    def trainer(
        self,
        model: nn.Module,
        tokenizer: Any,
        hparams: Hyperparams,
        arch: ArchitectureSpec,
        ctx: EditContext,
        *,
        train: list[EditRequest],
        val: list[EditRequest] | None,
        out_dir: Path,
    ) -> BaseTrainer:
        """A method with trained components (``requires_training``) returns the
        :class:`~kedit_core.trainer.BaseTrainer` that writes its checkpoint to ``out_dir`` -- what
        ``ctx.checkpoint`` (``--checkpoint``) names at edit time. ``Editor.trainer`` sets it up."""
        raise KeditError(f"method {self.name!r} has nothing to train")

    # -- hyperparameters ------------------------------------------------------------------------
    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        return {
            "batch": cls.supports_batch,
            "sequential": cls.supports_sequential,
            "training": cls.requires_training,
            "edit_area": cls.edit_area,
            "kind": cls.kind.value,
            "wraps": cls.wraps,
        }

    @classmethod
    def presets(cls) -> dict[str, Any]:
        package = cls.preset_package or cls.__module__.split(".")[0]
        return preset_files(package, cls.name)

    @classmethod
    def load_hparams(
        cls, source: str | Path | dict | Hyperparams | None = None, model_key: str | None = None
    ) -> Hyperparams:
        """Hyperparameters from an object, a mapping, a file, or the packaged preset for ``model_key``."""
        hp_cls = cls.hparams_class
        if isinstance(source, hp_cls):
            hp = source
        elif isinstance(source, Hyperparams):
            hp = hp_cls.from_dict(source.to_dict())
        elif isinstance(source, dict):
            hp = hp_cls.from_dict(source)
        elif source is not None:
            hp = hp_cls.from_file(source)
        else:
            presets = cls.presets()
            preset = presets.get(model_key or "") or presets.get("default")
            if preset is None:
                hp = hp_cls()
            else:
                hp = hp_cls.from_file(Path(str(preset)))
        if hp.method is not None and hp.method.lower() != cls.name:
            raise HparamsError(f"hyperparameters are for method {hp.method!r}, not {cls.name!r}")
        return hp
