"""The checkpoint manifest (size and SHA-256 of every file) and tools/checkpoint_manifest.py:
a one-byte change that keeps every size is found and named."""

import importlib.util
import io
import json
import os
import re

import numpy as np
import pytest
from conftest import REPO

from grok.checkpoint import manifest, pickle_format
from grok.errors import CheckpointError


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location(
        "checkpoint_manifest", REPO / "tools" / "checkpoint_manifest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def ckpt(tmp_path):
    folder = tmp_path / "ckpt-0"
    folder.mkdir()
    for index in range(5):
        pickle_format.write_tensor(folder / f"tensor{index:05d}_000",
                                   np.full((64, index + 1), index, np.float32))
    return tmp_path


def flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x40
    path.write_bytes(data)


def test_round_trip_finds_and_names_a_one_byte_change(tool, ckpt, capsys):
    assert tool.main(["write", str(ckpt)]) == 0
    err = capsys.readouterr().err
    assert "hashing [" in err and "5/5 files" in err and "ckpt-0.manifest.json" in err
    document = json.loads((ckpt / "ckpt-0.manifest.json").read_text())
    assert document["format"] == manifest.FORMAT
    assert [e["name"] for e in document["files"]] == [f"tensor{i:05d}_000" for i in range(5)]
    file = ckpt / "ckpt-0" / "tensor00003_000"
    assert document["files"][3]["size"] == file.stat().st_size
    assert tool.main(["check", str(ckpt), "--quiet"]) == 0
    assert "all 5 files match" in capsys.readouterr().err

    flip_last_byte(file)
    assert tool.main(["check", str(ckpt / "ckpt-0"), "--quiet"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"{file}: SHA-256 differs: expected {document['files'][3]['sha256'][:16]}" \
        f"..., found {manifest.compute(ckpt / 'ckpt-0')[3].sha256[:16]}..."
    assert lines[1].startswith("1 of 5 files do not match")


def test_check_names_missing_extra_resized_and_special_files(tool, ckpt, capsys):
    folder = ckpt / "ckpt-0"
    manifest.write(folder, threads=2)
    (folder / "tensor00000_000").unlink()
    (folder / "tensor00009_000").write_bytes(b"new")
    size = (folder / "tensor00001_000").stat().st_size
    with open(folder / "tensor00001_000", "ab") as f:
        f.write(b"\0")
    (folder / "tensor00002_000").unlink()
    os.mkfifo(folder / "tensor00002_000")  # never opened: its type is checked first
    (folder / "notes\x1b[2J.txt").write_text("")
    assert tool.main(["check", str(ckpt), "--quiet"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert [line.removeprefix(f"{folder}/") for line in lines] == [
        "notes\\x1b[2J.txt: extra file, not in the manifest",
        "tensor00000_000: missing",
        f"tensor00001_000: size differs: expected {size} bytes, found {size + 1}",
        "tensor00002_000: expected a regular file, found a FIFO (named pipe)",
        "tensor00009_000: extra file, not in the manifest",
        "5 of 5 files do not match " + str(manifest.manifest_path(folder)),
    ]


def test_usage_errors_exit_2_in_one_line(tool, ckpt, tmp_path, capsys):
    assert tool.main(["check", str(ckpt)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert tool.main(["bogus"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert tool.main(["write", str(tmp_path / "nowhere")]) == 2
    assert "expected a checkpoint folder, found nothing" in capsys.readouterr().err
    assert tool.main(["write", str(ckpt), "--threads", "0"]) == 2
    assert tool.main(["write", str(ckpt), "--quiet"]) == 0
    assert tool.main(["write", str(ckpt), "--quiet"]) == 2
    assert "a manifest is already there" in capsys.readouterr().err
    assert tool.main(["write", str(ckpt), "--quiet", "--force"]) == 0
    capsys.readouterr()
    target = ckpt / "ckpt-0.manifest.json"
    for damage in ("{", '{"format": "other"}', json.dumps(
            {"format": manifest.FORMAT, "files": [{"name": "../x", "size": 1,
                                                   "sha256": "0" * 64}]}),
            "[" * 100000 + "]" * 100000):
        target.write_text(damage)
        assert tool.main(["check", str(ckpt)]) == 2
        err = capsys.readouterr().err
        assert "not a valid manifest" in err and err.count("\n") == 1 and len(err) < 1100


def test_verify_raises_one_error_naming_the_files(ckpt):
    folder = ckpt / "ckpt-0"
    manifest.write(folder)
    manifest.verify(folder)
    for index in range(5):
        flip_last_byte(folder / f"tensor{index:05d}_000")
    with pytest.raises(CheckpointError, match=r"ckpt-0: 5 file\(s\) differ from the manifest "
                                              r"ckpt-0.manifest.json: tensor00000_000: SHA-256 "
                                              r"differs.*; tensor00002_000: .* \(and 2 more\)$"):
        manifest.verify(folder)


def test_entries_are_validated():
    with pytest.raises(ValueError, match="bad file name"):
        manifest.Entry("a/b", 1, "0" * 64)
    with pytest.raises(ValueError, match="bad size"):
        manifest.Entry("a", -1, "0" * 64)
    with pytest.raises(ValueError, match="bad SHA-256"):
        manifest.Entry("a", 1, "0" * 63)


def test_cli_verify_reaches_the_loader(tmp_path):
    """`--verify` is passed through `Grok.load` to the loader, which checks the manifest
    before any tensor is read (so these runs fail fast, without loading the model)."""
    import shutil

    from grok.cli import build_parser, main
    from grok.demo import DEMO_FILES
    assert build_parser().parse_args(["--verify"]).verify
    assert not build_parser().parse_args([]).verify
    shutil.copytree(DEMO_FILES, tmp_path / "demo")
    argv = ["--checkpoint", str(tmp_path / "demo"), "--config",
            str(tmp_path / "demo" / "config.json"), "--tokenizer",
            str(DEMO_FILES / "demo.model"), "--mesh", "1x1", "--verify",
            "--prompt", "1+1=", "--max-new-tokens", "1"]
    err = io.StringIO()
    assert main(argv, out=io.StringIO(), err=err) == 2
    assert "ckpt-0.manifest.json: no manifest here" in err.getvalue()
    manifest.write(tmp_path / "demo" / "ckpt-0")
    flip_last_byte(tmp_path / "demo" / "ckpt-0" / "tensor00001_000")
    err = io.StringIO()
    assert main(argv, out=io.StringIO(), err=err) == 2
    assert re.search(r"1 file\(s\) differ from the manifest ckpt-0.manifest.json: "
                     r"tensor00001_000: SHA-256 differs", err.getvalue())
