"""One process of a multi-process run on the upstream-tiny fixture (started by
test_multihost.py, one per simulated host):

    python tests/multihost_worker.py --coordinator HOST:PORT --num-processes N \
        --process-id I FIXTURE OUT_DIR

Loads the fixture on a 2x4 mesh spanning all processes, counting the bytes this process
reads, then computes the reference logits and a greedy continuation, with unrolled and with
scanned layers; writes them to OUT_DIR/process_I.npz.
"""

import argparse
import json
import sys
import threading
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grok import distributed

MESH = (2, 4)
NEW_TOKENS = 12


def count_reads(loader) -> list[int]:
    """Counts the bytes each read of the loader copies out of the checkpoint files."""
    total, lock, read = [0], threading.Lock(), loader._read_piece

    def counting(fd, host, src, dst):
        with lock:
            total[0] += dst.nbytes
        return read(fd, host, src, dst)

    loader._read_piece = counting
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    distributed.add_arguments(parser)
    parser.add_argument("fixture", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    distributed.initialize(args)

    import jax

    from grok import Grok, model, sharding
    from grok.checkpoint import loader
    from grok.config import GrokConfig

    config = GrokConfig.from_json(args.fixture / "config.json")
    mesh = sharding.make_mesh(MESH)
    read = count_reads(loader)
    params = loader.load_checkpoint(
        args.fixture, model.abstract_params(config),
        lambda path, kind, shape: sharding.param_sharding(mesh, path, kind, shape),
        progress=False)
    held = whole = split = 0
    for array in jax.tree_util.tree_leaves(params):
        mine = {loader._key(s.index, array.shape): s.data.nbytes
                for s in array.addressable_shards}
        held += sum(mine.values())
        whole += array.nbytes
        split += sum(mine.values()) < array.nbytes
    bytes_read = read[0]
    del params

    reference = json.loads((args.fixture / "reference.json").read_text())
    grok = Grok.load(args.fixture, config, mesh_shape=MESH)
    logits = grok.logits(reference["tokens"])
    greedy = grok.generate(reference["prompt_ids"], max_new_tokens=NEW_TOKENS, temperature=0)
    del grok
    # Scanned layers: each process assembles its share of every stacked array.
    scan = Grok.load(args.fixture, config, mesh_shape=MESH, layers="scan")
    scan_logits = scan.logits(reference["tokens"])
    scan_greedy = scan.generate(reference["prompt_ids"], max_new_tokens=NEW_TOKENS,
                                temperature=0)
    np.savez(args.out / f"process_{jax.process_index()}.npz", logits=logits,
             greedy=np.asarray(greedy.output_ids), scan_logits=scan_logits,
             scan_greedy=np.asarray(scan_greedy.output_ids), read=bytes_read, held=held,
             whole=whole, split=split, processes=jax.process_count(),
             devices=len(jax.devices()))


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        distributed.exit_on_failure(1)
        raise
