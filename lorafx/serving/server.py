"""`lorafx serve`: vLLM's OpenAI-compatible routes over the continuous-batching engine.

Starlette on uvicorn: the ASGI pair FastAPI itself runs on, without FastAPI's pydantic layer —
requests are checked field by field here so a bad request is a 400 naming the field, in
OpenAI's error shape ({"error": {"message", "type", "param", "code"}}), and a field lorafx does
not implement is refused by name rather than ignored. Each request hands the engine a sink that
posts the engine thread's events onto the event loop; streaming responses are server-sent
events ending in `data: [DONE]`, as OpenAI's and vLLM's.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

from lorafx.serving.engine import Engine, QueueFull, Request, Sampling, UnknownAdapter

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError:  # the `serve` extra
    uvicorn = None

MISSING = object()
# Fields accepted only at the value that means "off" (OpenAI's default): anything else is refused.
NO_OP = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None, "frequency_penalty": 0,
         "presence_penalty": 0, "suffix": None, "logit_bias": None, "tools": None, "tool_choice": None,
         "response_format": None, "user": MISSING, "stream_options": MISSING, "parallel_tool_calls": MISSING}
SAMPLING = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "ignore_eos")
COMPLETION_FIELDS = {"model", "prompt", *SAMPLING, *NO_OP}
CHAT_FIELDS = {"model", "messages", *SAMPLING, *NO_OP}
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def error(status: int, message: str, param: str | None = None) -> "JSONResponse":
    kind = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error", 504: "timeout_error"}
    body = {"error": {"message": message, "type": kind.get(status, "server_error"), "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def create_app(engine: Engine, model_name: str, adapter_paths: dict[str, str] | None = None) -> "Starlette":
    """The ASGI app; `adapter_paths` (name → folder) is what /v1/models reports as each root."""
    if uvicorn is None:
        raise ImportError("lorafx serve needs uvicorn and starlette: pip install 'lorafx[serve]'")
    paths = dict(adapter_paths or {})
    created = int(time.time())

    def resolve(body) -> str | None:
        name = body.get("model", MISSING)
        if name is MISSING:
            raise BadRequest("the field 'model' is required: the base model's name or an adapter's", "model")
        if name == model_name:
            return None
        if isinstance(name, str) and name in engine.adapters():
            return name
        raise BadRequest(f"The model `{name}` does not exist.", "model", status=404)

    async def read_body(request, fields) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        for field in body:
            if field not in fields:
                raise BadRequest(f"unsupported field {field!r}", field)
        for field, off in NO_OP.items():
            if off is not MISSING and field in body and body[field] not in (off, None):
                raise BadRequest(f"{field}={body[field]!r} is not supported by lorafx serve (only {off!r})", field)
        return body

    def sampling(body, prompt_len: int, default_max: int | None) -> tuple[Sampling, bool]:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        if max_tokens is None:
            max_tokens = default_max if default_max is not None else max(1, engine.max_model_len - prompt_len)
        check_int(max_tokens, field, 1)
        temperature = number(body.get("temperature"), "temperature", 1.0)
        if temperature < 0:
            raise BadRequest(f"temperature must be >= 0 (0: greedy), got {temperature!r}", "temperature")
        top_p = number(body.get("top_p"), "top_p", 1.0)
        if not 0 < top_p <= 1:
            raise BadRequest(f"top_p must be in (0, 1], got {top_p!r}", "top_p")
        top_k = body.get("top_k")
        top_k = 0 if top_k is None or top_k == -1 else top_k
        check_int(top_k, "top_k", 0)
        seed = body.get("seed")
        if seed is not None:
            check_int(seed, "seed", 0)
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise BadRequest("stop must be a non-empty string or a list of up to 4 of them", "stop")
        stream, ignore_eos = body.get("stream", False), body.get("ignore_eos", False)
        for field, value in (("stream", stream), ("ignore_eos", ignore_eos)):
            if not isinstance(value, bool):
                raise BadRequest(f"{field} must be true or false, got {value!r}", field)
        return Sampling(max_tokens, temperature, top_p, top_k, seed, tuple(stop), ignore_eos), stream

    def encode(text: str, special: bool) -> list[int]:
        with engine.tokenizer_lock:
            return engine.tokenizer(text, add_special_tokens=special).input_ids

    async def completions(request):
        try:
            body = await read_body(request, COMPLETION_FIELDS)
            adapter = resolve(body)
            prompt = body.get("prompt", MISSING)
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = encode(prompt, special=True)
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                ids = prompt
            else:
                raise BadRequest("prompt must be a string or a non-empty list of token ids (one prompt per request)", "prompt")
            settings, stream = sampling(body, len(ids), COMPLETION_DEFAULT_MAX_TOKENS)
        except BadRequest as e:
            return error(e.status, str(e), e.param)
        return await run(request, ids, adapter, settings, stream, body, chat=False)

    async def chat(request):
        try:
            body = await read_body(request, CHAT_FIELDS)
            adapter = resolve(body)
            messages = body.get("messages", MISSING)
            if not isinstance(messages, list) or not messages:
                raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
            messages = [message_of(m, i) for i, m in enumerate(messages)]
            if not getattr(engine.tokenizer, "chat_template", None):
                raise BadRequest("the model's tokenizer has no chat template: use /v1/completions with a prompt", "messages")
            with engine.tokenizer_lock:
                text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = encode(text, special=False)
            settings, stream = sampling(body, len(ids), None)
        except BadRequest as e:
            return error(e.status, str(e), e.param)
        return await run(request, ids, adapter, settings, stream, body, chat=True)

    async def run(http, ids, adapter, settings, stream, body, chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(kind, **data):
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, data))
            except RuntimeError:  # the event loop is gone (server stopping)
                pass

        job = Request(ids, adapter, settings, sink, engine.request_timeout)
        try:
            engine.submit(job)
        except QueueFull as e:
            return error(429, str(e))
        except UnknownAdapter:
            return error(404, f"The model `{adapter}` does not exist.", "model")
        except ValueError as e:
            return error(400, str(e), "max_tokens" if "context length" in str(e) else "prompt")
        name = body["model"]
        rid = ("chatcmpl-" if chat else "cmpl-") + job.id
        if stream:
            return StreamingResponse(sse(job, events, rid, name, chat, body), media_type="text/event-stream")
        parts = []
        while True:
            try:
                kind, data = await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    job.cancel()
                    return Response(status_code=499)
                continue
            if kind == "text":
                parts.append(data["delta"])
            elif kind == "error":
                return error(data["status"], data["message"])
            else:
                text, reason = "".join(parts), data["finish_reason"]
                choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                           "finish_reason": reason} if chat else
                          {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
                return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                     "created": int(time.time()), "model": name, "choices": [choice],
                                     "usage": data["usage"]})

    async def sse(job, events, rid, name, chat, body):
        obj = "chat.completion.chunk" if chat else "text_completion"
        usage_wanted = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta=None, reason=None, usage=MISSING):
            choices = [] if usage is not MISSING else [
                {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": reason} if chat else
                {"index": 0, "text": (delta or {}).get("content", ""), "logprobs": None, "finish_reason": reason}
            ]
            out = {"id": rid, "object": obj, "created": int(time.time()), "model": name, "choices": choices}
            if usage is not MISSING:
                out["usage"] = usage
            return f"data: {json.dumps(out)}\n\n"

        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, data = await events.get()
                if kind == "text":
                    yield chunk({"content": data["delta"]})
                elif kind == "error":
                    body = {"error": {"message": data["message"], "type": "server_error", "param": None,
                                      "code": data["status"]}}
                    yield f"data: {json.dumps(body)}\n\n"
                    break
                else:
                    yield chunk({}, data["finish_reason"])
                    if usage_wanted:
                        yield chunk(usage=data["usage"])
                    break
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects (the response task is cancelled)
            job.cancel()

    async def models(request):
        def card(name, root, parent):
            return {"id": name, "object": "model", "created": created, "owned_by": "lorafx", "root": root,
                    "parent": parent, "max_model_len": engine.max_model_len}

        data = [card(model_name, model_name, None)]
        data += [card(name, paths.get(name, name), model_name) for name in engine.adapters()]
        return JSONResponse({"object": "list", "data": data})

    async def load_lora(request):
        try:
            body = await read_body(request, {"lora_name", "lora_path"})
            name, path = body.get("lora_name"), body.get("lora_path")
            if not isinstance(name, str) or not name or name == model_name:
                raise BadRequest("lora_name must be a non-empty string other than the base model's name", "lora_name")
            if not isinstance(path, str) or not path:
                raise BadRequest("lora_path must be the adapter's folder", "lora_path")
            if not os.path.isdir(path):
                raise BadRequest(f"lora_path {path!r} is not a folder", "lora_path", status=404)
            future = engine.load_adapter(name, path)
        except BadRequest as e:
            return error(e.status, str(e), e.param)
        except ValueError as e:
            return error(400, str(e), "lora_name")
        try:
            await asyncio.wrap_future(future)
        except Exception as e:  # a corrupt or mismatched adapter: the message names the problem
            return error(400, f"{type(e).__name__}: {e}", "lora_path")
        paths[name] = path
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(request):
        try:
            body = await read_body(request, {"lora_name", "lora_int_id"})
            name = body.get("lora_name")
            if not isinstance(name, str):
                raise BadRequest("lora_name must be the adapter's name", "lora_name")
            future = engine.unload_adapter(name)
        except BadRequest as e:
            return error(e.status, str(e), e.param)
        except UnknownAdapter:
            return error(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
        await asyncio.wrap_future(future)
        paths.pop(name, None)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def health(request):
        return Response(status_code=200 if engine.alive() else 503)

    async def metrics(request):
        m = engine.metrics
        lines = ["# HELP lorafx_requests_total Requests finished, by outcome.", "# TYPE lorafx_requests_total counter"]
        for outcome in ("stop", "length", "error", "timeout", "cancelled", "rejected"):
            lines.append(f'lorafx_requests_total{{outcome="{outcome}"}} {m.requests[outcome]}')
        for name, kind, value, text in (
            ("prompt_tokens_total", "counter", m.prompt_tokens, "Prompt tokens of accepted requests."),
            ("generation_tokens_total", "counter", m.generated_tokens, "Tokens generated."),
            ("decode_steps_total", "counter", m.steps, "Forward steps of the decode graph."),
            ("cache_compactions_total", "counter", m.compactions, "Times the KV cache slots were compacted."),
            ("tokens_per_second", "gauge", round(m.tokens_per_second(), 3), "Tokens generated per second, recent steps."),
            ("queue_length", "gauge", engine.queue_length(), "Requests waiting for a row."),
            ("running_requests", "gauge", engine.running(), "Requests in the running batch."),
            ("batch_size", "gauge", m.batch_size, "Rows in the last decode step."),
            ("adapters_loaded", "gauge", len(engine.adapters()), "Adapters resident."),
        ):
            lines += [f"# HELP lorafx_{name} {text}", f"# TYPE lorafx_{name} {kind}", f"lorafx_{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/load_lora_adapter", load_lora, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_lora, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ])


def check_int(value, field: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BadRequest(f"{field} must be an integer >= {low}, got {value!r}", field)


def number(value, field: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise BadRequest(f"{field} must be a number, got {value!r}", field)
    return float(value)


def message_of(message, i: int) -> dict:
    """One chat message as the chat template takes it; text content parts are joined."""
    field = f"messages[{i}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise BadRequest(f"{field} must be an object with a string 'role'", field)
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise BadRequest(f"{field}.content: only text parts ({{'type': 'text', 'text': ...}}) are supported", field)
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise BadRequest(f"{field}.content must be a string or a list of text parts", field)
    return {"role": message["role"], "content": content}


class Server:
    """The app on uvicorn in a thread: `Server(engine, name).start()` binds host:port (port 0: a
    free one, then `.port` says which) and returns once it accepts connections."""

    def __init__(self, engine: Engine, model_name: str, adapter_paths=None, host: str = "127.0.0.1", port: int = 0):
        self.engine = engine
        self.app = create_app(engine, model_name, adapter_paths)
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = host, self.socket.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5)
        self.uvicorn = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    def run(self) -> None:
        """Serve in this thread until interrupted (the CLI)."""
        if not self.engine.alive():
            self.engine.start()
        try:
            self.uvicorn.run(sockets=[self.socket])
        except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down gracefully, then re-raises
            pass
        finally:
            self.engine.stop()

    def start(self, timeout: float = 30.0) -> "Server":
        self.engine.start()
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=15)
        self.engine.stop()
        self.socket.close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
