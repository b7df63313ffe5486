"""Stop strings: where an answer ends (engine side) and what text a client sees (API side)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from memserve.api import AnswerText
from memserve.sampling import stop_at, stop_prefix
from tests.conftest import examples


def test_stop_at_finds_the_earliest_start_among_stops_not_searched_before() -> None:
    assert stop_at(b"hello world", ["world", "lo"]) == 3
    assert stop_at(b"hello world", ["xyz"]) is None
    assert stop_at(b"hello world", ["lo"], since=4) == 3  # "lo" is bytes 3-4: not all in the first 4
    assert stop_at(b"hello world", ["lo"], since=5) is None  # all in the first 5, searched before
    assert stop_at("naïve café".encode(), ["é"]) == len("naïve caf".encode())


def test_stop_prefix_is_the_longest_tail_that_begins_a_stop() -> None:
    assert stop_prefix(b"the end###", ["####"]) == 3
    assert stop_prefix(b"the end#", ["##x", "#"]) == 1  # a complete stop is not a prefix to hold
    assert stop_prefix(b"abc", ["xyz"]) == 0
    assert stop_prefix(b"ab", ["abcd"]) == 2
    assert stop_prefix("é".encode()[:1], ["é"]) == 1  # half a character of a stop


def test_answer_text_holds_back_a_stop_in_the_making_and_never_shows_it() -> None:
    pieces = {1: b"Hello", 2: b" wor", 3: b"ld", 4: b"!\nUser", 5: b":", 6: b" more"}
    answer = AnswerText(lambda ids: b"".join(pieces[i] for i in ids), ["\nUser:"])
    shown = [answer.add(t) for t in (1, 2, 3, 4, 5)]
    assert shown == ["Hello", " wor", "ld", "!", ""]  # "\nUser" waited for ":"
    assert answer.finish() == "" and answer.sent == "Hello world!"
    nothing = AnswerText(lambda ids: b"".join(pieces[i] for i in ids), ["\nUser:"])
    assert [nothing.add(t) for t in (1, 4)] == ["Hello", "!"]
    assert nothing.finish() == "\nUser"  # the answer ended (max_tokens): what was held comes out


def test_answer_text_waits_for_a_whole_character() -> None:
    euro = "€".encode()
    pieces = {1: b"a" + euro[:1], 2: euro[1:], 3: b"b"}
    answer = AnswerText(lambda ids: b"".join(pieces[i] for i in ids), [])
    assert [answer.add(t) for t in (1, 2, 3)] == ["", "a€", "b"]


# small alphabets, so that stops occur, overlap and straddle tokens; é and € split across tokens
BYTES = st.lists(st.sampled_from([b"a", b"b", b"ab", b"\n", "é".encode(), "€".encode()[:2], "€".encode()[2:]]))
STOPS = st.lists(st.text(alphabet="ab\né€", min_size=1, max_size=4), max_size=4)


@settings(max_examples=examples(400), deadline=None)
@given(st.lists(BYTES.map(b"".join), min_size=1, max_size=12), STOPS)
def test_a_streamed_answer_stops_where_a_plain_search_says_and_shows_the_same_text(
    tokens: list[bytes], stops: list[str]
) -> None:
    """The engine's rule (end at the first token completing a stop) and the API's stream (pieces
    let out as tokens arrive) agree with a plain search of the whole text: the answer has the
    tokens up to the first one whose text contains a stop, and the joined pieces are the text
    before that stop's first occurrence (all of it when no stop occurs)."""
    data, ended = bytearray(), len(tokens)
    for i, t in enumerate(tokens):  # the engine's check, one token at a time
        since = len(data)
        data += t
        if stop_at(data, stops, since) is not None:
            ended = i + 1
            break
    plain = [k for k in range(1, len(tokens) + 1) if any(s.encode() in b"".join(tokens[:k]) for s in stops)]
    assert ended == (plain[0] if plain else len(tokens))
    answer = AnswerText(lambda ids: b"".join(tokens[i] for i in ids), stops)
    streamed = "".join(answer.add(i) for i in range(ended)) + answer.finish()
    whole = b"".join(tokens[:ended])
    cuts = [whole.find(s.encode()) for s in stops if s.encode() in whole]
    assert streamed == whole[: min(cuts, default=len(whole))].decode("utf-8", errors="replace")
