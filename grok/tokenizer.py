"""SentencePiece tokenizer, as the release uses it: no BOS on prompts, pad/eos from the config.

Streaming needs care because SentencePiece text is not a per-token concatenation: the first
piece loses its leading "▁", and byte-fallback pieces only form a character once all of its
UTF-8 bytes have arrived. `StreamDecoder` handles both so that streamed text equals `decode`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import numpy as np
import sentencepiece as spm

from grok.config import GrokConfig
from grok.errors import GrokError

# What SentencePiece decodes an incomplete (or invalid) byte-fallback sequence to.
_REPLACEMENT = "\ufffd"
# Error messages stay one bounded line: at most this many characters of a text, and of
# the characters a tokenizer cannot encode.
_SHOWN_TEXT = 40
_SHOWN_CHARS = 10


def _short(text: str) -> str:
    """`text` quoted, escaped (no line breaks) and cut to _SHOWN_TEXT characters."""
    return repr(text[:_SHOWN_TEXT]) + ("..." if len(text) > _SHOWN_TEXT else "")


def default_allowed(config: GrokConfig, tokenizer: Tokenizer | None = None) -> np.ndarray:
    """bool[vocab_size]: the tokens sampling may draw when the user names none. All but
    the config's pad and, with a tokenizer, its control pieces (BOS, unknown), so a model
    unsure of itself cannot print empty text; EOS stays, since it ends a row."""
    allowed = np.ones(config.vocab_size, bool)
    allowed[config.pad_token] = False
    if tokenizer is not None:
        control = np.asarray(tokenizer.control_ids, np.int64)
        allowed[control[control < config.vocab_size]] = False
    allowed[config.eos_token] = True
    return allowed


class Tokenizer:
    """Thin wrapper over a SentencePiece model with the ids the model config names."""

    def __init__(self, path: str | os.PathLike, pad_id: int = 0, eos_id: int = 2):
        self.path = os.fspath(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            # SentencePiece reports a missing file and a malformed one alike, as RuntimeError.
            reason = ("does not exist" if not os.path.exists(self.path)
                      else f"could not be read ({e})")
            raise GrokError(f"tokenizer file {self.path!r} {reason}: expected a SentencePiece "
                             f"model (a .model protobuf such as the release's tokenizer.model)"
                             ) from None
        self._pad_id = self._check_id("pad_id", pad_id)
        self._eos_id = self._check_id("eos_id", eos_id)

    @classmethod
    def from_config(cls, path: str | os.PathLike, config: GrokConfig) -> Tokenizer:
        """Takes pad/eos from the model config. The vocab sizes may differ (the tiny fixture
        pairs a 4096-row model with the full tokenizer), so they are not compared."""
        return cls(path, pad_id=config.pad_token, eos_id=config.eos_token)

    def _check_id(self, name: str, value) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise GrokError(f"{name} must be an integer, got {value!r}")
        if not 0 <= value < self.vocab_size:
            raise GrokError(f"{name}={value} must lie in [0, vocab_size={self.vocab_size})")
        return value

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def bos_id(self) -> int:
        """The model's own BOS (-1 if it has none); the release never prepends it."""
        return self._sp.bos_id()

    @functools.cached_property
    def control_ids(self) -> list[int]:
        """Ids that stand for no text (pad, BOS, the unknown piece, other control pieces),
        except EOS: a model should end a row, never write one of these."""
        sp = self._sp
        return [i for i in range(self.vocab_size) if i != self._eos_id
                and (i == self._pad_id or sp.is_control(i) or sp.is_unknown(i))]

    def raw_pieces(self) -> list[str]:
        """Each id's SentencePiece piece as stored ("▁" for a space, "<0xE2>" for a byte),
        and "" for the ids that stand for no text (pad, control, unknown; EOS included)."""
        sp = self._sp
        return ["" if i == self._pad_id or i == self._eos_id or sp.is_control(i)
                or sp.is_unknown(i) else sp.id_to_piece(i) for i in range(self.vocab_size)]

    @functools.cached_property
    def strips_leading_space(self) -> bool:
        """Whether `decode` drops the first piece's leading "▁" (SentencePiece's dummy
        prefix): then text that begins a generation is written by a piece with a "▁"."""
        sp = self._sp
        marked = next((i for i in range(self.vocab_size) if not sp.is_control(i)
                       and sp.id_to_piece(i).startswith("\u2581")
                       and len(sp.id_to_piece(i)) > 1), None)
        return marked is not None and sp.decode([marked]) == \
            sp.id_to_piece(marked)[1:].replace("\u2581", " ")

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; raises GrokError, naming them, where some characters have
        no piece (they would all become the unknown token, and the model see nothing)."""
        if not isinstance(text, str):
            raise GrokError(f"encode expects a str, got {type(text).__name__}")
        ids = self._sp.encode(text)
        unk = self._sp.unk_id()
        if unk in ids:
            pieces = self._sp.encode(text, out_type=str)  # an unknown piece keeps its text
            missing = dict.fromkeys(c for i, piece in zip(ids, pieces, strict=True) if i == unk
                                    for c in piece.replace("\u2581", " "))
            shown = ", ".join(repr(c) for c in list(missing)[:_SHOWN_CHARS])
            more = f" and {len(missing) - _SHOWN_CHARS} more" \
                if len(missing) > _SHOWN_CHARS else ""
            raise GrokError(
                f"text {_short(text)} has characters the tokenizer {self.path!r} cannot encode: "
                f"{shown}{more} (expected only characters it has pieces for)")
        if add_bos:
            if self.bos_id < 0:
                raise GrokError(f"tokenizer {self.path!r} has no BOS piece to add")
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(self._checked_ids(ids))

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        # SentencePiece raises a bare IndexError without naming the id; numpy ints become int.
        out = [int(i) for i in ids]
        for i in out:
            if not 0 <= i < self.vocab_size:
                raise GrokError(f"token id {i} must lie in [0, vocab_size={self.vocab_size})")
        return out

    def piece(self, token_id: int) -> str:
        """The token's own text, as logprob listings show it: its piece with SentencePiece's
        word marker as a space (byte pieces stay `<0xE2>`)."""
        [token_id] = self._checked_ids([token_id])
        return self._sp.id_to_piece(token_id).replace("\u2581", " ")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns token ids pushed one at a time into text increments whose concatenation (with
    `flush()`) is exactly `tokenizer.decode(all ids)`.

    Each step decodes only a window `ids[start:]` and emits what it adds to the already
    emitted `ids[start:done]`. That difference is the true increment provided the window's
    own leading-space stripping happens inside `ids[start:done]` (so `start` only moves to
    positions whose emitted part decodes to non-empty text) and no character straddles
    `done` (so `done` only moves when the text does not end in an incomplete byte sequence).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._start = 0  # window start
        self._done = 0  # ids whose text has been returned

    def push(self, token_id: int) -> str:
        """Returns the text completed by `token_id`; "" while a character is incomplete."""
        self._ids.extend(self._tok._checked_ids([token_id]))
        text = self._tok.decode(self._ids[self._start:])
        if text.endswith(_REPLACEMENT):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """Ends the sequence: returns whatever was held back (an incomplete character as
        `decode` gives it, U+FFFD) and starts afresh, so the decoder can be reused."""
        rest = ""
        if self._done < len(self._ids):
            rest = self._advance(self._tok.decode(self._ids[self._start:]))
        self._ids, self._start, self._done = [], 0, 0
        return rest

    def _advance(self, text: str) -> str:
        emitted = self._tok.decode(self._ids[self._start:self._done])
        assert text.startswith(emitted), (emitted, text)
        new = text[len(emitted):]
        if self._tok.decode(self._ids[self._done:]):
            self._start = self._done
        self._done = len(self._ids)
        return new
