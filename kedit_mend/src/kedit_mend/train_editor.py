"""Training an editor network (MEND's g or KE's hyper-network) with :class:`~kedit_core.trainer.BaseTrainer`.

One training step, for a batch of edits ``z_i = (x_i, y_i)`` with a paraphrase ``x'_i`` and an
unrelated locality input ``x_loc,i`` (MEND Alg. 1, KE Sec. 3):

1. the fine-tuning gradient of ``-log p_θ(y_i | x_i)`` at the edited weights, as rank-one terms
   ``(u_t, δ_t)`` (:mod:`.gradient_factors`; inputs to the editor, not differentiated through);
2. the editor maps them to ``Δ_i`` (per edit, or per group of ``train_group_size`` edits summed);
3. with ``θ + Δ_i``:  ``L_edit = mean NLL of y_i given x_i and x'_i``,
   ``L_loc = KL(p_θ(·|x_loc,i) || p_{θ+Δ_i}(·|x_loc,i))`` at the locality answer's positions;
   ``L = c_edit L_edit + c_loc L_loc`` (MEND eq. 4; :meth:`BaseTrainer.objective`).
   With ``continuation_loss_weight`` ``c_cont > 0``, ``+ c_cont L_cont``: the same KL on the text
   ``x_i y_i`` followed by the unedited model's greedy continuation ``c_i`` of it, at the position after
   ``y_i`` and along ``c_i`` (:func:`continuations`) -- teacher-forced edit losses say nothing of what
   follows the target, and an editor trained on them alone makes the model loop on it.

Only layers from the first edited one onwards are run: the hidden states entering that layer, the
unedited model's final states and top-k tokens at the target positions, and the gradient factors of
each edit are computed once per record and cached (:class:`PairCache`). With ``train_vocab_sample``
the softmaxes of step 3 run over a sampled vocabulary (the targets, the unedited model's top-k
tokens at every scored position, and that many uniformly drawn tokens) instead of all 262k Gemma
tokens -- a sampled softmax, training only; editing and evaluation use the full vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from kedit_core.architecture import ArchitectureSpec
from kedit_core.ops.logits import final_hidden, head_logits, logits_at, model_device
from kedit_core.ops.tokens import EncodedPairs, encode_pairs, pad_right
from kedit_core.request import EditRequest
from kedit_core.trainer import BaseTrainer, TrainResult, locality_kl, save_tensors

from .forward import capture_layer_input, edited_forward, start_from_layer
from .gradient_factors import GradientFactors, gradient_factors

log = logging.getLogger(__name__)

Pair = tuple[str, str]


class FixedGroups:
    """Pairs are computed in fixed groups: padding changes float results in the last bits, so fixed
    groups make the caches -- and a resumed training run -- independent of the order of access."""

    def __init__(self) -> None:
        self.groups: list[list[Pair]] = []
        self.home: dict[Pair, int] = {}

    def add(self, groups: list[list[Pair]]) -> None:
        for group in groups:
            group = [p for p in dict.fromkeys(group) if p not in self.home]
            for p in group:
                self.home[p] = len(self.groups)
            self.groups.append(group)

    def missing(self, pairs: list[Pair], cached: Any) -> list[list[Pair]]:
        """The groups (or singletons) holding pairs of ``pairs`` not in ``cached``; only their uncached pairs."""
        missing = [p for p in dict.fromkeys(pairs) if p not in cached]
        homes = sorted({self.home[p] for p in missing if p in self.home})
        groups = [self.groups[g] for g in homes] + [[p] for p in missing if p not in self.home]
        return [[p for p in g if p not in cached] for g in groups]


class PairCache:
    """Per (prompt, target): token ids, hidden states entering layer ``start``, final states at the target."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        arch: ArchitectureSpec,
        start: int,
        top_k: int = 64,
        batch_size: int = 16,
    ) -> None:
        self.model, self.tokenizer, self.arch, self.start, self.batch_size = model, tokenizer, arch, start, batch_size
        self.top_k = top_k
        self.entries: dict[Pair, dict[str, Any]] = {}
        self.groups = FixedGroups()

    @torch.no_grad()
    def ensure(self, pairs: list[Pair]) -> None:
        for group in self.groups.missing(pairs, self.entries):
            self._compute(group)

    def _compute(self, pairs: list[Pair]) -> None:
        device = model_device(self.model)
        for s in range(0, len(pairs), self.batch_size):
            chunk = pairs[s : s + self.batch_size]
            enc = encode_pairs(self.tokenizer, [p for p, _ in chunk], [t for _, t in chunk], device)
            with capture_layer_input(self.model, self.arch, self.start) as seen:
                h = final_hidden(self.model, enc.input_ids, enc.attention_mask)
            h0 = seen[0]
            r, c = enc.target_positions()
            top = (
                head_logits(self.model, h[r.to(h.device), c.to(h.device)])
                .topk(min(self.top_k, self.model.get_output_embeddings().weight.shape[0]), dim=-1)
                .indices.cpu()
            )
            k = 0
            for i, pair in enumerate(chunk):
                plen, tids = enc.prompt_lens[i], enc.target_ids[i]
                n = plen + len(tids)
                self.entries[pair] = {
                    "ids": enc.input_ids[i, :n].cpu(),
                    "plen": plen,
                    "tids": tids,
                    "h0": h0[i, :n].cpu(),
                    "hfin": h[i, plen - 1 : plen - 1 + len(tids)].cpu(),
                    "top": top[k : k + len(tids)],
                }
                k += len(tids)

    def batch(self, pairs: list[Pair]) -> tuple[EncodedPairs, torch.Tensor]:
        """A right-padded batch of cached pairs and the hidden states entering layer ``start``."""
        self.ensure(pairs)
        device = model_device(self.model)
        es = [self.entries[p] for p in pairs]
        width = max(len(e["ids"]) for e in es)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(es), width), pad, dtype=torch.long)
        mask = torch.zeros((len(es), width), dtype=torch.long)
        h0 = torch.zeros((len(es), width, es[0]["h0"].shape[-1]), dtype=es[0]["h0"].dtype)
        for i, e in enumerate(es):
            n = len(e["ids"])
            ids[i, :n], mask[i, :n], h0[i, :n] = e["ids"], 1, e["h0"]
        enc = EncodedPairs(ids.to(device), mask.to(device), [e["plen"] for e in es], [e["tids"] for e in es])
        return enc, h0.to(device)

    def base_final(self, pairs: list[Pair]) -> torch.Tensor:
        """The unedited model's final hidden states at every target position, concatenated."""
        return torch.cat([self.entries[p]["hfin"] for p in pairs]).to(model_device(self.model))

    def base_top(self, pairs: list[Pair]) -> torch.Tensor:
        """The unedited model's top-k token ids at every target position, flattened."""
        return torch.cat([self.entries[p]["top"].reshape(-1) for p in pairs])


def vocab_logits(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the tokens ``ids`` only (all tokens when ``None``), soft-capped like the model's."""
    if ids is None:
        return head_logits(model, hidden)
    head = model.get_output_embeddings()
    ids = ids.to(head.weight.device)
    bias = head.bias[ids] if getattr(head, "bias", None) is not None else None
    logits = torch.nn.functional.linear(hidden, head.weight[ids], bias)
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def training_pairs(
    requests: list[EditRequest], continuation: dict[Pair, str] | None = None
) -> tuple[list[Pair], list[Pair], list[int], list[Pair], list[int]]:
    """Edit pairs, paraphrase pairs (+ owning request), locality pairs (+ owning request); the locality
    pairs end with the continuation pairs ``(x_i y_i, c_i)`` of the edits ``continuation`` holds."""
    edits = [(r.prompt, r.target_new) for r in requests]
    gen, gen_owner, loc, loc_owner = [], [], [], []
    for i, r in enumerate(requests):
        if r.rephrase_prompts:
            gen.append((r.rephrase_prompts[0], r.target_new))
            gen_owner.append(i)
        if r.locality:
            loc.append((r.locality[0].prompt, r.locality[0].target))
            loc_owner.append(i)
    for i, pair in enumerate(edits):
        if (continuation or {}).get(pair):
            loc.append((continuation_prompt(*pair), continuation[pair]))
            loc_owner.append(i)
    return edits, gen, gen_owner, loc, loc_owner


def continuation_prompt(prompt: str, target: str) -> str:
    """The edit's text ``x y``, as :func:`~kedit_core.ops.tokens.split_prompt_target` joins it."""
    return prompt.rstrip() + " " + target.strip()


@torch.no_grad()
def continuations(
    model: nn.Module, tokenizer: Any, pairs: list[Pair], tokens: int, batch_size: int = 16
) -> dict[Pair, str]:
    """The unedited model's greedy continuation (``tokens`` tokens, as text) of each edit's text ``x y``;
    an edit whose continuation is only whitespace gets none (the pair would have no token to score)."""
    out: dict[Pair, str] = {}
    device = model_device(model)
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        seqs = [tokenizer(continuation_prompt(*p))["input_ids"] for p in chunk]
        new: list[list[int]] = [[] for _ in chunk]
        for _ in range(tokens):
            ids, mask = pad_right([q + n for q, n in zip(seqs, new, strict=True)], 0)
            rows, last = torch.arange(len(chunk)), mask.sum(1) - 1
            logits = logits_at(model, ids.to(device), mask.to(device), rows, last)  # each row's last position only
            for i, tok in enumerate(logits.argmax(-1).tolist()):
                new[i].append(tok)
        for pair, n in zip(chunk, new, strict=True):
            text = tokenizer.decode(n, skip_special_tokens=True).strip()
            if text:
                out[pair] = text
    return out


class EditorTrainer(BaseTrainer):
    """Meta-trains ``network`` (a :class:`~.gradient_network.MENDNetwork` or :class:`~.hypernetwork.KENetwork`)."""

    def __init__(
        self,
        hparams: Any,
        out_dir: Path,
        train: list[EditRequest],
        val: list[EditRequest] | None,
        model: nn.Module,
        tokenizer: Any,
        arch: ArchitectureSpec,
        network: nn.Module,
        layers: list[int],
        base_model: dict[str, Any],
        progress: bool = True,
        cache_dir: Path | None = None,
        exclude_ids: list[int] | None = None,
    ) -> None:
        super().__init__(hparams, out_dir, train, val, progress=progress)
        self.model, self.tokenizer, self.arch, self.net = model, tokenizer, arch, network
        self.start = min(layers)
        self.group_size = int(getattr(hparams, "train_group_size", 1))
        self.base_model = base_model
        self.exclude_ids = exclude_ids
        self.vocab_sample = getattr(hparams, "train_vocab_sample", None)
        self.cache = PairCache(model, tokenizer, arch, self.start, top_k=int(getattr(hparams, "train_top_k", 64)))
        self.factor_cache: dict[Pair, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        records = self.train_data + self.val_data
        self.continuation: dict[Pair, str] = {}
        if float(getattr(hparams, "continuation_loss_weight", 0.0)) > 0:
            edits = list(dict.fromkeys((r.prompt, r.target_new) for r in records))
            self.continuation = continuations(model, tokenizer, edits, int(hparams.continuation_tokens))
        chunks = [training_pairs(records[i : i + 8], self.continuation) for i in range(0, len(records), 8)]
        self.cache.groups.add([e + g + lo for e, g, _, lo, _ in chunks])
        self.edit_groups = FixedGroups()
        self.edit_groups.add([e for e, _, _, _, _ in chunks])
        self._updating = True
        self.cache_file = None
        if cache_dir is not None and base_model.get("fingerprint"):
            key = json.dumps([base_model["fingerprint"], self.start, self.cache.top_k, self.net.params])
            self.cache_file = Path(cache_dir) / f"records-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
            if self.cache_file.is_file():
                self.load_caches(self.cache_file)

    def run(self, max_steps: int | None = None, *, stop_after: int | None = None) -> TrainResult:
        try:
            return super().run(max_steps, stop_after=stop_after)
        finally:
            if self.cache_file is not None:
                self.save_caches(self.cache_file)

    # -- the record caches on disk (keyed by the model fingerprint, the first layer and the weights) --
    def save_caches(self, path: Path) -> None:
        tensors, pairs, fpairs = {}, [], []
        for i, (pair, e) in enumerate(self.cache.entries.items()):
            pairs.append([*pair, e["plen"], e["tids"]])
            for k in ("ids", "h0", "hfin", "top"):
                tensors[f"pair/{i}/{k}"] = e[k].clone()  # views of a batch share storage
        for i, (pair, per) in enumerate(self.factor_cache.items()):
            fpairs.append(list(pair))
            for j, p in enumerate(self.net.params):
                tensors[f"factor/{i}/{j}/u"], tensors[f"factor/{i}/{j}/delta"] = (t.clone() for t in per[p])
        save_tensors(tensors, path)
        index = {"pairs": pairs, "factor_pairs": fpairs, "exclude_ids": sorted(self.exclude_ids or [])}
        path.with_suffix(".json").write_text(json.dumps(index), encoding="utf-8")
        log.info("saved %d cached records to %s", len(pairs), path)

    def load_caches(self, path: Path) -> None:
        index = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        with safe_open(str(path), framework="pt") as fh:
            for i, (prompt, target, plen, tids) in enumerate(index["pairs"]):
                entry = {k: fh.get_tensor(f"pair/{i}/{k}") for k in ("ids", "h0", "hfin", "top")}
                self.cache.entries[(prompt, target)] = {**entry, "plen": plen, "tids": tids}
            same_factors = index.get("exclude_ids", []) == sorted(self.exclude_ids or [])
            for i, (prompt, target) in enumerate(index["factor_pairs"] if same_factors else []):
                self.factor_cache[(prompt, target)] = {
                    p: (fh.get_tensor(f"factor/{i}/{j}/u"), fh.get_tensor(f"factor/{i}/{j}/delta"))
                    for j, p in enumerate(self.net.params)
                }
        log.info("loaded %d cached records from %s", len(index["pairs"]), path)

    def trainable(self) -> dict[str, nn.Parameter]:
        return dict(self.net.named_parameters())

    def config(self) -> dict[str, Any]:
        return {**self.net.config(), "base_model": self.base_model}

    def objective(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """MEND eq. 4, plus ``continuation_loss_weight * L_cont`` when the continuation term is on."""
        total = super().objective(parts)
        if "continuation" in parts:
            total = total + self.hparams.continuation_loss_weight * parts["continuation"]
        return total

    def validate(self) -> dict[str, float]:
        self._updating = False  # normalization statistics come from training edits only
        try:
            return super().validate()
        finally:
            self._updating = True

    def _tail(self, enc: EncodedPairs, h0: torch.Tensor) -> torch.Tensor:
        with start_from_layer(self.model, self.arch, self.start, h0):
            return final_hidden(self.model, enc.input_ids, enc.attention_mask)

    def edit_factors(self, edits: list[Pair], group: list[int]) -> dict[str, GradientFactors]:
        """Gradient factors of the edits (cached per edit: the unedited model never changes)."""
        for chunk in self.edit_groups.missing(edits, self.factor_cache):
            enc, h0 = self.cache.batch(chunk)
            got = gradient_factors(
                self.model,
                enc,
                self.net.params,
                forward=lambda enc=enc, h0=h0: self._tail(enc, h0),
                exclude_ids=self.exclude_ids,
            )
            for i, pair in enumerate(chunk):
                self.factor_cache[pair] = {
                    p: (f.u[f.owner == i].cpu(), f.delta[f.owner == i].cpu()) for p, f in got.items()
                }
        device = model_device(self.model)
        out = {}
        for p in self.net.params:
            us, ds, owners = [], [], []
            for pair, g in zip(edits, group, strict=False):
                u, d = self.factor_cache[pair][p]
                us.append(u)
                ds.append(d)
                owners.append(torch.full((u.shape[0],), g, dtype=torch.long))
            out[p] = GradientFactors(torch.cat(us).to(device), torch.cat(ds).to(device), torch.cat(owners).to(device))
        return out

    def sampled_vocab(self, targets: torch.Tensor, pairs: list[Pair]) -> torch.Tensor | None:
        """Targets ∪ the unedited model's top-k at the scored positions ∪ uniform samples (sorted), or None."""
        vocab = self.model.get_output_embeddings().weight.shape[0]
        if self.vocab_sample is None or self.vocab_sample >= vocab:
            return None
        drawn = torch.randint(vocab, (self.vocab_sample,), generator=self.rng)
        return torch.unique(torch.cat([targets.cpu(), self.cache.base_top(pairs), drawn]))

    def losses(self, batch: list[EditRequest]) -> dict[str, torch.Tensor]:
        edits, gen, gen_owner, loc, loc_owner = training_pairs(batch, self.continuation)
        group = [i // self.group_size for i in range(len(batch))]
        factors = self.edit_factors(edits, group)
        rows = edits + gen + loc
        enc2, h2 = self.cache.batch(rows)
        embeds = edit_embeddings(self.model, enc2, len(edits))
        updates = self.net.updates(factors, update_stats=self._updating and torch.is_grad_enabled(), edit_embeds=embeds)
        row_owner = torch.tensor(
            group + [group[i] for i in gen_owner] + [group[i] for i in loc_owner], device=h2.device
        )
        with edited_forward(self.model, updates, row_owner):
            hidden = self._tail(enc2, h2)
        r, c = enc2.target_positions()
        targets = enc2.flat_targets()
        vocab = self.sampled_vocab(targets, rows)
        logits = vocab_logits(self.model, hidden[r.to(hidden.device), c.to(hidden.device)], vocab).float()
        targets = (torch.searchsorted(vocab, targets) if vocab is not None else targets).to(logits.device)
        n_pairs = len(edits) + len(gen)
        n_edit_pos = sum(len(t) for t in enc2.target_ids[:n_pairs])
        logp = torch.log_softmax(logits[:n_edit_pos], dim=-1)
        tok_nll = -logp.gather(1, targets[:n_edit_pos, None])[:, 0]
        per_pair = torch.zeros(n_pairs, device=logits.device).index_add(0, r[:n_edit_pos].to(logits.device), tok_nll)
        lens = torch.tensor([len(t) for t in enc2.target_ids[:n_pairs]], device=logits.device)
        parts = {"edit": (per_pair / lens).mean()}
        with torch.no_grad():
            parts["edit_acc"] = (logp.argmax(-1) == targets[:n_edit_pos]).float().mean()
        if loc:
            with torch.no_grad():
                base = vocab_logits(self.model, self.cache.base_final(loc), vocab).float()
            edited = logits[n_edit_pos:]
            n_cont = sum(1 for pair in edits if self.continuation.get(pair))  # the last of ``loc``
            n_loc_pos = sum(len(t) for t in enc2.target_ids[n_pairs : n_pairs + len(loc) - n_cont])
            if n_loc_pos:
                parts["locality"] = locality_kl(base[:n_loc_pos], edited[:n_loc_pos])
                with torch.no_grad():
                    parts["loc_acc"] = (edited[:n_loc_pos].argmax(-1) == base[:n_loc_pos].argmax(-1)).float().mean()
            if n_cont:
                parts["continuation"] = locality_kl(base[n_loc_pos:], edited[n_loc_pos:])
        return parts


def edit_embeddings(model: nn.Module, enc: EncodedPairs, n: int | None = None) -> list[torch.Tensor]:
    """The (frozen) input embeddings of the first ``n`` pairs' prompt + target tokens (what KE's LSTM reads)."""
    emb = model.get_input_embeddings()
    rows = list(zip(enc.prompt_lens, enc.target_ids, strict=False))[:n]
    with torch.no_grad():
        return [emb(enc.input_ids[i, : plen + len(t)]).float() for i, (plen, t) in enumerate(rows)]
