"""SentencePiece tokenizer, as the release uses it: no BOS on prompts, pad/eos from the config.

Streaming needs care because SentencePiece text is not a per-token concatenation: the first
piece loses its leading "▁", and byte-fallback pieces only form a character once all of its
UTF-8 bytes have arrived. `StreamDecoder` handles both so that streamed text equals `decode`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import sentencepiece as spm

from grok.config import GrokConfig

# What SentencePiece decodes an incomplete (or invalid) byte-fallback sequence to.
_REPLACEMENT = "\ufffd"


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
            raise ValueError(f"tokenizer file {self.path!r} {reason}: expected a SentencePiece "
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
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if not 0 <= value < self.vocab_size:
            raise ValueError(f"{name}={value} must lie in [0, vocab_size={self.vocab_size})")
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

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        ids = self._sp.encode(text)
        if add_bos:
            if self.bos_id < 0:
                raise ValueError(f"tokenizer {self.path!r} has no BOS piece to add")
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(self._checked_ids(ids))

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        # SentencePiece raises a bare IndexError without naming the id; numpy ints become int.
        out = [int(i) for i in ids]
        for i in out:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} must lie in [0, vocab_size={self.vocab_size})")
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
