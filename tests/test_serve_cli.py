"""`python -m grok.serve` as a user starts it: flags, the API key, a graceful SIGTERM, and
two processes x 4 simulated devices serving what one process serves."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

import httpx

from grok import Grok
from grok.demo import DEMO_CHECKPOINT, DEMO_CONFIG, DEMO_TOKENIZER
from grok.serve.__main__ import main
from grok.structured import Regex

REPO = Path(__file__).resolve().parents[1]
MODEL = "grok-1-demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path, devices: int = 1) -> subprocess.Popen:
    env = os.environ | {"JAX_PLATFORMS": "cpu",
                        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, "-m", "grok.serve", *args], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_ready(url: str, procs: list[subprocess.Popen], log: Path, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"the server exited with {p.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"not ready within {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop(procs: list[subprocess.Popen], timeout: float = 120) -> list[int]:
    procs[0].send_signal(signal.SIGTERM)
    try:
        return [p.wait(timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.parametrize("argv, message", [
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--max-seq-len", "65"], r"--max-seq-len must be in \[2, 64\]"),
    (["--port", "70000"], "--port must be at most 65535"),
    (["--chat-template", "/nowhere.jinja"], "--chat-template '/nowhere.jinja'"),
    (["--checkpoint", "/nowhere"], "no checkpoint at '/nowhere'"),
    (["--frobnicate"], "unrecognized arguments"),
    (["--prefill-chunk", "48"], "--prefill-chunk must be a power of two, or 0 for whole "
                                "prompts; got 48"),
    (["--prefill-chunk", "0", "--deterministic"], "--deterministic prefill in chunks"),
    (["--prefix-cache-blocks", "0"], r"--prefix-cache-blocks must be in \[1, 2\*\*24\]"),
])
def test_bad_flags_exit_2_before_loading(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err


def test_serves_with_a_key_and_drains_on_sigterm(tmp_path):
    """The first request compiles its steps (--no-warmup), which keeps it in flight for
    seconds: SIGTERM then turns new requests away with 503 while it runs to its end, and
    the process exits 0."""
    port, key = free_port(), "k3y"
    url, log = f"http://127.0.0.1:{port}", tmp_path / "server.log"
    proc = start(["--port", str(port), "--max-batch", "2", "--max-seq-len", "16",
                  "--api-key", key, "--no-warmup"], log)
    try:
        wait_ready(url, [proc], log)
        auth = {"Authorization": f"Bearer {key}"}
        body = {"model": MODEL, "prompt": "123+456=", "max_tokens": 8, "temperature": 0}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        result = {}

        def in_flight():
            result["r"] = httpx.post(f"{url}/v1/completions", json=body, headers=auth,
                                     timeout=300)

        thread = threading.Thread(target=in_flight)
        thread.start()
        deadline = time.monotonic() + 30
        while "grok_prompt_tokens_total 8.0" not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = httpx.post(f"{url}/v1/completions", json=body, headers=auth)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        thread.join(300)
        assert result["r"].status_code == 200
        assert result["r"].json()["choices"][0]["text"] == "579"
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "draining" in log.read_text()


PROMPTS = ["123+456=", "5+7=", "99+1=", "410+592="]


@pytest.mark.slow
def test_two_processes_serve_what_one_serves(tmp_path):
    """Process 0 serves and broadcasts each step's plan; process 1 follows. Streaming,
    several prompts, n, a structured output (each process compiles it and runs its own
    matchers), a cancelled request and shutdown all keep the two in step."""
    grok = Grok.load(DEMO_CHECKPOINT, DEMO_CONFIG, tokenizer_path=DEMO_TOKENIZER,
                     mesh_shape=(1, 1))
    want = [c.text for c in grok.generate(PROMPTS, max_new_tokens=8, temperature=0)]
    digits = Regex("[1-9][0-9]?")
    want_shaped = [c.text for c in grok.generate(PROMPTS, max_new_tokens=8, temperature=0,
                                                 structure=digits)]
    grok.grammars.close()
    port, coordinator = free_port(), f"127.0.0.1:{free_port()}"
    url, log = f"http://127.0.0.1:{port}", tmp_path / "process_0.log"
    common = ["--mesh", "2x4", "--coordinator", coordinator, "--num-processes", "2",
              "--max-batch", "2", "--max-seq-len", "16", "--no-warmup"]
    procs = [start([*common, "--process-id", "0", "--port", str(port)], log, devices=4),
             start([*common, "--process-id", "1", "--port", str(free_port())],
                   tmp_path / "process_1.log", devices=4)]
    try:
        wait_ready(url, procs, log, timeout=600)
        body = {"model": MODEL, "prompt": PROMPTS, "max_tokens": 8, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
        assert [c["text"] for c in r.json()["choices"]] == want
        r = httpx.post(f"{url}/v1/completions", timeout=600, json=body | {
            "structured_outputs": {"regex": digits.pattern}})
        assert [c["text"] for c in r.json()["choices"]] == want_shaped, r.text
        # A request whose client leaves: cancelled on both processes alike.
        with httpx.stream("POST", f"{url}/v1/completions", timeout=600, json=body | {
                "n": 2, "stream": True, "ignore_eos": True, "temperature": 1.0}) as s:
            assert next(s.iter_lines()).startswith("data: ")
        chunks = httpx.post(f"{url}/v1/completions", timeout=600,
                            json=body | {"prompt": PROMPTS[0], "stream": True}).text
        text = "".join(json.loads(line[6:])["choices"][0]["text"]
                       for line in chunks.split("\n\n") if line.startswith("data: {"))
        assert text == want[0]
        assert httpx.get(f"{url}/health").status_code == 200
        assert stop(procs) == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert (tmp_path / "process_1.log").read_text().count("Uvicorn running") == 0
