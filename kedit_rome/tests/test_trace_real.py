"""Causal tracing on the real Gemma 3 270M (a few tens of seconds)."""

from __future__ import annotations

import json

import pytest

from kedit_core.architecture import resolve_architecture
from kedit_core.ops.tokens import split_prompt_target
from kedit_rome.trace import (
    causal_trace,
    embedding_std,
    restored_probabilities,
    save_trace,
    subject_noise,
    subject_token_range,
)
from kedit_rome.trace.profile import subject_last_profile

pytestmark = pytest.mark.real_model

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"


def test_embedding_std_is_measured_after_gemma_scaling(gemma):
    model, _, _ = gemma
    sigma = embedding_std(model, resolve_architecture(model))
    raw = float(model.get_input_embeddings().weight.float().std())
    assert 0.5 < sigma < 2.0 and sigma > 10 * raw  # Gemma multiplies embeddings by sqrt(640)


def test_trace_the_eiffel_tower(gemma, tmp_path):
    model, tok, _ = gemma
    res = causal_trace(model, tok, PROMPT, SUBJECT, kind="hidden", samples=1)
    assert res.answer.strip() == "Paris" and res.clean_prob > 0.3
    assert res.corrupted_prob < 0.5 * res.clean_prob  # the noise destroys the fact
    assert res.scores[-1][-1] == pytest.approx(res.clean_prob, rel=1e-3)
    # the subject tokens carry the fact through the early/middle layers, the last token from there on
    gap = res.clean_prob - res.corrupted_prob
    s0, s1 = res.subject_range
    subject_rows = res.effect[s0:s1]
    assert max(max(row[:12]) for row in subject_rows) > 0.25 * gap
    assert max(max(row[13:]) for row in subject_rows) < 0.05 * gap
    assert max(res.effect[-1][13:]) > 0.5 * gap
    last = s1 - 1
    paths = save_trace(res, tmp_path / "eiffel")
    assert json.loads(paths["json"].read_text())["tokens"][last].strip() == "Tower"
    assert paths["png"].stat().st_size > 1000


def test_restoring_the_subject_at_layer_zero_is_exact(gemma):
    model, tok, _ = gemma
    arch = resolve_architecture(model)
    ids = tok(PROMPT)["input_ids"]
    s0, s1 = subject_token_range(tok, PROMPT, SUBJECT)
    paris = split_prompt_target(tok, PROMPT, "Paris")[1][0]
    noise = subject_noise(2, s1 - s0, model.config.hidden_size, 3 * embedding_std(model, arch), seed=0)
    everything = tuple((t, 0) for t in range(len(ids)))
    clean, (corrupted, restored) = restored_probabilities(model, arch, ids, (s0, s1), paris, noise, [(), everything])
    assert restored == pytest.approx(clean, rel=1e-3, abs=1e-7)


def test_mlp_profile_at_the_subject_last_token(gemma):
    model, tok, _ = gemma
    facts = [("Bernard Giraudeau is a native speaker of", "Bernard Giraudeau", "French")]
    prof = subject_last_profile(model, tok, facts, kind="mlp", window=4, samples=2)
    assert len(prof.mean_effect) == 18
    assert all(f["clean_prob"] > f["corrupted_prob"] for f in prof.per_fact)
    # the early-site MLPs (layers 2-6) matter, the last ones do not
    assert max(prof.mean_effect[2:7]) > 0.1 and max(prof.mean_effect[14:]) < 0.05


def test_trace_layers_command(gemma, tmp_path):
    from click.testing import CliRunner

    from kedit_rome.cli import trace_layers

    out = CliRunner().invoke(trace_layers, ["--facts", "1", "--samples", "2", "--out", str(tmp_path / "p.json")])
    assert out.exit_code == 0, out.output
    profile = json.loads((tmp_path / "p.json").read_text())
    effect = profile["mean_effect"]
    assert profile["n_facts"] == 1 and len(effect) == 18 and out.output.count("\n") >= 20
    fact = profile["per_fact"][0]
    assert fact["clean_prob"] >= 0.05 and fact["answer"].strip() not in fact["subject"]
    # the early-site MLPs carry the fact, the last layers do not
    assert max(effect[:10]) > 5 * max(max(effect[14:]), 1e-4)
