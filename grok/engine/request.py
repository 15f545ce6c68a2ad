"""What a caller asks of the engine, checked before any device work, and what it gets back.

One `Request` is one prompt with its own `GenerationSettings`; the engine never mixes one
request's settings into another's, so a request's tokens do not depend on what else runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from grok.config import GrokConfig
from grok.errors import GrokError
from grok.sampling import check_settings
from grok.structured.spec import Structure, check_structure
from grok.tokenizer import Tokenizer, default_allowed

# "abort": a grammar that no token of the vocabulary can continue (a tokenizer without the
# characters it needs) ended the row early.
FINISH_REASONS = ("eos", "stop", "length", "abort")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How to sample one request. Defaults are the release's, except that EOS ends a row."""

    max_new_tokens: int = 100  # 0: the prompt only (to score it, with prompt_logprobs)
    temperature: float = 0.01  # 0 is greedy
    top_p: float = 1.0  # nucleus filter, as the release
    top_k: int = 0  # 0 is off
    seed: int = 42
    stop: tuple[str, ...] = ()  # the text is cut before the first stop string
    ignore_eos: bool = False  # EOS is an ordinary token: run to max_new_tokens
    allowed_tokens: tuple[int, ...] | None = None  # None: all but pad and control pieces
    # Steering, as OpenAI's and vLLM's APIs define it (see `grok.sampling.Controls`).
    presence_penalty: float = 0.0  # in [-2, 2]
    frequency_penalty: float = 0.0  # in [-2, 2]
    repetition_penalty: float = 1.0  # > 0; 1 is off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias) pairs, or a dict
    min_tokens: int = 0  # EOS and stop_token_ids barred (stop strings ignored) until then
    stop_token_ids: tuple[int, ...] = ()  # drawing one ends the row ("stop")
    # Report each prompt token's log-probability given the ones before it (every prompt
    # token is then computed: the prefix cache is not read).
    prompt_logprobs: bool = False
    # The shape the output must take (grok.structured: JsonSchema, JsonObject, Regex,
    # Choice, Ebnf); the row ends ("stop") when it is complete.
    structure: Structure | None = None

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        if self.allowed_tokens is not None:
            object.__setattr__(self, "allowed_tokens", tuple(self.allowed_tokens))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        object.__setattr__(self, "stop_token_ids", _token_ids("stop_token_ids",
                                                              self.stop_token_ids))
        for name, low, high in (("presence_penalty", -2.0, 2.0),
                                ("frequency_penalty", -2.0, 2.0)):
            _check_number(name, getattr(self, name), low, high)
        _check_number("repetition_penalty", self.repetition_penalty, 0.0, None)
        try:
            check_settings(self.temperature, self.top_p, self.top_k)
        except ValueError as e:
            raise GrokError(str(e)) from None
        scoring = self.prompt_logprobs is True
        for name, low in (("max_new_tokens", 0 if scoring else 1), ("seed", -(2**63))):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                    or not low <= value < 2**63:
                also = " (0 only with prompt_logprobs)" if name == "max_new_tokens" else ""
                raise GrokError(f"{name} must be an integer >= {low}{also}, got "
                                f"{value!r:.80}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise GrokError(f"min_tokens must be an integer in [0, max_new_tokens="
                            f"{self.max_new_tokens}], got {self.min_tokens!r:.80}")
        if any(not isinstance(s, str) or not s for s in stop):
            raise GrokError(f"stop strings must be non-empty strings, got {list(stop)!r:.200}")
        check_structure(self.structure)
        if self.structure is not None and self.allowed_tokens is not None:
            raise GrokError("allowed_tokens and structure cannot be combined (the grammar "
                            "already says which tokens may come)")
        for name in ("ignore_eos", "prompt_logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise GrokError(f"{name} must be true or false, got "
                                f"{getattr(self, name)!r:.80}")

    @property
    def steered(self) -> bool:
        """Whether any logit control is set (a row without them skips that work)."""
        return bool(self.logit_bias) or self.presence_penalty != 0 \
            or self.frequency_penalty != 0 or self.repetition_penalty != 1


# logit_bias values are clamped to this range, as OpenAI documents and vLLM does.
MAX_LOGIT_BIAS = 100.0


def _check_number(name: str, value, low: float, high: float | None) -> None:
    """A finite number in [low, high] (or > low where high is None)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer,
                                                            np.floating)) \
        and np.isfinite(value)
    if ok and (value > low if high is None else low <= value <= high):
        return
    where = (f"> {low:g}" if high is None else "finite" if np.isinf(low) and np.isinf(high)
             else f"in [{low:g}, {high:g}]")
    raise GrokError(f"{name} must be a number {where}, got {value!r:.80}")


def _is_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def _token_ids(name: str, value) -> tuple[int, ...]:
    ids = (value,) if _is_int(value) else tuple(value or ())
    if not all(_is_int(t) and t >= 0 for t in ids):
        raise GrokError(f"{name} must be a list of token ids (integers >= 0), got "
                        f"{list(ids)!r:.120}")
    return tuple(int(t) for t in ids)


def _bias_pairs(value) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (token, bias) pairs from a dict or pairs; biases clamped."""
    pairs = list(value.items()) if isinstance(value, dict) else list(value or ())
    out = {}
    for pair in pairs:
        token, bias = pair if isinstance(pair, (tuple, list)) and len(pair) == 2 \
            else (None, None)
        if not _is_int(token) or token < 0:
            raise GrokError(f"logit_bias keys must be token ids (integers >= 0), got "
                            f"{token if token is not None else pair!r:.80}")
        _check_number(f"logit_bias[{token}]", bias, -np.inf, np.inf)
        out[int(token)] = float(np.clip(bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS))
    return tuple(sorted(out.items()))


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt, tokenized and checked against the model, with its settings."""

    prompt_ids: tuple[int, ...]
    settings: GenerationSettings
    prompt: str | None = None  # the text, where the prompt was given as text
    # settings.structure compiled (grok.structured.compiler.Grammar), where it is set
    grammar: object | None = None


def make_request(config: GrokConfig, tokenizer: Tokenizer | None, prompt: str | Sequence[int],
                 settings: GenerationSettings, max_seq_len: int | None = None,
                 label: str = "the prompt", grammar=None) -> Request:
    """Validates what a user can get wrong; each error names the value and the range.

    `max_seq_len` is the context the request must fit (default: the model's);
    `label` names the prompt in messages ("prompt 3" in a batch); `grammar` is
    settings.structure compiled (`grok.structured.compiler.GrammarCompiler`), which a
    request with a structure needs.
    """
    if (settings.structure is None) != (grammar is None) or (
            grammar is not None and grammar.spec != settings.structure):
        raise ValueError("a request's grammar must be its settings.structure, compiled")
    if max_seq_len is None or max_seq_len == config.sequence_len:
        limit, limit_name = config.sequence_len, "sequence_len"
    else:
        limit, limit_name = max_seq_len, "max_seq_len"
    if settings.stop and tokenizer is None:
        raise GrokError("stop strings need a tokenizer (pass tokenizer_path to Grok.load)")
    if isinstance(prompt, str):
        if not prompt:
            raise GrokError(f"{label} is empty")
        if tokenizer is None:
            raise GrokError("text prompts need a tokenizer: pass tokenizer_path to Grok.load, "
                            "or give prompts as token-id lists")
        ids = tokenizer.encode(prompt)
    else:
        flat = np.asarray(prompt if len(prompt) else [], dtype=object).reshape(-1)
        if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in flat):
            raise GrokError("a token-id prompt must hold integers only")
        ids = [int(t) for t in flat]
    if not ids:
        raise GrokError(f"{label} is empty")
    try:
        config.check_tokens([ids])
    except ValueError as e:
        raise GrokError(f"{label}: {e}") from None
    if len(ids) + settings.max_new_tokens > limit:
        raise GrokError(
            f"{label} has {len(ids)} token{'s' * (len(ids) != 1)}; with max_new_tokens="
            f"{settings.max_new_tokens} it needs {len(ids) + settings.max_new_tokens} "
            f"positions, more than {limit_name}={limit}")
    for name, chosen in (("logit_bias", [t for t, _ in settings.logit_bias]),
                         ("stop_token_ids", settings.stop_token_ids)):
        bad = [t for t in chosen if t >= config.vocab_size]
        if bad:
            raise GrokError(f"{name}: token id {bad[0]} is out of range [0, vocab_size="
                            f"{config.vocab_size})")
    if settings.allowed_tokens is not None:
        chosen = settings.allowed_tokens
        if not chosen or any(isinstance(t, bool) or not isinstance(t, (int, np.integer))
                             or not 0 <= t < config.vocab_size for t in chosen):
            raise GrokError(f"allowed_tokens must be a non-empty list of token ids in "
                            f"[0, vocab_size={config.vocab_size})")
    return Request(tuple(ids), settings, prompt if isinstance(prompt, str) else None, grammar)


def allowed_mask(config: GrokConfig, settings: GenerationSettings,
                 tokenizer: Tokenizer | None) -> np.ndarray:
    """bool[V]: the tokens this request may draw (by default all but pad and control
    pieces, see `default_allowed`)."""
    if settings.allowed_tokens is None:
        return default_allowed(config, tokenizer)
    mask = np.zeros(config.vocab_size, bool)
    mask[list(settings.allowed_tokens)] = True
    return mask


@dataclasses.dataclass(frozen=True)
class PromptLogprobs:
    """Each prompt token's log-probability given the tokens before it (None for the
    first, which has none), its rank there (1: the most likely), and the 8 most likely
    tokens there; of the raw temperature-1 logits, as the generated tokens' are."""

    tokens: list[int]  # the prompt
    logprobs: list[float | None]
    ranks: list[int | None]
    top_alternatives: list[list[tuple[int, float]]]  # [] for the first token


@dataclasses.dataclass(frozen=True)
class Completion:
    """One request's result."""

    prompt: str | None
    prompt_ids: list[int]
    output_ids: list[int]
    output_logprobs: list[float]  # log-softmax of the float32 logits, temperature 1
    top_alternatives: list[list[tuple[int, float]]]  # per token: 8 (id, log-prob), best first
    text: str
    finish_reason: str  # one of FINISH_REASONS
    cached_tokens: int = 0  # prompt tokens copied from the prefix cache, not computed
    prompt_logprobs: PromptLogprobs | None = None  # where the settings ask for them

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Event:
    """One new token of one request, with the text it made final.

    `text` may be empty while a possible stop string or an unfinished multi-byte character
    is held back; it is never taken back later. The request's last event carries its
    `completion`. A request of max_new_tokens 0 has one event, with no token.
    """

    request_id: int
    token: int | None
    logprob: float | None  # of `token`, under the raw temperature-1 distribution
    top: tuple[tuple[int, float], ...]  # the 8 most likely (id, log-prob), best first
    text: str
    completion: Completion | None = None
    prompt_logprobs: PromptLogprobs | None = None  # on the first event, where asked for

    @property
    def finished(self) -> bool:
        return self.completion is not None
