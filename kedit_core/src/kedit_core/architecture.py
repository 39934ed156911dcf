"""Where each model family keeps its layers, MLPs, attention and head -- architectures as data.

Method code never mentions a model family: it asks the :class:`ArchitectureSpec` resolved for the
model (``resolve_architecture(model)``) for module paths and for structural facts such as whether
the MLP output is normalized before it joins the residual stream (Gemma 2/3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .errors import ArchitectureError, HparamsError
from .offload import onloaded, read_value, write_value

#: fields of :class:`ArchitectureSpec` naming one module of the model, or one module (or several) per layer
MODEL_ROLES = ("embed", "final_norm", "lm_head")
LAYER_ROLES = ("attn", "attn_out", "mlp", "mlp_in", "mlp_out", "post_mlp_norm")


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module paths of one HF architecture family.

    Paths of ``layers``, ``embed``, ``final_norm`` and ``lm_head`` are relative to the model; the
    others are relative to one decoder layer.
    """

    names: tuple[str, ...]
    layers: str
    embed: str
    final_norm: str
    lm_head: str
    attn: str
    attn_out: str
    mlp: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    weight_layout: Literal["linear", "conv1d"] = "linear"
    #: the MLP output passes through this norm (relative to the layer) before the residual add
    post_mlp_norm: str | None = None
    #: attention and MLP read the same residual (GPT-J, GPT-NeoX)
    parallel_attn_mlp: bool = False
    #: config attributes that may hold the number of positions the model accepts (first one set wins)
    positions_config: tuple[str, ...] = ("max_position_embeddings", "n_positions", "n_ctx")

    @property
    def mlp_output_normalized(self) -> bool:
        return self.post_mlp_norm is not None

    # -- module access --------------------------------------------------------------------------
    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return get_module(model, self.layers)  # type: ignore[return-value]

    def num_layers(self, model: nn.Module) -> int:
        return len(self.layer_list(model))

    def layer(self, model: nn.Module, index: int) -> nn.Module:
        layers = self.layer_list(model)
        if not -len(layers) <= index < len(layers):
            raise ArchitectureError(f"layer {index} out of range: the model has {len(layers)} layers")
        return layers[index]

    def check_layer(self, model: nn.Module, index: int, what: str = "layer") -> int:
        """The layer index of hyperparameter ``what`` as ``0..n-1``; see :meth:`check_layers`."""
        return self.check_layers(model, [index], what)[0]

    def check_layers(self, model: nn.Module, indices: Iterable[int], what: str = "layers") -> list[int]:
        """Layer indices of hyperparameter ``what``, checked against this model and returned as ``0..n-1``.

        The one rule for every method: ``0..n-1`` count from the first layer, ``-n..-1`` from the end
        (``-1`` is the last layer, as in Python). Anything else, and a layer named twice (``[1, 1]``, or
        ``[-1, 3]`` on a 4-layer model), is a one-line :class:`HparamsError` naming ``what``.
        """
        n = self.num_layers(model)
        out: list[int] = []
        given = list(indices)
        for index in given:
            if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
                raise HparamsError(
                    f"hyperparameter {what!r}: layer {index!r} is out of range for this model's {n} layers "
                    f"(valid: 0..{n - 1}, or -{n}..-1 counting from the end)"
                )
            layer = index % n
            if layer in out:
                raise HparamsError(f"hyperparameter {what!r}: layer {layer} is named twice in {given}")
            out.append(layer)
        return out

    def max_positions(self, model: nn.Module) -> int | None:
        """How many token positions the model accepts (its config's ``max_position_embeddings`` or
        equivalent, see ``positions_config``), or None where the config does not say."""
        config = getattr(model, "config", None)
        for attr in self.positions_config:
            value = getattr(config, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    def layer_path(self, index: int, rel: str = "") -> str:
        return f"{self.layers}.{index}" + (f".{rel}" if rel else "")

    def module(self, model: nn.Module, index: int, rel: str) -> nn.Module:
        return get_module(model, self.layer_path(index, rel))

    def role_paths(self, model: nn.Module, role: str) -> list[str]:
        """Every module path of an architecture role -- a field naming modules: ``mlp_out``, ``attn``,
        ``mlp_in`` (one per layer) or ``embed``, ``final_norm``, ``lm_head`` (one per model)."""
        if role in MODEL_ROLES:
            return [getattr(self, role)]
        if role not in LAYER_ROLES:
            known = ", ".join(MODEL_ROLES + LAYER_ROLES)
            raise ArchitectureError(f"unknown architecture role {role!r} (known: {known})")
        value = getattr(self, role)
        rels = value if isinstance(value, tuple) else (value,) if value else ()
        return [self.layer_path(i, rel) for i in range(self.num_layers(model)) for rel in rels]

    def mlp_out_param(self, index: int) -> str:
        """Full parameter name of the MLP down-projection weight at ``index`` (ROME's W_out)."""
        return self.layer_path(index, self.mlp_out) + ".weight"

    def weight(self, model: nn.Module, param: str) -> torch.Tensor:
        """A weight's value (:func:`weight_value`) as an ``[out, in]`` matrix view, whatever the storage
        layout. For reading: change a weight with :func:`write_weight`."""
        p = weight_value(model, param)
        return p.T if self.weight_layout == "conv1d" and p.ndim == 2 else p

    def to_param_layout(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        """Turn an ``[out, in]`` update into the parameter's storage layout."""
        return delta_out_in.T.contiguous() if self.weight_layout == "conv1d" else delta_out_in

    def lowrank_to_param_layout(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-rank factors of an ``[out, in]`` update (``a @ b``) in the parameter's layout."""
        if self.weight_layout == "conv1d":
            return b.T.contiguous(), a.T.contiguous()
        return a, b


def get_module(model: nn.Module, path: str) -> nn.Module:
    """Resolve a dotted module path (``model.layers.3.mlp``) with a clear error."""
    if not path:
        return model
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise ArchitectureError(f"module {path!r} not found in {type(model).__name__}: {exc}") from None


def get_parameter(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter object ``name``; in a model accelerate offloaded (``device_map``) it may be a ``meta``
    placeholder: read and write its value with :func:`weight_value` and :func:`write_weight`."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise ArchitectureError(f"parameter {name!r} not found in {type(model).__name__}") from None


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return get_parameter(model, name)
    except ArchitectureError:
        try:
            return model.get_buffer(name)
        except AttributeError:
            raise ArchitectureError(f"parameter {name!r} not found in {type(model).__name__}") from None


def weight_value(model: nn.Module, name: str) -> torch.Tensor:
    """The value of parameter (or buffer) ``name`` as the model's next forward uses it, wherever it
    lives: the parameter itself, or, where accelerate offloaded it to CPU memory or disk (a ``meta``
    placeholder, loaded by a hook at forward time), the value in the hook's offload map
    (:mod:`kedit_core.offload`). Do not change it in place: use :func:`write_weight`."""
    return read_value(model, name, _tensor(model, name))


def write_weight(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Write ``value`` into parameter (or buffer) ``name`` where it lives -- in place, and into
    accelerate's offload map for an offloaded weight -- so that the next forward uses it."""
    write_value(model, name, _tensor(model, name), value)


@contextlib.contextmanager
def trainable_weights(model: nn.Module, names: list[str]) -> Iterator[list[nn.Parameter]]:
    """The parameters ``names``, trainable inside the block (``requires_grad``): real tensors even where
    accelerate offloaded them (their modules hold copies for the block, :func:`kedit_core.offload.onloaded`).
    On exit each one's value, gradient flag and gradient are what they were, bit for bit."""
    with onloaded(model, names):
        params = [get_parameter(model, n) for n in names]
        originals = [p.detach().clone() for p in params]
        flags = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(True)
            yield params
        finally:
            with torch.no_grad():
                for p, o, flag in zip(params, originals, flags, strict=True):
                    p.copy_(o)
                    p.requires_grad_(flag)
                    p.grad = None


def model_architecture_names(model: nn.Module) -> list[str]:
    names = list(getattr(getattr(model, "config", None), "architectures", None) or [])
    cls = type(model).__name__
    if cls not in names:
        names.append(cls)
    return names


def resolve_architecture(model: nn.Module) -> ArchitectureSpec:
    """The registered spec for ``model`` (matched on ``config.architectures``, then its class name)."""
    from .plugins import get_registry

    registry = get_registry()
    names = model_architecture_names(model)
    for name in names:
        if name in registry.architectures:
            return registry.architectures[name]
    known = ", ".join(sorted(registry.architectures))
    raise ArchitectureError(
        f"architecture {names[0]!r} is not registered (known: {known}). Register an ArchitectureSpec "
        "for it from a plugin: implement the hook register_architectures(register) and call "
        f"register(ArchitectureSpec(names=({names[0]!r},), layers=..., mlp_out=..., ...))"
    )


LLAMA_LIKE = dict(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    attn="self_attn",
    attn_out="self_attn.o_proj",
    mlp="mlp",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
)

BUILTIN_ARCHITECTURES: tuple[ArchitectureSpec, ...] = (
    ArchitectureSpec(
        names=("GPT2LMHeadModel",),
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        attn="attn",
        attn_out="attn.c_proj",
        mlp="mlp",
        mlp_in=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        weight_layout="conv1d",
    ),
    ArchitectureSpec(
        names=("GPTJForCausalLM",),
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        attn="attn",
        attn_out="attn.out_proj",
        mlp="mlp",
        mlp_in=("mlp.fc_in",),
        mlp_out="mlp.fc_out",
        parallel_attn_mlp=True,
    ),
    ArchitectureSpec(
        names=("GPTNeoXForCausalLM",),
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="embed_out",
        attn="attention",
        attn_out="attention.dense",
        mlp="mlp",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        parallel_attn_mlp=True,
    ),
    ArchitectureSpec(names=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"), **LLAMA_LIKE),
    ArchitectureSpec(
        names=("Gemma3ForCausalLM", "Gemma2ForCausalLM"),
        post_mlp_norm="post_feedforward_layernorm",
        **LLAMA_LIKE,
    ),
)
