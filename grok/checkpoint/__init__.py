"""Checkpoint I/O: the release's file format read without unpickling, the loader that
places each device's slices straight from the files, the writer, and manifests.

  `pickle_format`  one tensor file: parsed as data, never executed; written as the release's
  `loader`         a folder of tensor files: checked, read, placed on the mesh, written
  `manifest`       size and SHA-256 of every file, for `--verify`
  `files`          opening files without blocking; bounded, printable one-line errors
"""

from grok.checkpoint.loader import (
    CKPT_DIR,
    expected_tree,
    flatten,
    load_checkpoint,
    local_slices,
    read_checkpoint,
    tensor_name,
    write_checkpoint,
)

__all__ = ["CKPT_DIR", "expected_tree", "flatten", "load_checkpoint", "local_slices",
           "read_checkpoint", "tensor_name", "write_checkpoint"]
