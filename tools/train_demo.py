"""Trains the demo model that `run.py` runs when the real weights are absent.

    python tools/train_demo.py [--seed 0] [--steps N] [--out-checkpoint grok/demo_files]
                               [--out-tokenizer grok/demo_files/demo.model] [--toy]

A small model with every part of Grok-1 (grouped-query attention with RoPE and the soft
cap, 8 experts top-2, the release's multipliers) learns multi-digit addition: "123+456="
-> "579" and EOS, operands of 1 to 3 digits. It trains through `grok.model.build` itself
(bf16 activations, float32 parameters), so the weights fit the inference code exactly; the
loss covers only the answer and its EOS. The weights are then written as the release
stores them (int8 where it quantises), with the config JSON beside them, and checked
through the real loader on held-out problems. Problems are split by `grok.demo`'s hash
rule, so those checks, `run.py`'s examples and the tests use problems never trained on.

Progress (step, loss, held-out accuracy) goes to stderr.
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grok import demo, model  # noqa: E402
from grok.api import Grok  # noqa: E402
from grok.checkpoint import write_checkpoint  # noqa: E402
from grok.cli import ArgumentParser, UsageError  # noqa: E402
from grok.config import GROK_1, GrokConfig  # noqa: E402

SYMBOLS = [*"0123456789", "+", "="]  # ids 4.. in this order, after pad, bos, eos, unk
TIME_LEN = 16  # the longest problem, "999+999=1998" and EOS, is 13 tokens
EVAL_PROBLEMS = 1000
CHECK_PROBLEMS = 200
CHECK_SEED = 7


def demo_config(emb_size: int, key_size: int, num_q_heads: int, num_kv_heads: int,
                num_layers: int, widening_factor: float) -> GrokConfig:
    """Grok-1's structure and multipliers at a small size, with the demo tokenizer's ids."""
    return dataclasses.replace(
        GROK_1, vocab_size=4 + len(SYMBOLS), sequence_len=64, emb_size=emb_size,
        key_size=key_size, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
        num_layers=num_layers, widening_factor=widening_factor,
        attn_output_multiplier=1 / math.sqrt(key_size))


@dataclasses.dataclass(frozen=True)
class Recipe:
    config: GrokConfig
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    eval_every: int


# The shipped model (2M parameters, mostly experts). Six layers of eight narrow heads over
# four key/value heads, with narrow experts, learnt much faster than four layers of four
# wide heads over two with experts twice as wide, at the same cost per step (99.8% vs 93%
# held-out after 2000 steps). Head counts and widths are even, so a model axis of 2 fits.
DEMO = Recipe(demo_config(128, 16, 8, 4, 6, 1), steps=2500, batch_size=128,
              learning_rate=3e-3, warmup_steps=100, eval_every=100)
# For the test suite: the same path in seconds.
TOY = Recipe(demo_config(32, 8, 4, 2, 2, 2), steps=20, batch_size=32,
             learning_rate=3e-3, warmup_steps=5, eval_every=10)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train_tokenizer(rng: random.Random, path: Path) -> spm.SentencePieceProcessor:
    """A SentencePiece model over the problems' text: one piece per digit and sign, with
    Grok's special ids (pad 0, bos 1, eos 2)."""
    lines = [demo.prompt(a, b) + str(a + b)
             for a, b in demo.problems(rng, 10_000, held_out=False)]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto, model_type="bpe",
        vocab_size=4 + len(SYMBOLS), user_defined_symbols=SYMBOLS, split_digits=True,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, add_dummy_prefix=False,
        normalization_rule_name="identity", character_coverage=1.0, minloglevel=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.getvalue())
    return spm.SentencePieceProcessor(model_proto=proto.getvalue())


def encode_batch(sp: spm.SentencePieceProcessor, config: GrokConfig,
                 pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [B, TIME_LEN] (prompt, answer, EOS, pad) and the loss mask [B, TIME_LEN - 1]:
    1 where position t predicts an answer token or the EOS."""
    tokens = np.full((len(pairs), TIME_LEN), config.pad_token, np.int32)
    mask = np.zeros((len(pairs), TIME_LEN - 1), np.float32)
    for i, (a, b) in enumerate(pairs):
        question = sp.encode(demo.prompt(a, b))
        row = [*question, *sp.encode(str(a + b)), config.eos_token]
        tokens[i, : len(row)] = row
        mask[i, len(question) - 1: len(row) - 1] = 1
    return tokens, mask


def init_params(config: GrokConfig, key) -> dict:
    """The model's initialisation, with embeddings shrunk by the embedding multiplier so that
    the residual stream starts near unit scale (the released multiplier is kept)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = jax.jit(model.build(config, "dense").init)(key, tokens)  # eager init is slow
    embed = params["language_model/in_out_embed"]
    embed["embeddings"] = embed["embeddings"] / config.embedding_multiplier_scale
    return params


def make_steps(recipe: Recipe):
    forward = model.build(recipe.config, "dense")
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, recipe.learning_rate, recipe.warmup_steps, recipe.steps,
        end_value=recipe.learning_rate / 20)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b2=0.98, weight_decay=0.01))

    def per_token(params, tokens):
        """Negative log-likelihood of each next token, and whether argmax got it."""
        logits = forward.apply(params, tokens)[0][:, :-1].astype(jnp.float32)
        targets = tokens[:, 1:]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return nll, jnp.argmax(logits, -1) == targets

    def loss_fn(params, tokens, mask):
        nll, _ = per_token(params, tokens)
        return jnp.sum(nll * mask) / jnp.sum(mask)

    @jax.jit
    def train_step(params, opt_state, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def exact(params, tokens, mask):
        """Per problem: every answer token and the EOS are the argmax given the true prefix,
        which is exactly when greedy decoding writes the right answer."""
        _, hit = per_token(params, tokens)
        return jnp.all(hit | (mask == 0), axis=-1)

    return optimizer, train_step, exact


def train(recipe: Recipe, seed: int, sp: spm.SentencePieceProcessor) -> dict:
    rng = random.Random(seed)
    eval_tokens, eval_mask = encode_batch(sp, recipe.config,
                                          demo.fresh_problems(seed + 1, EVAL_PROBLEMS))
    optimizer, train_step, exact = make_steps(recipe)
    params = init_params(recipe.config, jax.random.key(seed))
    opt_state = optimizer.init(params)
    start, losses = time.perf_counter(), []
    for step in range(1, recipe.steps + 1):
        tokens, mask = encode_batch(
            sp, recipe.config, demo.problems(rng, recipe.batch_size, held_out=False))
        params, opt_state, loss = train_step(params, opt_state, tokens, mask)
        losses.append(loss)
        if step % recipe.eval_every == 0 or step == recipe.steps:
            accuracy = float(np.mean(exact(params, eval_tokens, eval_mask)))
            log(f"step {step}/{recipe.steps}  loss {float(np.mean(losses)):.4f}  "
                f"held-out exact {accuracy:.1%}  {time.perf_counter() - start:.0f} s")
            losses = []
    return params


def check(out_checkpoint: Path, config_path: Path, tokenizer_path: Path) -> None:
    """Greedy answers to fresh problems through the real loader, in both weight modes."""
    pairs = demo.fresh_problems(CHECK_SEED, CHECK_PROBLEMS)
    for weights in ("int8", "dequantized"):
        grok = Grok.load(out_checkpoint, config_path, tokenizer_path=tokenizer_path,
                         mesh_shape=(1, 1), weights=weights)
        completions = grok.generate([demo.prompt(a, b) for a, b in pairs], temperature=0,
                                    max_new_tokens=demo.MAX_NEW_TOKENS)
        right = sum(demo.is_right(a, b, c.text) and c.finish_reason == "eos"
                    for (a, b), c in zip(pairs, completions, strict=True))
        log(f"{weights} weights, loaded from {out_checkpoint}: {right}/{len(pairs)} "
            f"fresh problems right ({right / len(pairs):.1%})")


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    p.add_argument("--out-checkpoint", type=Path, default=demo.DEMO_CHECKPOINT,
                   help="folder for ckpt-0/ and config.json (default: %(default)s)")
    p.add_argument("--out-tokenizer", type=Path, default=demo.DEMO_TOKENIZER,
                   help="SentencePiece model to write (default: %(default)s)")
    p.add_argument("--toy", action="store_true", help="a tiny model for a few steps (tests)")
    try:
        args = p.parse_args(argv)
        if args.steps is not None and args.steps < 1:
            p.error(f"--steps must be at least 1, got {args.steps}")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    recipe = TOY if args.toy else DEMO
    if args.steps is not None:
        recipe = dataclasses.replace(recipe, steps=args.steps,
                                     warmup_steps=min(recipe.warmup_steps, args.steps // 2))

    start = time.perf_counter()
    sp = train_tokenizer(random.Random(args.seed), args.out_tokenizer)
    params = train(recipe, args.seed, sp)
    log(f"trained in {time.perf_counter() - start:.0f} s")
    write_checkpoint(args.out_checkpoint, params)
    config_path = args.out_checkpoint / "config.json"
    recipe.config.to_json(config_path)
    check(args.out_checkpoint, config_path, args.out_tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
