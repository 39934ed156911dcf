"""The Strategy every editing method implements: requests in, a :class:`~kedit_core.patch.Patch` out."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from .errors import HparamsError, PatchError
from .hparams import Hyperparams, preset_files

if TYPE_CHECKING:
    from torch import nn

    from .architecture import ArchitectureSpec
    from .patch import Patch
    from .request import EditRequest


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
    #: patches already applied to the model by this editing session (sequential editing), oldest first
    applied: list[Patch] = field(default_factory=list)


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
    def compute_patch(
        self,
        model: nn.Module,
        tokenizer: Any,
        requests: list[EditRequest],
        hparams: Hyperparams,
        arch: ArchitectureSpec,
        ctx: EditContext,
    ) -> Patch:
        """Compute the edit for ``requests``; must leave ``model`` exactly as it found it."""

    def attach(self, model: nn.Module, patch: Patch, arch: ArchitectureSpec) -> Detach:
        """Install a module-state or memory patch; return a callable that removes it.

        Must validate everything before changing the model. Weight-delta methods never need it.
        """
        raise PatchError(f"method {self.name!r} does not apply {patch.kind.value} patches")

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
    def load_hparams(cls, source: str | Path | dict | Hyperparams | None = None, model_key: str | None = None) -> Hyperparams:
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
