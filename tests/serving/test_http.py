"""`tide up` end to end (tiny model): OpenAI-compatible HTTP with the official client, errors,
bounded queues, API key, metrics, status, load, plot, down."""

import json
import os
import socket
import threading
import time

import httpx
import pytest

from tests.conftest import tide_cli
from tide.config import DecodeConfig, ModelConfig
from tide.models import load_target
from tide.speculative import target_generate
from tide.transport.redis_server import free_port

pytestmark = pytest.mark.integration
KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    port = free_port()
    env = {**os.environ, "TIDE_API_KEY": KEY, "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    overrides = [f"model.source={tiny_model_dir}", "model.dtype=float32", "model.max_context=256",
                 "draft.vocab_size=100000", "decode.max_new_tokens=24", f"serving.port={port}",
                 "serving.max_queue=2", "ray.dashboard=false", "ray.num_cpus=2", "wandb.mode=offline",
                 "online.min_records=4", "online.eval_every=5", "train.seq_len=128"]
    up = tide_cli("up", "--run-dir", str(run_dir), *overrides, env=env)
    assert up.returncode == 0, up.stderr[-3000:]
    url = f"http://127.0.0.1:{port}"
    yield {"url": url, "run_dir": run_dir, "env": env, "model_dir": tiny_model_dir}
    down = tide_cli("down", "--run-dir", str(run_dir), env=env)
    assert down.returncode == 0, down.stderr


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def target(tiny_model_dir):
    return load_target(ModelConfig(source=str(tiny_model_dir), dtype="float32"))


def _healthy(url):
    h = httpx.get(url + "/health").json()
    assert h["status"] == "ok" and h["replicas_up"] == 1


def test_health_models_and_auth(server, client):
    _healthy(server["url"])  # /health needs no key
    assert [m.id for m in client.models.list().data] == [str(server["model_dir"])]
    r = httpx.get(server["url"] + "/v1/models")
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    r = httpx.get(server["url"] + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


def test_completion_equals_target_alone(client, target):
    prompt = "The quick brown fox"
    out = client.completions.create(model="m", prompt=prompt, max_tokens=20, temperature=0)
    ids = target.tokenizer(prompt)["input_ids"]
    expected = target_generate(target, ids, DecodeConfig(max_new_tokens=20)).tokens
    assert out.choices[0].text == target.tokenizer.decode(expected, skip_special_tokens=True)
    assert out.usage.completion_tokens == len(expected)
    tide = out.usage.model_extra["tide"]
    assert {"draft_version", "drafted_tokens", "accepted_tokens"} <= set(tide)
    assert tide["accepted_tokens"] <= tide["drafted_tokens"]


def test_chat_and_streamed_chat_agree(client):
    msgs = [{"role": "user", "content": "Tell me about the sea."}]
    full = client.chat.completions.create(model="m", messages=msgs, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant" and text
    chunks = list(client.chat.completions.create(model="m", messages=msgs, max_tokens=24, temperature=0,
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_and_seeded_sampling(client):
    out = client.completions.create(model="m", prompt="one two three", max_tokens=24, temperature=0)
    text = out.choices[0].text
    if len(text) > 4:
        stop = text[2:4]
        cut = client.completions.create(model="m", prompt="one two three", max_tokens=24, temperature=0,
                                        stop=[stop])
        assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
        assert cut.usage.completion_tokens < out.usage.completion_tokens  # decoding ended there
        streamed = list(client.completions.create(model="m", prompt="one two three", max_tokens=24,
                                                  temperature=0, stop=[stop], stream=True))
        assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
        assert streamed[-1].choices[0].finish_reason == "stop"
    # top_k is honoured: top_k=1 samples the argmax, whatever the temperature
    k1 = client.completions.create(model="m", prompt="one two three", max_tokens=24, temperature=1.5, seed=3,
                                   extra_body={"top_k": 1})
    assert k1.choices[0].text == text
    a = client.completions.create(model="m", prompt="hello", max_tokens=12, temperature=0.9, seed=7)
    b = client.completions.create(model="m", prompt="hello", max_tokens=12, temperature=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text


NESTED = b'{"prompt": "hi", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize("body, raw, fragment", [
    (None, b"{not json", "not valid JSON"),
    (None, b"\xff\xfe\x00bad", "not UTF-8"),
    (None, b'["prompt", "hi"]', "JSON object"),
    (None, b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", "not valid JSON"),  # 5,000 digits
    (None, b'{"prompt": "hi", "temperature": NaN}', "not valid JSON"),
    (None, NESTED, "nested too deeply"),
    (None, b'{"prompt": "\\ud800 lone surrogate"}', "prompt"),
    ({"prompt": "", "max_tokens": 5}, None, "non-empty"),
    ({"prompt": 42}, None, "non-empty string"),
    ({"prompt": ["a", "b"]}, None, "prompt"),
    ({"prompt": "a" * 200_001}, None, "prompt is 200001 characters"),
    ({"prompt": "word " * 400}, None, "shorten"),
    ({"messages": [{"role": "user", "content": "hi"}]}, None, "messages"),
    ({"prompt": "hi", "max_tokens": "ten"}, None, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, None, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 10**7}, None, "max_tokens"),
    ({"prompt": "hi", "max_tokens": True}, None, "max_tokens"),
    ({"prompt": "hi", "max_completion_tokens": -3}, None, "max_completion_tokens"),
    ({"prompt": "hi", "temperature": -1}, None, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, None, "temperature"),
    ({"prompt": "hi", "top_p": 0}, None, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, None, "top_p"),
    ({"prompt": "hi", "top_k": -2}, None, "top_k"),
    ({"prompt": "hi", "top_k": 10**9}, None, "top_k"),
    ({"prompt": "hi", "top_k": 2.5}, None, "top_k"),
    ({"prompt": "hi", "seed": 2**70}, None, "seed"),
    ({"prompt": "hi", "seed": -1}, None, "seed"),
    ({"prompt": "hi", "seed": "7"}, None, "seed"),
    ({"prompt": "hi", "n": 3}, None, "n=1"),
    ({"prompt": "hi", "stream": "yes"}, None, "stream"),
    ({"prompt": "hi", "stream_options": "all"}, None, "stream_options"),
    ({"prompt": "hi", "model": 123}, None, "model"),
    ({"prompt": "hi", "user": ["x"]}, None, "user"),
    ({"prompt": "hi", "stop": 42}, None, "stop"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, None, "stop"),
    ({"prompt": "hi", "stop": [""]}, None, "stop"),
    ({"prompt": "hi", "stop": ["x" * 300]}, None, "stop"),
    ({"prompt": "hi", "logit_bias": {"1": 2}}, None, "unsupported"),
])
def test_bad_requests_get_clear_4xx(server, body, raw, fragment):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server["url"] + "/v1/completions", headers=headers,
                   content=raw if raw is not None else json.dumps(body).encode())
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"
    _healthy(server["url"])


def test_bad_chat_messages(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    for body in ({"messages": []}, {"messages": [{"role": "user"}]}, {"messages": [{"role": "robot", "content": "x"}]},
                 {"messages": [{"role": "user", "content": " "}]}, {"messages": "hello"},
                 {"messages": [{"role": "user", "content": 123}]},
                 {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                 {"messages": [{"role": "user", "content": "hi"}] * 300},
                 {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}):
        r = httpx.post(server["url"] + "/v1/chat/completions", headers=headers, json=body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert "messages" in err["message"] or "prompt" in err["message"]
        assert err["param"].startswith(("messages", "prompt"))
    # text parts are accepted (what the openai client sends for content lists)
    r = httpx.post(server["url"] + "/v1/chat/completions", headers=headers, timeout=60, json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    _healthy(server["url"])


def test_huge_body_is_refused_413_without_reading_it_whole(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = b'{"prompt": "' + b"a" * 24_000_000 + b'"}'
    r = httpx.post(server["url"] + "/v1/completions", headers=headers, content=body, timeout=60)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(30):
            yield b"a" * 100_000

    r = httpx.post(server["url"] + "/v1/completions", headers=headers, content=chunks(), timeout=60)
    assert r.status_code == 413
    _healthy(server["url"])


def test_full_queue_answers_429_quickly(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    statuses, times = [], []

    def one():
        t0 = time.monotonic()
        r = httpx.post(server["url"] + "/v1/completions", headers=headers, timeout=120,
                       json={"prompt": "count with me", "max_tokens": 200})  # long: the slots stay full
        statuses.append(r.status_code)
        times.append((r.status_code, time.monotonic() - t0))

    n = 40  # well past serving.max_batch (the default 16) + max_queue (2)
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(statuses) == n and set(statuses) <= {200, 429}
    assert 200 in statuses and 429 in statuses
    assert max(dt for s, dt in times if s == 429) < 2.0
    _healthy(server["url"])


def test_metrics_status_load_plot(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    env, run_dir = server["env"], str(server["run_dir"])
    load = tide_cli("load", "--url", server["url"], "--requests", "6", "--concurrency", "2",
                 "--max-tokens", "16", "--stream", env=env)
    assert load.returncode == 0, load.stderr[-2000:]
    report = json.loads(load.stdout)
    assert report["ok"] == 6 and report["failed"] == 0 and report["latency_p99_s"] > 0
    assert 0 < report["ttft_p50_s"] <= report["latency_p99_s"]
    text = httpx.get(server["url"] + "/metrics", headers=headers).text
    for name in ("tide_spec_decode_num_drafts_total", "tide_spec_decode_num_accepted_tokens_per_pos_total",
                 "tide_generation_tokens_total", "tide_draft_version", "tide_records_total",
                 'tide_http_requests_total{status="client_error"}', "tide_policy_choices_total{",
                 "tide_policy_measured_speedup{", 'tide_policy_acceptance_rate{replica="r0",source="head"'):
        assert name in text, name
    time.sleep(2.5)  # one status tick after the load
    st = tide_cli("status", "--run-dir", run_dir, env=env)
    status = json.loads(st.stdout)
    assert status["state"] == "ready" and status["served_tokens"] > 0
    for key in ("draft_version", "acceptance_ema", "stream_length", "trainer_step", "last_swap", "policy"):
        assert key in status
    policy = status["policy"][0]  # what the replica's controller drafted, predicted vs measured
    assert sum(policy["choices"].values()) > 0 and policy["measured_speedup"] > 0
    assert status["stream_length"] > 0
    plot = tide_cli("plot", "--run-dir", run_dir, env=env)
    assert plot.returncode == 0, plot.stderr
    png = server["run_dir"] / "acceptance.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((server["run_dir"] / "wandb").glob("offline-run-*")), "W&B offline run missing"


def _metric(server, needle):
    text = httpx.get(server["url"] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return float(next(ln for ln in text.splitlines() if needle in ln).split()[-1])


def _send_and_leave(server, body, path="/v1/completions") -> socket.socket:
    """A raw HTTP request whose client will go away (the caller closes the socket)."""
    port = int(server["url"].rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _slots_free(server, timeout=30.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if httpx.get(server["url"] + "/health").json()["replicas"][0]["inflight"] == 0:
            return True
        time.sleep(0.1)
    return False


def test_streaming_clients_gone_before_the_first_chunk_free_their_slots(server, client):
    # max_queue + 1 of them used to hold every slot for good: each next request got 429
    for _ in range(4):
        sock = _send_and_leave(server, {"prompt": "tell a very long story", "max_tokens": 200, "stream": True})
        time.sleep(0.02)
        sock.close()
    assert _slots_free(server)
    out = client.completions.create(model="m", prompt="hi", max_tokens=8, temperature=0)
    assert out.choices[0].text is not None


def test_a_client_gone_before_a_plain_answer_stops_its_decoding(server, client):
    before, gone = _metric(server, 'status="cancelled"'), _metric(server, 'status="client_gone"')
    done = []
    busy = [threading.Thread(target=lambda: done.append(client.completions.create(
        model="m", prompt="a long story about the sea", max_tokens=200, temperature=0))) for _ in range(16)]
    for t in busy:  # they fill the replica's batch (serving.max_batch 16): the next request waits behind them
        t.start()
    time.sleep(0.05)
    sock = _send_and_leave(server, {"prompt": "tell a very long story", "max_tokens": 200})
    time.sleep(0.05)
    sock.close()  # gone while it waits for its answer
    for t in busy:
        t.join(120)
    assert len(done) == 16 and _slots_free(server)
    deadline = time.time() + 30
    while time.time() < deadline and _metric(server, 'status="cancelled"') == before:
        time.sleep(0.2)
    assert _metric(server, 'status="cancelled"') == before + 1  # stopped, not decoded for nobody
    assert _metric(server, 'status="client_gone"') == gone + 1


def test_client_disconnect_mid_stream_frees_the_replica(server, client):
    def cancelled():
        return _metric(server, 'status="cancelled"')

    before = cancelled()
    stream = client.completions.create(model="m", prompt="tell a very long story", max_tokens=200,
                                       temperature=0, stream=True)
    next(iter(stream))  # the first chunk arrives, then the client goes away
    stream.close()
    deadline = time.time() + 30
    while time.time() < deadline and cancelled() == before:
        time.sleep(0.2)
    assert cancelled() == before + 1  # the replica stopped decoding for nobody
    assert _slots_free(server)
    out = client.completions.create(model="m", prompt="hi", max_tokens=8, temperature=0)
    assert out.choices[0].text is not None


def test_streamed_text_holds_back_an_incomplete_character_and_coalesces_arrivals():
    """The replica decodes once per arrival (what finished while the last item was read) and
    sends only the new text; a multi-byte character split across passes waits for its end."""
    from serving.actor import text_deltas

    def detok(tokens):  # byte-level: a token is a byte
        return bytes(tokens).decode("utf-8", errors="replace")

    e = list("é".encode())
    out = list(text_deltas([([[104, 105]], False), ([[32, e[0]]], False), ([[e[1]], [33]], False), ([], True)],
                           detok))
    assert [o["text"] for o in out] == ["hi", " é!"]
    assert [o["tokens"] for o in out] == [[104, 105], [32, e[0], e[1], 33]]
    assert "".join(o["text"] for o in text_deltas([([[e[0]]], True)], detok)) == "\ufffd"  # the end: as is
