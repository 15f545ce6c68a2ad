"""`Grok`: a loaded model on a device mesh, the library's entry point."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from grok import checkpoint, distributed, model, sharding
from grok.config import GrokConfig, resolve_config
from grok.engine.engine import Engine, bucket
from grok.engine.prefix_cache import PrefixCache, PrefixCacheSettings
from grok.engine.request import Completion, Event, GenerationSettings, make_request
from grok.engine.scheduler import Scheduler, Stats
from grok.errors import GrokError
from grok.layers import check_layer_mode, default_layer_mode
from grok.moe import STRATEGIES
from grok.quant import (
    DEFAULT_INT4_GROUP,
    WEIGHT_MODES,
    check_int4_group,
    default_weight_mode,
    storage_dtype,
    store_params,
)
from grok.routing import ExpertUsage, Routing, UsageCounter
from grok.scoring import Score, Scorer, encode_pair, join, rolling_windows
from grok.tokenizer import Tokenizer

if TYPE_CHECKING:
    from grok.structured.compiler import GrammarCompiler


class Grok:
    """A Grok-architecture model with its parameters placed on a (data, model) mesh."""

    def __init__(self, config: GrokConfig, params: dict, mesh: Mesh,
                 tokenizer: Tokenizer | None = None, moe_strategy: str = "sparse",
                 expert_stats: bool = True, layers: str = "unrolled"):
        """`expert_stats`: every prefill and decode step tallies its expert routing
        (`expert_usage`); off, the steps compute nothing of it. `layers`: the tree `params`
        has and how the layers run (see `grok.layers`)."""
        self.config = config
        self.params = params
        self.mesh = mesh
        self.tokenizer = tokenizer
        self.layers = check_layer_mode(layers)
        self.model = model.build(config, moe_strategy, mesh, layers)
        self.expert_stats = expert_stats
        self.usage = UsageCounter(config.num_layers, config.num_experts)
        self.prefix_cache: PrefixCache | None = None
        self._engines: dict[tuple[int, int, int | None, bool], Engine] = {}

    def enable_prefix_cache(self, settings: PrefixCacheSettings | None) -> None:
        """Keeps the keys and values of full blocks of prompts that every later prefill
        (of any engine, `generate` call or server request) reuses when a prompt begins with
        them; None turns it off and frees the pool. Numbers are those of a prefill without
        it, up to the last bits of a differently shaped computation (see README)."""
        self.prefix_cache = None  # the old pool goes before the new one is made
        if settings is not None:
            self.prefix_cache = PrefixCache(settings, self.config, self.mesh)

    @classmethod
    def load(cls, checkpoint_dir: str | os.PathLike, config: GrokConfig | str | os.PathLike,
             tokenizer_path: str | os.PathLike | Tokenizer | None = None,
             mesh_shape: tuple[int, int] | None = None, weights: str | None = None,
             moe: str = "sparse", progress: bool | None = None, verify: bool = False,
             expert_stats: bool = True, layers: str | None = None,
             int4_group: int = DEFAULT_INT4_GROUP) -> Grok:
        """Reads a checkpoint in the released format onto a new mesh.

        `checkpoint_dir` holds `ckpt-0` (or is it); `config` is a GrokConfig, a preset name
        or a JSON path; `mesh_shape` is (data, model), default all devices on `model` (in a
        multi-process run, one `data` row per process; see `sharding.make_mesh`).
        `weights`: "int8" keeps 8-bit weights on the devices, "int4" requantises the
        experts' to 4 bits in groups of `int4_group` rows as they load (half the memory;
        see `grok.quant`), "dequantized" turns them into their exact bf16 values once
        (default: dequantized on CPU, int8 elsewhere).
        `moe`: "sparse" runs only the chosen experts; "dense" all of them, as the release.
        `tokenizer_path` may also be a `Tokenizer` already read (the CLI reads it first, to
        check prompts before the long load). `verify`: check every file against the
        manifest beside `ckpt-0` first (see `grok.checkpoint.manifest`). `expert_stats`: see
        `Grok.__init__`. `layers`: "scan" runs one compiled layer body over stacked
        weights, "unrolled" compiles every layer (default: unrolled on CPU, scan elsewhere;
        see `grok.layers`).
        """
        if moe not in STRATEGIES:
            raise GrokError(f"moe must be one of {list(STRATEGIES)}, got {moe!r}")
        if weights not in (None, *WEIGHT_MODES):
            raise GrokError(f"weights must be one of {list(WEIGHT_MODES)}, got {weights!r:.40}")
        check_int4_group(int4_group)
        if layers is not None:
            check_layer_mode(layers)
        config = resolve_config(config)
        tokenizer = tokenizer_path
        if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer.from_config(tokenizer_path, config)
        mesh = sharding.make_mesh(mesh_shape)
        sharding.check_mesh(config, mesh)
        platform = mesh.devices.flat[0].platform
        layers = default_layer_mode(platform) if layers is None else layers
        weights = default_weight_mode(platform) if weights is None else weights
        params = checkpoint.load_checkpoint(
            checkpoint_dir, model.abstract_params(config),
            lambda path, kind, shape: sharding.param_sharding(mesh, path, kind, shape),
            progress=progress if distributed.is_main_process() else False, verify=verify,
            stacked=layers == "scan", int4_group=int4_group if weights == "int4" else None,
            int4_files=weights != "int8")
        params = store_params(params, weights, storage_dtype(platform),
                              split_experts=platform == "cpu")
        return cls(config, params, mesh, tokenizer, moe_strategy=moe,
                   expert_stats=expert_stats, layers=layers)

    @functools.cached_property
    def grammars(self) -> GrammarCompiler:
        """Compiles output structures (`grok.structured`) for this model's vocabulary; made
        on first use (it needs the tokenizer and xgrammar). A compiler made earlier for the
        same tokenizer and vocabulary size may be assigned instead."""
        from grok.structured.compiler import GrammarCompiler

        if self.tokenizer is None:
            raise GrokError("structured output needs a tokenizer (pass tokenizer_path to "
                            "Grok.load)")
        return GrammarCompiler(self.tokenizer, self.config.vocab_size)

    def logits(self, tokens) -> np.ndarray:
        """Float32 logits [B, T, vocab_size] of a full forward pass over int tokens [B, T]."""
        tokens = self.config.check_tokens(tokens)
        out = self._forward(self.params, self._place(tokens))
        return sharding.fetch(out[: tokens.shape[0]]).astype(np.float32)

    def _place(self, tokens: np.ndarray) -> jax.Array:
        """Checked tokens [B, T] on the mesh, rows padded to the data axis with pad."""
        batch = tokens.shape[0]
        rows = sharding.padded_batch(self.mesh, batch)
        padded = np.full((rows, tokens.shape[1]), self.config.pad_token, np.int32)
        padded[:batch] = tokens
        return sharding.put(padded, NamedSharding(self.mesh, sharding.TOKENS_SPEC))

    @functools.cached_property
    def _forward(self):
        return jax.jit(lambda params, tokens: self.model.apply(params, tokens)[0])

    def score(self, contexts: Sequence[Prompt], continuations: Sequence[Prompt]
              ) -> list[Score]:
        """Per (context, continuation) pair: each continuation token's log-probability
        given everything before it, their `total`, and whether greedy decoding would have
        produced the continuation (lm_eval's `loglikelihood`; see `grok.scoring`). Texts
        need the tokenizer; token-id lists are taken as they are."""
        if isinstance(contexts, str) or isinstance(continuations, str) \
                or len(contexts) != len(continuations):
            raise GrokError("contexts and continuations must be lists of the same length")
        pairs = []
        for i, (context, continuation) in enumerate(zip(contexts, continuations,
                                                        strict=True)):
            if isinstance(context, str) != isinstance(continuation, str):
                raise GrokError(f"pair {i}: context and continuation must both be text or "
                                f"both token ids")
            if isinstance(context, str):
                pairs.append(encode_pair(self._need_tokenizer(), context, continuation))
            else:
                pairs.append((_ids(context, f"context {i}"),
                              _ids(continuation, f"continuation {i}")))
        return self._scorer.score(self.params, pairs)

    def score_rolling(self, texts: Sequence[Prompt], prefix_token: int | None = None
                      ) -> list[Score]:
        """Every token of each text scored, in disjoint windows of the model's context,
        the first window given `prefix_token` (default: the tokenizer's BOS), each later
        one given the token before it (lm_eval's `loglikelihood_rolling`, for perplexity;
        see `grok.scoring`)."""
        if isinstance(texts, str):
            raise GrokError("texts must be a list of texts or token-id lists")
        if prefix_token is None:
            prefix_token = self._need_tokenizer().bos_id
            if prefix_token < 0:
                raise GrokError("the tokenizer has no BOS: pass prefix_token")
        _ids([prefix_token], "prefix_token")
        ids = [self._need_tokenizer().encode(t) if isinstance(t, str) else _ids(t, f"text {i}")
               for i, t in enumerate(texts)]
        if any(not x for x in ids):
            raise GrokError(f"text {next(i for i, x in enumerate(ids) if not x)} is empty")
        windows = [rolling_windows(x, prefix_token, self.config.sequence_len) for x in ids]
        scores = iter(self._scorer.score(self.params, [p for w in windows for p in w]))
        return [join([next(scores) for _ in w]) for w in windows]

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise GrokError("text needs a tokenizer: pass tokenizer_path to Grok.load, or "
                            "give token-id lists")
        return self.tokenizer

    @functools.cached_property
    def _scorer(self) -> Scorer:
        return Scorer(self.config, lambda params, tokens: self.model.apply(params, tokens)[0],
                      lambda tokens: sharding.put(tokens, NamedSharding(
                          self.mesh, sharding.TOKENS_SPEC)),
                      sharding.fetch, lambda n: sharding.padded_batch(self.mesh, n))

    def routing(self, tokens) -> Routing:
        """The experts each token of int tokens [B, T] chose in each layer, most probable
        first, and their gate weights, exactly as the forward pass used them: int32 and
        float32 [B, T, L, X]; -1 and 0 at pad tokens."""
        tokens = self.config.check_tokens(tokens)
        experts, gates = (sharding.fetch(x)[: tokens.shape[0]]
                          for x in self._route(self.params, self._place(tokens)))
        pad = (tokens == self.config.pad_token)[:, :, None, None]
        return Routing(np.where(pad, -1, experts).astype(np.int32),
                       np.where(pad, 0.0, gates).astype(np.float32))

    @functools.cached_property
    def _route(self):
        def route(params, tokens):
            routing = self.model.apply(params, tokens, with_routing=True)[2]
            return routing.experts, routing.gates
        return jax.jit(route)

    def expert_usage(self) -> ExpertUsage:
        """Routing tallies of every prefill and decode step since load or the last
        `reset_expert_usage` (all zero with `expert_stats` off)."""
        return self.usage.snapshot()

    def reset_expert_usage(self) -> None:
        self.usage.reset()

    def engine(self, max_batch: int, max_seq_len: int | None = None,
               log: Callable[[str], None] | None = None,
               prefill_chunk: int | None = None, deterministic: bool = False) -> Engine:
        """The engine for `max_batch` slots of `max_seq_len` positions (default: the model's
        context), prefilling at most `prefill_chunk` prompt tokens at a time (None: whole
        prompts), with `deterministic` steps or not (see `Engine`); kept, so its compiled
        steps serve every later call of the same shape. `log`, if given, is told of each
        compile as it finishes."""
        max_seq_len = self.config.sequence_len if max_seq_len is None else max_seq_len
        key = (max_batch, max_seq_len, prefill_chunk, deterministic)
        if key not in self._engines:
            self._engines[key] = Engine(self, max_batch, max_seq_len,
                                        prefill_chunk=prefill_chunk,
                                        deterministic=deterministic)
        engine = self._engines[key]
        if log is not None:
            engine.log = log
        return engine

    @property
    def compile_count(self) -> int:
        """Programs compiled so far by this model's engines."""
        return sum(engine.compile_count for engine in self._engines.values())

    @property
    def compile_seconds(self) -> float:
        return sum(engine.compile_seconds for engine in self._engines.values())

    def run(self, prompts: Prompt | Sequence[Prompt], log: Callable[[str], None] | None = None,
            **settings) -> GenerationRun:
        """Checks prompts and settings before any device work and returns the run, which
        decodes as it is iterated (see `GenerationRun`)."""
        single, batch = _as_batch(prompts)
        if not batch:
            raise GrokError("no prompts given")
        seed = settings.pop("seed", GenerationSettings.seed)
        seeds = [seed] * len(batch) if isinstance(seed, (int, np.integer)) else list(seed)
        if len(seeds) != len(batch):
            raise GrokError(f"seed must be an int or one int per prompt ({len(batch)}), "
                            f"got {seed!r:.80}")
        each = [GenerationSettings(seed=s, **settings) for s in seeds]
        structure = each[0].structure
        grammar = None if structure is None else self.grammars.compile(structure)
        requests = [make_request(self.config, self.tokenizer, prompt, s, label=f"prompt {i}",
                                 grammar=grammar)
                    for i, (prompt, s) in enumerate(zip(batch, each, strict=True))]
        engine = self.engine(*run_shape(self.config, requests), log=log)
        return GenerationRun(single, engine, requests)

    def generate(self, prompts: Prompt | Sequence[Prompt], **settings
                 ) -> Completion | list[Completion]:
        """Samples continuations of one prompt or a batch of them (decoded together).

        A prompt is a string (needs the tokenizer) or a list of token ids. Settings are the
        fields of `GenerationSettings`: max_new_tokens, temperature (0: greedy), top_p,
        top_k (0: off), seed (one, or one per prompt), stop, ignore_eos, allowed_tokens,
        the steering controls, structure (`grok.structured`: JSON schema, regex, ...);
        defaults are the release's. Each row stops at EOS, at a stop string, or after
        max_new_tokens. One prompt in gives one `Completion` out; a list gives a list, in
        prompt order.
        """
        run = self.run(prompts, **settings)
        for _ in run:
            pass
        return run.completions[0] if run.single else run.completions

    def stream(self, prompts: Prompt | Sequence[Prompt], **settings
               ) -> Iterator[str] | Iterator[tuple[int, str]]:
        """Like `generate`, yielding text as it is produced: strings for one prompt,
        (prompt index, text) pairs for a list. (`run` gives the tokens and completions.)"""
        run = self.run(prompts, **settings)
        for index, event in run:
            if event.text:
                yield event.text if run.single else (index, event.text)


class GenerationRun:
    """One call's prompts on an engine. Iterating decodes and yields (prompt index, Event)
    as tokens arrive; `completions` (prompt order) and `stats` are complete afterwards."""

    def __init__(self, single: bool, engine: Engine, requests: list):
        self.single = single
        self.engine = engine
        self.requests = requests
        self.completions: list[Completion | None] = [None] * len(requests)
        self.stats = Stats()
        self.compile_s = 0.0

    def programs(self) -> list[tuple]:
        """The programs this run compiles as it goes (`Engine.programs()` keys, in the
        scheduler's order: prefills grouped by prompt bucket, then the decode step), so
        that a caller can compile them first (`Engine.warmup`)."""
        engine = self.engine
        lengths = [len(r.prompt_ids) for r in self.requests]
        keys: list[tuple] = [("init",)]
        keys += [("prefill", engine.rows_for(len(group)),
                  engine.prompt_bucket(max(lengths[i] for i in group)))
                 for group in engine.prefill_groups(lengths)]
        last = max(n + r.settings.max_new_tokens - 1 for n, r in zip(lengths, self.requests,
                                                                     strict=True))
        if last > max(lengths):
            keys.append(("decode", engine.slots))
        cache = engine.grok.prefix_cache
        if cache is not None and max(lengths) >= cache.block_size:
            # Full blocks are saved; which prompts continue cached blocks (and the
            # programs they need) depends on the cache, and compiles as it happens.
            keys.append(("save_blocks", cache.settings))
        return list(dict.fromkeys(keys))

    def __iter__(self) -> Iterator[tuple[int, Event]]:
        compiled_before = self.engine.compile_seconds
        scheduler = Scheduler(self.engine, shrink_rows=False)
        index = {scheduler.submit(r): i for i, r in enumerate(self.requests)}
        while scheduler.has_work:
            for event in scheduler.step():
                i = index[event.request_id]
                if event.completion is not None:
                    self.completions[i] = event.completion
                yield i, event
        self.stats = scheduler.stats
        self.compile_s = self.engine.compile_seconds - compiled_before


Prompt = str | Sequence[int]


def _ids(value, label: str) -> list[int]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, Sequence) or any(
            isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in value):
        raise GrokError(f"{label} must be text or a list of token ids")
    return [int(t) for t in value]


def run_shape(config: GrokConfig, requests: Sequence) -> tuple[int, int]:
    """(slots, positions) of the engine `Grok.run` uses for these requests: the smallest
    cache that holds every one, bucketed so that calls alike in size share an engine and
    its compiled steps."""
    needed = max(len(r.prompt_ids) + r.settings.max_new_tokens for r in requests)
    return (bucket(len(requests), cap=1 << 30, minimum=1),
            bucket(needed, cap=config.sequence_len))


def _as_batch(prompts) -> tuple[bool, list]:
    """(True, [prompt]) for one prompt (a string or a list of ints), else (False, list)."""
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                    and all(isinstance(t, (int, np.integer)) for t in prompts)):
        return True, [prompts]
    if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
        return True, [prompts.tolist()]
    return False, list(prompts)
