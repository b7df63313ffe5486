"""The bundled tokenizer and the chat template."""

from __future__ import annotations

import pytest

from memserve import ModelConfigError, Tokenizer

pytest.importorskip("quicktok")


@pytest.mark.parametrize("name", ["llama3", "cl100k_base"])
def test_round_trip_and_prefix_stable_chat(name: str) -> None:
    tok = Tokenizer(name)
    text = "Hello, wörld! <|eot_id|> 🙂"
    assert tok.decode(tok.encode(text)) == text  # special spellings in user text stay text
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    for k in range(1, len(msgs)):
        shorter = tok.chat(msgs[:k], add_generation_prompt=False)
        assert tok.chat(msgs[: k + 1])[: len(shorter)] == shorter
    assert tok.eos_id in tok.stop_ids and max(tok.encode(text)) < tok.vocab_size
    assert tok.chat(msgs) == tok.chat(msgs)  # rendering twice gives the same tokens (no shared state)


def test_llama3_markers_are_single_special_tokens() -> None:
    tok = Tokenizer("llama3")
    ids = tok.chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == 128000 and ids[1] == 128006 and ids[-2] == 128007  # begin, header start, header end
    assert tok.encode("<|eot_id|>") != [128009]
    assert tok.end_of_turn() == [128009] and 128009 in tok.stop_ids


def test_unknown_encoding_and_role_are_refused() -> None:
    with pytest.raises(ModelConfigError, match="no chat template"):
        Tokenizer("gpt2")
    with pytest.raises(ValueError, match="role"):
        Tokenizer().message("robot", "hi")


@pytest.mark.parametrize(("name", "missing"), [("llama3", 128256), ("llama3", 200_000), ("cl100k_base", 100261)])
def test_an_id_the_encoding_lacks_decodes_to_a_replacement_character(name: str, missing: int) -> None:
    """A checkpoint whose vocabulary is larger than the tokenizer's (extra tokens, a padded
    embedding) can emit such an id: its answer's text raised KeyError from the tokenizer."""
    tok = Tokenizer(name)
    assert tok.decode(tok.encode("Hi") + [missing] + tok.encode(" 🙂")) == "Hi\ufffd 🙂"
    assert tok.decode_bytes([missing]) == "\ufffd".encode()
