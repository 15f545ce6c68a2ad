"""Loading benchmark: a full-width checkpoint (Grok-1's tensors, 1 or 2 layers) with random
data, loaded with `grok.checkpoint.load_checkpoint`, against the raw read speed of the same
files on this machine; figures as JSON.

    python benchmarks/load_bench.py [--layers 1] [--dir DIR] [--keep] [--repeats 2]
                                    [--devices 1]

The checkpoint (about 8 GB for one layer, 13 GB for two) is written tensor by tensor, never
the whole model in memory, and deleted afterwards unless --keep (an existing one in --dir is
reused). "Cold" figures come after the files are dropped from the page cache (through
/proc/sys/vm/drop_caches where permitted, else `posix_fadvise(DONTNEED)` per file), "warm"
ones with the files cached. Raw speed: every file read whole with 64 MB reads into reused
buffers, by one stream and by 8 threads; and, in a fresh process like each load, into new
memory the size of the files with the loader's thread count (a load must end with the
data in memory never touched before, which costs time of its own on some machines, VMs
above all). Loads and fresh-memory reads alternate, `--repeats` times each; the best is
reported. Each loading process then loads again into memory it has used before ("reload"):
the loader's own speed against the raw reads. Memory: the first load's peak resident set
(ru_maxrss, file pages included) and the peak of anonymous memory alone (sampled), against
the bytes loaded plus the largest tensor. Progress goes to stderr, the figures to stdout.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import queue
import resource
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grok.checkpoint import loader, pickle_format  # noqa: E402
from grok.cli import ArgumentParser, UsageError  # noqa: E402
from grok.config import GROK_1  # noqa: E402
from grok.quant import QuantizedWeight8bit, is_quantized  # noqa: E402

READ_CHUNK = 64 << 20
RAW_THREADS = 8


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tensors(layers: int) -> list[tuple[str, object]]:
    """(name, abstract leaf) of every file, in the release's order."""
    from grok.model import abstract_params
    return loader.flatten(abstract_params(dataclasses.replace(GROK_1, num_layers=layers)))[0]


def nbytes(leaf) -> int:
    parts = (leaf.weight, leaf.scales) if is_quantized(leaf) else (leaf,)
    return sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in parts)


def random_value(name: str, leaf, rng: np.random.Generator):
    """Random data of the stored kind: int8 weights with bf16 scales, float32 otherwise."""
    if is_quantized(leaf):
        weight = rng.integers(-127, 128, leaf.weight.shape, dtype=np.int8)
        scales = (rng.random(leaf.scales.shape, dtype=np.float32) * 1e-3).astype(
            ml_dtypes.bfloat16)
        return QuantizedWeight8bit(weight, scales)
    if name.endswith("/scale"):
        return np.ones(leaf.shape, np.float32)
    return rng.standard_normal(leaf.shape, dtype=np.float32)


def write(folder: Path, layers: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    named = tensors(layers)
    for index, (name, leaf) in enumerate(named):
        path = folder / loader.tensor_name(index)
        pickle_format.write_tensor(path, random_value(name, leaf, rng))
        with open(path, "rb") as f:  # on disk, so that the page cache can be dropped
            os.fsync(f.fileno())
        log(f"  wrote {path.name} ({name}, {nbytes(leaf) / 1e9:.2f} GB)")


def drop_cache(files: list[Path]) -> str:
    """Evicts the files from the page cache; returns how."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise(DONTNEED) per file (drop_caches not permitted)"


def prepare(files: list[Path], state: str) -> None:
    """Drops the files from the page cache ("cold") or reads them into it ("warm")."""
    if state == "cold":
        drop_cache(files)
    else:
        raw_read(files, RAW_THREADS)


def raw_read(files: list[Path], threads: int) -> float:
    """Seconds to read every file whole with large reads into reused buffers: one stream,
    or `threads` positional readers over 64 MB chunks of the files."""
    if threads == 1:
        buffer = bytearray(READ_CHUNK)
        start = time.perf_counter()
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
        return time.perf_counter() - start
    local = threading.local()

    def into_reused(path, offset):
        if not hasattr(local, "buffer"):
            local.buffer = bytearray(READ_CHUNK)
        return local.buffer

    return _parallel_read(files, threads, into_reused)


def _parallel_read(files: list[Path], threads: int, buffer_for) -> float:
    chunks = [(path, offset) for path in files
              for offset in range(0, path.stat().st_size, READ_CHUNK)]

    def read(chunk):
        fd = os.open(chunk[0], os.O_RDONLY)
        try:
            os.preadv(fd, [buffer_for(*chunk)], chunk[1])
        finally:
            os.close(fd)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, chunks))
    return time.perf_counter() - start


def read_fresh(files: list[str], result) -> None:
    """Child process: reads every file into new memory the size of the files (where a load
    must put them) with as many readers as the loader: the raw figure under a load's
    conditions, memory first-touch costs included."""
    files = [Path(f) for f in files]
    targets = {path: np.empty(path.stat().st_size, np.uint8) for path in files}  # untouched
    seconds = _parallel_read(files, loader._MAX_THREADS, lambda path, offset: memoryview(
        targets[path][offset:offset + READ_CHUNK]))
    result.put({"seconds": seconds})


class MemorySampler:
    """Peaks of this process's resident memory by kind, from /proc/self/status."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak = interval, dict.fromkeys((*self.FIELDS, "anon"), 0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    @classmethod
    def read(cls) -> dict[str, int]:
        values = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in cls.FIELDS:
                    values[key] = int(rest.split()[0]) * 1024
        values["anon"] = values.get("RssAnon", 0) + values.get("RssShmem", 0)
        return values

    def run(self) -> None:
        while not self.stop.is_set():
            for key, value in self.read().items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def load(folder: str, layers: int, mesh_shape: tuple[int, int], state: str, result) -> None:
    """Child process: loads the checkpoint onto the mesh and reports time and memory; then
    frees it and loads it again (after dropping the files from the cache again when cold),
    which takes memory the process has used before: the loader's own speed, without the
    cost of memory never touched before."""
    import gc

    import jax

    from grok import model, sharding

    config = dataclasses.replace(GROK_1, num_layers=layers)
    mesh = sharding.make_mesh(mesh_shape)
    jax.block_until_ready(jax.numpy.zeros(1))  # the backend is up before the clock starts

    def timed_load():
        start = time.perf_counter()
        params = loader.load_checkpoint(
            folder, model.abstract_params(config),
            lambda path, kind, shape: sharding.param_sharding(mesh, path, kind, shape),
            progress=True)
        jax.block_until_ready(params)
        return params, time.perf_counter() - start

    baseline = MemorySampler.read()
    with MemorySampler() as memory:
        params, seconds = timed_load()
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the check
    held = sum(shard.data.nbytes for leaf in jax.tree_util.tree_leaves(params)
               for shard in leaf.addressable_shards)
    # Spot check: the first shard of every tensor equals the file's bytes there.
    host = jax.tree_util.tree_leaves(loader.read_checkpoint(folder, config))
    for leaf, mapped in zip(jax.tree_util.tree_leaves(params), host, strict=True):
        shard = leaf.addressable_shards[0]
        if np.asarray(shard.data).tobytes() != np.ascontiguousarray(mapped[shard.index]).tobytes():
            raise SystemExit(f"loaded data differs from the file for a {mapped.shape} tensor")
    del params, host, leaf, mapped, shard
    gc.collect()
    prepare(sorted(Path(folder, loader.CKPT_DIR).glob("tensor*")), state)
    _, again = timed_load()
    result.put({"seconds": seconds, "again": again, "held": held, "baseline": baseline,
                "peak": memory.peak, "ru_maxrss": ru_maxrss, "devices": len(jax.devices()),
                "mesh": dict(mesh.shape)})


def in_child(target, *args) -> dict:
    """Runs `target(*args, result_queue)` in a fresh process; returns what it put there."""
    context = multiprocessing.get_context("spawn")
    result = context.Queue()
    child = context.Process(target=target, args=(*args, result))
    child.start()
    while True:
        try:
            value = result.get(timeout=1)
            break
        except queue.Empty:
            if not child.is_alive():
                raise SystemExit(f"the measuring process failed ({child.exitcode})") from None
    child.join()
    return value


def gb(n: float) -> float:
    return round(n / 1e9, 3)


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1, choices=(1, 2))
    parser.add_argument("--dir", type=Path, help="where to write the checkpoint (default: a "
                                                 "new folder under the system's temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    parser.add_argument("--repeats", type=int, default=2,
                        help="loads per state (cold, warm); the best is reported")
    parser.add_argument("--devices", type=int, default=1,
                        help="simulated CPU devices (XLA_FLAGS), all on `model`")
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    named = tensors(args.layers)
    total = sum(nbytes(leaf) for _, leaf in named)
    largest = max(nbytes(leaf) for _, leaf in named)
    root = args.dir or Path(tempfile.mkdtemp(prefix="grok-load-bench-"))
    folder = root / loader.CKPT_DIR
    wrote = False
    try:
        try:
            loader.read_checkpoint(root, dataclasses.replace(GROK_1, num_layers=args.layers))
            log(f"reusing the checkpoint in {folder}")
        except ValueError:
            free = shutil.disk_usage(root if root.exists() else root.parent).free
            if free < total * 1.02 + (1 << 30):
                raise SystemExit(f"need {gb(total * 1.02 + (1 << 30))} GB free in {root} for a "
                                 f"{args.layers}-layer checkpoint, have {gb(free)} GB") from None
            log(f"writing a {args.layers}-layer full-width checkpoint ({gb(total)} GB) to "
                f"{folder} ...")
            wrote = True
            write(folder, args.layers)
        files = [folder / loader.tensor_name(i) for i in range(len(named))]
        file_bytes = sum(path.stat().st_size for path in files)

        how = drop_cache(files)
        raw, loads = {}, {}
        for state in ("cold", "warm"):
            for threads in (1, RAW_THREADS):
                prepare(files, state)
                raw[f"{state}_{threads}"] = file_bytes / raw_read(files, threads) / 1e9
            runs = []
            for _ in range(args.repeats):  # alternating, so that both see the same machine
                prepare(files, state)
                fresh = in_child(read_fresh, [str(f) for f in files])["seconds"]
                prepare(files, state)
                runs.append((in_child(load, str(root), args.layers, (1, args.devices), state),
                             fresh))
                log(f"{state}: raw read into fresh memory {file_bytes / fresh / 1e9:.2f} GB/s, "
                    f"load {runs[-1][0]['seconds']:.1f} s, again {runs[-1][0]['again']:.1f} s")
            loads[state] = runs
            log(f"{state}: raw read, reused buffers: {raw[f'{state}_1']:.2f} GB/s (one stream),"
                f" {raw[f'{state}_{RAW_THREADS}']:.2f} GB/s ({RAW_THREADS} threads)")
    finally:
        if wrote and not args.keep:
            shutil.rmtree(root if args.dir is None else folder, ignore_errors=True)

    first = loads["cold"][0][0]
    figures = {"layers": args.layers, "files": len(files), "file_gb": gb(file_bytes),
               "largest_tensor_gb": gb(largest), "cache_drop": how,
               "devices": first["devices"], "mesh": first["mesh"], "repeats": args.repeats}
    for state, runs in loads.items():
        run, fresh = min(runs, key=lambda r: r[0]["seconds"])
        rate = total / run["seconds"] / 1e9
        fresh_rate = file_bytes / min(f for _, f in runs) / 1e9
        again_rate = total / min(r["again"] for r, _ in runs) / 1e9
        held, peak = run["held"], run["peak"]
        figures[state] = {
            "load_s": round(run["seconds"], 2), "load_gbs": round(rate, 2),
            "load_s_all": [round(r["seconds"], 2) for r, _ in runs],
            "raw_1_stream_gbs": round(raw[f"{state}_1"], 2),
            f"raw_{RAW_THREADS}_threads_gbs": round(raw[f"{state}_{RAW_THREADS}"], 2),
            "raw_fresh_memory_gbs": round(fresh_rate, 2),
            "load_over_raw_1_stream": round(rate / raw[f"{state}_1"], 2),
            f"load_over_raw_{RAW_THREADS}_threads": round(rate / raw[f"{state}_{RAW_THREADS}"],
                                                          2),
            "load_over_raw_fresh_memory": round(rate / fresh_rate, 2),
            # The same load again in the same process, into memory it has used before.
            "reload_s": round(min(r["again"] for r, _ in runs), 2),
            "reload_gbs": round(again_rate, 2),
            "reload_over_raw_1_stream": round(again_rate / raw[f"{state}_1"], 2),
            f"reload_over_raw_{RAW_THREADS}_threads": round(
                again_rate / raw[f"{state}_{RAW_THREADS}"], 2),
            "loaded_gb": gb(held),
            "baseline_rss_gb": gb(run["baseline"]["VmRSS"]),
            "peak_rss_gb": gb(run["ru_maxrss"]),
            "peak_anon_gb": gb(peak["anon"]),
            "peak_file_mapped_gb": gb(peak["RssFile"]),
            "peak_rss_within_loaded_plus_largest": run["ru_maxrss"] <= held + largest,
        }
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
