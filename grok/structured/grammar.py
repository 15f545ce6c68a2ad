"""The xgrammar side of structured output: the model's vocabulary as xgrammar sees it, specs
built into grammars, and the per-request matcher that says which tokens may come next.

Imported only where structured output is used (xgrammar imports PyTorch, seconds of
start-up). Masks are xgrammar's packed form: int32 words [ceil(V / 32)], bit j of word i
allowing token 32 i + j; the compiled sampler unpacks them on the device
(`grok.sampling.unpack_token_mask`).

SentencePiece drops the leading "▁" of a generation's first piece when it decodes, and a
row's text is the decode of its tokens alone. So with such a tokenizer a spec is compiled
twice, as `root` and as `" " root`, and the first token is judged by the second where its
piece begins with "▁" (the space that decoding drops) and by the first otherwise (a byte
piece <0x20> keeps its space); the request continues in the grammar its first token took.
The text then matches the spec exactly, whichever way the model begins.
"""

from __future__ import annotations

import json
import re

import numpy as np
import xgrammar as xgr

from grok.errors import GrokError
from grok.sampling import mask_words
from grok.structured.spec import Choice, Ebnf, JsonObject, JsonSchema, Regex, Structure
from grok.tokenizer import Tokenizer

MAX_MESSAGE = 300  # characters of a compiler message passed on to the user


class Vocabulary:
    """A tokenizer's pieces as xgrammar decodes them, at the model's vocabulary size (the
    tokenizer may have more pieces than the model has rows, or fewer)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        pieces = tokenizer.raw_pieces()[:vocab_size]
        pieces += [""] * (vocab_size - len(pieces))
        self.size = vocab_size
        self.leading_space = tokenizer.strips_leading_space
        stops = [tokenizer.eos_id] if tokenizer.eos_id < vocab_size else []
        self.stop_words = _pack(stops, vocab_size)
        self.vocab_words = _pack(list(range(vocab_size)), vocab_size)  # not the padding bits
        # Tokens whose text holds a control character (U+0000 to U+001F: byte pieces
        # <0x00> to <0x1F>, and pieces such as "\n" or "\t"), which JSON without free
        # whitespace never holds, and which xgrammar 0.2.9 lets into strings that have a
        # maxLength (measured: "\x02" accepted there).
        self.json_words = self.vocab_words & ~_pack(
            [i for i, p in enumerate(pieces) if _control(p)], vocab_size)
        # The pieces whose first space decoding drops when they begin a generation.
        self.spaced_words = _pack([i for i, p in enumerate(pieces) if p.startswith("\u2581")]
                                  if self.leading_space else [], vocab_size)
        self.info = xgr.TokenizerInfo(pieces, xgr.VocabType.BYTE_FALLBACK,
                                      vocab_size=vocab_size, stop_token_ids=stops)


def _control(piece: str) -> bool:
    byte = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
    if byte:
        return int(byte.group(1), 16) < 0x20
    return any(c < " " for c in piece)


def _pack(tokens: list[int], vocab_size: int) -> np.ndarray:
    """int32 [ceil(V / 32)] with the bits of `tokens` set."""
    bits = np.zeros(mask_words(vocab_size) * 32, np.uint8)
    bits[tokens] = 1
    return np.packbits(bits, bitorder="little").view(np.int32)


def _ebnf_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def build(spec: Structure, vocab: Vocabulary, compiler: xgr.GrammarCompiler
          ) -> list[xgr.CompiledGrammar]:
    """The spec compiled: [root], or [root, " " root] where the tokenizer drops a leading
    space (see the module's docstring). JSON has fixed separators and no free whitespace,
    so a model cannot pad it with spaces until max_tokens. Raises GrokError with the
    compiler's message, one bounded line."""
    try:
        if isinstance(spec, JsonSchema):
            grammar = xgr.Grammar.from_json_schema(spec.schema, any_whitespace=False)
        elif isinstance(spec, JsonObject):
            grammar = xgr.Grammar.from_json_schema('{"type":"object"}', any_whitespace=False)
        elif isinstance(spec, Regex):
            grammar = xgr.Grammar.from_regex(spec.pattern)
        elif isinstance(spec, Choice):
            grammar = xgr.Grammar.from_ebnf(
                "root ::= " + " | ".join(_ebnf_literal(o) for o in spec.options))
        elif isinstance(spec, Ebnf):
            grammar = xgr.Grammar.from_ebnf(spec.grammar)
        else:
            raise GrokError(f"unknown structure {type(spec).__name__}")
        grammars = [grammar]
        if vocab.leading_space:
            grammars.append(xgr.Grammar.concat(xgr.Grammar.from_ebnf('root ::= " "'), grammar))
        return [compiler.compile_grammar(g) for g in grammars]
    except (RuntimeError, ValueError) as e:
        if isinstance(e, GrokError):
            raise
        raise GrokError(f"{spec.kind} does not compile: {tidy(str(e))}") from None


def tidy(message: str) -> str:
    """xgrammar's message without its time and source-file prefix, on one bounded line."""
    message = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", message)
    message = " ".join(message.split())
    return message[:MAX_MESSAGE] + ("..." if len(message) > MAX_MESSAGE else "")


class Matcher:
    """One request's place in its grammar: the packed mask of the tokens allowed next,
    advanced by each token the request draws."""

    def __init__(self, compiled: list[xgr.CompiledGrammar], vocab: Vocabulary, json: bool):
        """`json`: the grammar is JSON's, whose text holds no control character."""
        # Until the first token, every form of the grammar is live (see the docstring).
        self._matchers = [xgr.GrammarMatcher(c) for c in compiled]
        self._vocab = vocab
        self._possible = vocab.json_words if json else vocab.vocab_words
        self._masks = np.empty((len(compiled), mask_words(vocab.size)), np.int32)
        self._fill()

    @property
    def mask(self) -> np.ndarray:
        """int32 [ceil(V / 32)]: the tokens allowed next."""
        return self._mask

    @property
    def finished(self) -> bool:
        """The output is complete: the grammar ended, or it allows only EOS next."""
        return self._terminated or self._only_stop

    @property
    def stuck(self) -> bool:
        """No token of the vocabulary can continue the output (a tokenizer without the
        characters the grammar needs)."""
        return not self._terminated and not self._mask.any()

    def accept(self, token: int) -> bool:
        """Advances past `token`; False (and no change) where the grammar forbids it."""
        token = int(token)
        if len(self._matchers) == 2:
            spaced = self._vocab.spaced_words[token // 32] >> (token % 32) & 1
            matcher = self._matchers[int(spaced)]
        else:
            matcher = self._matchers[0]
        if not matcher.accept_token(token):
            return False
        self._matchers = [matcher]
        self._masks = self._masks[:1]
        self._fill()
        return True

    def _fill(self) -> None:
        self._terminated = self._matchers[0].is_terminated()
        if self._terminated:
            self._mask = np.zeros_like(self._masks[0])
            self._only_stop = False
            return
        for i, matcher in enumerate(self._matchers):
            matcher.fill_next_token_bitmask(self._masks, i)
        if len(self._matchers) == 2:
            spaced = self._vocab.spaced_words
            self._mask = (self._masks[0] & ~spaced) | (self._masks[1] & spaced)
        else:
            self._mask = self._masks[0].copy()
        self._mask &= self._possible
        self._only_stop = bool(self._mask.any()) and not (self._mask & ~self._vocab.stop_words
                                                          ).any()
