"""One request's host-side progress: its tokens, its text, and when it is done.

Plain Python with no JAX in it, so that stop strings, EOS and streamed text can be tested
by feeding tokens by hand.
"""

from __future__ import annotations

from grok.engine.request import Completion, PromptLogprobs, Request
from grok.tokenizer import StreamDecoder


class Row:
    """Accepts a request's drawn tokens one by one and decides when it is finished.

    Text that could be the start of a stop string is held back until it is known not to
    be, so a streamed increment is never taken back.
    """

    def __init__(self, request: Request, eos_token: int, decoder: StreamDecoder | None,
                 cached_tokens: int = 0):
        """`cached_tokens`: prompt tokens that came from the prefix cache."""
        self.request = request
        self.cached_tokens = cached_tokens
        self.eos_token = eos_token
        self.decoder = decoder
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        self.alternatives: list[list[tuple[int, float]]] = []
        self.text = ""
        self.emitted = 0  # text[:emitted] has been handed out
        self.finish_reason: str | None = None
        n = len(request.prompt_ids)
        self.prompt_scores = PromptLogprobs(list(request.prompt_ids), [None] * n, [None] * n,
                                            [[] for _ in range(n)]) \
            if request.settings.prompt_logprobs else None
        # Where the output has a structure: which tokens may come next (`mask`).
        self.matcher = None if request.grammar is None else request.grammar.matcher()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def filled(self) -> int:
        """Cache slots the request holds once its last token is fed back."""
        return len(self.request.prompt_ids) + len(self.output_ids)

    def score_prompt(self, start: int, logprobs, ranks, top_ids, top_logprobs) -> None:
        """Records a prefilled part's scores: position t (prompt token start + t) gives
        those of prompt token start + t + 1, as far as the prompt goes."""
        s, n = self.prompt_scores, len(self.request.prompt_ids)
        for t in range(min(len(logprobs), n - 1 - start)):
            s.logprobs[start + t + 1] = float(logprobs[t])
            s.ranks[start + t + 1] = int(ranks[t])
            s.top_alternatives[start + t + 1] = [
                (int(i), float(lp)) for i, lp in zip(top_ids[t], top_logprobs[t], strict=True)]

    def finish_prompt_only(self) -> None:
        """Ends a request of max_new_tokens 0 once its prompt is prefilled."""
        self.finish_reason = "length"

    def accept(self, token: int, logprob: float, top: list[tuple[int, float]]) -> str:
        """Records one drawn token; returns the text it made final ('' while held)."""
        settings = self.request.settings
        stops = settings.stop
        self.output_ids.append(token)
        self.logprobs.append(logprob)
        self.alternatives.append(top)
        eos = token == self.eos_token and not settings.ignore_eos
        # Its text is left out, as EOS's (and vLLM's for stop tokens).
        stop_token = token in settings.stop_token_ids
        done = eos or stop_token or len(self.output_ids) >= settings.max_new_tokens
        grammar_end = None  # "stop": the structure is complete; "abort": it cannot go on
        if self.matcher is not None:
            if not self.matcher.accept(token):
                raise RuntimeError(f"token {token} was drawn outside its request's grammar")
            grammar_end = "stop" if self.matcher.finished else \
                "abort" if self.matcher.stuck else None
            done = done or grammar_end is not None
        if self.decoder is not None:
            self.text += "" if eos or stop_token else self.decoder.push(token)
            self.text += self.decoder.flush() if done else ""
        # Stop strings count from min_tokens on (the device bars EOS and stop tokens before).
        cuts = [at for s in stops if (at := self.text.find(s, self.emitted)) >= 0] \
            if len(self.output_ids) >= settings.min_tokens else []
        if cuts:
            self.text = self.text[: min(cuts)]
            self.finish_reason = "stop"
            done = True
        elif done:
            self.finish_reason = "eos" if eos else "stop" if stop_token else \
                grammar_end or "length"
        end = len(self.text) if done else len(self.text) - stop_prefix_len(self.text, stops)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece

    def completion(self) -> Completion:
        return Completion(self.request.prompt, list(self.request.prompt_ids),
                          list(self.output_ids), list(self.logprobs),
                          [list(a) for a in self.alternatives], self.text,
                          self.finish_reason or "length", self.cached_tokens,
                          self.prompt_scores)


def stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that begins some stop string."""
    longest = max((len(s) for s in stops), default=1)
    for k in range(min(longest - 1, len(text)), 0, -1):
        if any(len(s) > k and s.startswith(text[-k:]) for s in stops):
            return k
    return 0
