"""`lorafx serve`: a real server on 127.0.0.1 (a free port), the real OpenAI client and plain
HTTP against it; PEFT's generate with each adapter alone is the oracle. Every request carries a
timeout and every loop is bounded."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from torch._dynamo.utils import counters
from conftest import VOCAB, tiny_model, word_tokenizer
from test_multi_adapter import ADAPTERS, peft_oracle, save_peft_adapters

from lorafx.serving import load
from lorafx.serving.engine import Request, Sampling
from lorafx.serving.server import Engine, Server

WORDS = [f"w{i}" for i in range(VOCAB)]
TIMEOUT = 60  # seconds, any one request


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base = root / "base"
    tiny_model("llama").save_pretrained(base)
    tokenizer = word_tokenizer(WORDS)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}w3"
    tokenizer.save_pretrained(base)
    adapters = save_peft_adapters(root, "llama", {**ADAPTERS, "extra": dict(r=4, lora_alpha=4, target_modules=["k_proj"])})
    return {"base": base, "adapters": {name: str(path) for name, path in adapters.items()}, "root": root}


@pytest.fixture(scope="module")
def oracle(folders):
    """Greedy text of PEFT's generate, one adapter (or the base model) at a time."""
    theirs = peft_oracle("llama", {k: v for k, v in folders["adapters"].items()})
    tokenizer = word_tokenizer(WORDS)
    cache = {}

    def text(adapter, prompt, max_tokens):
        if (adapter, prompt, max_tokens) not in cache:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                if adapter is None:
                    with theirs.disable_adapter():
                        out = theirs.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False)
                else:
                    theirs.set_adapter(adapter)
                    out = theirs.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False)
            new = out[0, ids.shape[1]:].tolist()
            new = new[: new.index(2)] if 2 in new else new  # eos_token_id 2 ends the text
            cache[adapter, prompt, max_tokens] = tokenizer.decode(new, skip_special_tokens=True)  # as the server (and vLLM)
        return cache[adapter, prompt, max_tokens]

    return text


@pytest.fixture(scope="module")
def server(folders):
    served = {name: folders["adapters"][name] for name in ADAPTERS}  # "extra" is loaded at runtime
    lm, tokenizer = load.load(folders["base"], served)
    engine = Engine(lm, tokenizer, max_batch=4, max_model_len=64, max_queue=16)
    srv = Server(engine, "base", served).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0)


def prompts(n):
    g = torch.Generator().manual_seed(5)
    return [" ".join(WORDS[int(t)] for t in torch.randint(3, VOCAB, (3 + i % 4,), generator=g)) for i in range(n)]


def test_each_adapter_equals_peft_generate_streaming_or_not(client, oracle):
    prompt = prompts(1)[0]
    for model in ["base", *ADAPTERS]:
        out = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        expected = oracle(None if model == "base" else model, prompt, 8)
        assert out.choices[0].text == expected, model
        assert out.usage.prompt_tokens == len(prompt.split()) and out.usage.completion_tokens >= len(expected.split())
        chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_concurrent_mixed_adapter_requests_each_equal_that_adapter_alone(server, client, oracle):
    names = ["sql", "chat", "base", "tiny"] * 3
    texts = prompts(len(names))
    expected = [oracle(None if m == "base" else m, p, 12) for m, p in zip(names, texts)]
    steps_before = int(metric(server, "lorafx_decode_steps_total"))

    def ask(i):
        return client.completions.create(model=names[i], prompt=texts[i], max_tokens=12, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(len(names)), timeout=TIMEOUT))
    assert got == expected
    generated = sum(len(e.split()) for e in expected)
    assert int(metric(server, "lorafx_decode_steps_total")) - steps_before < generated  # rows shared steps


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_rows_keep_their_tokens_when_the_cache_is_compacted(folders, oracle, compile):
    """A 20-slot cache for requests of up to 16 tokens: the shared write pointer runs out every
    few steps, and each row's live slots move to the front while the others keep decoding
    (compiled: the same through torch.compile with backend "lorafx", every bucket compiled before
    serving and nothing compiled while requests of several prompt widths run; ~50 s here)."""
    lm, tokenizer = load.load(folders["base"], {name: folders["adapters"][name] for name in ADAPTERS})
    engine = Engine(lm, tokenizer, max_batch=3, max_model_len=20, compile=compile).start()
    compiled_before = counters["stats"]["unique_graphs"]
    names, texts, results = ["sql", "chat", None, "tiny"] * 2, prompts(8), {}
    done = threading.Event()

    def sink_for(i):
        parts = []

        def sink(kind, **data):
            if kind == "text":
                parts.append(data["delta"])
            else:
                results[i] = "".join(parts) if kind == "done" else data
                if len(results) == len(names):
                    done.set()
        return sink

    try:
        for i, (name, text) in enumerate(zip(names, texts)):
            ids = tokenizer(text).input_ids
            engine.submit(Request(ids, name, Sampling(max_tokens=10, temperature=0), sink_for(i), TIMEOUT))
        assert done.wait(TIMEOUT)
    finally:
        engine.stop()
    assert [results[i] for i in range(len(names))] == [oracle(n, t, 10) for n, t in zip(names, texts)]
    assert engine.metrics.compactions >= 2
    assert len({len(tokenizer(t).input_ids) for t in texts}) > 2  # several prompt widths ...
    assert counters["stats"]["unique_graphs"] == compiled_before  # ... and no compile on the way


def test_chat_completions_use_the_chat_template(client, oracle):
    messages = [{"role": "w4", "content": "w10 w11"}, {"role": "w5", "content": [{"type": "text", "text": "w12"}]}]
    rendered = "w4 w10 w11 w5 w12 w3"  # the template of the fixture
    out = client.chat.completions.create(model="chat", messages=messages, max_tokens=6, temperature=0)
    assert out.choices[0].message.content == oracle("chat", rendered, 6)
    assert out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="chat", messages=messages, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_sampling_is_seeded_and_stop_strings_cut(client):
    prompt = prompts(2)[1]
    runs = [client.completions.create(model="sql", prompt=prompt, max_tokens=10, temperature=0.9, top_p=0.9, seed=7,
                                      extra_body={"top_k": 20, "ignore_eos": True}).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0].split()) == 10
    greedy = client.completions.create(model="sql", prompt=prompt, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    words = greedy.split()
    stop = words[3]
    cut = client.completions.create(model="sql", prompt=prompt, max_tokens=10, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == greedy[: greedy.find(stop)]


def test_models_and_adapters_loaded_and_unloaded_at_runtime(server, client, folders, oracle):
    assert [m.id for m in client.models.list().data] == ["base", *ADAPTERS]
    http = httpx.Client(base_url=server.url, timeout=TIMEOUT)
    prompt = prompts(1)[0]
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": folders["adapters"]["extra"]})
    assert r.status_code == 200, r.text
    assert "extra" in [m.id for m in client.models.list().data]
    out = client.completions.create(model="extra", prompt=prompt, max_tokens=8, temperature=0)
    assert out.choices[0].text == oracle("extra", prompt, 8)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": folders["adapters"]["extra"]})
    assert r.status_code == 400 and "already loaded" in r.json()["error"]["message"]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200
    with pytest.raises(openai.NotFoundError, match="extra"):
        client.completions.create(model="extra", prompt=prompt, max_tokens=2)
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "extra"})
    assert r.status_code == 404 and "extra" in r.json()["error"]["message"]
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "gone", "lora_path": str(folders["root"] / "nope")})
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    corrupt = folders["root"] / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                             "target_modules": ["q_proj"]}))
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(corrupt)})
    assert r.status_code == 400 and "adapter_model.safetensors" in r.json()["error"]["message"]
    # the others still serve, unchanged
    assert client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0).choices[0].text == \
        oracle("tiny", prompt, 8)
    assert [m.id for m in client.models.list().data] == ["base", *ADAPTERS]


def test_bad_requests_are_named(server, client):
    http = httpx.Client(base_url=server.url, timeout=TIMEOUT)
    with pytest.raises(openai.NotFoundError, match="nosuch"):
        client.completions.create(model="nosuch", prompt="w5", max_tokens=2)
    cases = [
        ({"model": "sql", "prompt": "w5", "temperature": "hot"}, "temperature"),
        ({"model": "sql", "prompt": "w5", "n": 2}, "n"),
        ({"model": "sql", "prompt": "w5", "frobnicate": 1}, "frobnicate"),
        ({"model": "sql", "prompt": "w5", "max_tokens": 0}, "max_tokens"),
        ({"model": "sql", "prompt": "w5", "max_tokens": 100}, "max_tokens"),  # over max_model_len 64
        ({"model": "sql", "prompt": [1, 2, 500]}, "prompt"),
        ({"model": "sql", "prompt": 5}, "prompt"),
        ({"prompt": "w5"}, "model"),
    ]
    for body, field in cases:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"], (body, r.text)
    r = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"model": "sql", "prompt": "w5", "max_tokens": 100})
    assert "64" in r.json()["error"]["message"] and "100" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json={"model": "sql", "messages": [{"content": "w5"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0]"
    assert http.get("/health").status_code == 200
    text = http.get("/metrics").text
    for name in ("lorafx_requests_total", "lorafx_tokens_per_second", "lorafx_queue_length", "lorafx_batch_size"):
        assert name in text


def test_a_failing_request_does_not_take_down_the_others(server, client, oracle, monkeypatch):
    engine = server.engine
    original = engine._text
    poison = WORDS[80]

    def text(request):  # decoding this one request's text fails inside the engine
        if request.prompt[0] == 80:
            raise RuntimeError("boom")
        return original(request)

    monkeypatch.setattr(engine, "_text", text)
    good = prompts(3)

    def ask(prompt):
        try:
            return client.completions.create(model="chat", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
        except openai.InternalServerError as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, [*good, f"{poison} w5 w6"], timeout=TIMEOUT))
    assert got[:3] == [oracle("chat", p, 8) for p in good]
    assert isinstance(got[3], openai.InternalServerError) and "boom" in str(got[3])


def metric(server, name):
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    return next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


def test_queue_full_is_429_timeouts_504_and_a_disconnect_frees_the_row(folders):
    lm, tokenizer = load.load(folders["base"], {"sql": folders["adapters"]["sql"]})
    engine = Engine(lm, tokenizer, max_batch=1, max_model_len=2048, max_queue=1)
    decode = engine._decoder

    def slow_decode(**inputs):  # a model that takes 10 ms a step, so the long request is still running
        time.sleep(0.01)
        return decode(**inputs)

    engine._decoder = slow_decode
    srv = Server(engine, "base").start()
    try:
        http = httpx.Client(base_url=srv.url, timeout=TIMEOUT)
        long = {"model": "sql", "prompt": "w5 w6", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
        with http.stream("POST", "/v1/completions", json={**long, "stream": True}) as running:
            lines = running.iter_lines()  # held: dropping the iterator would close the connection
            assert next(lines).startswith("data: ")
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(http.post, "/v1/completions", json={**long, "max_tokens": 4})
                for _ in range(200):  # bounded: until the second request is queued
                    if int(metric(srv, "lorafx_queue_length")) == 1:
                        break
                    time.sleep(0.02)
                rejected = http.post("/v1/completions", json={**long, "max_tokens": 4})
                assert rejected.status_code == 429 and "queue is full" in rejected.json()["error"]["message"]
                running.close()  # the client goes away: its row is freed for the waiting request
                answer = waiting.result(timeout=TIMEOUT)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
        deadline = time.monotonic() + 10
        while int(metric(srv, 'lorafx_requests_total{outcome="cancelled"}')) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert int(metric(srv, 'lorafx_requests_total{outcome="cancelled"}')) == 1
        engine.request_timeout = 0.2
        r = http.post("/v1/completions", json=long)
        assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
        engine.request_timeout = 600.0
        assert http.post("/v1/completions", json={**long, "max_tokens": 3}).status_code == 200
    finally:
        srv.stop()


def test_cli_serves_an_nf4_base_with_adapters(folders):
    """`lorafx serve` as a user runs it: a subprocess on a free port, stopped with Ctrl-C."""
    adapters = folders["adapters"]
    cmd = [sys.executable, "-m", "lorafx.tools.cli", "serve", str(folders["base"]), "--port", "0", "--quantize", "nf4",
           "--max-batch", "4", "--max-model-len", "64", "--lora-modules", f"sql={adapters['sql']}", f"tiny={adapters['tiny']}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()  # "serving base with 2 adapters (sql, tiny) on http://127.0.0.1:PORT/v1"
        assert "serving base" in line, proc.stderr.read() if proc.poll() is not None else line
        url = line.split()[-1]
        for _ in range(100):  # bounded wait for the first accepted connection
            try:
                if httpx.get(url.removesuffix("/v1") + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=url, api_key="x", timeout=TIMEOUT, max_retries=0)
        prompt = prompts(1)[0]
        lm, tokenizer = load.load(folders["base"], {"sql": adapters["sql"], "tiny": adapters["tiny"]}, quantize="nf4")
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        for name in ("sql", "tiny"):
            new = lm.generate(ids, adapter_ids=[name], max_new_tokens=6)[0, ids.shape[1]:].tolist()
            new = new[: new.index(2)] if 2 in new else new
            got = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0).choices[0].text
            assert got == tokenizer.decode(new, skip_special_tokens=True), name
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
