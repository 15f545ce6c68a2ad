"""The HTTP server on the demo model, driven over 127.0.0.1 by the real `openai` client and
by raw HTTP (httpx). One server serves the whole module (compiling its steps is the cost);
a second app on the same device thread has a chat template.

Results are checked against `Grok.generate` on the same weights, and, for the concurrent
tests, against the same request sent alone.
"""

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

pytest.importorskip("fastapi")

import httpx
import openai
import uvicorn

from grok import Grok
from grok.demo import DEMO_CHECKPOINT, DEMO_CONFIG, DEMO_TOKENIZER
from grok.serve.app import ServerConfig, Service, create_app
from grok.serve.chat import ChatTemplate
from grok.serve.metrics import Metrics
from grok.serve.worker import Admission, Worker

MODEL = "grok-1-demo"
KEY = "sesame"
MAX_BATCH, MAX_QUEUE, MAX_SEQ_LEN = 4, 60, 16
BODY_LIMIT = 1 << 16


class ThreadedServer:
    """uvicorn on a free port of 127.0.0.1, in a background thread."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def start_worker(worker: Worker, timeout: float = 120) -> None:
    """Starts the device thread and waits until the model is loaded."""
    worker.start()
    deadline = time.monotonic() + timeout
    while worker.state == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.05)


@contextlib.contextmanager
def running_server(grok, engine: Callable, name: str, max_seq_len: int, slots: int,
                   queue: int = 16, chat_template: ChatTemplate | None = None
                   ) -> Iterator[str]:
    """A server of `grok` on the engine `engine()` builds, with its device thread started;
    yields its URL."""
    metrics = Metrics(slots)
    worker = Worker(engine, admission=Admission(slots + queue), metrics=metrics)
    config = ServerConfig(model_name=name, tokenizer=grok.tokenizer,
                          eos_id=grok.config.eos_token, max_seq_len=max_seq_len,
                          chat_template=chat_template)
    server = ThreadedServer(create_app(Service(config, worker, metrics)))
    try:
        start_worker(worker)
        yield server.url
    finally:
        server.stop()
        worker.stop(timeout=30)


@pytest.fixture(scope="module")
def grok():
    return Grok.load(DEMO_CHECKPOINT, DEMO_CONFIG, tokenizer_path=DEMO_TOKENIZER,
                     mesh_shape=(1, 1))


@pytest.fixture(scope="module")
def served(grok):
    """(service, url) of the main server, and the URL of a second app with a chat template
    over the same device thread."""
    metrics = Metrics(MAX_BATCH)
    metrics.watch_routing(grok.expert_usage)
    worker = Worker(lambda: grok.engine(MAX_BATCH, MAX_SEQ_LEN),
                    admission=Admission(MAX_BATCH + MAX_QUEUE), metrics=metrics)
    config = ServerConfig(model_name=MODEL, tokenizer=grok.tokenizer,
                          eos_id=grok.config.eos_token, max_seq_len=MAX_SEQ_LEN, api_key=KEY,
                          max_body_bytes=BODY_LIMIT)
    service = Service(config, worker, metrics)
    chat_config = ServerConfig(
        model_name=MODEL, tokenizer=grok.tokenizer, eos_id=grok.config.eos_token,
        max_seq_len=MAX_SEQ_LEN, chat_template=ChatTemplate(
            "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}"
            "{% endfor %}"))
    servers = [ThreadedServer(create_app(service)),
               ThreadedServer(create_app(Service(chat_config, worker, metrics)))]
    try:
        start_worker(worker)
        yield service, servers[0].url, servers[1].url
    finally:
        for s in servers:
            s.stop()
        worker.stop(timeout=30)


@pytest.fixture(scope="module")
def url(served):
    return served[1]


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=120) as c:
        yield c


def metric(http, name, **labels) -> float:
    text = http.get("/metrics").text
    want = "" if not labels else "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in text.splitlines():
        if line.startswith(name + want + " "):
            return float(line.split()[-1])
    return 0.0


def sse_events(response) -> list:
    """The `data:` payloads of a raw event stream, checking the framing on the way."""
    out = []
    for block in response.text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    assert response.text.endswith("\n\n")
    return out


def assert_ok_after(http):
    """The server still answers correctly."""
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "2+2=", "max_tokens": 4,
                                           "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "4"


PROBLEMS = ["123+456=", "5+7=", "99+1=", "410+592=", "3+4=", "77+88="]


def test_health_models_and_metrics(http, url):
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    r = http.get("/v1/models").json()
    assert r["object"] == "list" and [m["id"] for m in r["data"]] == [MODEL]
    assert http.get(f"/v1/models/{MODEL}").json()["max_model_len"] == MAX_SEQ_LEN
    text = httpx.get(f"{url}/metrics").text
    for name in ("grok_requests_running", "grok_requests_waiting", "grok_slots_in_use",
                 "grok_time_to_first_token_seconds_bucket",
                 "grok_inter_token_latency_seconds_bucket",
                 "grok_request_latency_seconds_bucket", "grok_prompt_tokens_total",
                 "grok_generation_tokens_total"):
        assert re.search(rf"^{name}(\{{.*\}})? [0-9.e+-]+$", text, re.M), name
    assert metric(http, "grok_slots") == MAX_BATCH


def test_completion_matches_generate(client, grok):
    for prompt in PROBLEMS[:3]:
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                        temperature=0)
        want = grok.generate(prompt, max_new_tokens=8, temperature=0)
        [choice] = got.choices
        assert choice.text == want.text and choice.finish_reason == "stop"
        assert got.usage.prompt_tokens == len(want.prompt_ids)
        assert got.usage.completion_tokens == len(want.output_ids)
        assert got.object == "text_completion" and got.model == MODEL


def test_sampled_completion_with_seed_matches_generate(client, grok):
    got = client.completions.create(model=MODEL, prompt="12+34=", max_tokens=6,
                                    temperature=1.5, seed=1234, logprobs=1,
                                    extra_body={"top_k": 5, "ignore_eos": True})
    want = grok.generate("12+34=", max_new_tokens=6, temperature=1.5, top_k=5, seed=1234,
                         ignore_eos=True)
    [choice] = got.choices
    assert choice.text == want.text and choice.finish_reason == "length"
    assert choice.logprobs.tokens == [grok.tokenizer.piece(t) for t in want.output_ids]
    assert choice.logprobs.token_logprobs == pytest.approx(want.output_logprobs, abs=1e-4)


def test_streaming_matches_the_full_response(http):
    body = {"model": MODEL, "prompt": ["410+592=", "3+4="], "max_tokens": 8, "temperature": 0,
            "logprobs": 3}
    full = http.post("/v1/completions", json=body).json()
    r = http.post("/v1/completions", json=body | {"stream": True,
                                                  "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == full["usage"]
    chunks = events[:-2]
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks)
    for want in full["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == want["index"]]
        assert "".join(c["text"] for c in mine) == want["text"]
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + ["stop"]
        joined = {k: [x for c in mine for x in c["logprobs"][k]] for k in want["logprobs"]}
        assert joined == want["logprobs"]
        assert len(joined["top_logprobs"][0]) == 3


def test_n_choices_with_a_seed_are_each_seeds_own(client):
    kwargs = dict(model=MODEL, prompt="25+25=", max_tokens=5, temperature=2.0,
                  extra_body={"ignore_eos": True})
    several = client.completions.create(n=3, seed=40, **kwargs)
    assert [c.index for c in several.choices] == [0, 1, 2]
    for j, choice in enumerate(several.choices):
        alone = client.completions.create(seed=40 + j, **kwargs)
        assert choice.text == alone.choices[0].text


def test_stop_strings(client, grok):
    got = client.completions.create(model=MODEL, prompt="410+592=", max_tokens=8,
                                    temperature=0, stop=["0"])
    want = grok.generate("410+592=", max_new_tokens=8, temperature=0, stop=["0"])
    assert got.choices[0].text == want.text == "1"
    assert got.choices[0].finish_reason == "stop"


def test_token_id_prompts(client, grok):
    ids = grok.tokenizer.encode("99+1=")
    got = client.completions.create(model=MODEL, prompt=[ids, grok.tokenizer.encode("5+7=")],
                                    max_tokens=6, temperature=0)
    assert [c.text for c in got.choices] == ["100", "12"]
    single = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert single.choices[0].text == "100"


def test_length_limit(client):
    got = client.completions.create(model=MODEL, prompt="123+456=", max_tokens=2,
                                    temperature=0)
    assert got.choices[0].text == "57" and got.choices[0].finish_reason == "length"


def test_sixteen_concurrent_streams_each_get_their_solo_result(url):
    """16 clients at once (4 slots, so most wait and join a running batch mid-way), with
    different prompts, lengths and seeds; each gets what it gets alone."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)
    jobs = [dict(prompt=PROBLEMS[i % len(PROBLEMS)], max_tokens=3 + i % 6, seed=100 + i,
                 temperature=0.0 if i % 3 == 0 else 1.0, top_p=0.9) for i in range(16)]

    async def one(job, stream):
        if not stream:
            r = await client.completions.create(model=MODEL, **job)
            return r.choices[0].text, r.choices[0].finish_reason
        text, finish = "", None
        async for chunk in await client.completions.create(model=MODEL, stream=True, **job):
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def run():
        together = await asyncio.gather(*(one(job, True) for job in jobs))
        alone = [await one(job, False) for job in jobs]
        await client.close()
        return together, alone

    together, alone = asyncio.run(run())
    assert together == alone


def test_chat_needs_a_template(client):
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                               "content": "1+1="}])


def test_chat_with_a_template(served):
    client = openai.OpenAI(base_url=f"{served[2]}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "12+7="}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                       max_tokens=8, logprobs=True, top_logprobs=2)
    assert r.choices[0].message.content == "19" and r.choices[0].message.role == "assistant"
    assert [e.token for e in r.choices[0].logprobs.content] == ["1", "9", "</s>"]
    assert r.object == "chat.completion"
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                            max_tokens=8, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "19"
    assert chunks[-1].choices[0].finish_reason == "stop"


BAD = [
    # (description, how to send it, status, param)
    ("bad JSON", {"content": b"{not json"}, 400, None),
    ("not an object", {"json": [1, 2]}, 400, None),
    ("wrong type", {"json": {"model": MODEL, "prompt": "1+1=", "max_tokens": "8"}}, 400,
     "max_tokens"),
    ("out of range", {"json": {"model": MODEL, "prompt": "1+1=", "temperature": -1}}, 400,
     "temperature"),
    ("top_p out of range", {"json": {"model": MODEL, "prompt": "1+1=", "top_p": 2}}, 400,
     "top_p"),
    ("logprobs too many", {"json": {"model": MODEL, "prompt": "1+1=", "logprobs": 9}}, 400,
     "logprobs"),
    ("prompt too long", {"json": {"model": MODEL, "prompt": "123+456=", "max_tokens": 9}},
     400, "prompt"),
    ("token id outside vocab", {"json": {"model": MODEL, "prompt": [5, 99]}}, 400, "prompt"),
    ("negative token id", {"json": {"model": MODEL, "prompt": [[5], [-1]]}}, 400, "prompt"),
    ("empty prompt", {"json": {"model": MODEL, "prompt": ""}}, 400, "prompt"),
    ("beam search", {"json": {"model": MODEL, "prompt": "1+1=", "use_beam_search": True}},
     400, "use_beam_search"),
    ("best_of", {"json": {"model": MODEL, "prompt": "1+1=", "best_of": 3}}, 400, "best_of"),
    ("more choices than the server holds",
     {"json": {"model": MODEL, "prompt": "1+1=", "n": MAX_BATCH + MAX_QUEUE + 1}}, 400, "n"),
    ("unknown model", {"json": {"model": "gpt-4", "prompt": "1+1="}}, 404, "model"),
    ("body too large", {"json": {"model": MODEL, "prompt": "1" * BODY_LIMIT}}, 413, None),
]


@pytest.mark.parametrize("what, send, status, param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests(http, what, send, status, param):
    r = http.post("/v1/completions", headers={"content-type": "application/json"}, **send)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"] and "Traceback" not in r.text


def test_unknown_paths_and_methods(http):
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = http.get("/v1/completions")
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param",
                                                                "code"}
    assert http.get("/v1/models/gpt-4").status_code == 404


def test_bad_requests_leave_the_server_serving(http, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="1+1=", extra_body={"suffix": "x"})
    assert e.value.body["param"] == "suffix"
    # Unknown fields and the no-op values benchmark tools send are fine.
    r = http.post("/v1/completions", json={
        "model": MODEL, "prompt": "3+4=", "max_tokens": 4, "temperature": 0, "best_of": 1,
        "repetition_penalty": 1.0, "logprobs": None, "frobnicate": {"x": 1}})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "7"
    assert_ok_after(http)


def test_api_key_is_enforced(url, http):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{url}/v1/completions", headers=headers,
                       json={"model": MODEL, "prompt": "1+1="})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200  # monitoring needs no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def long_job(**more) -> dict:
    """64 sequences of 8 tokens on 4 slots: 16 prefills and about 120 decode steps."""
    return {"model": MODEL, "prompt": "1+1=", "max_tokens": 8, "n": MAX_BATCH + MAX_QUEUE,
            "ignore_eos": True, "temperature": 1.0, "stream": True} | more


def test_a_full_queue_answers_429(url, http):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as first, first.stream("POST", "/v1/completions",
                                                         json=long_job()) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # it is running: the room is taken
        busy = http.post("/v1/completions", json=long_job(n=1, stream=False))
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "rate_limit_exceeded"
        assert sum(1 for line in lines if line.startswith("data: {")) > 0
    deadline = time.monotonic() + 30
    while metric(http, "grok_slots_in_use") > 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert_ok_after(http)


def test_a_disconnect_frees_the_slots(url, http, served):
    service = served[0]
    cancelled = metric(http, "grok_requests_finished_total", reason="cancelled")
    generated = metric(http, "grok_generation_tokens_total")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as c, c.stream("POST", "/v1/completions",
                                                 json=long_job()) as r:
        assert next(r.iter_lines()).startswith("data: ")
    # The connection is closed: every sequence still queued or running is cancelled.
    deadline = time.monotonic() + 10
    while metric(http, "grok_slots_in_use") or metric(http, "grok_requests_waiting") \
            or service.admission.in_flight:
        assert time.monotonic() < deadline, "the slots were not freed"
        time.sleep(0.02)
    count = MAX_BATCH + MAX_QUEUE
    assert metric(http, "grok_requests_finished_total", reason="cancelled") - cancelled \
        >= count // 2
    assert metric(http, "grok_generation_tokens_total") - generated < count * 8 // 2
    assert_ok_after(http)


def test_a_disconnect_cancels_a_non_streaming_request(url, http, served):
    # Once in full, so that every step it needs is compiled and the next one is quick.
    assert len(http.post("/v1/completions", json=long_job(stream=False)).json()["choices"]) \
        == MAX_BATCH + MAX_QUEUE
    cancelled = metric(http, "grok_requests_finished_total", reason="cancelled")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json=long_job(stream=False), timeout=httpx.Timeout(10, read=0.005))
    # Waits for the cancels to be counted, not for the queue to look empty: on a loaded
    # machine the server may not have taken the request in yet when the client gives up.
    deadline = time.monotonic() + 10
    while metric(http, "grok_requests_finished_total", reason="cancelled") <= cancelled \
            or served[0].admission.in_flight:
        assert time.monotonic() < deadline, "the requests were not cancelled"
        time.sleep(0.02)


def test_metrics_count_what_was_served(http):
    assert metric(http, "grok_requests_finished_total", reason="eos") > 0
    assert metric(http, "grok_requests_finished_total", reason="length") > 0
    assert metric(http, "grok_requests_finished_total", reason="stop") > 0
    assert metric(http, "grok_time_to_first_token_seconds_count") > 0
    assert metric(http, "grok_inter_token_latency_seconds_count") > 0
    assert metric(http, "grok_requests_rejected_total", status="429") > 0
    assert metric(http, "grok_requests_rejected_total", status="400") > 0


def routed(http) -> dict:
    """{(phase, layer): tokens routed to any expert} from /metrics."""
    out = {}
    for m in re.finditer(r'^grok_expert_tokens_total\{expert="\d+",layer="(\d+)",'
                         r'phase="(\w+)"\} ([0-9.e+]+)$', http.get("/metrics").text, re.M):
        key = (m.group(2), int(m.group(1)))
        out[key] = out.get(key, 0) + float(m.group(3))
    return out


def test_metrics_show_expert_routing(http, grok):
    """Routing counters by phase, layer and expert grow by exactly what one request routed:
    2 experts per prompt token in prefill, 2 per fed-back token in decode."""
    before = routed(http)
    assert len(before) == 2 * grok.config.num_layers
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "123+456=",
                                           "max_tokens": 8, "temperature": 0}).json()
    generated = r["usage"]["completion_tokens"]
    after = routed(http)
    for layer in range(grok.config.num_layers):
        assert after["prefill", layer] - before["prefill", layer] == 2 * 8
        assert after["decode", layer] - before["decode", layer] == 2 * (generated - 1)
    text = http.get("/metrics").text
    assert re.search(r'^grok_router_entropy_nats_total\{layer="0",phase="decode"\} ', text,
                     re.M)
    assert re.search(r'^grok_routed_tokens_total\{phase="prefill"\} ', text, re.M)


def test_while_loading_everything_answers_503(grok):
    """A worker that has not finished loading (here: never started)."""
    metrics = Metrics(1)
    worker = Worker(lambda: None, admission=Admission(1), metrics=metrics)
    config = ServerConfig(model_name=MODEL, tokenizer=grok.tokenizer, eos_id=2, max_seq_len=16)
    server = ThreadedServer(create_app(Service(config, worker, metrics)))
    try:
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "loading"
        r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "1"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "loading"
    finally:
        server.stop()


# Stops the module's server: keep it last.
def test_stopping_ends_the_requests_in_flight_with_503(url, served):
    service = served[0]
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as c, c.stream("POST", "/v1/completions",
                                                 json=long_job()) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        service.worker.stop(timeout=30)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][len("data: "):])["error"]
    assert error["type"] == "service_unavailable" and "shutting down" in error["message"]
    assert service.admission.in_flight == 0
    health = httpx.get(f"{url}/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == "stopped"
