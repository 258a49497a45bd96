"""The serving engine: continuous batching of HRMGemma generation with per-token halting.

    engine = Engine(model, eos_id=2, vocab_limit=sp.get_piece_size(), decode=sp.decode)
    engine.start()                                               # the scheduler thread
    request = Request(prompt_ids, SamplingParams(max_tokens=64, temperature=0.0), sink=outputs.append)
    engine.submit(request)    # sink gets an Output per new token, the last with finish_reason and usage

One scheduler thread runs the model, so exactly one forward runs at a time. Its loop:

    while serving:
        drop the rows of cancelled requests                                   cache.select
        admit waiting requests in arrival order while the batch has room and the iteration's prefill
        budget (prompt tokens) lasts (at least one):
            prefill each prompt alone and sample its first token              cache.prefill
            the rows that have not finished join the batch                    cache.join
        one decode step for every row: feed its last token, sample the next   cache.step
        rows that finished (eos, a stop string, max_tokens) leave at once     cache.select

so requests join and leave between decode steps, and a row never waits for another to finish. The
cache is behind a four-call interface (serve/cache.py): paged (blocks in a pool, offload) or rectangular.

Hot swap (`swap(model)`, from any thread): the engine stops admitting, lets the running rows finish on
the model they started with, then switches models between two loop iterations and admits again, so no
request is dropped and none mixes two models; requests that arrive meanwhile wait in the queue.

A row computes what it would alone: its positions count its own tokens, padding joined in front of it
is masked, and its halting limits (max_cycles, halt_threshold) are its own. Sampling is per row too:
each request draws from its own torch.Generator seeded with its seed (a random one if none is given),
exactly as `stream_generate` draws for a single prompt, so a request's tokens do not depend on what
else is in the batch and equal `hrm-mega generate` with the same seed.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hrm_mega.inference.generate import sample_token
from hrm_mega.inference.serve.cache import BatchCache, RectangularCache
from hrm_mega.inference.serve.text import TextStream
from hrm_mega.models.lm import HRMGemma

log = logging.getLogger(__name__)

COUNTERS = (
    "requests", "finished", "cancelled", "error", "errors", "prefills", "prompt_tokens", "steps", "tokens",
    "peak_rows",
)  # fmt: skip


class RequestError(ValueError):
    """A request the engine cannot run (bad sampling options, too long); the message is one line."""


class Busy(RuntimeError):
    """The engine's queue is full."""


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks for. temperature 0 is greedy (argmax); top_k 0 and top_p 1 keep every
    token; seed None draws a random seed. max_cycles None is the model's h_cycles; halt_threshold None
    turns early halting off for this request."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    max_cycles: int | None = None
    halt_threshold: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    cycles: int = 0  # H cycles summed over the new tokens and the blocks
    blocks: int = 1

    @property
    def mean_cycles(self) -> float | None:
        """H cycles per block per new token, as `hrm-mega generate` reports them."""
        return self.cycles / (self.completion_tokens * self.blocks) if self.completion_tokens else None


@dataclass
class Output:
    """New text and tokens of one request; the last Output of a request has finish_reason and usage.
    finish_reason: "stop" (eos or a stop string), "length" (max_tokens), "cancelled" or "error"."""

    text: str
    token_ids: list[int]
    cycles: list[int]  # per new token: H cycles summed over the blocks
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Output], None]  # called on the scheduler thread: it must not block
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    cancelled: bool = False
    finished: bool = False
    pixel_values: torch.Tensor | None = None  # the prompt's images (a model with images), read in its prefill

    def cancel(self) -> None:
        """The client went away: its row leaves the batch before the next decode step."""
        self.cancelled = True


@dataclass(eq=False)
class _Row:
    request: Request
    generator: torch.Generator | None
    text: TextStream | None
    usage: Usage
    position: int  # of the next token fed
    last: int = 0  # the token to feed next


class Engine:
    """Continuous batching over one HRMGemma (module docstring).

    max_batch: rows decoded together at most; max_waiting: requests queued beyond them (submit raises
    Busy past it); prefill_budget: prompt tokens prefilled per loop iteration (at least one prompt), so
    that a burst of arrivals delays the running rows' next token by a bounded amount; max_context:
    prompt + max_tokens at most; max_cycles_limit: the largest per-request max_cycles; decode: ids ->
    text (None: outputs carry no text, and stop strings are refused)."""

    def __init__(
        self,
        model: HRMGemma,
        *,
        eos_id: int | None,
        vocab_limit: int | None = None,
        decode: Callable[[list[int]], str] | None = None,
        max_batch: int = 32,
        max_waiting: int = 256,
        prefill_budget: int = 4096,
        max_context: int | None = None,
        max_cycles_limit: int | None = None,
        cache: BatchCache | None = None,
    ) -> None:
        if not isinstance(model, HRMGemma):
            raise ValueError(f"serving needs an HRMGemma language model, not a {type(model).__name__}")
        for name, value in (("max_batch", max_batch), ("prefill_budget", prefill_budget)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if max_waiting < 0:
            raise ValueError(f"max_waiting={max_waiting} must be >= 0")
        c = model.config
        self.model = model
        self.device = model.embed_tokens.weight.device
        self.eos_id, self.decode = eos_id, decode
        self.vocab_limit = c.vocab_size if vocab_limit is None else vocab_limit
        if not 0 < self.vocab_limit <= c.vocab_size:
            raise ValueError(
                f"vocab_limit={self.vocab_limit} must be in [1, model.vocab_size={c.vocab_size}]"
            )
        self.max_batch, self.max_waiting, self.prefill_budget = max_batch, max_waiting, prefill_budget
        self.max_context = c.max_position if max_context is None else max_context
        self.max_cycles_limit = max(4 * c.h_cycles, 8) if max_cycles_limit is None else max_cycles_limit
        self.blocks = len(model.blocks)
        self.cache: BatchCache = RectangularCache(model) if cache is None else cache
        self._rows: list[_Row] = []
        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._swap: tuple[HRMGemma, threading.Event] | None = None
        self.swaps = 0
        self.counters = collections.Counter(dict.fromkeys(COUNTERS, 0))

    # ----------------------------------------------------------------------------------------------
    # Client side (any thread)

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raises RequestError (one line) for a request the engine would refuse."""
        p = params
        if not prompt:
            raise RequestError("the prompt is empty: it needs at least one token")
        vision = self.model.config.vision
        image_id = None if vision is None else vision.image_token_id
        if any(not 0 <= t < self.vocab_limit and t != image_id for t in prompt):
            raise RequestError(f"the prompt holds token ids outside the vocabulary [0, {self.vocab_limit})")
        if p.max_tokens < 1:
            raise RequestError(f"max_tokens={p.max_tokens} must be >= 1")
        if len(prompt) + p.max_tokens > self.max_context:
            raise RequestError(
                f"this model's context is {self.max_context} tokens, but the request needs "
                f"{len(prompt) + p.max_tokens} ({len(prompt)} in the prompt, max_tokens={p.max_tokens})"
            )
        if not 0 <= p.temperature <= 100:
            raise RequestError(f"temperature={p.temperature} must be in [0, 100] (0 is greedy)")
        if not 0 < p.top_p <= 1:
            raise RequestError(f"top_p={p.top_p} must be in (0, 1]")
        if p.top_k < 0:
            raise RequestError(f"top_k={p.top_k} must be >= 0 (0 keeps every token)")
        if p.max_cycles is not None and not 1 <= p.max_cycles <= self.max_cycles_limit:
            raise RequestError(f"max_cycles={p.max_cycles} must be in [1, {self.max_cycles_limit}]")
        if p.halt_threshold is not None and not 0 < p.halt_threshold <= 1:
            raise RequestError(f"halt_threshold={p.halt_threshold} must be in (0, 1]")
        if p.stop and self.decode is None:
            raise RequestError("stop strings need a tokenizer to decode with")

    def submit(self, request: Request) -> None:
        """Queues a request (checked first: RequestError); Busy when the queue is full."""
        self.check(request.prompt, request.params)
        with self._lock:
            if self._stopping:
                raise Busy("the server is shutting down")
            if len(self._waiting) >= self.max_waiting + max(0, self.max_batch - len(self._rows)):
                raise Busy(f"{len(self._waiting)} requests are waiting already; retry later")
            self._waiting.append(request)
            self.counters["requests"] += 1
            self._lock.notify()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"running": len(self._rows), "waiting": len(self._waiting), "swaps": self.swaps,
                    **self.counters}  # fmt: skip

    def swap(self, model: HRMGemma, timeout: float = 600.0) -> HRMGemma:
        """Serves `model` from now on (module docstring); returns the model it replaced. Blocks until
        the running rows have finished and the swap is done (TimeoutError past `timeout`, and then the
        swap is called off: the old model keeps serving)."""
        if not isinstance(model, HRMGemma):
            raise ValueError(f"serving needs an HRMGemma language model, not a {type(model).__name__}")
        if model.config.vocab_size < self.vocab_limit:
            raise ValueError(
                f"the new model's vocab_size={model.config.vocab_size} is smaller than the tokenizer's "
                f"{self.vocab_limit} pieces"
            )
        done = threading.Event()
        with self._lock:
            if self._swap is not None:
                raise Busy("another swap is under way")
            self._swap = (model, done)
            old = self.model
            self._lock.notify()
        if self._thread is None:  # no scheduler thread (tests stepping by hand): swap now if idle
            self.step()
        if not done.wait(timeout):
            with self._lock:
                if self._swap is not None and self._swap[1] is done:
                    self._swap = None
                    raise TimeoutError(f"the running requests did not finish within {timeout} s")
        return old

    def _apply_swap(self) -> None:
        """Between iterations, once no row runs: the new model and a cache for it."""
        with self._lock:
            if self._swap is None or self._rows:
                return
            model, done = self._swap
            self._swap = None
        self.model = model
        self.device = model.embed_tokens.weight.device
        self.blocks = len(model.blocks)
        self.cache = self.cache.for_model(model)
        self.swaps += 1
        done.set()

    # ----------------------------------------------------------------------------------------------
    # The scheduler

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hrm-mega-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stops the loop; requests still queued or running finish with finish_reason "cancelled"."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for request in [r.request for r in self._rows] + list(self._waiting):
            self._finish_request(request, "cancelled", Usage(len(request.prompt), blocks=self.blocks))
        self._rows, self._waiting = [], collections.deque()
        self.cache.select(torch.zeros(0, dtype=torch.long))

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._waiting or self._rows or self._stopping or self._swap):
                    self._lock.wait()
                if self._stopping:
                    return
            self.step()

    def step(self) -> None:
        """One iteration of the loop (module docstring); the loop thread calls it, tests may too."""
        with torch.inference_mode():
            try:
                self._drop_cancelled()
                self._apply_swap()
                self._admit()
                if self._rows:
                    self._decode_step()
            except Exception as e:  # a failed forward fails the requests it held, and serving goes on
                log.exception("engine step failed")
                message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                for row in self._rows:
                    self._finish_request(row.request, "error", row.usage, error=message)
                self._rows = []
                self.cache.select(torch.zeros(0, dtype=torch.long))
                self.counters["errors"] += 1

    def _drop_cancelled(self) -> None:
        if any(row.request.cancelled for row in self._rows):
            self._leave([row.request.cancelled for row in self._rows], "cancelled")

    def _admit(self) -> None:
        budget, joined = self.prefill_budget, []
        while len(self._rows) + len(joined) < self.max_batch and self._swap is None:
            with self._lock:
                if not self._waiting or (
                    budget < len(self._waiting[0].prompt) and budget < self.prefill_budget
                ):
                    break
                request = self._waiting.popleft()
            if request.cancelled:
                self._finish_request(request, "cancelled", Usage(len(request.prompt), blocks=self.blocks))
                continue
            budget -= len(request.prompt)
            try:
                row, part = self._prefill(request)
            except Exception as e:  # this request fails; the batch goes on
                log.exception("prefill of request %s failed", request.id)
                self._finish_request(request, "error", Usage(len(request.prompt), blocks=self.blocks),
                                     error=f"{type(e).__name__}: {e}".splitlines()[0])  # fmt: skip
                continue
            if row is not None:
                self._rows.append(row)
                joined.append(part)
        self.cache.join(joined)
        self.counters["peak_rows"] = max(self.counters["peak_rows"], len(self._rows))

    def _prefill(self, request: Request) -> tuple[_Row | None, object]:
        p = request.params
        generator = None
        if not p.greedy:
            seed = p.seed if p.seed is not None else secrets.randbits(63)
            generator = torch.Generator(device=self.device).manual_seed(seed)
        text = None if self.decode is None else TextStream(self.decode, request.prompt, p.stop)
        row = _Row(
            request, generator, text, Usage(len(request.prompt), blocks=self.blocks), len(request.prompt)
        )
        ids = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
        max_cycles, threshold = self._halting([row])
        pixels = None if request.pixel_values is None else request.pixel_values.to(self.device)
        logits, cycles, part = self.cache.prefill(ids, max_cycles, threshold, pixel_values=pixels)
        self.counters["prefills"] += 1
        self.counters["prompt_tokens"] += len(request.prompt)
        done = self._emit(row, int(self._pick([row], logits)[0]), int(cycles[0].sum()))
        return (None, None) if done else (row, part)

    def _decode_step(self) -> None:
        rows = self._rows
        tokens = torch.tensor([r.last for r in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([r.position for r in rows], dtype=torch.long, device=self.device)
        max_cycles, threshold = self._halting(rows)
        logits, cycles = self.cache.step(tokens, positions, max_cycles, threshold)
        self.counters["steps"] += 1
        picked = self._pick(rows, logits).tolist()
        cycle_sums = cycles.sum(dim=1).tolist()
        for row in rows:
            row.position += 1
        done = [self._emit(row, picked[i], cycle_sums[i]) for i, row in enumerate(rows)]
        if any(done):
            self._leave(done, None)

    def _leave(self, leaving: list[bool], reason: str | None) -> None:
        """Rows flagged in `leaving` leave the batch (finished with `reason` unless they already are)."""
        keep = [i for i, gone in enumerate(leaving) if not gone]
        for i, gone in enumerate(leaving):
            if gone and reason is not None:
                self._finish_request(self._rows[i].request, reason, self._rows[i].usage)
        self._rows = [self._rows[i] for i in keep]
        self.cache.select(torch.tensor(keep, dtype=torch.long, device=self.device))

    def _halting(self, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-row max_cycles [b] and halt_threshold [b] (NaN: no early halting), or None for none."""
        h = self.model.config.h_cycles
        max_cycles = torch.tensor(
            [r.request.params.max_cycles or h for r in rows], dtype=torch.long, device=self.device
        )
        thresholds = [r.request.params.halt_threshold for r in rows]
        if all(t is None for t in thresholds):
            return max_cycles, None
        values = [float("nan") if t is None else t for t in thresholds]
        return max_cycles, torch.tensor(values, dtype=torch.float32, device=self.device)

    def _pick(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row [b]: argmax for greedy rows, else a draw from the row's own
        generator, as stream_generate picks for one prompt (logits past vocab_limit are -inf)."""
        if self.vocab_limit < logits.shape[-1]:
            logits = logits.clone()
            logits[:, self.vocab_limit :] = float("-inf")
        tokens = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            p = row.request.params
            if not p.greedy:
                tokens[i] = sample_token(
                    logits[i : i + 1], greedy=False, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                    generator=row.generator,
                )[0]  # fmt: skip
        return tokens

    def _emit(self, row: _Row, token: int, cycles: int) -> bool:
        """Records a row's new token and sends it; True when the row is finished."""
        request, p, usage = row.request, row.request.params, row.usage
        usage.completion_tokens += 1
        usage.cycles += cycles
        self.counters["tokens"] += 1
        row.last = token
        finish = None
        if token == self.eos_id and not p.ignore_eos:
            finish = "stop"
        text = ""
        if row.text is not None and finish is None:
            text = row.text.push(token)
            if row.text.stopped:
                finish = "stop"
        if finish is None and usage.completion_tokens >= p.max_tokens:
            finish = "length"
        if finish is not None and row.text is not None:
            text += row.text.finish()
        output = Output(text, [token], [cycles])
        if finish is not None:
            output.finish_reason, output.usage = finish, usage
            request.finished = True
            self.counters["finished"] += 1
        self._send(request, output)
        return finish is not None

    def _finish_request(self, request: Request, reason: str, usage: Usage, error: str | None = None) -> None:
        if request.finished:
            return
        request.finished = True
        self.counters[reason] += 1
        self._send(request, Output("", [], [], finish_reason=reason, usage=usage, error=error))

    def _send(self, request: Request, output: Output) -> None:
        try:
            request.sink(output)
        except Exception:  # a sink that fails (its client is gone) must not stop the others
            log.exception("request %s: its sink failed", request.id)
            request.cancelled = True


def wait_all(engine: Engine, requests: list[Request], timeout: float = 60.0) -> None:
    """Steps `engine` on this thread until every request has finished (for tests and benchmarks that
    run without the scheduler thread)."""
    deadline = time.monotonic() + timeout
    while not all(r.finished for r in requests):
        if time.monotonic() > deadline:
            raise TimeoutError(f"requests not finished after {timeout} s")
        engine.step()
