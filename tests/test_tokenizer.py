"""Tokenizer, streaming decoder, stop matcher and chat template.

The real SmolLM2, Qwen2.5-Coder (0.5B, 1.5B) and Gemma 3 vocabularies are checked against their
reference fixtures (token ids from llama.cpp, chat prompts rendered by each model's template);
the SentencePiece path also against small hand-built vocabularies whose expected ids are
derived by hand in the comments.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringllm.chat import CHATML_TEMPLATE, render_chat
from ringllm.errors import ModelError, RequestError, UnsupportedError
from ringllm.tokenizer import StopMatcher, StreamDecoder, Tokenizer, TokenType

FIXTURE = json.loads((Path(__file__).parent / "data" / "smollm2-135m-q4_1.json").read_text())
CHAT_CASES = [c for c in FIXTURE["greedy"] if c["messages"]]
SPECIAL_BITS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im", "_end|>", "a b", "é\n"]
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """The real SmolLM2 tokenizer, read once per module (the model is fetched on first use)."""
    from ringllm.fetch import resolve_model

    return Tokenizer.from_gguf(resolve_model("smollm2-135m"))


# -- the real vocabulary against the reference ----------------------------------------------


@pytest.mark.model
@pytest.mark.parametrize("case", FIXTURE["tokenize"], ids=lambda c: c["id"])
def test_fixture_tokenization_exact(tok: Tokenizer, case: dict) -> None:
    assert tok.encode(case["text"], parse_special=True) == case["ids"]
    assert tok.encode(case["text"], parse_special=False) == case["ids_plain"]
    assert tok.decode(case["ids"]) == case["text"]
    assert tok.decode(case["ids_plain"]) == case["text"]


@pytest.mark.model
def test_smollm2_special_ids(tok: Tokenizer) -> None:
    assert (tok.model, tok.pre, tok.vocab_size) == ("gpt2", "smollm", 49152)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    # <|endoftext|>, <|im_end|> (also the EOS), and <reponame>: llama.cpp stops on the FIM
    # repo-name token it finds by text ("<reponame>", Granite's spelling, which SmolLM2 shares)
    assert tok.eog_ids == {0, 2, 4}
    assert tok.token_bytes(2) == b"<|im_end|>"
    assert tok.decode([1, 4093, 2], skip_special=True) == "user"
    assert tok.encode("Hi", parse_special=True, add_bos=True)[0] == 1


@pytest.mark.model
@pytest.mark.parametrize("case", CHAT_CASES, ids=lambda c: c["id"])
def test_chat_template_renders_fixture_prompt(tok: Tokenizer, case: dict) -> None:
    prompt = render_chat(tok.chat_template, case["messages"], add_generation_prompt=True,
                         bos_token=tok.token_text(tok.bos_id), eos_token=tok.token_text(tok.eos_id))
    assert prompt == case["prompt"]
    assert tok.encode(prompt, parse_special=True) == case["prompt_ids"]


@pytest.mark.model
def test_fixture_generations_decode(tok: Tokenizer) -> None:
    for case in FIXTURE["greedy"]:
        assert tok.encode(case["prompt"], parse_special=True) == case["prompt_ids"]
        assert tok.decode(case["ids"]) == case["text"]


@pytest.mark.model
@FAST
@given(text=st.text(max_size=60))
def test_bpe_round_trip_is_lossless(tok: Tokenizer, text: str) -> None:
    # Lossless except for the bytes the vocabulary has no symbol for, which encode drops.
    kept = bytes(b for b in text.encode() if b not in tok.missing_bytes)
    for parse_special in (False, True):
        ids = tok.encode(text, parse_special=parse_special)
        assert b"".join(tok.token_bytes(i) for i in ids) == kept
        assert tok.decode(ids) == kept.decode("utf-8", "replace")
        assert parse_special or not any(tok.is_special(i) for i in ids)


@pytest.mark.model
@FAST
@given(text=st.text(st.characters(codec="utf-8", exclude_characters="\x04\x06\x13\x14\x16\x1d",
                                  max_codepoint=0x3FFFF), max_size=60))
def test_bpe_round_trip_is_exact_for_representable_text(tok: Tokenizer, text: str) -> None:
    assert tok.missing_bytes == {4, 6, 19, 20, 22, 29, 192, 193, *range(241, 243), *range(245, 256)}
    assert tok.decode(tok.encode(text, parse_special=False)) == text
    assert tok.decode(tok.encode(text, parse_special=True)) == text


@pytest.mark.model
@FAST
@given(text=st.lists(st.sampled_from(SPECIAL_BITS), max_size=8).map("".join))
def test_bpe_round_trip_with_special_texts(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text, parse_special=True)) == text
    assert tok.decode(tok.encode(text, parse_special=False)) == text


@pytest.fixture(scope="module")
def byte_ids(tok: Tokenizer) -> list[int]:
    """Ids of single-byte tokens >= 0x80: fragments of multi-byte UTF-8 characters."""
    return [i for i in range(tok.vocab_size) if len(b := tok.token_bytes(i)) == 1 and b[0] >= 0x80]


@pytest.mark.model
@FAST
@given(data=st.data())
def test_stream_decoder_matches_decode(tok: Tokenizer, byte_ids: list[int], data: st.DataObject) -> None:
    any_id = st.integers(0, tok.vocab_size - 1)
    ids = data.draw(st.lists(st.one_of(any_id, st.sampled_from(byte_ids)), max_size=24))
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids)
    try:
        b"".join(tok.token_bytes(i) for i in ids).decode("utf-8")
    except UnicodeDecodeError:
        return
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.model
def test_stream_decoder_holds_split_characters(tok: Tokenizer) -> None:
    case = next(c for c in FIXTURE["tokenize"] if c["id"] == "tok-10")  # emoji split over byte tokens
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in case["ids"]]
    assert "" in pieces and not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + dec.flush() == case["text"]
    assert dec.push(case["ids"][0]) == "" and dec.flush() == "\ufffd"  # a cut-off tail, flushed


# -- stop strings ---------------------------------------------------------------------------


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Start of the stop string that completes first, scanning the text character by character."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if end >= len(s) and text[end - len(s):end] == s]
        if starts:
            return min(starts)
    return None


@given(pieces=st.lists(st.text("abc", max_size=4), max_size=10),
       stops=st.lists(st.text("abc", min_size=1, max_size=3), min_size=1, max_size=3))
def test_stop_matcher_emits_exactly_the_text_before_the_first_stop(pieces: list[str], stops: list[str]) -> None:
    m = StopMatcher(stops)
    out, stopped = [], False
    for p in pieces:
        text, stopped = m.push(p)
        out.append(text)
        assert not any(s in "".join(out) for s in stops)
    if not stopped:
        out.append(m.flush())
    full = "".join(pieces)
    at = _first_stop(full, stops)
    assert stopped == (at is not None)
    assert "".join(out) == (full if at is None else full[:at])


def test_stop_matcher_across_pieces() -> None:
    m = StopMatcher(["<|im_end|>", "\n\n"])
    assert m.push("Hello <|im") == ("Hello ", False)
    assert m.push("_en") == ("", False)
    assert m.push("d|> trailing") == ("", True)
    assert m.matched == "<|im_end|>" and m.push("more") == ("", True)
    m = StopMatcher(["STOP"])
    assert m.push("ST") == ("", False)
    assert m.push("ay") == ("STay", False)
    assert m.push("S") == ("", False) and m.flush() == "S"
    with pytest.raises(RequestError):
        StopMatcher([""])


# -- SentencePiece vocabularies built by hand ----------------------------------------------

N_FIXED = 3 + 256  # <unk>, <s>, </s>, then <0x00>..<0xFF>


def spm(pieces: dict[str, float], *, bytes_: bool = True, **meta: object) -> Tokenizer:
    """A llama-style vocab: <unk>=0, <s>=1, </s>=2, byte tokens 3..258, then `pieces` in order."""
    tokens, types, scores = ["<unk>", "<s>", "</s>"], [2, 3, 3], [0.0, 0.0, 0.0]
    if bytes_:
        tokens += [f"<0x{b:02X}>" for b in range(256)]
        types += [TokenType.BYTE] * 256
        scores += [0.0] * 256
    for text, score in pieces.items():
        tokens.append(text)
        types.append(TokenType.NORMAL)
        scores.append(score)
    return Tokenizer.from_metadata({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, **meta})


def ids_of(t: Tokenizer, *texts: str) -> list[int]:
    to_id = {t.token_text(i): i for i in range(t.vocab_size)}  # a duplicate keeps its last id
    return [to_id[x] for x in texts]


BASE = {"▁": -1.0, "a": -2.0, "b": -2.0, "c": -2.0}


def test_spm_merges_best_score_first() -> None:
    # "abc" -> "▁abc"; "▁a" is no token, so the pairs are ab and bc: the better score merges,
    # after which "abc"/"▁ab"/"▁bc" are no tokens and nothing else merges.
    t = spm({**BASE, "ab": -5.0, "bc": -6.0})
    assert t.encode("abc", parse_special=False, add_bos=False) == ids_of(t, "▁", "ab", "c")
    t = spm({**BASE, "ab": -6.0, "bc": -5.0})
    assert t.encode("abc", parse_special=False, add_bos=False) == ids_of(t, "▁", "a", "bc")


def test_spm_equal_scores_merge_leftmost() -> None:
    # "▁aba": ab (at 1) and ba (at 2) tie; the leftmost wins, leaving "a".
    t = spm({**BASE, "ab": -5.0, "ba": -5.0})
    assert t.encode("aba", parse_special=False, add_bos=False) == ids_of(t, "▁", "ab", "a")


def test_spm_merges_chain() -> None:
    # "▁a" (-3) beats "bc" (-4); then "▁ab" is no token, bc merges, and finally "▁abc" (-9).
    t = spm({**BASE, "▁a": -3.0, "bc": -4.0, "▁abc": -9.0})
    assert t.encode("abc", parse_special=False, add_bos=False) == ids_of(t, "▁abc")


def test_spm_byte_fallback_and_unknown() -> None:
    t = spm(BASE)
    euro = [N_FIXED - 256 + b for b in "€".encode()]  # <0xE2> <0x82> <0xAC>
    assert t.encode("a€", parse_special=False, add_bos=False) == ids_of(t, "▁", "a") + euro
    assert t.decode(euro[:2]) == "\ufffd"
    no_bytes = spm(BASE, bytes_=False)
    assert no_bytes.encode("a€", parse_special=False, add_bos=False) == [*ids_of(no_bytes, "▁", "a"), 0]


def test_spm_bos_spaces_and_specials() -> None:
    t = spm({**BASE, "ab": -5.0})
    sp, ab = ids_of(t, "▁", "ab")
    assert t.add_bos and t.add_space_prefix and t.eog_ids == {2}
    assert t.encode("ab", parse_special=False) == [1, sp, ab]  # add_bos defaults to true for llama
    assert t.encode("a b", parse_special=False, add_bos=False) == ids_of(t, "▁", "a", "▁", "b")
    # A parsed special is followed by a fresh space prefix, as in llama.cpp.
    assert t.encode("<s>ab</s>", parse_special=True, add_bos=False) == [1, sp, ab, 2]
    lt, s, gt = (N_FIXED - 256 + ord(c) for c in "<s>")
    assert t.encode("<s>ab", parse_special=False, add_bos=False) == [sp, lt, s, gt, ab]
    assert t.decode([1, sp, ab, 2]) == "<s>ab</s>"
    assert t.decode([1, sp, ab, 2], skip_special=True) == "ab"
    no_prefix = spm({**BASE, "ab": -5.0}, **{"tokenizer.ggml.add_space_prefix": False})
    assert no_prefix.encode("ab b", parse_special=False, add_bos=False) == ids_of(no_prefix, "ab", "▁", "b")


@given(text=st.lists(st.sampled_from(["a", "b", "c", " ", "€", "<s>", "</s>", "x", "\n"]), max_size=12)
       .map("".join))
def test_spm_round_trip_and_stream(text: str) -> None:
    t = SPM_RT
    for parse_special in (False, True):
        ids = t.encode(text, parse_special=parse_special)
        assert t.decode(ids) == ("<s>" if t.add_bos else "") + text
        dec = t.stream_decoder()
        assert "".join(dec.push(i) for i in ids) + dec.flush() == t.decode(ids)


SPM_RT = spm({**BASE, "ab": -5.0, "bc": -4.0, "▁a": -3.0, "▁▁": -2.5})


# -- metadata handling ----------------------------------------------------------------------


def bpe_meta(pre: str, extra_tokens: list[str], merges: list[str], **meta: object) -> dict:
    """A byte-level vocab: the 256 GPT-2 alphabet symbols (ids 0..255), then `extra_tokens`."""
    from ringllm.tokenizer import _gpt2_alphabet

    enc, _ = _gpt2_alphabet()
    tokens = [enc[b] for b in range(256)] + extra_tokens
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": merges, **meta}


@pytest.mark.parametrize("pre, pieces", [
    ("gpt2", ["12", "34"]),  # one piece "1234": 1+2, then 3+4 outranks 12+3
    ("llama3", ["123", "4"]),  # digits in groups of three
    ("qwen2", ["1", "2", "3", "4"]),  # single digits
    ("smollm", ["1", "2", "3", "4"]),
])
def test_bpe_pre_tokenizers(pre: str, pieces: list[str]) -> None:
    meta = bpe_meta(pre, ["12", "34", "123"], ["1 2", "3 4", "12 3"], **{"tokenizer.ggml.add_bos_token": False})
    t = Tokenizer.from_metadata(meta)
    assert [t.token_text(i) for i in t.encode("1234", parse_special=False, add_bos=False)] == pieces


def test_bpe_llama3_ignores_merges_for_whole_words() -> None:
    meta = bpe_meta("llama3", ["abc", "<|begin_of_text|>", "<|eot_id|>"], [],
                    **{"tokenizer.ggml.bos_token_id": 257, "tokenizer.ggml.eos_token_id": 257})
    t = Tokenizer.from_metadata(meta)  # no token_type: all NORMAL; <|eot_id|> is promoted to CONTROL
    assert t.add_bos and t.eog_ids == {257, 258} and t.token_type(258) == TokenType.CONTROL
    assert t.encode("abc", parse_special=False) == [257, 256]
    assert t.encode("abc<|eot_id|>", parse_special=True, add_bos=False) == [256, 258]
    gpt2 = Tokenizer.from_metadata(bpe_meta("gpt2", ["abc"], []))
    assert gpt2.encode("abc", parse_special=False) == [ord("a"), ord("b"), ord("c")]


def test_bad_metadata_is_named() -> None:
    with pytest.raises(UnsupportedError, match="'nonesuch'"):
        Tokenizer.from_metadata(bpe_meta("nonesuch", [], []))
    with pytest.raises(UnsupportedError, match="'bert'"):
        Tokenizer.from_metadata({**bpe_meta("gpt2", [], []), "tokenizer.ggml.model": "bert"})
    with pytest.raises(ModelError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(ModelError, match="tokenizer.ggml.token_type"):
        Tokenizer.from_metadata({**bpe_meta("gpt2", [], []), "tokenizer.ggml.token_type": [1]})
    with pytest.raises(RequestError, match="token id 999"):
        Tokenizer.from_metadata(bpe_meta("gpt2", [], [])).decode([999])


# -- chat templates -------------------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]


def test_chatml_fallback() -> None:
    assert render_chat(None, USER) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(CHATML_TEMPLATE, USER, add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_chat_environment_is_hf_like() -> None:
    blocks = "{% for m in messages %}\n  {% if true %}\n{{ m.role }}\n  {% endif %}\n{% endfor %}"
    assert render_chat(blocks, USER * 2) == "user\nuser\n"  # trim_blocks + lstrip_blocks
    e_acute = [{"role": "user", "content": "é"}]
    assert render_chat("{{ messages[0] | tojson }}", e_acute) == '{"role": "user", "content": "é"}'
    tags = "{{ bos_token }}{% generation %}x{% endgeneration %}{{ foo }}"
    assert render_chat(tags, USER, bos_token="<s>", foo=1) == "<s>x1"
    globals_ = "{% for m in messages %}{% break %}{% endfor %}{{ strftime_now('%Y') | length }}"
    assert render_chat(globals_, USER) == "4"


def test_chat_errors() -> None:
    with pytest.raises(RequestError, match="alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", USER)
    with pytest.raises(ModelError, match="does not compile"):
        render_chat("{% for m in messages %}", USER)
    with pytest.raises(ModelError, match="failed to render"):
        render_chat("{{ messages[0].content + 1 }}", USER)
    with pytest.raises(ModelError, match="failed to render"):
        render_chat("{{ ''.__class__.__mro__ }}", USER)  # the sandbox refuses
    with pytest.raises(RequestError, match=r"messages\[0\]"):
        render_chat(None, [{"content": "no role"}])


# -- Qwen2.5-Coder and Gemma 3 against their reference fixtures -----------------------------

DATA = Path(__file__).parent / "data"
# known model name -> its fixture (copied from shared/fixtures)
FIXTURES = {
    "qwen2.5-coder-0.5b": json.loads((DATA / "qwen2.5-coder-0.5b-q4_k_m.json").read_text()),
    "gemma3-270m": json.loads((DATA / "gemma3-270m-q4_k_m.json").read_text()),
    "qwen2.5-coder-1.5b": json.loads((DATA / "qwen2.5-coder-1.5b-q4_k_m.json").read_text()),
}
TOKENIZE_CASES = [(name, c) for name, fx in FIXTURES.items() for c in fx["tokenize"]]
PROMPT_CASES = [(name, c) for name, fx in FIXTURES.items() for c in fx["greedy"] + fx["logits"]]
_TOKENIZERS: dict[str, Tokenizer] = {}


def tokenizer_of(name: str) -> Tokenizer:
    """The model's real tokenizer, read once per session (the model is fetched on first use)."""
    if name not in _TOKENIZERS:
        from ringllm.fetch import resolve_model

        _TOKENIZERS[name] = Tokenizer.from_gguf(resolve_model(name))
    return _TOKENIZERS[name]


def _case_id(nc: tuple[str, dict]) -> str:
    return f"{nc[0]}:{nc[1]['id']}"


@pytest.mark.model
@pytest.mark.parametrize("name, case", TOKENIZE_CASES, ids=map(_case_id, TOKENIZE_CASES))
def test_new_models_tokenize_like_llama_cpp(name: str, case: dict) -> None:
    t = tokenizer_of(name)
    assert t.encode(case["text"], parse_special=True, add_bos=False) == case["ids"]
    assert t.encode(case["text"], parse_special=False, add_bos=False) == case["ids_plain"]
    # the model's default: Gemma adds its BOS, Qwen adds none
    assert t.encode(case["text"], parse_special=True) == ([2] if name == "gemma3-270m" else []) + case["ids"]
    assert t.decode(case["ids"]) == case["text"]
    assert t.decode(case["ids_plain"]) == case["text"]


@pytest.mark.model
@pytest.mark.parametrize("name, case", PROMPT_CASES, ids=map(_case_id, PROMPT_CASES))
def test_new_models_prompts_match_the_reference(name: str, case: dict) -> None:
    from ringllm.runtime import ModelInfo, prompt_ids

    t = tokenizer_of(name)
    # prompt_ids needs only the tokenizer and template of a ModelInfo
    info = ModelInfo(path="", config=None, fingerprint="", tokenizer=t,  # type: ignore[arg-type]
                     chat_template=t.chat_template, ffn_block=0)
    if case.get("messages"):
        rendered = render_chat(t.chat_template, case["messages"], bos_token=t.token_text(t.bos_id),
                               eos_token=t.token_text(t.eos_id))
        assert rendered == case["prompt"]
        assert prompt_ids(info, messages=case["messages"]) == case["prompt_ids"]
        user = [m for m in case["messages"] if m["role"] == "user"]
        if len(user) == len(case["messages"]) == 1:  # the CLI's path: a prompt string
            assert prompt_ids(info, user[0]["content"]) == case["prompt_ids"]
    else:
        assert prompt_ids(info, case["prompt"], raw=True) == case["prompt_ids"]
    if "ids" in case:  # a greedy continuation: its text decodes from its ids
        assert t.decode(case["ids"]) == case["text"]


@pytest.mark.model
@pytest.mark.parametrize("name", list(FIXTURES))
def test_new_models_special_tokens(name: str) -> None:
    t = tokenizer_of(name)
    if name == "gemma3-270m":
        assert (t.model, t.vocab_size, t.bos_id, t.eos_id, t.add_bos, t.add_space_prefix) == \
            ("llama", 262144, 2, 1, True, False)
        assert t.eog_ids == {1, 106, 212}  # <eos>, <end_of_turn>, </s>: the fixture's notes
        assert t.missing_bytes == frozenset()  # <0x00>..<0xFF> all present: byte fallback is lossless
        from ringllm.chat import GEMMA_TEMPLATE

        assert t.chat_template == GEMMA_TEMPLATE  # the base model's GGUF ships none
    else:
        assert (t.model, t.pre, t.vocab_size, t.bos_id, t.eos_id, t.add_bos) == \
            ("gpt2", "qwen2", 151936, 151643, 151645, False)
        # <|endoftext|>, <|im_end|>, <|fim_pad|>, <|repo_name|>, <|file_sep|>; not the NORMAL "</s>"
        assert t.eog_ids == {151643, 151645, 151662, 151663, 151664}
        assert t.token_text(128247) == "</s>" and t.token_type(128247) == TokenType.NORMAL
        assert "You are Qwen, created by Alibaba Cloud." in t.chat_template
        assert t.decode([151644, 872, 151645], skip_special=True) == "user"


@pytest.mark.model
@pytest.mark.parametrize("name", list(FIXTURES))
def test_new_models_stream_decode_holds_partial_utf8(name: str) -> None:
    t = tokenizer_of(name)
    held = 0
    for case in FIXTURES[name]["tokenize"]:
        dec = t.stream_decoder()
        pieces = [dec.push(i) for i in case["ids"]]
        assert "".join(pieces) + dec.flush() == case["text"]
        assert not any("\ufffd" in p for p in pieces)
        held += sum(p == "" for p in pieces)
    if name == "gemma3-270m":
        # Gemma's fixture texts are all whole tokens; U+1D306 is not in its vocabulary, so it
        # falls back to its UTF-8 bytes F0 9D 8C 86 as <0xNN> tokens (<0x00> is id 238).
        ids = t.encode("a𝌆", parse_special=False, add_bos=False)
        assert ids[1:] == [238 + 0xF0, 238 + 0x9D, 238 + 0x8C, 238 + 0x86]
        assert all(t.token_type(i) == TokenType.BYTE for i in ids[1:])
        dec = t.stream_decoder()
        assert [dec.push(i) for i in ids] == ["a", "", "", "", "𝌆"] and dec.flush() == ""
        assert dec.push(ids[1]) == "" and dec.flush() == "\ufffd"  # a cut-off tail, flushed
    else:
        assert held  # Qwen splits some characters (emoji, Arabic) over several tokens


# Text without "▁" (SentencePiece reads it back as a space) and without the bytes a vocabulary
# lacks (Qwen2.5 has a symbol for every byte; checked by the assertion inside).
ROUND_TRIP_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="▁"), max_size=60) | \
    st.lists(st.sampled_from(["<start_of_turn>", "<|im_end|>", "<eos>", "</s>", " ", "\n", "é", "😀", "▁x"]),
             max_size=8).map("".join)


@pytest.mark.model
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "gemma3-270m"])
def test_new_models_round_trip(name: str) -> None:
    t = tokenizer_of(name)
    assert t.missing_bytes == frozenset()

    @FAST
    @given(text=ROUND_TRIP_TEXT)
    def check(text: str) -> None:
        want = text if t.model == "gpt2" else text.replace("▁", " ")
        for parse_special in (False, True):
            ids = t.encode(text, parse_special=parse_special, add_bos=False)
            assert t.decode(ids) == want
            dec = t.stream_decoder()
            assert "".join(dec.push(i) for i in ids) + dec.flush() == want

    check()


def test_gemma_template_rules() -> None:
    from ringllm.chat import GEMMA_TEMPLATE, default_template

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi \n"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}]
    assert render_chat(GEMMA_TEMPLATE, chat, bos_token="<bos>") == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n")
    assert render_chat(GEMMA_TEMPLATE, chat[1:2], add_generation_prompt=False, bos_token="<bos>") == \
        "<bos><start_of_turn>user\nHi<end_of_turn>\n"
    with pytest.raises(RequestError, match="alternate"):
        render_chat(GEMMA_TEMPLATE, [{"role": "assistant", "content": "x"}])
    with pytest.raises(RequestError, match="alternate"):
        render_chat(GEMMA_TEMPLATE, [{"role": "user", "content": "x"}] * 2)
    assert default_template({"<start_of_turn>", "<end_of_turn>", "a"}) == GEMMA_TEMPLATE
    assert default_template({"<|im_start|>", "<|im_end|>"}) == CHATML_TEMPLATE
    t = spm(BASE)  # a llama vocab without a template or Gemma's turn tokens: ChatML
    assert t.chat_template == CHATML_TEMPLATE


def test_eog_by_text_follows_llama_cpp() -> None:
    normal, user_defined, control = 1, 4, 3
    extra = ["</s>", "<eos>", "<|fim_pad|>", "<|repo_name|>", "<|fim_repo|>", "<|file_sep|>", "<|im_end|>"]
    kinds = [normal, user_defined, control, control, control, control, normal]
    meta = bpe_meta("gpt2", extra, [], **{"tokenizer.ggml.token_type": [normal] * 256 + kinds,
                                           "tokenizer.ggml.eos_token_id": 0})
    t = Tokenizer.from_metadata(meta)
    # "</s>" is NORMAL here: plain text. "<eos>" is special, so it ends generation; of the two
    # repo-name spellings the first in llama.cpp's list wins; <|im_end|> is promoted to CONTROL.
    assert t.eog_ids == {0, 257, 258, 260, 261, 262}
    assert t.token_type(262) == TokenType.CONTROL and t.token_type(256) == TokenType.NORMAL
    named = Tokenizer.from_metadata({**meta, "tokenizer.ggml.fim_pad_token_id": 259})
    assert named.eog_ids == {0, 257, 259, 260, 261, 262}  # a metadata id replaces the text search


@pytest.mark.model
def test_qwen_template_keeps_a_given_system_prompt() -> None:
    t = tokenizer_of("qwen2.5-coder-0.5b")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}]
    assert render_chat(t.chat_template, chat) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n")
