"""The bench configuration: which methods, which data subsets, how many records.

``zsre`` and ``counterfact`` name a data set shipped with kedit-core (``zsre``, ``counterfact``, ...) or a
file; relative file paths are resolved against the configuration file's directory.

A sweep is the same file with ``models:`` (several models) and ``sweep:`` (per method, values of some
hyperparameters): every combination is a variant of the method with jobs of its own, named in the
tables like ``rome[clamp_norm_factor=1.5]`` (and ``@ model`` when there are several models).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..datasets import shipped_path
from ..errors import KeditError
from ..hparams import _format_errors, read_mapping_file


class MethodOptions(BaseModel):
    """Per-method settings; every field is optional."""

    model_config = ConfigDict(extra="forbid")

    hparams: str | dict[str, Any] | None = None
    checkpoint: str | None = None
    #: cap on the records of every job of this method (slow methods); shown as ``n`` in the tables
    max_records: int | None = Field(default=None, ge=1)
    #: jobs to leave out for this method: any of zsre, counterfact, batch, sequential
    skip: list[str] = Field(default_factory=list)
    #: why the defaults are overridden (printed under the tables)
    note: str | None = None
    #: memory a job of this method reserves on a Ray cluster (default: the bench's ``memory_mb``)
    memory_mb: int | None = Field(default=None, ge=1)


JOB_KINDS = ("counterfact", "batch", "zsre", "sequential")


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "gemma3-270m"
    #: several models: every job runs on each (``model`` is then ignored)
    models: list[str] = Field(default_factory=list)
    device: str = "cpu"
    dtype: str = "float32"
    #: registered method names; empty means every installed method
    methods: list[str] = Field(default_factory=list)
    zsre: str = "zsre"
    counterfact: str = "counterfact"
    #: Table 2: the first ``zsre_n`` ZsRE records (from ``zsre_start``), each edit from the unedited model
    zsre_n: int = Field(default=50, ge=1)
    zsre_start: int = Field(default=0, ge=0)
    #: score the generation protocol (greedy answers, fluency, degeneracy) in the ZsRE, CounterFact and
    #: sequential jobs besides the teacher-forced one (the timing-only batch job never generates)
    generation: bool = True
    #: CounterFact ES/PS/NS table; its first ``speed_n`` edits give Table 1's time for 10 edits
    counterfact_n: int = Field(default=30, ge=1)
    speed_n: int = Field(default=10, ge=1)
    #: the sequential figure: this many ZsRE records edited one after another
    sequential_n: int = Field(default=30, ge=1)
    #: the data set edited one after another (default: ``zsre`` from ``zsre_start``; a CounterFact set adds
    #: efficacy and paraphrase scores to the figure, from its first record)
    sequential_data: str | None = None

    def sequential_subset(self) -> tuple[str, int]:
        """(data set, first record) of the sequential job."""
        if self.sequential_data is None or self.sequential_data == self.zsre:
            return self.zsre, self.zsre_start
        return self.sequential_data, 0

    #: torch threads in each job (None: torch's default)
    threads: int | None = Field(default=None, ge=1)
    #: jobs running at once, each in its own process (with ``threads: 1``, one per core)
    workers: int = Field(default=1, ge=1)
    #: memory a job reserves on a Ray cluster, in MB (default: estimated from earlier results of the
    #: same method and job kind under ``OUT/jobs``, else nothing reserved)
    memory_mb: int | None = Field(default=None, ge=1)
    options: dict[str, MethodOptions] = Field(default_factory=dict)
    #: method -> {hyperparameter: [values]}: one variant per combination, over the method's hparams
    sweep: dict[str, dict[str, list[Any]]] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path | None) -> BenchConfig:
        if path is None:
            return cls()
        path = Path(path)
        data = read_mapping_file(path)
        if not isinstance(data, dict):
            raise KeditError(f"{path}: a bench configuration must be a mapping")
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            raise KeditError(f"{path}: {_format_errors(exc)}") from None
        return config.resolved(path.parent)

    def resolved(self, base: Path) -> BenchConfig:
        """Data paths made absolute against ``base``; names of shipped data sets stay names."""

        def fix(p: str) -> str:
            q = Path(p).expanduser()
            if shipped_path(p) is not None and not (base / q).exists():
                return p
            return str(q if q.is_absolute() else (base / q).resolve())

        opts = {}
        for name, o in self.options.items():
            hp = o.hparams
            if isinstance(hp, str):
                hp = fix(hp)
            opts[name] = o.model_copy(update={"hparams": hp, "checkpoint": fix(o.checkpoint) if o.checkpoint else None})
        return self.model_copy(update={"zsre": fix(self.zsre), "counterfact": fix(self.counterfact), "options": opts})

    @field_validator("sweep")
    @classmethod
    def _no_empty_sweeps(cls, sweep: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        for method, grid in sweep.items():
            empty = [name for name, values in grid.items() if not values]
            if not grid or empty:
                raise ValueError(f"sweep of {method!r}: give at least one value for {empty or 'a hyperparameter'}")
        return sweep

    def option(self, method: str) -> MethodOptions:
        return self.options.get(method, MethodOptions())

    def model_names(self) -> list[str]:
        return self.models or [self.model]

    def variants(self, method: str) -> list[dict[str, Any]]:
        """The hyperparameter overrides of each variant of ``method``: ``[{}]`` when it is not swept."""
        grid = self.sweep.get(method, {})
        names = list(grid)
        return [dict(zip(names, values, strict=True)) for values in itertools.product(*grid.values())] or [{}]
