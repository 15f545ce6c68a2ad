"""`Grok`: a loaded model on a device mesh, the library's entry point."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from grok import checkpoint, distributed, model, sharding
from grok.config import GrokConfig, resolve_config
from grok.generate import Completion, GenerationSettings, Generator, Request, make_request
from grok.moe import STRATEGIES
from grok.quant import WEIGHT_MODES, default_weight_mode, storage_dtype, store_params
from grok.tokenizer import Tokenizer


class Grok:
    """A Grok-architecture model with its parameters placed on a (data, model) mesh."""

    def __init__(self, config: GrokConfig, params: dict, mesh: Mesh,
                 tokenizer: Tokenizer | None = None, moe_strategy: str = "sparse"):
        self.config = config
        self.params = params
        self.mesh = mesh
        self.tokenizer = tokenizer
        self.model = model.build(config, moe_strategy, mesh)
        self.generator = Generator(self)

    @classmethod
    def load(cls, checkpoint_dir: str | os.PathLike, config: GrokConfig | str | os.PathLike,
             tokenizer_path: str | os.PathLike | Tokenizer | None = None,
             mesh_shape: tuple[int, int] | None = None, weights: str | None = None,
             moe: str = "sparse", progress: bool | None = None, verify: bool = False) -> Grok:
        """Reads a checkpoint in the released format onto a new mesh.

        `checkpoint_dir` holds `ckpt-0` (or is it); `config` is a GrokConfig, a preset name
        or a JSON path; `mesh_shape` is (data, model), default all devices on `model` (in a
        multi-process run, one `data` row per process; see `sharding.make_mesh`).
        `weights`: "int8" keeps 8-bit weights on the devices, "dequantized" turns them
        into their exact bf16 values once (default: dequantized on CPU, int8 elsewhere).
        `moe`: "sparse" runs only the chosen experts; "dense" all of them, as the release.
        `tokenizer_path` may also be a `Tokenizer` already read (the CLI reads it first, to
        check prompts before the long load). `verify`: check every file against the
        manifest beside `ckpt-0` first (see `grok.manifest`).
        """
        if moe not in STRATEGIES:
            raise ValueError(f"moe must be one of {list(STRATEGIES)}, got {moe!r}")
        if weights not in (None, *WEIGHT_MODES):
            raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
        config = resolve_config(config)
        tokenizer = tokenizer_path
        if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer.from_config(tokenizer_path, config)
        mesh = sharding.make_mesh(mesh_shape)
        sharding.check_mesh(config, mesh)
        params = checkpoint.load_checkpoint(
            checkpoint_dir, model.abstract_params(config),
            lambda path, kind, shape: sharding.param_sharding(mesh, path, kind, shape),
            progress=progress if distributed.is_main_process() else False, verify=verify)
        platform = mesh.devices.flat[0].platform
        weights = default_weight_mode(platform) if weights is None else weights
        params = store_params(params, weights, storage_dtype(platform),
                              split_experts=platform == "cpu")
        return cls(config, params, mesh, tokenizer, moe_strategy=moe)

    def logits(self, tokens) -> np.ndarray:
        """Float32 logits [B, T, vocab_size] of a full forward pass over int tokens [B, T]."""
        tokens = self.config.check_tokens(tokens)
        batch = tokens.shape[0]
        rows = sharding.padded_batch(self.mesh, batch)
        padded = np.full((rows, tokens.shape[1]), self.config.pad_token, np.int32)
        padded[:batch] = tokens
        placed = sharding.put(padded, NamedSharding(self.mesh, sharding.TOKENS_SPEC))
        out = self._forward(self.params, placed)
        return sharding.fetch(out[:batch]).astype(np.float32)

    @functools.cached_property
    def _forward(self):
        return jax.jit(lambda params, tokens: self.model.apply(params, tokens)[0])

    def request(self, prompts: Prompt | Sequence[Prompt], **settings) -> tuple[bool, Request]:
        """Checks prompts and settings (see `GenerationSettings`) before any work."""
        single, batch = _as_batch(prompts)
        return single, make_request(self.config, self.tokenizer, batch,
                                    GenerationSettings(**settings))

    def generate(self, prompts: Prompt | Sequence[Prompt], **settings
                 ) -> Completion | list[Completion]:
        """Samples continuations of one prompt or a batch of them (decoded together).

        A prompt is a string (needs the tokenizer) or a list of token ids. Settings are the
        fields of `GenerationSettings`: max_new_tokens, temperature (0: greedy), top_p,
        top_k (0: off), seed, stop, allowed_tokens; defaults are the release's. Each row
        stops at EOS, at a stop string, or after max_new_tokens. One prompt in gives one
        `Completion` out; a list gives a list, in prompt order.
        """
        single, request = self.request(prompts, **settings)
        for _ in self.generator.run(request):
            pass
        out = self.generator.completions
        return out[0] if single else out

    def stream(self, prompts: Prompt | Sequence[Prompt], **settings
               ) -> Iterator[str] | Iterator[tuple[int, str]]:
        """Like `generate`, yielding text as it is produced: strings for one prompt,
        (prompt index, text) pairs for a list. The completions are in
        `self.generator.completions` afterwards."""
        single, request = self.request(prompts, **settings)
        for index, piece, _ in self.generator.run(request):
            if piece:
                yield piece if single else (index, piece)


Prompt = str | Sequence[int]


def _as_batch(prompts) -> tuple[bool, list]:
    """(True, [prompt]) for one prompt (a string or a list of ints), else (False, list)."""
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                    and all(isinstance(t, (int, np.integer)) for t in prompts)):
        return True, [prompts]
    if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
        return True, [prompts.tolist()]
    return False, list(prompts)
