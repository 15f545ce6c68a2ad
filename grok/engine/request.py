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
from grok.tokenizer import Tokenizer, default_allowed

FINISH_REASONS = ("eos", "stop", "length")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How to sample one request. Defaults are the release's, except that EOS ends a row."""

    max_new_tokens: int = 100
    temperature: float = 0.01  # 0 is greedy
    top_p: float = 1.0  # nucleus filter, as the release
    top_k: int = 0  # 0 is off
    seed: int = 42
    stop: tuple[str, ...] = ()  # the text is cut before the first stop string
    ignore_eos: bool = False  # EOS is an ordinary token: run to max_new_tokens
    allowed_tokens: tuple[int, ...] | None = None  # None: all but pad and control pieces

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        if self.allowed_tokens is not None:
            object.__setattr__(self, "allowed_tokens", tuple(self.allowed_tokens))
        try:
            check_settings(self.temperature, self.top_p, self.top_k)
        except ValueError as e:
            raise GrokError(str(e)) from None
        for name, low in (("max_new_tokens", 1), ("seed", -(2**63))):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                    or not low <= value < 2**63:
                raise GrokError(f"{name} must be an integer >= {low}, got {value!r:.80}")
        if any(not isinstance(s, str) or not s for s in stop):
            raise GrokError(f"stop strings must be non-empty strings, got {list(stop)!r:.200}")
        if not isinstance(self.ignore_eos, bool):
            raise GrokError(f"ignore_eos must be true or false, got {self.ignore_eos!r:.80}")


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt, tokenized and checked against the model, with its settings."""

    prompt_ids: tuple[int, ...]
    settings: GenerationSettings
    prompt: str | None = None  # the text, where the prompt was given as text


def make_request(config: GrokConfig, tokenizer: Tokenizer | None, prompt: str | Sequence[int],
                 settings: GenerationSettings, max_seq_len: int | None = None,
                 label: str = "the prompt") -> Request:
    """Validates what a user can get wrong; each error names the value and the range.

    `max_seq_len` is the context the request must fit (default: the model's);
    `label` names the prompt in messages ("prompt 3" in a batch).
    """
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
    if settings.allowed_tokens is not None:
        chosen = settings.allowed_tokens
        if not chosen or any(isinstance(t, bool) or not isinstance(t, (int, np.integer))
                             or not 0 <= t < config.vocab_size for t in chosen):
            raise GrokError(f"allowed_tokens must be a non-empty list of token ids in "
                            f"[0, vocab_size={config.vocab_size})")
    return Request(tuple(ids), settings, prompt if isinstance(prompt, str) else None)


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

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Event:
    """One new token of one request, with the text it made final.

    `text` may be empty while a possible stop string or an unfinished multi-byte character
    is held back; it is never taken back later. The request's last event carries its
    `completion`.
    """

    request_id: int
    token: int
    logprob: float  # of `token`, under the raw temperature-1 distribution
    top: tuple[tuple[int, float], ...]  # the 8 most likely (id, log-prob), best first
    text: str
    completion: Completion | None = None

    @property
    def finished(self) -> bool:
        return self.completion is not None
