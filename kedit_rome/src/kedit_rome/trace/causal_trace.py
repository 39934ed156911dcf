"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", Sec. 2.1, Fig. 1).

Three runs of the model on the prompt: the clean run gives ``P(o)`` of the answer ``o``; the
corrupted run adds noise to the subject's token embeddings and gives ``P*(o)``; the
corrupted-with-restoration run also copies chosen clean states back and gives
``P*_{clean h_i^(l)}(o)``. The indirect effect of a state is ``IE = P*_{clean h_i^(l)}(o) - P*(o)``,
averaged over noise samples. ``kind`` selects what is restored at (token ``i``, layer ``l``): the
layer's hidden state (``hidden``), or the MLP / attention outputs of a window of layers around
``l`` (``mlp`` / ``attn``), as in the paper's Fig. 1.

Many restorations share one forward pass: the batch holds the clean run in row 0 and ``samples``
corrupted rows per restoration; hooks copy row 0's state into the restored rows as the pass
reaches each layer.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from kedit_core.architecture import ArchitectureSpec, get_module, resolve_architecture
from kedit_core.ops.logits import final_hidden, head_logits, model_device, next_token_logits
from kedit_core.ops.tokens import split_prompt_target, subject_last_token

from .noise import embedding_std, subject_noise

log = logging.getLogger(__name__)

Kind = Literal["hidden", "mlp", "attn"]
KINDS: tuple[str, ...] = ("hidden", "mlp", "attn")
#: one restoration: the (token, layer) states copied from the clean run together
Restoration = tuple[tuple[int, int], ...]


@dataclass
class TraceResult:
    """Restored probabilities ``scores[token][layer]`` of the answer, and the run's facts."""

    prompt: str
    subject: str
    answer: str
    answer_id: int
    kind: str
    window: int
    samples: int
    noise_multiplier: float
    noise_std: float
    tokens: list[str]
    subject_range: tuple[int, int]
    layers: list[int]
    clean_prob: float
    corrupted_prob: float
    scores: list[list[float]] = field(default_factory=list)

    @property
    def effect(self) -> list[list[float]]:
        """Indirect effect ``P*_{clean h}(o) - P*(o)`` per (token, layer)."""
        return [[s - self.corrupted_prob for s in row] for row in self.scores]

    def peak_layers(self, token: int | None = None, top: int = 3) -> list[int]:
        """Layers of the largest effect at ``token`` (default: the subject's last token), best first."""
        row = self.scores[self.subject_range[1] - 1 if token is None else token]
        return sorted(range(len(row)), key=lambda i: -row[i])[:top]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["subject_range"] = list(self.subject_range)
        data["effect"] = self.effect
        data["subject_last_token"] = self.subject_range[1] - 1
        data["peak_layers_subject_last"] = self.peak_layers()
        return data


def subject_token_range(tokenizer: Any, prompt: str, subject: str) -> tuple[int, int]:
    """``[start, end)`` token indices of the subject's last occurrence in ``prompt``."""
    prompt = prompt.rstrip()
    end = subject_last_token(tokenizer, prompt, subject) + 1
    prefix = prompt[: prompt.rindex(subject)].rstrip()
    ids = tokenizer(prefix)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and ids[-1:] == [eos]:
        ids = ids[:-1]
    return min(len(ids), end - 1), end


def _hook_module(model: nn.Module, arch: ArchitectureSpec, kind: str, layer: int) -> nn.Module:
    if kind == "hidden":
        return arch.layer(model, layer)
    return arch.module(model, layer, arch.mlp if kind == "mlp" else arch.attn)


def _restore_hook(rows: torch.Tensor, toks: torch.Tensor):
    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        h = output[0] if isinstance(output, tuple) else output
        h[rows.to(h.device), toks.to(h.device)] = h[0, toks.to(h.device)]
        return output

    return hook


@torch.no_grad()
def restored_probabilities(
    model: nn.Module,
    arch: ArchitectureSpec,
    input_ids: list[int],
    subject_range: tuple[int, int],
    answer_id: int,
    noise: torch.Tensor,
    restorations: list[Restoration],
    kind: str = "hidden",
    max_rows: int = 512,
    progress: bool = False,
) -> tuple[float, list[float]]:
    """``P(o)`` of the clean run and ``P*_{restored}(o)`` per restoration (mean over noise samples).

    ``noise``: ``[samples, subject tokens, hidden]``. An empty restoration is the corrupted run.
    """
    samples = noise.shape[0]
    per_pass = max(1, (max_rows - 1) // samples)
    clean, probs = 0.0, []
    bar = tqdm(total=len(restorations), desc=f"tracing ({kind})", unit="cell", disable=not progress)
    for lo in range(0, len(restorations), per_pass):
        chunk = restorations[lo : lo + per_pass]
        p = _one_pass(model, arch, input_ids, subject_range, answer_id, noise, chunk, kind)
        clean = float(p[0])
        probs.extend(p[1:].view(len(chunk), samples).mean(1).tolist())
        bar.update(len(chunk))
    bar.close()
    return clean, probs


def _one_pass(model, arch, input_ids, subject_range, answer_id, noise, restorations, kind) -> torch.Tensor:
    samples = noise.shape[0]
    device = model_device(model)
    batch = 1 + samples * len(restorations)
    ids = torch.tensor(input_ids, device=device)[None].expand(batch, -1)
    s0, s1 = subject_range
    per_layer: dict[int, list[tuple[int, int]]] = {}
    for r, states in enumerate(restorations):
        for tok, layer in states:
            for s in range(samples):
                per_layer.setdefault(layer, []).append((1 + r * samples + s, tok))

    def corrupt(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        eps = noise.to(output.device, output.dtype).repeat(len(restorations), 1, 1)
        output[1:, s0:s1] += eps
        return output

    handles = [get_module(model, arch.embed).register_forward_hook(corrupt)]
    try:
        for layer, pairs in per_layer.items():
            idx = torch.tensor(pairs, dtype=torch.long)
            handles.append(
                _hook_module(model, arch, kind, layer).register_forward_hook(_restore_hook(idx[:, 0], idx[:, 1]))
            )
        hidden = final_hidden(model, ids, torch.ones_like(ids))[:, -1]
    finally:
        for h in handles:
            h.remove()
    out = []
    for lo in range(0, batch, 64):
        logp = torch.log_softmax(head_logits(model, hidden[lo : lo + 64]).float(), -1)
        out.append(logp[:, answer_id].exp().cpu())
    return torch.cat(out)


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The ``window`` layers centred on ``layer`` (clipped to the model), as in the paper's Fig. 1."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def causal_trace(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    subject: str,
    *,
    answer: str | None = None,
    kind: Kind = "hidden",
    samples: int = 10,
    noise: float = 3.0,
    window: int = 10,
    seed: int = 0,
    arch: ArchitectureSpec | None = None,
    max_rows: int = 512,
    progress: bool = False,
) -> TraceResult:
    """Trace ``prompt``: the restored probability of the answer for every (token, layer).

    ``answer``: the expected completion (its first token is traced); default the model's own greedy
    next token. ``noise``: the multiple of the embeddings' std used as the noise std (3 in the
    paper). Tokens before the subject never see the noise in a causal model, so restoring them
    gives the corrupted probability; they are filled in without a forward pass.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if subject not in prompt:
        raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    arch = arch or resolve_architecture(model)
    prompt = prompt.rstrip()
    ids = list(tokenizer(prompt)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and len(ids) > 1 and ids[-1] == eos:
        ids = ids[:-1]
    s0, s1 = subject_token_range(tokenizer, prompt, subject)
    answer_id = _answer_id(model, tokenizer, prompt, ids, answer)
    sigma = embedding_std(model, arch)
    hidden = model.get_input_embeddings().weight.shape[1]
    eps = subject_noise(samples, s1 - s0, hidden, noise * sigma, seed)
    n_layers = arch.num_layers(model)
    cells = [(t, layer) for t in range(s0, len(ids)) for layer in range(n_layers)]
    if kind == "hidden":
        restorations: list[Restoration] = [((t, layer),) for t, layer in cells]
    else:
        restorations = [tuple((t, w) for w in window_layers(layer, window, n_layers)) for t, layer in cells]
    clean, probs = restored_probabilities(
        model, arch, ids, (s0, s1), answer_id, eps, [()] + restorations, kind, max_rows, progress=progress
    )
    corrupted = probs[0]
    scores = [[corrupted] * n_layers for _ in range(len(ids))]
    for (t, layer), p in zip(cells, probs[1:], strict=True):
        scores[t][layer] = p
    log.info("traced %r (%s): P(clean)=%.4f P(corrupted)=%.4f", prompt, kind, clean, corrupted)
    return TraceResult(
        prompt=prompt,
        subject=subject,
        answer=tokenizer.decode([answer_id]),
        answer_id=answer_id,
        kind=kind,
        window=window if kind != "hidden" else 1,
        samples=samples,
        noise_multiplier=noise,
        noise_std=noise * sigma,
        tokens=[tokenizer.decode([i]) for i in ids],
        subject_range=(s0, s1),
        layers=list(range(n_layers)),
        clean_prob=clean,
        corrupted_prob=corrupted,
        scores=scores,
    )


@torch.no_grad()
def _answer_id(model: nn.Module, tokenizer: Any, prompt: str, ids: list[int], answer: str | None) -> int:
    if answer is not None:
        return split_prompt_target(tokenizer, prompt, answer)[1][0]
    return int(next_token_logits(model, ids).argmax(-1))
