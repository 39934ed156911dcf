"""Metrics are data registered in one place: a plugin adds one (or a judge) without touching the core, and
it reaches the evaluator, the Editor's reports with its protocol, and the CLI table."""

import json

import pytest

from kedit_core.editor import Editor
from kedit_core.evaluate.metrics import BUILTIN_METRICS, Metric, metric_names, protocols
from kedit_core.hookspecs import hookimpl
from kedit_core.plugins import get_registry
from kedit_core.testing import plugin_registered, tiny_model, tiny_requests

HP = {"layers": [1], "lr": 0.05, "num_steps": 3}


def prompt_length(evaluator, requests, references):
    """A toy judge: tokens in the edit prompt; no value (None) for prompts without "is"."""
    return [float(len(evaluator.tokenizer(r.prompt)["input_ids"])) if " is " in r.prompt else None for r in requests]


class MetricPlugin:
    @hookimpl
    def register_metrics(self, register):
        register(Metric("prompt_tokens", "toy-judge: tokens in the edit prompt", ("zsre",), prompt_length))


@pytest.fixture()
def metric_plugin(ft_plugin):
    with plugin_registered(MetricPlugin(), "metrics", "pkg-metrics", "1.0"):
        yield


def test_builtins_are_listed_once_in_order():
    names = metric_names()
    assert names[:3] == ["reliability", "generalization", "locality"] and names[-1] == "fluency"
    assert len(names) == len(set(names)) == len(BUILTIN_METRICS)
    assert metric_names("counterfact")[:3] == ["efficacy_score", "paraphrase_score", "neighborhood_score"]
    for table in ("zsre", "counterfact", "sequential"):  # every table shows the generation protocol beside
        assert {"gen_reliability", "gen_locality", "degenerate"} <= set(metric_names(table))


def test_a_judge_plugin_reads_the_generations_without_generating_again(ft_plugin):
    def answer_length(evaluator, requests, references):
        return [float(len(g.answer.split())) for g in evaluator.last_generations]

    class Judge:
        @hookimpl
        def register_metrics(self, register):
            register(Metric("answer_words", "toy-judge: words in the greedy answer", ("counterfact",), answer_length))

    model, tok = tiny_model("llama")
    with plugin_registered(Judge(), "judge", "pkg-judge", "1.0"):
        result = Editor("ft-m", model, tok, hparams=HP).edit(tiny_requests()[:2])
        assert "answer_words" in metric_names("counterfact")
        report = result.to_report()
    for row in report["per_request"]:
        answer = row["generations"]["post"]["texts"]["reliability"][0]
        assert row["post"]["answer_words"] == len(answer.split())
    assert report["protocols"]["answer_words"].startswith("toy-judge")


def test_a_plugin_metric_reaches_evaluator_report_and_tables(metric_plugin):
    assert metric_names()[-1] == "prompt_tokens" and "prompt_tokens" in metric_names("zsre")
    model, tok = tiny_model("llama")
    result = Editor("ft-m", model, tok, hparams=HP).edit(tiny_requests()[:2])
    report = result.to_report()
    expected = [float(len(tok(r.prompt)["input_ids"])) if " is " in r.prompt else None for r in tiny_requests()[:2]]
    assert any(v is not None for v in expected) and any(v is None for v in expected)
    assert [p["post"].get("prompt_tokens") for p in report["per_request"]] == expected
    assert [p["pre"].get("prompt_tokens") for p in report["per_request"]] == expected
    assert report["protocols"]["prompt_tokens"] == "toy-judge: tokens in the edit prompt"
    json.dumps(report)


def test_a_metric_name_cannot_be_taken_twice(ft_plugin):
    class Clash:
        @hookimpl
        def register_metrics(self, register):
            register(Metric("locality", "mine", (), prompt_length))

    with plugin_registered(Clash(), "clash", "pkg-clash", "1.0"):
        registry = get_registry()
        assert registry.metrics == []
        assert any("metric name 'locality' is already taken" in b.error for b in registry.broken)
        assert protocols()["locality"].startswith("easyedit-token-agreement")
