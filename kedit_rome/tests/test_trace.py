"""Causal tracing on tiny random models: shapes, exact restoration, files, the CLI command."""

from __future__ import annotations

import json

import click
import pytest
import torch
from click.testing import CliRunner

from kedit_core.architecture import resolve_architecture
from kedit_core.testing import FAMILIES, tiny_model
from kedit_rome.cli import trace as trace_command
from kedit_rome.cli import trace_layers
from kedit_rome.trace import (
    causal_trace,
    embedding_std,
    restored_probabilities,
    save_trace,
    subject_noise,
    subject_token_range,
    window_layers,
)
from kedit_rome.trace.profile import known_facts, subject_last_profile

PROMPT = "Where is it? The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return tiny_model(request.param)


def test_subject_token_range_covers_the_subject(tiny):
    model, tok = tiny
    s0, s1 = subject_token_range(tok, PROMPT, SUBJECT)
    ids = tok(PROMPT)["input_ids"]
    assert 0 < s0 < s1 <= len(ids)
    assert tok.decode(ids[s0:s1]).strip() == SUBJECT


def test_trace_shapes_and_probabilities(tiny):
    model, tok = tiny
    res = causal_trace(model, tok, PROMPT, SUBJECT, kind="hidden", samples=2, noise=30.0)
    n_layers = resolve_architecture(model).num_layers(model)
    assert len(res.tokens) == len(tok(PROMPT)["input_ids"])
    assert len(res.scores) == len(res.tokens) and all(len(r) == n_layers for r in res.scores)
    assert res.layers == list(range(n_layers))
    assert 0 <= res.corrupted_prob <= 1 and 0 < res.clean_prob <= 1
    assert res.corrupted_prob != pytest.approx(res.clean_prob, abs=1e-7), "the noise changes nothing"
    # tokens before the subject never see the noise: restoring them gives the corrupted probability
    for row in res.scores[: res.subject_range[0]]:
        assert row == [res.corrupted_prob] * n_layers
    # restoring the last token's final hidden state restores the whole output
    assert res.scores[-1][-1] == pytest.approx(res.clean_prob, rel=1e-4, abs=1e-6)
    assert res.effect[-1][-1] == pytest.approx(res.clean_prob - res.corrupted_prob, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("layer", [0, 2])
def test_restoring_every_token_at_a_layer_gives_the_clean_probability(tiny, layer):
    model, tok = tiny
    arch = resolve_architecture(model)
    ids = tok(PROMPT)["input_ids"]
    s0, s1 = subject_token_range(tok, PROMPT, SUBJECT)
    noise = subject_noise(3, s1 - s0, model.config.hidden_size, 10 * embedding_std(model, arch), seed=1)
    everything = tuple((t, layer) for t in range(len(ids)))
    clean, (corrupted, restored) = restored_probabilities(model, arch, ids, (s0, s1), 5, noise, [(), everything])
    assert restored == pytest.approx(clean, rel=1e-4, abs=1e-7)
    assert corrupted != pytest.approx(clean, rel=1e-4, abs=1e-7)


def test_batching_does_not_change_the_answer(tiny):
    model, tok = tiny
    arch = resolve_architecture(model)
    ids = tok(PROMPT)["input_ids"]
    s0, s1 = subject_token_range(tok, PROMPT, SUBJECT)
    noise = subject_noise(2, s1 - s0, model.config.hidden_size, 5.0, seed=0)
    rest = [(), ((s1 - 1, 1),), ((len(ids) - 1, 2),), ((s0, 0), (s1 - 1, 0))]
    big = restored_probabilities(model, arch, ids, (s0, s1), 7, noise, rest, max_rows=64)
    small = restored_probabilities(model, arch, ids, (s0, s1), 7, noise, rest, max_rows=3)
    assert big[0] == pytest.approx(small[0], rel=1e-5)
    assert big[1] == pytest.approx(small[1], rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("kind", ["mlp", "attn"])
def test_window_kinds(tiny, kind):
    model, tok = tiny
    res = causal_trace(model, tok, PROMPT, SUBJECT, kind=kind, samples=2, window=2, noise=30.0)
    assert res.kind == kind and res.window == 2
    assert all(0 <= p <= 1 for row in res.scores for p in row)
    # the window kinds leave the model unchanged (hooks removed)
    again = causal_trace(model, tok, PROMPT, SUBJECT, kind=kind, samples=2, window=2, noise=30.0)
    assert again.scores == res.scores


def test_window_layers_are_centred_and_clipped():
    assert list(window_layers(5, 4, 18)) == [3, 4, 5, 6]
    assert list(window_layers(0, 10, 18)) == [0, 1, 2, 3, 4]
    assert list(window_layers(17, 10, 18)) == [12, 13, 14, 15, 16, 17]
    assert list(window_layers(3, 1, 18)) == [3]


def test_given_answer_and_errors(tiny):
    model, tok = tiny
    res = causal_trace(model, tok, PROMPT, SUBJECT, answer="Paris", samples=1)
    assert res.answer.strip() and tok.decode([res.answer_id]) == res.answer
    with pytest.raises(ValueError, match="does not occur"):
        causal_trace(model, tok, PROMPT, "Colosseum")
    with pytest.raises(ValueError, match="kind"):
        causal_trace(model, tok, PROMPT, SUBJECT, kind="neurons")


def test_output_files(tiny, tmp_path):
    model, tok = tiny
    res = causal_trace(model, tok, PROMPT, SUBJECT, kind="hidden", samples=1)
    paths = save_trace(res, tmp_path / "out" / "eiffel")
    assert paths["json"].name == "eiffel_hidden.json" and paths["png"].name == "eiffel_hidden.png"
    data = json.loads(paths["json"].read_text())
    assert data["tokens"] == res.tokens and data["scores"] == res.scores
    assert len(data["effect"]) == len(res.tokens) and data["clean_prob"] == res.clean_prob
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_subject_last_profile(tiny):
    model, tok = tiny
    facts = [(PROMPT, SUBJECT, None), ("Toyota is a company headquartered in", "Toyota", "Japan")]
    prof = subject_last_profile(model, tok, facts, kind="mlp", window=2, samples=2)
    assert prof.n_facts == 2 and len(prof.mean_effect) == resolve_architecture(model).num_layers(model)
    assert len(prof.peak_layers(2)) == 2


def test_normalized_effect_counts_only_facts_the_noise_hurt(tiny, monkeypatch):
    from kedit_rome.trace import profile as profile_module

    model, tok = tiny
    n = resolve_architecture(model).num_layers(model)
    # (clean, [corrupted, restored per layer]): the second fact's noise raised the answer's probability
    runs = iter([(0.5, [0.1] + [0.3] * n), (0.2, [0.25] + [0.2] * n)])
    monkeypatch.setattr(profile_module, "restored_probabilities", lambda *a, **k: next(runs))
    facts = [(PROMPT, SUBJECT, "Paris"), ("Toyota is a company headquartered in", "Toyota", "Japan")]
    prof = subject_last_profile(model, tok, facts, kind="mlp", window=2, samples=1)
    assert prof.mean_effect == pytest.approx([(0.2 - 0.05) / 2] * n)
    assert prof.mean_normalized_effect == pytest.approx([0.5] * n)  # (0.3 - 0.1) / (0.5 - 0.1), fact 1 only


def test_known_facts_keeps_answers_the_model_ranks_high(tiny):
    model, tok = tiny
    facts = [
        (PROMPT, SUBJECT, "Paris"),
        ("Toyota is a company headquartered in", "Toyota", "Japan"),
        ("The Eiffel Tower is near the", SUBJECT, "Eiffel"),  # the answer is part of the subject
    ]
    anything = {"min_prob": 0.0, "max_rank": 10**9}
    assert known_facts(model, tok, facts, 5, **anything) == facts[:2]
    assert known_facts(model, tok, facts, 1, **anything) == facts[:1]
    # the true answer's first-token probability and rank after the prompt, computed here independently
    ids = tok(PROMPT)["input_ids"]
    answer = tok(PROMPT + " Paris")["input_ids"][len(ids)]
    with torch.no_grad():
        probs = model(torch.tensor([ids])).logits[0, -1].softmax(-1)
    p, rank = float(probs[answer]), int((probs > probs[answer]).sum())
    assert known_facts(model, tok, facts[:1], 1, min_prob=p * 0.99, max_rank=rank + 1) == facts[:1]
    assert known_facts(model, tok, facts[:1], 1, min_prob=p * 1.01, max_rank=10**9) == []
    assert known_facts(model, tok, facts[:1], 1, min_prob=0.0, max_rank=rank) == []


def test_trace_layers_refuses_when_no_fact_is_known(tmp_path):
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    args = ["--model", str(tmp_path / "m"), "--data", "counterfact", "--facts", "2", "--samples", "1"]
    out = CliRunner().invoke(trace_layers, args)
    # a random model puts ~1/vocabulary on any answer: below the 0.05 floor
    assert out.exit_code != 0 and "knows none of the facts in counterfact" in str(out.exception)


def test_cli_command(tmp_path):
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    runner = CliRunner()
    args = [
        "--model",
        str(tmp_path / "m"),
        "--prompt",
        PROMPT,
        "--subject",
        SUBJECT,
        "--kind",
        "mlp",
        "--samples",
        "2",
        "--window",
        "2",
        "--out",
        str(tmp_path / "t"),
        "--json",
    ]
    out = runner.invoke(trace_command, args)
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["kind"] == "mlp" and (tmp_path / "t_mlp.png").is_file() and (tmp_path / "t_mlp.json").is_file()
    assert report["trace"]["tokens"][0] == tok.bos_token
    bad = runner.invoke(trace_command, ["--model", str(tmp_path / "m"), "--prompt", PROMPT, "--subject", "Rome"])
    assert bad.exit_code != 0 and "does not occur" in str(bad.exception)


def test_plugin_registers_the_trace_command():
    from kedit_rome import plugin

    group = click.Group("kedit")
    plugin.register_commands(group)
    assert group.commands["trace"] is trace_command and group.commands["trace-layers"] is trace_layers
