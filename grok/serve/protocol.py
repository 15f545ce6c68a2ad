"""The OpenAI wire format: request bodies checked into frozen parameter objects, and the
response, chunk and error shapes clients parse.

Nothing here touches the engine or JAX, so every rule a client can break is testable
alone. Parsing is strict about types (a string where a number belongs is a 400 naming the
field, never a coercion) and lenient about unknown fields (ignored, and reported to the
caller so it can log them), as OpenAI-compatible servers are.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
import uuid
from collections.abc import Sequence
from typing import Any

from grok.engine.request import Completion, GenerationSettings, PromptLogprobs
from grok.errors import GrokError
from grok.structured.spec import Choice, Ebnf, JsonObject, JsonSchema, Regex, Structure
from grok.tokenizer import Tokenizer

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_LOGPROBS = 8  # the engine reports the 8 most likely tokens of each step

# The engine's finish reasons in OpenAI's words: EOS and a stop string are both "stop";
# "abort" (a grammar the vocabulary cannot continue) is vLLM's word.
FINISH_REASON = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}


class ApiError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


# --- field readers --------------------------------------------------------------------------


def _get(body: dict, name: str, default: Any) -> Any:
    """The field's value; an explicit null means the default, as in OpenAI's API."""
    value = body.get(name)
    return default if value is None else value


def _int(body: dict, name: str, default: int | None, lo: int | None = None,
         hi: int | None = None) -> int | None:
    value = _get(body, name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer, got {json.dumps(value)[:80]}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        where = (f">= {lo}" if hi is None else f"<= {hi}" if lo is None
                 else f"in [{lo}, {hi}]")
        raise bad_request(f"{name} must be {where}, got {value}", name)
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = _get(body, name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise bad_request(f"{name} must be a number, got {json.dumps(value)[:80]}", name)
    return float(value)


def _bool(body: dict, name: str, default: bool) -> bool:
    value = _get(body, name, default)
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {json.dumps(value)[:80]}", name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = _get(body, "stop", [])
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request(f"stop must be a non-empty string or a list of them, got "
                          f"{json.dumps(value)[:120]}", "stop")
    return tuple(stops)


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    """{"token id": bias}: keys are strings of digits, as JSON objects have them."""
    value = _get(body, "logit_bias", {})
    if not isinstance(value, dict):
        raise bad_request(f"logit_bias must be an object mapping token ids to biases, got "
                          f"{json.dumps(value)[:80]}", "logit_bias")
    pairs = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise bad_request(f"logit_bias keys must be token ids (strings of digits), got "
                              f"{json.dumps(key)[:40]}", "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) \
                or not math.isfinite(bias):
            raise bad_request(f"logit_bias[{key}] must be a number, got "
                              f"{json.dumps(bias)[:40]}", "logit_bias")
        pairs.append((int(key), float(bias)))
    return tuple(pairs)


def _token_ids(body: dict, name: str) -> tuple[int, ...]:
    value = _get(body, name, [])
    if not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise bad_request(f"{name} must be a list of token ids (integers >= 0), got "
                          f"{json.dumps(value)[:80]}", name)
    return tuple(value)


# Fields a client may send that this server cannot honour, each with the values that ask
# for nothing (benchmark tools send those as a matter of course).
_NO_OP_VALUES: dict[str, tuple] = {
    "echo": (False,),
    "suffix": ("",),
    "best_of": (1,),
    "use_beam_search": (False,),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none",),
    "function_call": ("none",),
    "parallel_tool_calls": (False, True),
    "n_probs": (0,),
}

_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop",
           "stream", "stream_options", "ignore_eos", "user", "presence_penalty",
           "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens",
           "stop_token_ids", "response_format", "structured_outputs"}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "prompt_logprobs"}
CHAT_FIELDS = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}


def _refuse_unhonourable(body: dict, names: Sequence[str]) -> None:
    wanted = [n for n in names if n in body and body[n] is not None
              and not any(body[n] == v and type(body[n]) is type(v) for v in _NO_OP_VALUES[n])]
    if wanted:
        raise bad_request(f"this server does not support {', '.join(wanted)} (only "
                          f"{'; '.join(_no_op(n) for n in wanted)})", wanted[0])


def _no_op(name: str) -> str:
    return f"{name}: " + " or ".join(json.dumps(v) for v in _NO_OP_VALUES[name])


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What both endpoints share: how each choice is sampled and streamed."""

    model: str
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    n: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    prompt_logprobs: bool = False  # the prompt is scored (echo, prompt_logprobs)
    structure: Structure | None = None
    structure_field: str = "response_format"  # the field it came from, or structured_outputs

    def settings(self, choice: int) -> GenerationSettings:
        """The engine settings of choice `choice` (0 .. n-1): with a seed, seed + choice, so
        choice 0 is what a one-choice request with that seed gets; without, a fresh seed."""
        seed = secrets.randbits(63) if self.seed is None else self.seed + choice
        try:
            return GenerationSettings(
                max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                top_k=self.top_k, seed=seed, stop=self.stop, ignore_eos=self.ignore_eos,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty, logit_bias=self.logit_bias,
                min_tokens=self.min_tokens, stop_token_ids=self.stop_token_ids,
                prompt_logprobs=self.prompt_logprobs, structure=self.structure)
        except GrokError as e:
            named = str(e).split(" ", 1)[0].split("[", 1)[0].rstrip(":")
            raise bad_request(str(e), named if named in _SETTING_FIELDS else None) from None


# Request fields whose values GenerationSettings checks (its messages begin with the name).
_SETTING_FIELDS = {"temperature", "top_p", "top_k", "seed", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens",
                   "stop_token_ids"}


def _sampling(body: dict, max_tokens_names: Sequence[str], scoring: bool = False
              ) -> Sampling:
    """`scoring`: the prompt is scored, and max_tokens may be 0 (the prompt only)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required: a string naming the served model "
                          "(GET /v1/models lists it)", "model")
    max_tokens = DEFAULT_MAX_TOKENS
    for name in max_tokens_names:  # the later name wins, as OpenAI's newer field does
        max_tokens = _int(body, name, max_tokens, lo=0)
        if max_tokens == 0 and not scoring:
            raise bad_request(f"{name} must be >= 1 (0 only with echo or prompt_logprobs), "
                              f"got 0", name)
    top_k = _int(body, "top_k", 0, lo=-1)
    stream = _bool(body, "stream", False)
    options = _get(body, "stream_options", None)
    if options is not None and not stream:
        raise bad_request("stream_options is only allowed with stream: true",
                          "stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    include_usage = _bool(options or {}, "include_usage", False)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("user must be a string", "user")
    sampling = Sampling(
        model=model, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0),
        top_k=0 if top_k == -1 else top_k,  # -1 is "off" in vLLM's API
        n=_int(body, "n", 1, lo=1),
        seed=_int(body, "seed", None, lo=-(2**63), hi=2**63 - 1),
        stop=_stop(body), stream=stream, include_usage=include_usage,
        ignore_eos=_bool(body, "ignore_eos", False),
        presence_penalty=_number(body, "presence_penalty", 0.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
        logit_bias=_logit_bias(body), min_tokens=_int(body, "min_tokens", 0, lo=0),
        stop_token_ids=_token_ids(body, "stop_token_ids"), prompt_logprobs=scoring,
        structure=_structure(body),
        structure_field=_structure_field(body))
    sampling.settings(0)  # the engine's own range checks, before anything is queued
    return sampling


# structured_outputs (vLLM's): one of these says what the output is.
_STRUCTURE_KINDS = ("json", "regex", "choice", "grammar", "json_object")
# vLLM's switches that change nothing here: there is no fallback engine, JSON never has
# free whitespace, and a schema allows extra properties only where it says so.
_STRUCTURE_SWITCHES = ("disable_fallback", "disable_any_whitespace",
                       "disable_additional_properties")


def _structure_field(body: dict) -> str:
    """The field a request's structure comes from (a null field gives none)."""
    return "response_format" if _get(body, "response_format", None) is not None \
        else "structured_outputs"


def _structure(body: dict) -> Structure | None:
    """The output's structure from OpenAI's response_format or vLLM's structured_outputs."""
    fmt, outputs = _get(body, "response_format", None), _get(body, "structured_outputs", None)
    if fmt is not None and outputs is not None:
        raise bad_request("give response_format or structured_outputs, not both",
                          "structured_outputs")
    name = _structure_field(body)
    try:
        if fmt is not None:
            return _response_format(fmt)
        return None if outputs is None else _structured_outputs(outputs)
    except GrokError as e:
        raise bad_request(f"{name}: {e}", name) from None


def _response_format(fmt: Any) -> Structure | None:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonObject()
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), (dict, bool)):
            raise GrokError('json_schema must be an object {"name": ..., "schema": {...}, '
                            f'"strict": ...}} with a schema, got {json.dumps(spec)[:80]}')
        for field, kinds in (("name", str), ("strict", bool), ("description", str)):
            if spec.get(field) is not None and not isinstance(spec[field], kinds):
                raise GrokError(f"json_schema.{field} must be a {kinds.__name__}, got "
                                f"{json.dumps(spec[field])[:40]}")
        return JsonSchema(spec["schema"])
    raise GrokError(f'type must be "text", "json_object" or "json_schema", got '
                    f"{json.dumps(fmt)[:80]}")


def _structured_outputs(value: Any) -> Structure:
    if not isinstance(value, dict):
        raise GrokError(f"must be an object, got {json.dumps(value)[:80]}")
    unknown = sorted(k for k in value if k not in _STRUCTURE_KINDS + _STRUCTURE_SWITCHES)
    if unknown:
        raise GrokError(f"{unknown[0]!r} is not supported (only one of "
                        f"{', '.join(_STRUCTURE_KINDS)}, and {', '.join(_STRUCTURE_SWITCHES)})")
    for switch in _STRUCTURE_SWITCHES:
        if value.get(switch) is not None and not isinstance(value[switch], bool):
            raise GrokError(f"{switch} must be true or false")
    given = [k for k in _STRUCTURE_KINDS if value.get(k) is not None
             and not (k == "json_object" and value[k] is False)]
    if len(given) != 1:
        raise GrokError(f"give exactly one of {', '.join(_STRUCTURE_KINDS)}, got "
                        f"{', '.join(given) or 'none'}")
    kind, spec = given[0], value[given[0]]
    if kind == "json_object":
        if spec is not True:
            raise GrokError(f"json_object must be true, got {json.dumps(spec)[:40]}")
        return JsonObject()
    if kind == "choice" and not (isinstance(spec, list)
                                 and all(isinstance(c, str) for c in spec)):
        raise GrokError(f"choice must be a list of strings, got {json.dumps(spec)[:80]}")
    return {"json": JsonSchema, "regex": Regex, "choice": Choice, "grammar": Ebnf}[kind](spec)


def unknown_fields(body: dict, known: set[str]) -> list[str]:
    """Fields neither used nor refused: ignored, and worth a log line."""
    return sorted(k for k in body if k not in known and k not in _NO_OP_VALUES)


# --- /v1/completions ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompletionParams:
    sampling: Sampling
    prompts: tuple[str | tuple[int, ...], ...]
    logprobs: int | None  # alternatives per token in `logprobs` (None: no logprobs)
    echo: bool = False  # the prompt (and its logprobs) comes before the completion
    prompt_logprobs: int | None = None  # vLLM's: alternatives per prompt token

def _prompts(value: Any) -> tuple[str | tuple[int, ...], ...]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    def is_id(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return tuple(value)
        if all(is_id(t) for t in value):
            return (tuple(value),)
        if all(isinstance(p, list) and p and all(is_id(t) for t in p) for p in value):
            return tuple(tuple(p) for p in value)
    raise bad_request("prompt must be a non-empty string, a list of strings, a list of token "
                      "ids, or a list of non-empty token-id lists", "prompt")


def parse_completion(body: Any) -> CompletionParams:
    """Checks a /v1/completions body; raises `ApiError` (400) naming the first bad field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    _refuse_unhonourable(body, ["suffix", "best_of", "use_beam_search", "n_probs"])
    if "prompt" not in body:
        raise bad_request("prompt is required", "prompt")
    prompts = _prompts(body["prompt"])
    if any(isinstance(p, str) and not p for p in prompts):
        raise bad_request("prompt must not be empty", "prompt")
    echo = _bool(body, "echo", False)
    prompt_logprobs = _int(body, "prompt_logprobs", None, lo=0, hi=MAX_LOGPROBS)
    return CompletionParams(
        _sampling(body, ["max_tokens"], scoring=echo or prompt_logprobs is not None),
        prompts, _int(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS), echo, prompt_logprobs)


# --- /v1/chat/completions -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclasses.dataclass(frozen=True)
class ChatParams:
    sampling: Sampling
    messages: tuple[Message, ...]
    logprobs: bool
    top_logprobs: int


def _content(value: Any, i: int) -> str:
    """A message's text: a string, null, or a list of {"type": "text", "text": ...} parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
        raise bad_request(f"messages[{i}].content: only text parts are supported",
                          "messages")
    raise bad_request(f"messages[{i}].content must be a string or a list of text parts",
                      "messages")


def parse_chat(body: Any) -> ChatParams:
    """Checks a /v1/chat/completions body; raises `ApiError` (400) naming the first bad field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    _refuse_unhonourable(body, ["echo", "best_of", "use_beam_search", "tools", "functions",
                                "tool_choice", "function_call", "parallel_tool_calls"])
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a string role",
                              "messages")
        parsed.append(Message(m["role"], _content(m.get("content"), i)))
    logprobs = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", 0, lo=0, hi=MAX_LOGPROBS)
    if top and not logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    return ChatParams(_sampling(body, ["max_tokens", "max_completion_tokens"]), tuple(parsed),
                      logprobs, top)


# --- responses ------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens the prefix cache served."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class TokenTexts:
    """Token ids as logprob entries show them, and the text each token adds in context.

    A token's own text is its piece with SentencePiece's word marker as a space (a byte
    piece stays `<0xE2>`); the text it *adds* comes from a stream decoder, so that offsets
    add up to the completion's text (a character split over byte pieces counts at its last
    byte).
    """

    def __init__(self, tokenizer: Tokenizer, eos_id: int):
        self.tokenizer, self.eos_id = tokenizer, eos_id

    def piece(self, token: int) -> str:
        return self.tokenizer.piece(token)

    def increments(self, ids: Sequence[int]) -> list[str]:
        decoder = self.tokenizer.stream_decoder()
        out = [decoder.push(t) if t != self.eos_id else "" for t in ids]
        if out:
            out[-1] += decoder.flush()
        return out


class CompletionLogprobs:
    """Builds /v1/completions `logprobs` objects, token by token, so a stream and a full
    response report the same thing. `offset` counts the text of the tokens seen so far."""

    def __init__(self, texts: TokenTexts, top: int, offset: int = 0):
        """`offset`: where the tokens' text starts (after an echoed prompt's)."""
        self.texts, self.top, self.offset = texts, top, offset
        self._decoder = texts.tokenizer.stream_decoder()

    def entries(self, tokens: Sequence[int], logprobs: Sequence[float | None],
                tops: Sequence[Sequence[tuple[int, float]]], last: bool) -> dict:
        """A logprob of None (an echoed prompt's first token) has null alternatives."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}
        for i, (token, logprob, top) in enumerate(zip(tokens, logprobs, tops, strict=True)):
            out["tokens"].append(self.texts.piece(token))
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(
                None if logprob is None
                else {self.texts.piece(t): lp for t, lp in list(top)[: self.top]})
            out["text_offset"].append(self.offset)
            added = "" if token == self.texts.eos_id else self._decoder.push(token)
            if last and i == len(tokens) - 1:
                added += self._decoder.flush()
            self.offset += len(added)
        return out


def join_logprobs(first: dict, second: dict) -> dict:
    """Two runs of completion `logprobs` entries as one (an echoed prompt's, then the
    completion's)."""
    return {key: first[key] + second[key] for key in first}


def vllm_prompt_logprobs(texts: TokenTexts, scores: PromptLogprobs, top: int) -> list:
    """vLLM's `prompt_logprobs`: null for the first token, then for each token a map from
    token id to {logprob, rank, decoded_token} of the token itself and the `top` most
    likely ones there."""
    out: list[dict | None] = [None]
    for token, logprob, rank, alternatives in zip(
            scores.tokens[1:], scores.logprobs[1:], scores.ranks[1:],
            scores.top_alternatives[1:], strict=True):
        entry = {str(token): {"logprob": logprob, "rank": rank,
                              "decoded_token": texts.piece(token)}}
        for r, (t, lp) in enumerate(alternatives[:top], 1):
            entry.setdefault(str(t), {"logprob": lp, "rank": r,
                                      "decoded_token": texts.piece(t)})
        out.append(entry)
    return out


def chat_logprobs(texts: TokenTexts, tokens: Sequence[int], logprobs: Sequence[float],
                  tops: Sequence[Sequence[tuple[int, float]]], top: int) -> dict:
    """A chat choice's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def entry(token: int, logprob: float) -> dict:
        text = texts.piece(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in
                                                          list(alts)[:top]]}
                        for t, lp, alts in zip(tokens, logprobs, tops, strict=True)]}


def completion_choice(index: int, completion: Completion, logprobs: dict | None) -> dict:
    return {"index": index, "text": completion.text, "logprobs": logprobs,
            "finish_reason": FINISH_REASON[completion.finish_reason]}


def chat_choice(index: int, completion: Completion, logprobs: dict | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": completion.text},
            "logprobs": logprobs, "finish_reason": FINISH_REASON[completion.finish_reason]}


def sse(payload: dict | str) -> bytes:
    """One server-sent event: `data: {json}` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


DONE = sse("[DONE]")
