"""Tokenizers for the two GGUF vocabulary kinds ringllm runs, built from GGUF metadata.

``tokenizer.ggml.model == "gpt2"``: byte-level BPE (SmolLM2: pre-tokenizer "smollm"; Qwen2.5:
"qwen2"). The text is split by the regexes llama.cpp uses for ``tokenizer.ggml.pre`` (each
regex splits every piece the previous one left; the text between matches stays a piece of its
own), each piece is mapped byte by byte to the GPT-2 alphabet, and the `tokenizers` library
merges it by rank.

``tokenizer.ggml.model == "llama"``: SentencePiece-style BPE over scores (Llama 2, Gemma 3),
llama.cpp's algorithm written out here (the `tokenizers` library merges by rank, not by score).
Spaces become "▁"; when ``add_space_prefix`` a "▁" is put before every run of plain text
(Gemma's GGUF sets it false: "Hello world" is "Hello", "▁world"); the adjacent pair whose
concatenation is the best-scored token merges first (ties: leftmost); a
symbol that is not a token becomes its UTF-8 bytes as ``<0xNN>`` tokens.

Both follow llama.cpp (``llama-vocab.cpp``), which the reference fixture agrees with. Special
tokens are cut out of the text before either model runs, longest first, as llama.cpp does:
CONTROL and UNKNOWN tokens only when ``parse_special``, USER_DEFINED tokens always (llama.cpp
and Hugging Face both match non-special added tokens in plain text).
"""

from __future__ import annotations

import codecs
import enum
import heapq
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from ringllm.chat import default_template
from ringllm.errors import ModelError, RequestError, UnsupportedError
from ringllm.gguf_parse import GGUFFile

log = logging.getLogger(__name__)


class TokenType(enum.IntEnum):
    """Values of GGUF ``tokenizer.ggml.token_type`` (llama.cpp's ``llama_token_type``)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Rendered as nothing by decode(skip_special=True); cut out of text only when parse_special.
SPECIAL_TYPES = frozenset({TokenType.CONTROL, TokenType.UNKNOWN})
# Every type that encode cuts out of text as a whole token (never merged from pieces).
_CUT_TYPES = SPECIAL_TYPES | {TokenType.USER_DEFINED}

# llama.cpp ends generation on tokens with these texts even when no metadata key names them,
# and promotes them to CONTROL (ref llama.cpp issue 9606). SmolLM2: <|endoftext|>, <|im_end|>;
# Qwen2.5: the same two; Gemma 3: <end_of_turn>.
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
})
# llama.cpp's list also has these, but in some vocabularies they are ordinary text pieces
# (Qwen2.5's "</s>", id 128247, is a NORMAL token: an HTML closing tag a coder model writes),
# so they end generation only where the GGUF marks them special (Gemma 3's "</s>", id 212,
# is USER_DEFINED; the Gemma 3 reference fixture lists it among the stops).
EOG_TEXTS_IF_SPECIAL = frozenset({"</s>", "<eos>"})
# Fill-in-the-middle tokens llama.cpp also stops on, found by text (first in list order) when
# the metadata has no fim_pad/fim_rep/fim_sep id. Qwen2.5-Coder: <|fim_pad|>, <|repo_name|>,
# <|file_sep|>; SmolLM2: <reponame>.
_FIM_EOG_TEXTS = {
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}

# Metadata ids that end generation besides the EOS (llama.cpp adds the FIM ones too).
_EOG_KEYS = ("eos", "eot", "eom", "fim_pad", "fim_rep", "fim_sep")

# Pre-tokenizer regexes, in the Hugging Face (oniguruma) spelling of llama.cpp's lists.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")


@dataclass(frozen=True)
class _Pre:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is itself a token is taken whole (llama3)
    add_bos: bool = False  # used when the metadata has no tokenizer.ggml.add_bos_token


_PRE_FAMILIES: list[tuple[tuple[str, ...], _Pre]] = [
    (("default",), _Pre((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", "[0-9][0-9][0-9]"))),
    (("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"), _Pre((_GPT2_RE,))),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
     _Pre((r"\p{N}", _GPT2_RE))),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"),
     _Pre((_LLAMA3_RE,), ignore_merges=True, add_bos=True)),
    (("dbrx", "smaug-bpe"), _Pre((_LLAMA3_RE,))),
    (("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), _Pre((_QWEN2_RE,))),
    (("falcon",), _Pre((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_RE, "[0-9][0-9][0-9]"))),
]
PRE_TOKENIZERS: dict[str, _Pre] = {name: pre for names, pre in _PRE_FAMILIES for name in names}

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _gpt2_alphabet() -> tuple[dict[int, str], dict[str, int]]:
    """GPT-2's reversible byte <-> printable character table (``bytes_to_unicode``)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    enc = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in enc:
            enc[b] = chr(256 + extra)
            extra += 1
    return enc, {c: b for b, c in enc.items()}


class Tokenizer:
    """A GGUF vocabulary: text <-> token ids.

    Attributes: ``model`` ("gpt2" or "llama"), ``pre`` (the pre-tokenizer name or None),
    ``vocab_size``, ``bos_id``/``eos_id``/``unk_id`` (None when the model has none),
    ``eog_ids`` (every id that ends generation), ``add_bos``/``add_eos`` (what ``encode``
    adds by default), ``add_space_prefix``, ``chat_template`` (the GGUF's, else the family's
    standard one from :func:`ringllm.chat.default_template`) and
    ``missing_bytes``: byte values the vocabulary has no symbol for. Byte-level ``encode``
    drops such bytes, as llama.cpp and Hugging Face do (SmolLM2 lacks 21, e.g. 0x04 and the
    0xF1 lead byte of U+40000..U+7FFFF); a SentencePiece symbol needing one becomes ``<unk>``.
    Apart from those, ``decode(encode(s, ...)) == s``.

    Build it with :meth:`from_metadata` or :meth:`from_gguf`. Malformed metadata raises
    :class:`ModelError` naming the key; an unknown tokenizer model or pre-tokenizer raises
    :class:`UnsupportedError` naming it.
    """

    def __init__(self, meta: Mapping[str, Any]) -> None:
        self.model = str(_need(meta, "tokenizer.ggml.model"))
        tokens = [_as_str(t) for t in _need(meta, "tokenizer.ggml.tokens")]
        if not tokens:
            raise ModelError("metadata 'tokenizer.ggml.tokens' is empty")
        self._tokens = tokens
        self._types = _read_types(meta, len(tokens))
        self._to_id = {t: i for i, t in enumerate(tokens)}  # a duplicate text keeps its last id, as in llama.cpp
        ids = {k: _opt_id(meta, k, len(tokens)) for k in ("bos", "eos", "unknown", *_EOG_KEYS[1:])}
        self.bos_id, self.eos_id, self.unk_id = ids["bos"], ids["eos"], ids["unknown"]
        self.eog_ids: frozenset[int] = frozenset(self._find_eog(ids))
        # The GGUF's template, else the family's standard one (see ringllm.chat).
        self.chat_template: str = meta.get("tokenizer.chat_template") or default_template(self._to_id)

        if self.model == "gpt2":
            default_bos = self._init_bpe(meta)
        elif self.model == "llama":
            default_bos = self._init_spm(meta)
        else:
            raise UnsupportedError(
                f"tokenizer.ggml.model {self.model!r} is not supported (supported: 'gpt2', 'llama')")
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos))
        self.add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        if self.add_bos and self.bos_id is None:
            raise ModelError("tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is missing")
        if self.add_eos and self.eos_id is None:
            raise ModelError("tokenizer.ggml.add_eos_token is true but tokenizer.ggml.eos_token_id is missing")
        # Cut out longest first, like llama.cpp's tokenizer_st_partition.
        self._cut = sorted(((t, i) for i, t in enumerate(tokens) if t and self._types[i] in _CUT_TYPES),
                           key=lambda ti: -len(ti[0]))
        # Only the SentencePiece encoder needs text -> id after this (it keeps its own
        # reference); the token strings are kept packed (see _Packed).
        del self._to_id
        self._tokens = _Packed([t.encode("utf-8") for t in tokens], text=True)

    def _find_eog(self, ids: Mapping[str, int | None]) -> set[int]:
        """Ids that end generation, as llama.cpp finds them; promotes those found by text."""
        eog = {ids[k] for k in _EOG_KEYS if ids[k] is not None}
        found = [self._to_id.get(t) for t in EOG_TEXTS]
        found += [i for t in EOG_TEXTS_IF_SPECIAL
                  if (i := self._to_id.get(t)) is not None and self._types[i] != TokenType.NORMAL]
        for key, texts in _FIM_EOG_TEXTS.items():
            if ids[key] is None:
                found.append(next((i for t in texts if (i := self._to_id.get(t)) is not None), None))
        for i in found:
            if i is not None:
                eog.add(i)
                self._types[i] = TokenType.CONTROL
        return eog

    def _init_bpe(self, meta: Mapping[str, Any]) -> bool:
        """Byte-level BPE; returns the pre-tokenizer's default for add_bos."""
        self.pre: str | None = str(meta.get("tokenizer.ggml.pre") or "default")
        if "tokenizer.ggml.pre" not in meta:
            log.warning("GGUF has no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer")
        spec = PRE_TOKENIZERS.get(self.pre)
        if spec is None:
            raise UnsupportedError(f"tokenizer.ggml.pre {self.pre!r} is not supported "
                                   f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
        self._bpe: Any = _build_bpe(self._to_id, _need(meta, "tokenizer.ggml.merges"), spec)
        self._spm: _Spm | None = None
        self.add_space_prefix = False  # llama.cpp never prefixes BPE text, whatever the key says
        self._bytes = _Packed(_bpe_token_bytes(self._tokens, self._types))
        alphabet, _ = _gpt2_alphabet()
        self.missing_bytes = frozenset(b for b in range(256) if alphabet[b] not in self._to_id)
        return spec.add_bos

    def _init_spm(self, meta: Mapping[str, Any]) -> bool:
        """SentencePiece-style vocab; returns the default for add_bos (true, as in llama.cpp)."""
        self.pre = None
        scores = _need(meta, "tokenizer.ggml.scores")
        if len(scores) != len(self._tokens):
            raise ModelError(
                f"metadata 'tokenizer.ggml.scores' has {len(scores)} entries for {len(self._tokens)} tokens")
        self._bpe = None
        self._spm = _Spm(self._to_id, [float(x) for x in scores], self.unk_id)
        self.add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        self._bytes = _Packed(_spm_token_bytes(self._tokens, self._types))
        self.missing_bytes = frozenset(b for b in range(256) if self._spm.byte_ids[b] is None)
        return True

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from a mapping of GGUF key -> Python value (arrays as lists)."""
        return cls(meta)

    @classmethod
    def from_gguf(cls, source: Any) -> Tokenizer:
        """Build from a GGUF file path, a ``gguf.GGUFReader``, or its ``fields`` mapping."""
        if isinstance(source, (str, os.PathLike)):
            try:
                # GGUFFile, not GGUFReader: Qwen2.5's 151,936-token vocab parses in 1.9 s instead of 32
                with GGUFFile(source) as f:
                    return cls({k: v for k, v in f.metadata.items() if k.startswith("tokenizer.")})
            except OSError as exc:
                raise ModelError(f"cannot read GGUF file {source}: {exc}") from None
        fields = getattr(source, "fields", source)
        meta = {}
        for key, field in fields.items():
            if key.startswith("tokenizer."):
                try:
                    meta[key] = field.contents() if hasattr(field, "contents") else field
                except Exception as exc:  # a malformed field: name it
                    raise ModelError(f"GGUF metadata field {key!r} is malformed: {exc}") from None
        return cls(meta)

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, eog_ids={sorted(self.eog_ids)})")

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    # -- encoding -------------------------------------------------------------------------

    def encode(self, text: str, *, parse_special: bool, add_bos: bool | None = None,
               add_eos: bool | None = None) -> list[int]:
        """Token ids of `text`.

        `parse_special` cuts CONTROL/UNKNOWN token texts (e.g. ``<|im_start|>``) out of the
        text as single tokens; otherwise they are tokenized as plain text. `add_bos`/`add_eos`
        default to the model's ``add_bos``/``add_eos``.
        """
        out: list[int] = []
        if self.add_bos if add_bos is None else add_bos:
            out.append(self._need_id(self.bos_id, "BOS"))
        prev_cut = True  # SentencePiece prefixes a space to text at the start and after a cut token
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                prev_cut = True
            elif self._bpe is not None:
                out.extend(self._bpe.encode(frag, add_special_tokens=False).ids)
            else:
                assert self._spm is not None
                prefix = " " if self.add_space_prefix and prev_cut else ""
                out.extend(self._spm.encode((prefix + frag).replace(" ", "▁")))
                prev_cut = False
        if self.add_eos if add_eos is None else add_eos:
            out.append(self._need_id(self.eos_id, "EOS"))
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """`text` as plain-text fragments (str) and cut-out token ids (int), in order."""
        frags: list[str | int] = [text] if text else []
        for tok_text, tok_id in self._cut:
            if not parse_special and self._types[tok_id] in SPECIAL_TYPES:
                continue
            if tok_text not in text:  # cheap filter: most specials never occur
                continue
            split: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or tok_text not in f:
                    split.append(f)
                    continue
                for k, part in enumerate(f.split(tok_text)):
                    if k:
                        split.append(tok_id)
                    if part:
                        split.append(part)
            frags = split
        return frags

    # -- decoding -------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` stands for (a special token's own text, UTF-8 encoded)."""
        self._check_id(token_id)
        return self._bytes[token_id]

    def token_text(self, token_id: int) -> str:
        """The token's string as stored in the vocabulary (e.g. ``"Ġworld"``, ``"<0x0A>"``)."""
        self._check_id(token_id)
        return self._tokens[token_id]

    def token_type(self, token_id: int) -> TokenType:
        self._check_id(token_id)
        return self._types[token_id]

    def is_special(self, token_id: int) -> bool:
        """True for CONTROL and UNKNOWN tokens (what ``skip_special`` drops)."""
        return self.token_type(token_id) in SPECIAL_TYPES

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD.

        Special tokens render as their text unless `skip_special`. For a SentencePiece vocab
        with ``add_space_prefix`` the space that ``encode`` put before each run of plain text
        is removed again, so ``decode(encode(s, ...)) == s`` (see the class docstring for the
        bytes a vocabulary lacks; SentencePiece also reads a literal "▁" back as a space).
        """
        strip = self.add_space_prefix
        parts = []
        for i in ids:
            piece, strip = self._piece(i, strip, skip_special)
            parts.append(piece)
        return b"".join(parts).decode("utf-8", "replace")

    def stream_decoder(self, *, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special=skip_special)

    def _piece(self, token_id: int, strip: bool, skip_special: bool) -> tuple[bytes, bool]:
        """Bytes of one token in a decoded sequence, and whether the next token's leading
        space is the prefix ``encode`` added (so is dropped)."""
        self._check_id(token_id)
        kind = self._types[token_id]
        if kind in _CUT_TYPES:
            hidden = skip_special and kind in SPECIAL_TYPES
            return (b"" if hidden else self._bytes[token_id]), self.add_space_prefix
        piece = self._bytes[token_id]
        if strip and piece[:1] == b" ":
            return piece[1:], False
        return piece, strip and not piece

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < len(self._tokens):
            raise RequestError(f"token id {token_id} is outside the vocabulary (size {len(self._tokens)})")

    def _need_id(self, token_id: int | None, what: str) -> int:
        if token_id is None:
            raise ModelError(f"the model's vocabulary has no {what} token")
        return token_id


class StreamDecoder:
    """Token ids in, one at a time; text pieces out that never split a UTF-8 sequence.

    Contract: the pieces returned by :meth:`push` for ids, followed by :meth:`flush`, concatenate
    to ``tokenizer.decode(ids, skip_special=...)``. An incomplete UTF-8 sequence is held until a
    later token completes it; a piece holds U+FFFD only where the bytes are invalid UTF-8, not
    merely incomplete. :meth:`flush` replaces a held incomplete tail with U+FFFD and resets the
    decoder for a new sequence.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._strip = tokenizer.add_space_prefix

    def push(self, token_id: int) -> str:
        """The text that `token_id` completes (possibly empty). Bad ids raise RequestError."""
        piece, self._strip = self._tok._piece(token_id, self._strip, self._skip)
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """Whatever is held back, with an incomplete sequence as U+FFFD; then reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self._strip = self._tok.add_space_prefix
        return text


class _Spm:
    """llama.cpp's SentencePiece BPE (``llm_tokenizer_spm_session``): merge by token score."""

    def __init__(self, to_id: Mapping[str, int], scores: Sequence[float], unk_id: int | None) -> None:
        self._to_id = to_id
        self._scores = scores
        self._unk = unk_id
        self.byte_ids = [to_id.get(f"<0x{b:02X}>") for b in range(256)]

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, whose spaces are already "▁"."""
        syms = list(text)  # symbol i's text; "" once merged into its left neighbour
        nxt = [*range(1, len(syms)), -1]
        prv = list(range(-1, len(syms) - 1))
        heap: list[tuple[float, int, int, int]] = []

        def add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            tid = self._to_id.get(syms[left] + syms[right])
            if tid is not None:
                # max score first, then leftmost: llama.cpp's llm_bigram_spm comparator
                heapq.heappush(heap, (-self._scores[tid], left, right, len(syms[left]) + len(syms[right])))

        for i in range(len(syms) - 1):
            add(i, i + 1)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if not syms[left] or not syms[right] or len(syms[left]) + len(syms[right]) != size:
                continue  # stale: one side merged since this pair was queued
            syms[left] += syms[right]
            syms[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            add(prv[left], left)
            add(left, nxt[left])

        out: list[int] = []
        i = 0 if syms else -1
        while i >= 0:
            out.extend(self._symbol_ids(syms[i]))
            i = nxt[i]
        return out

    def _symbol_ids(self, sym: str) -> list[int]:
        if (tid := self._to_id.get(sym)) is not None:
            return [tid]
        byte_ids = [self.byte_ids[b] for b in sym.encode("utf-8")]
        if None not in byte_ids:
            return byte_ids  # type: ignore[return-value]
        if self._unk is None:
            raise ModelError(f"cannot tokenize {sym!r}: the vocabulary has neither its byte tokens nor <unk>")
        return [self._unk]  # one <unk> per unknown symbol, as SentencePiece does


def _build_bpe(vocab: dict[str, int], merges: Sequence[Any], spec: _Pre) -> Any:
    """The byte-level BPE of ``vocab`` (text -> id, the tokenizer's own map: not copied, to
    keep a 152k-token vocabulary's build peak down) and the GGUF's merges."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    pairs = []
    for k, m in enumerate(merges):
        m = _as_str(m)
        cut = m.find(" ", 1)  # from 1, like llama.cpp: a merge may begin with a space
        if cut < 0:
            raise ModelError(f"metadata 'tokenizer.ggml.merges'[{k}] = {m!r} is not two tokens and a space")
        a, b = m[:cut], m[cut + 1:]
        if a in vocab and b in vocab and a + b in vocab:  # the library refuses merges outside the vocab
            pairs.append((a, b))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=spec.ignore_merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return hf


def _bpe_token_bytes(tokens: Sequence[str], types: Sequence[TokenType]) -> list[bytes]:
    _, to_byte = _gpt2_alphabet()
    out = []
    for text, kind in zip(tokens, types):
        if kind in _CUT_TYPES:  # stored as raw text, not in the byte alphabet
            out.append(text.encode("utf-8"))
        elif kind == TokenType.BYTE and (m := _BYTE_TOKEN.fullmatch(text)):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            # A character outside the alphabet cannot come from encode; keep it as its UTF-8.
            out.append(b"".join(bytes([to_byte[c]]) if c in to_byte else c.encode("utf-8") for c in text))
    return out


def _spm_token_bytes(tokens: Sequence[str], types: Sequence[TokenType]) -> list[bytes]:
    out = []
    for text, kind in zip(tokens, types):
        if kind == TokenType.BYTE and (m := _BYTE_TOKEN.fullmatch(text)):
            out.append(bytes([int(m.group(1), 16)]))
        elif kind in _CUT_TYPES:
            out.append(text.encode("utf-8"))
        else:
            out.append(text.replace("▁", " ").encode("utf-8"))
    return out


class _Packed:
    """An immutable sequence of byte strings (or UTF-8 strings, ``text=True``) held as one blob
    and an offsets array. Why: a vocabulary as Python lists is ~100k small objects (~9 MB for
    SmolLM2's 49,152 tokens), and as they are built between the metadata's own short-lived
    lists they pin half-empty allocator arenas for the life of the peer; packed, a peer holds
    8 MB less after opening SmolLM2 (74 MB instead of 82)."""

    def __init__(self, items: Sequence[bytes], text: bool = False) -> None:
        self._off = np.zeros(len(items) + 1, np.int64)
        np.cumsum([len(b) for b in items], out=self._off[1:])
        self._blob = b"".join(items)
        self._text = text

    def __len__(self) -> int:
        return len(self._off) - 1

    def __getitem__(self, i: int) -> Any:
        b = self._blob[self._off[i]:self._off[i + 1]]
        return b.decode("utf-8") if self._text else b


def _need(meta: Mapping[str, Any], key: str) -> Any:
    if key not in meta:
        raise ModelError(f"metadata {key!r} is missing")
    return meta[key]


def _as_str(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def _read_types(meta: Mapping[str, Any], n: int) -> list[TokenType]:
    raw = meta.get("tokenizer.ggml.token_type")
    if raw is None:
        return [TokenType.NORMAL] * n
    if len(raw) != n:
        raise ModelError(f"metadata 'tokenizer.ggml.token_type' has {len(raw)} entries for {n} tokens")
    try:
        return [TokenType(int(t)) for t in raw]
    except ValueError as exc:
        raise ModelError(f"metadata 'tokenizer.ggml.token_type': {exc}") from None


def _opt_id(meta: Mapping[str, Any], name: str, n: int) -> int | None:
    key = f"tokenizer.ggml.{name}_token_id"
    value = meta.get(key)
    if value is None:
        return None
    if not 0 <= int(value) < n:
        # llama.cpp ignores an out-of-range special id too; say so rather than fail the load
        log.warning("metadata %r = %s is outside the vocabulary (size %d); ignored", key, value, n)
        return None
    return int(value)
