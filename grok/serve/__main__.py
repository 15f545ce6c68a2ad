"""`python -m grok.serve` (or `grok-serve`): an OpenAI-compatible HTTP server.

Takes run.py's model flags; with no checkpoint it serves the demo model. The HTTP port
answers at once (/health says 503 "loading") while the device thread loads the weights and
compiles every step it can meet; then /health turns 200. SIGTERM or Ctrl-C stops admitting
(503), lets running requests finish for up to --grace seconds, and exits 0; a second
signal exits at once. In a multi-process run, process 0 serves and the others follow its
plans (see plan.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from grok import cli, compilation, demo, distributed, sharding
from grok.config import resolve_config
from grok.engine.engine import (
    CPU_PREFILL_CHUNK,
    PREFILL_CHUNK,
    check_steps,
    default_prefill_chunk,
)
from grok.errors import GrokError
from grok.tokenizer import Tokenizer

log = logging.getLogger("grok.serve")
CPU_MAX_BATCH = 8
AUTO = cli.AUTO


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m grok.serve",
                           description="Serve a Grok-1 checkpoint over an OpenAI-compatible API.")
    cli.add_model_arguments(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    s.add_argument("--max-batch", type=cli.max_batch_arg,
                   help="sequences decoded together: the KV-cache slots, or 'auto': the most "
                        "that fit --memory-fraction at --max-seq-len, after the weights and "
                        "the largest step's temporaries (default: auto on accelerators, "
                        f"{CPU_MAX_BATCH} on CPU)")
    s.add_argument("--memory-fraction", type=float, default=0.9,
                   help="share of each device's memory the run may use, for --max-batch auto "
                        "and the check before loading (default: %(default)s)")
    s.add_argument("--max-seq-len", type=int,
                   help="positions per slot, prompt plus new tokens (default: the model's "
                        "context)")
    s.add_argument("--prefill-chunk", type=int, metavar="TOKENS",
                   help="prefill prompts at most this many tokens at a time (a power of two), "
                        "decoding the running requests between chunks; 0: whole prompts "
                        f"(default: {CPU_PREFILL_CHUNK} on CPU, {PREFILL_CHUNK} on "
                        "accelerators)")
    s.add_argument("--deterministic", action="store_true",
                   help="give every step one shape (decode all slots over the whole cache, "
                        "prefill one chunk of one prompt at a time), so that a request's "
                        "numbers do not depend on what else is in flight, on the prefix "
                        "cache or on when it arrived; slower (see README)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="sequences that may wait for a slot; more get 429 (default: "
                        "%(default)s)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    s.add_argument("--chat-template", type=Path,
                   help="Jinja chat template (as Hugging Face's) for /v1/chat/completions")
    s.add_argument("--model-name",
                   help="the model id clients name (default: grok-1, or grok-1-demo)")
    s.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="compile every step before reporting ready (default: on)")
    s.add_argument("--grace", type=float, default=30.0,
                   help="seconds running requests may take to finish at shutdown "
                        "(default: %(default)s)")
    s.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    compilation.add_argument(p)
    distributed.add_arguments(p)
    return p


def _check(args) -> tuple:
    """Everything a user can get wrong, before the model loads."""
    for name, low in (("max_queue", 0), ("port", 0)):
        if getattr(args, name) < low:
            raise GrokError(f"--{name.replace('_', '-')} must be at least {low}, got "
                            f"{getattr(args, name)}")
    if args.port > 65535:
        raise GrokError(f"--port must be at most 65535, got {args.port}")
    config = resolve_config(args.config)
    cli._check_paths(args)
    if args.max_seq_len is not None and not 2 <= args.max_seq_len <= config.sequence_len:
        raise GrokError(f"--max-seq-len must be in [2, {config.sequence_len}] (the model's "
                        f"context), got {args.max_seq_len}")
    if not 0 < args.memory_fraction <= 1:
        raise GrokError(f"--memory-fraction must be in (0, 1], got {args.memory_fraction}")
    tokenizer = Tokenizer.from_config(args.tokenizer, config)
    mesh = sharding.make_mesh(args.mesh)
    sharding.check_mesh(config, mesh)
    cpu = mesh.devices.flat[0].platform == "cpu"
    if args.max_batch is None:
        args.max_batch = CPU_MAX_BATCH if cpu else AUTO
    if args.prefill_chunk is None:
        args.prefill_chunk = default_prefill_chunk(mesh.devices.flat[0].platform)
    check_steps(args.prefill_chunk or None, args.deterministic, flags=True)
    cli.check_prefix_cache_flags(args)
    from grok.plan.sizes import RunShape, check_fits

    # With auto, at least one slot per data row must fit; the plan then takes the most.
    least = mesh.shape[sharding.DATA] if args.max_batch == AUTO else args.max_batch
    check_fits(RunShape(config, args.mesh, args.weights, args.layers, args.moe, least,
                        args.max_seq_len, args.int4_group), mesh, args.memory_fraction,
               cli.model_name(args))
    template = None
    if args.chat_template is not None:
        from grok.serve.chat import ChatTemplate

        eos = tokenizer.piece(config.eos_token)
        template = ChatTemplate.from_file(args.chat_template, eos_token=eos)
    return config, tokenizer, template


def _builder(args, config, tokenizer, on_slots: Callable[[int], None]):
    """The device thread's first job: load, size the decode state, make the engine,
    compile. `on_slots` is told the slots chosen."""
    def build():
        from grok.api import Grok
        from grok.engine.progress import ProgressLine
        from grok.plan.plan import spare_prefix_blocks

        start = time.perf_counter()
        grok = Grok.load(args.checkpoint, config, tokenizer_path=tokenizer,
                         mesh_shape=args.mesh, weights=args.weights, moe=args.moe,
                         verify=args.verify, layers=args.layers, int4_group=args.int4_group)
        log.info("loaded in %.1f s on a %dx%d mesh", time.perf_counter() - start,
                 grok.mesh.shape["data"], grok.mesh.shape["model"])
        max_seq_len = args.max_seq_len or config.sequence_len
        slots = args.max_batch
        if slots == AUTO:
            from grok.plan.plan import most_slots

            start = time.perf_counter()
            slots = distributed.agree(most_slots(grok, max_seq_len, args.memory_fraction,
                                                 prefill_chunk=args.prefill_chunk or None,
                                                 deterministic=args.deterministic))
            log.info("--max-batch auto: %d slots of %d positions fit %g of each device's "
                     "memory (sized in %.1f s)", slots, max_seq_len, args.memory_fraction,
                     time.perf_counter() - start)
        engine = grok.engine(slots, max_seq_len, prefill_chunk=args.prefill_chunk or None,
                             deterministic=args.deterministic)
        on_slots(engine.slots)
        cache = cli.prefix_cache_settings(
            args, engine.slots, max_seq_len,
            lambda block: _agreed(spare_prefix_blocks(engine, block, args.memory_fraction)))
        grok.enable_prefix_cache(cache)
        if cache is not None:
            log.info("prefix cache: %d blocks of %d tokens (%.1f MiB in all)",
                     grok.prefix_cache.settings.blocks, cache.block_size,
                     grok.prefix_cache.nbytes / 2**20)
        if args.warmup:
            start = time.perf_counter()
            engine.warmup(progress=ProgressLine("warming up", write=log.info))
            log.info("warmed up in %.1f s", time.perf_counter() - start)
        engine.log = log.info  # compiles after warmup: shapes it did not cover
        return engine
    return build


def _agreed(value: int | None) -> int | None:
    """Process 0's value on every process (None where the devices report no memory, which
    is the same on every process)."""
    return None if value is None else distributed.agree(value)


def main(argv: list[str] | None = None) -> int:
    try:
        args = demo.parse_args(build_parser(), argv)
        logging.basicConfig(level=args.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        distributed.initialize(args)  # before anything touches a JAX backend
        compilation.enable(args.compilation_cache)
        config, tokenizer, template = _check(args)
    except (GrokError, OSError) as e:
        print(f"error: {cli._one_line(e)}", file=sys.stderr)
        distributed.exit_on_failure(2)
        return 2
    except SystemExit as e:  # --help prints, then ends here
        return e.code if isinstance(e.code, int) else 0
    if args.demo:
        print(demo.BANNER, file=sys.stderr)

    from grok.serve.metrics import Metrics
    from grok.serve.plan import BroadcastChannel
    from grok.serve.worker import Admission, Worker

    multi = distributed.requested(args)
    channel = BroadcastChannel(distributed.is_main_process()) if multi else None
    # Sized for real once the builder knows the slots; requests wait on /health until then.
    admission = Admission(args.max_queue)
    metrics = Metrics(0)

    def on_slots(slots: int) -> None:
        admission.capacity = slots + args.max_queue
        metrics.slots.set(slots)

    worker = Worker(_builder(args, config, tokenizer, on_slots), admission=admission,
                    metrics=metrics, channel=channel)
    metrics.watch_routing(lambda: None if worker.engine is None
                          else worker.engine.grok.expert_usage())
    if not distributed.is_main_process():
        try:
            worker.follow()
        except BaseException:
            log.exception("following process 0 failed")
            distributed.exit_on_failure(1)
            raise
        return 0

    import uvicorn

    from grok.serve.app import ServerConfig, Service, create_app

    name = args.model_name or ("grok-1-demo" if args.demo else "grok-1")
    server_config = ServerConfig(
        model_name=name, tokenizer=tokenizer, eos_id=config.eos_token,
        max_seq_len=args.max_seq_len or config.sequence_len, api_key=args.api_key,
        chat_template=template)
    service = Service(server_config, worker, metrics)
    uv_config = uvicorn.Config(create_app(service), host=args.host, port=args.port,
                               log_level=args.log_level, lifespan="off",
                               timeout_graceful_shutdown=5)
    server = DrainingServer(uv_config, service, args.grace)
    worker.start()
    server.run()
    worker.stop(timeout=0 if worker.state == "loading" else 60)
    if worker.state == "failed":
        distributed.exit_on_failure(1)
        return 1
    if worker.state == "loading":
        # Stopped before the model was ready: a compile cannot be interrupted, and the
        # interpreter must not tear down under it.
        log.info("stopped while loading")
        logging.shutdown()
        sys.stderr.flush()
        os._exit(0)
    log.info("stopped")
    return 0


class DrainingServer:
    """uvicorn with a graceful stop: the first SIGTERM/SIGINT turns the service to
    draining (new requests get 503), waits for the requests in flight (at most `grace`
    seconds), ends what is left with a 503, then lets uvicorn close; a second signal
    closes at once. Exits 0 either way: being asked to stop is not a failure."""

    def __init__(self, config, service, grace: float):
        import uvicorn

        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame) -> None:
                outer._on_signal(sig)

        self.server = _Server(config)
        self.service, self.grace = service, grace
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.server.serve()

    def _on_signal(self, sig: int) -> None:
        if self.service.draining or self._loop is None:
            self.server.should_exit = True
            self.server.force_exit = self.service.draining
            return
        log.info("%s: draining (new requests get 503; up to %.0f s for the rest)",
                 signal.Signals(sig).name, self.grace)
        self.service.draining = True
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.grace
        while self.service.admission.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.service.admission.in_flight:
            log.warning("grace period over: ending %d request(s)",
                        self.service.admission.in_flight)
        self.service.worker.stop(timeout=0)  # what is left ends with a 503
        await asyncio.sleep(0.1)  # lets the handlers send it
        self.server.should_exit = True


if __name__ == "__main__":
    sys.exit(main())
