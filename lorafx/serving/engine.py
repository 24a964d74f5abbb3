"""The serving engine: continuous batching of requests for many adapters over one decode graph.

One thread owns the model. It keeps rows of the decode graph (a static KV cache of
`max_model_len` slots per row, lorafx/generation/decode.py) and between two steps lets finished
requests leave and waiting ones join. The graph's batch is a bucket (1, 2, 4, ... up to
`max_batch`) just above the running requests: a bucket change copies the live rows' cache into
the other bucket's graph, so one request does not pay for `max_batch` rows.

Every step feeds all rows one chunk of T columns: a decoding row its last token in the last
column, a joining row its prompt left-padded to T, an idle row padding. The attention mask over the cache says which slots a row sees, the position
ids count each row's own tokens, and each row's adapter id picks its adapter in the bank
(lorafx::multi_lora): rows of different adapters and lengths share every forward.

All rows write the same cache slots (one write pointer, `cache_position`). When the next chunk
would not fit, each row's live slots move to the front of its cache (compaction) and the pointer
restarts after the longest row. An adapter load or unload waits until the running requests are
done (it rebuilds the decode graph over the new bank) while new requests queue.

Requests talk to the engine through a `sink(kind, **data)` the engine calls from its thread:
"text" (delta), "done" (finish_reason, usage) or "error" (status, message), exactly one of the
last two per request.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import random
import threading
import time
import uuid

import torch

from lorafx.core import named_adapters
from lorafx.generation.decode import CACHE, GenerationError, capture_decoder
from lorafx.generation.generate import settings, token_list, warp
from lorafx.passes.adapter_bank import IDS

DEFAULT_MODEL_LEN = 2048  # cache slots per row when the model allows more


class QueueFull(RuntimeError):
    """The waiting queue holds max_queue requests: the server answers 429."""


class UnknownAdapter(KeyError):
    """A request or unload names an adapter that is not loaded: the server answers 404."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Per-request decoding settings (OpenAI's names; temperature 0 is greedy)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # vLLM's: run to max_tokens through end-of-sequence tokens


class Request:
    def __init__(self, prompt: list[int], adapter: str | None, sampling: Sampling, sink, timeout: float):
        self.id = uuid.uuid4().hex[:24]
        self.prompt, self.adapter, self.sampling, self.sink = list(prompt), adapter, sampling, sink
        self.arrival = time.monotonic()
        self.deadline = self.arrival + timeout
        self.timeout = timeout
        self.tokens: list[int] = []
        self.sent = 0  # characters of text already delivered
        self.position = 0  # position id of the next token
        self.cancelled = False
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)

    def cancel(self) -> None:
        """The client went away: the engine frees the row before its next step."""
        self.cancelled = True


class Metrics:
    """Counters /metrics renders (Prometheus text)."""

    def __init__(self):
        self.requests = collections.Counter()  # by outcome: stop, length, error, timeout, cancelled, rejected
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.steps = 0
        self.compactions = 0  # times the rows' cache slots were moved to the front
        self.batch_size = 0  # rows in the last step
        self.recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)  # (time, tokens) per step

    def tokens_per_second(self) -> float:
        if len(self.recent) < 2:
            return 0.0
        span = self.recent[-1][0] - self.recent[0][0]
        return sum(n for _, n in list(self.recent)[1:]) / span if span > 0 else 0.0


class Engine:
    """Continuous batching over `lm`'s decode graph; `start()` runs it on a thread of its own."""

    def __init__(self, lm, tokenizer, *, max_batch: int = 16, max_model_len: int | None = None, max_queue: int = 64,
                 request_timeout: float = 600.0, compile: bool = False):
        if lm.config is None or lm.generation_config is None:
            raise GenerationError(f"serving needs a Hugging Face language model; {lm.model_class} has no decode path")
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout!r}")
        text = lm.config.get_text_config()
        bound = getattr(text, "max_position_embeddings", None) or DEFAULT_MODEL_LEN
        if max_model_len is None:
            max_model_len = min(bound, DEFAULT_MODEL_LEN)
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or not 2 <= max_model_len <= bound:
            raise ValueError(f"max_model_len must be an integer from 2 to the model's max_position_embeddings ({bound}), "
                             f"got {max_model_len!r}")
        self.lm, self.tokenizer = lm.eval(), tokenizer
        self.max_batch, self.max_model_len, self.max_queue = max_batch, max_model_len, max_queue
        self.request_timeout, self.compile = request_timeout, compile
        self.vocab = text.vocab_size
        config = settings(lm.generation_config)
        self.eos = set(token_list(config["eos_token_id"], "eos_token_id"))
        if getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos.add(tokenizer.eos_token_id)
        pad = config["pad_token_id"]
        self.pad = pad if pad is not None else (min(self.eos) if self.eos else 0)
        named_adapters.to_bank(lm)  # a bank from the start: each row picks its adapter, -1 the base model
        self.metrics = Metrics()
        self.tokenizer_lock = threading.Lock()  # fast tokenizers are not safe across threads
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._controls: collections.deque = collections.deque()
        self._rows: list[Request | None] = []
        self._buckets = sorted({min(2**i, max_batch) for i in range(max_batch.bit_length() + 1)})
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._build()

    # -- what the server calls (any thread) ------------------------------------------------
    def adapters(self) -> list[str]:
        """Loaded adapters by name ("default", the model's own zero adapter, is kept hidden);
        a snapshot the engine thread renews after each load or unload."""
        return list(self._names)

    def submit(self, request: Request) -> None:
        if request.adapter is not None and request.adapter not in self.adapters():
            raise UnknownAdapter(request.adapter)
        if not request.prompt:
            raise ValueError("the prompt has no tokens")
        bad = [t for t in request.prompt if not 0 <= t < self.vocab]
        if bad:
            raise ValueError(f"the prompt holds token id {bad[0]}; the vocabulary has ids 0..{self.vocab - 1}")
        total = len(request.prompt) + request.sampling.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request asks for {total} "
                f"({len(request.prompt)} in the prompt, max_tokens {request.sampling.max_tokens} in the completion)"
            )
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                self.metrics.requests["rejected"] += 1
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.append(request)
            self.metrics.prompt_tokens += len(request.prompt)
            self._cond.notify()

    def load_adapter(self, name: str, path: str) -> concurrent.futures.Future:
        if name == named_adapters.DEFAULT:
            raise ValueError(f"{name!r} is reserved for the model's own adapter; choose another name")
        if name in self.adapters():
            raise ValueError(f"an adapter named {name!r} is already loaded; unload it first")
        return self._control(lambda: self.lm.load_adapter(os.fspath(path), name=name))

    def unload_adapter(self, name: str) -> concurrent.futures.Future:
        if name not in self.adapters():
            raise UnknownAdapter(name)
        return self._control(lambda: self.lm.delete_adapter(name))

    def queue_length(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        return sum(r is not None for r in self._rows)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="lorafx-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _control(self, change) -> concurrent.futures.Future:
        future = concurrent.futures.Future()
        with self._cond:
            self._controls.append((change, future))
            self._cond.notify()
        return future

    # -- the engine thread ---------------------------------------------------------------
    def _build(self) -> None:
        """Decode graphs over the current bank (no request running), starting at the smallest bucket."""
        self.lm.forget_views()  # a load/unload changed the bank: views built before hold the old one
        self._names = tuple(n for n in named_adapters.names(self.lm) if n != named_adapters.DEFAULT)
        self._graphs: dict[int, tuple] = {}
        self._rows, self._cache, self._mask = [], None, None
        if self.compile:
            self._warm()
        self._resize(self._buckets[0], keep=[])
        self._write = 0  # next cache slot every row writes

    def _warm(self) -> None:
        """Compile every bucket's graph before serving, at a prompt width and at width 1 (torch.compile
        specializes a size of 1), so that no request waits on a compile (vLLM warms up the same way).
        The prompt width is one no other size shares (a bucket, the cache length): torch.compile would
        take it for that size and specialize it."""
        prompt = next((w for w in range(2, self.max_model_len) if w not in self._buckets), None)
        widths = [1] if prompt is None else [prompt, 1]
        for batch in self._buckets:
            decoder, _, ids = self._graph(batch)
            ids.fill_(-1)
            for width in widths:
                mask = torch.zeros(batch, self.max_model_len, dtype=torch.long, device=ids.device)
                mask[:, :width] = 1
                steps = torch.arange(width, device=ids.device)
                with torch.no_grad():
                    decoder(input_ids=torch.full((batch, width), self.pad, dtype=torch.long, device=ids.device),
                            attention_mask=mask, position_ids=steps.repeat(batch, 1), cache_position=steps)

    def _graph(self, batch: int) -> tuple:
        """(decoder, cache tensors, adapter-id buffer) of the `batch`-row decode graph, built once."""
        if batch not in self._graphs:
            length = self.max_model_len
            gm = self.lm.entry_point(("serve", batch, length), lambda: capture_decoder(self.lm, batch, length, last_only=True))
            decoder = torch.compile(gm, backend="lorafx", dynamic=True) if self.compile else gm
            buffers = dict(gm.named_buffers())
            cache = [t for name, t in buffers.items() if name.startswith((f"{CACHE}_keys", f"{CACHE}_values"))]
            ids = torch.full((batch,), -1, dtype=torch.long, device=buffers[IDS].device)
            setattr(gm, IDS, ids)  # one id per row, written in place each step
            self._graphs[batch] = (decoder, cache, ids)
        return self._graphs[batch]

    def _resize(self, batch: int, keep: list[int]) -> None:
        """Switch to the `batch`-row graph; rows `keep` of the old one become rows 0, 1, ... (cache,
        mask and request); the write pointer and the slot layout stay."""
        decoder, cache, ids = self._graph(batch)
        self._device = ids.device
        mask = torch.zeros(batch, self.max_model_len, dtype=torch.long, device=self._device)
        rows: list[Request | None] = [None] * batch
        for new, old in enumerate(keep):
            for target, source in zip(cache, self._cache):  # (batch, heads, slots, head_dim)
                target[new].copy_(source[old])
            mask[new] = self._mask[old]
            rows[new] = self._rows[old]
        self._decoder, self._cache, self._ids, self._mask, self._rows = decoder, cache, ids, mask, rows

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._controls or self.running()):
                    self._cond.wait(0.5)
                if self._stopping:
                    break
            try:
                if self._controls and not self.running():
                    self._apply_control()
                    continue
                self._expire()
                joining = [] if self._controls else self._admit()
                if self.running():
                    self._step(joining)
                    self._shrink()
            except Exception as e:  # the step itself failed: fail the rows in it, keep serving
                for row, request in enumerate(self._rows):
                    if request is not None:
                        self._finish(row, "error", status=500, message=f"generation failed: {type(e).__name__}: {e}")
                self._mask.zero_()
                self._write = 0
        for request in [r for r in self._rows if r is not None] + list(self._waiting):
            request.sink("error", status=503, message="the server is shutting down")

    def _apply_control(self) -> None:
        change, future = self._controls.popleft()
        try:
            change()
            self._build()
            future.set_result(None)
        except Exception as e:
            try:
                self._build()
            finally:
                future.set_exception(e)

    def _expire(self) -> None:
        now = time.monotonic()
        for row, request in enumerate(self._rows):
            if request is not None and (request.cancelled or now > request.deadline):
                self._finish(row, "cancelled" if request.cancelled else "timeout")
        with self._cond:
            waiting = list(self._waiting)
        for request in waiting:
            if request.cancelled or now > request.deadline:
                with self._cond:
                    self._waiting.remove(request)
                self._close(request, "cancelled" if request.cancelled else "timeout")

    def _admit(self) -> list[tuple[int, Request]]:
        """Move waiting requests into free rows while their prompts fit the cache."""
        joining: list[Request] = []
        room = self.max_batch - self.running()
        compacted = False
        while len(joining) < room:
            with self._cond:
                if not self._waiting:
                    break
                request = self._waiting[0]
            if request.adapter is not None and request.adapter not in self.adapters():
                with self._cond:
                    self._waiting.popleft()
                self._close(request, "error", status=404, message=f"The model `{request.adapter}` does not exist.")
                continue
            width = max(len(r.prompt) for r in [*joining, request])
            if self._write + width > self.max_model_len and not compacted:
                self._compact()
                compacted = True
            if self._write + width > self.max_model_len:
                break  # wait for running rows to finish
            with self._cond:
                self._waiting.popleft()
            joining.append(request)
        need = self.running() + len(joining)
        if need > len(self._rows):  # grow to the bucket that holds them, rows in place
            self._resize(next(b for b in self._buckets if b >= need), keep=list(range(len(self._rows))))
        free = [row for row, request in enumerate(self._rows) if request is None]
        for row, request in zip(free, joining):
            self._rows[row] = request
        return list(zip(free, joining))

    def _shrink(self) -> None:
        """Nobody waiting and the running requests fit a smaller bucket: move them there."""
        running = self.running()
        smaller = next(b for b in self._buckets if b >= max(running, 1))
        if smaller < len(self._rows) and not self._waiting:
            self._resize(smaller, keep=[row for row, request in enumerate(self._rows) if request is not None])

    def _compact(self) -> None:
        """Move each row's live cache slots to the front (right-aligned to the longest row)."""
        live = [self._mask[row].nonzero().flatten() for row in range(len(self._rows))]
        longest = max(len(slots) for slots in live)
        for row, slots in enumerate(live):
            self._mask[row].zero_()
            if len(slots):
                target = torch.arange(longest - len(slots), longest, device=self._device)
                for tensor in self._cache:  # (batch, heads, slots, head_dim)
                    tensor[row, :, target] = tensor[row, :, slots].clone()
                self._mask[row, target] = 1
        self._write = longest
        self.metrics.compactions += 1

    def _step(self, joining: list[tuple[int, Request]]) -> None:
        width = max((len(r.prompt) for _, r in joining), default=1)
        if self._write + width > self.max_model_len:
            self._compact()
        start = self._write
        batch = len(self._rows)
        ids = torch.full((batch, width), self.pad, dtype=torch.long)
        positions = torch.ones((batch, width), dtype=torch.long)
        adapter_ids = [-1] * batch
        names = named_adapters.names(self.lm)
        new = {row for row, _ in joining}
        for row, request in enumerate(self._rows):
            if request is None:
                continue
            if row in new:
                n = len(request.prompt)
                ids[row, width - n:] = torch.tensor(request.prompt)
                positions[row, width - n:] = torch.arange(n)
                self._mask[row].zero_()
                self._mask[row, start + width - n : start + width] = 1
                request.position = n
            else:
                ids[row, -1] = request.tokens[-1]
                positions[row, -1] = request.position
                self._mask[row, start + width - 1] = 1
                request.position += 1
            adapter_ids[row] = -1 if request.adapter is None else names.index(request.adapter)
        self._ids.copy_(torch.tensor(adapter_ids))  # in place: a compiled decoder keeps reading the same buffer
        with torch.no_grad():
            logits = self._decoder(
                input_ids=ids.to(self._device), attention_mask=self._mask, position_ids=positions.to(self._device),
                cache_position=torch.arange(start, start + width, device=self._device),
            )
        self._write += width
        scores = logits[:, -1, :].float().cpu()
        greedy = scores.argmax(-1).tolist()
        active = 0
        for row, request in enumerate(self._rows):
            if request is None:
                continue
            active += 1
            try:
                s = request.sampling
                if s.temperature == 0:
                    token = greedy[row]
                else:
                    probs = torch.softmax(warp(scores[row : row + 1], s.temperature, s.top_k, s.top_p), dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=request.generator))
                self._advance(row, request, token)
            except Exception as e:  # this request's own failure (e.g. decoding its text): the others go on
                self._finish(row, "error", status=500, message=f"{type(e).__name__}: {e}")
        self.metrics.steps += 1
        self.metrics.batch_size = active
        self.metrics.recent.append((time.monotonic(), active))

    def _advance(self, row: int, request: Request, token: int) -> None:
        """One new token for `request`: deliver the text it completes, finish on eos, stop or length."""
        request.tokens.append(token)
        self.metrics.generated_tokens += 1
        s = request.sampling
        reason = None
        if token in self.eos and not s.ignore_eos:
            reason = "stop"
        elif len(request.tokens) >= s.max_tokens:
            reason = "length"
        text = self._text(request)
        cut = min((i for i in (text.find(stop) for stop in s.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        if reason is None:  # hold back what could still become a stop string or a multi-byte character
            hold = max((len(stop) - 1 for stop in s.stop), default=0)
            text = text[: len(text) - hold] if hold else text
            text = text.rstrip("\ufffd")
        if len(text) > request.sent:
            request.sink("text", delta=text[request.sent :])
            request.sent = len(text)
        if reason is not None:
            self._finish(row, reason)

    def _text(self, request: Request) -> str:
        tokens = request.tokens if request.sampling.ignore_eos else [t for t in request.tokens if t not in self.eos]
        with self.tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _finish(self, row: int, outcome: str, **error) -> None:
        request = self._rows[row]
        self._rows[row] = None
        self._mask[row].zero_()
        self._close(request, outcome, **error)

    def _close(self, request: Request, outcome: str, status: int = 500, message: str = "") -> None:
        self.metrics.requests[outcome] += 1
        if outcome in ("stop", "length"):
            usage = {"prompt_tokens": len(request.prompt), "completion_tokens": len(request.tokens),
                     "total_tokens": len(request.prompt) + len(request.tokens)}
            request.sink("done", finish_reason=outcome, usage=usage)
        elif outcome == "timeout":
            request.sink("error", status=504, message=f"the request timed out after {request.timeout:g} s")
        elif outcome == "cancelled":
            request.sink("error", status=499, message="the client disconnected")
        else:
            request.sink("error", status=status, message=message)
