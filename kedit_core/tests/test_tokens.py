import pytest

from kedit_core.ops.tokens import encode_pairs, split_prompt_target, subject_last_token
from kedit_core.testing import tiny_tokenizer


@pytest.mark.parametrize("style", ["byte", "sentencepiece"])
def test_target_tokens_never_include_bos_and_continue_the_prompt(style):
    tok = tiny_tokenizer(style)
    p, t = split_prompt_target(tok, "The Eiffel Tower is located in the city of ", "Rome")
    assert tok.bos_token_id not in t
    assert tok.decode(t).strip() == "Rome"
    assert tok.decode(p + t).replace("<bos>", "").strip() == "The Eiffel Tower is located in the city of Rome"
    if style == "sentencepiece":
        assert p[0] == tok.bos_token_id  # the prompt keeps the BOS the tokenizer adds


def test_byte_level_target_has_leading_space():
    tok = tiny_tokenizer("byte")
    _, t = split_prompt_target(tok, "The capital of Italy is", "Rome")
    assert tok.convert_ids_to_tokens(t)[0].startswith("\u0120")  # GPT-2's space marker


def test_encode_pairs_positions():
    tok = tiny_tokenizer("sentencepiece")
    enc = encode_pairs(tok, ["Toyota is a company headquartered in", "Paris is in"], ["Japan", "France"])
    rows, cols = enc.target_positions()
    flat = enc.flat_targets()
    for r, c, t in zip(rows.tolist(), cols.tolist(), flat.tolist(), strict=False):
        assert enc.input_ids[r, c + 1].item() == t  # the logit at c predicts the token at c+1
    assert enc.attention_mask.sum(1).tolist() == [
        len(p) + len(t)
        for p, t in (
            split_prompt_target(tok, a, b)
            for a, b in [("Toyota is a company headquartered in", "Japan"), ("Paris is in", "France")]
        )
    ]


@pytest.mark.parametrize("style", ["byte", "sentencepiece"])
def test_subject_last_token(style):
    tok = tiny_tokenizer(style)
    prompt = "The mother tongue of Danielle Darrieux is"
    i = subject_last_token(tok, prompt, "Danielle Darrieux")
    ids = tok(prompt)["input_ids"]
    assert tok.decode(ids[: i + 1]).replace("<bos>", "").strip().endswith("Darrieux")
    assert not tok.decode(ids[:i]).strip().endswith("Darrieux")


@pytest.mark.real_model
def test_gemma_tokenizer_target_split(gemma):
    _, tok, _ = gemma
    p, t = split_prompt_target(tok, "The Eiffel Tower is located in the city of", "Paris")
    assert p[0] == tok.bos_token_id and tok.bos_token_id not in t
    assert tok.convert_ids_to_tokens(t) == ["\u2581Paris"]
