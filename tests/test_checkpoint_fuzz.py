"""Seeded mutations of real tensor files (bit flips, inserted and deleted bytes, opcode
splices, rewritten length fields) and every truncation of one small file, each parsed in
worker processes under a memory cap and a time limit: only CheckpointError may ever
escape, with a well-formed message; nothing may hang, grow or execute."""

import json
import os
import selectors
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from checkpoint_worker import Mutator, launch
from conftest import FIXTURE

from grok.checkpoint import pickle_format
from grok.quant import quantize

MUTATIONS = 8000
WORKERS = 2
MEM_MB = 1024
# Seconds a worker may go without finishing a case (the first includes its start-up).
CASE_LIMIT_S, START_LIMIT_S = 10.0, 90.0
# Small files of each kind the release has: float arrays, 8-bit weights with G=1 and G=8.
FIXTURE_SEEDS = ["tensor00001_000", "tensor00013_000", "tensor00005_000", "tensor00006_000"]


def seed_files(folder) -> tuple[list[str], str]:
    """Copies of the fixture's small files into `folder` or, where ../shared is absent,
    files of the same kinds from the project's writer (which matches the release byte for
    byte); returns their names and the one to truncate."""
    folder.mkdir()
    if all((FIXTURE / "ckpt-0" / name).is_file() for name in FIXTURE_SEEDS):
        for name in FIXTURE_SEEDS:
            (folder / name).write_bytes((FIXTURE / "ckpt-0" / name).read_bytes())
        return FIXTURE_SEEDS, FIXTURE_SEEDS[0]
    rng = np.random.default_rng(0)
    values = {"float-vector": rng.standard_normal(64).astype(np.float32),
              "float-matrix": rng.standard_normal((32, 8)).astype(np.float32),
              "int8-g1": quantize(rng.standard_normal((32, 16)), 1),
              "int8-g8": quantize(rng.standard_normal((32, 16)), 8)}
    for name, value in values.items():
        pickle_format.write_tensor(folder / name, value)
    assert pickle_format.read_header(folder / "int8-g8").scales.dtype == ml_dtypes.bfloat16
    return sorted(values), "float-vector"


def run_workers(configs: list[dict], tmp_path) -> tuple[list[dict], float]:
    """Runs one worker per config and collects every case's result; a worker silent for
    longer than the case limit is killed and its next case reported as hung."""
    procs, buffers, progress = {}, {}, {}
    selector = selectors.DefaultSelector()
    for number, config in enumerate(configs):
        err = open(tmp_path / f"worker{number}.err", "w")  # noqa: SIM115 (closed below)
        proc = launch(["fuzz", json.dumps(config)], MEM_MB, stderr=err)
        err.close()
        procs[proc.stdout.fileno()] = (proc, config)
        buffers[proc.stdout.fileno()] = b""
        progress[proc.stdout.fileno()] = (config["first"] - 1, time.monotonic(), START_LIMIT_S)
        selector.register(proc.stdout.fileno(), selectors.EVENT_READ)
    results, start = [], time.monotonic()
    try:
        while selector.get_map():
            for key, _ in selector.select(timeout=0.5):
                fd = key.fd
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    selector.unregister(fd)
                    continue
                *lines, buffers[fd] = (buffers[fd] + chunk).split(b"\n")
                for line in lines:
                    result = json.loads(line)
                    results.append(result)
                    progress[fd] = (result["case"], time.monotonic(), CASE_LIMIT_S)
            now = time.monotonic()
            for fd, (last, when, limit) in progress.items():
                proc, config = procs[fd]
                if fd in selector.get_map() and now - when > limit:
                    raise TimeoutError(last + 1)
    except TimeoutError as hung:
        case = hung.args[0]
        for proc, _ in procs.values():
            proc.kill()
        raise AssertionError(f"case {case} hung (no answer in {CASE_LIMIT_S} s); "
                             f"{describe(case, configs[0])}") from None
    finally:
        for proc, _ in procs.values():
            proc.wait()
    for proc, config in procs.values():
        err = (tmp_path / f"worker{configs.index(config)}.err").read_text()[-2000:]
        assert proc.returncode == 0, f"worker died with {proc.returncode}: {err}"
    return results, time.monotonic() - start


def describe(case: int, config: dict) -> str:
    """What case `case` did, rebuilt here from its seed."""
    if case >= config["mutations"]:
        return f"{config['truncate']} truncated to {case - config['mutations']} bytes"
    seeds = {name: Path(config["seed_dir"], name).read_bytes()
             for name in config["seeds"]}
    name, _, what = Mutator(seeds, config["marker"], config["seed"]).case(case)
    return f"{name}, {what}"


def test_mutated_and_truncated_files_only_raise_checkpoint_error(tmp_path):
    seeds, truncate = seed_files(tmp_path / "seeds")
    marker = tmp_path / "pwned"
    total = MUTATIONS + (tmp_path / "seeds" / truncate).stat().st_size + 1
    share = -(-total // WORKERS)
    configs = [{"seed_dir": str(tmp_path / "seeds"), "seeds": seeds, "truncate": truncate,
                "marker": str(marker), "seed": 10, "mutations": MUTATIONS,
                "work_dir": str(tmp_path / f"work{n}"), "first": n * share,
                "count": min(share, total - n * share)} for n in range(WORKERS)]
    results, seconds = run_workers(configs, tmp_path)
    print(f"\n{len(results)} cases ({MUTATIONS} mutations, {total - MUTATIONS} truncations) "
          f"in {seconds:.1f} s on {WORKERS} workers")
    assert sorted(r["case"] for r in results) == list(range(total))
    failures = [f"case {r['case']} ({describe(r['case'], configs[0])}): {r['detail']}"
                for r in results if r["outcome"] == "fail"]
    assert not failures, f"{len(failures)} failures, e.g.\n" + "\n".join(failures[:10])
    assert not marker.exists()
    outcomes = [r["outcome"] for r in results]
    # Not vacuous: most damage is refused, and damage that keeps the meaning (a flipped
    # bit of data, a frame's length) is read.
    assert outcomes.count("refused") > total // 2 and outcomes.count("ok") > 50
    truncated = [r for r in results if r["case"] >= MUTATIONS]
    assert [r["outcome"] for r in truncated] == ["refused"] * (len(truncated) - 1) + ["ok"]
    slowest = max(results, key=lambda r: r["seconds"])
    assert slowest["seconds"] < CASE_LIMIT_S / 2, slowest


def test_cases_are_reproducible_and_of_every_kind(tmp_path):
    """The parent names a failing case by rebuilding it from its number."""
    seeds, _ = seed_files(tmp_path / "seeds")
    data = {n: (tmp_path / "seeds" / n).read_bytes() for n in seeds}
    first, second = Mutator(data, "m", 10), Mutator(data, "m", 10)
    cases = [first.case(i) for i in range(300)]
    assert cases == [second.case(i) for i in range(300)]
    assert {what.split(":")[0] for _, _, what in cases} == {
        "flip", "insert", "delete", "splice", "length", "duplicate"}
    # A rewrite may happen to write the old value back; nearly all cases change the file.
    assert sum(mutated != data[name] for name, mutated, _ in cases) > 280
