"""`hrm-mega serve`: continuous batching (engine), joining caches, and the OpenAI-compatible HTTP API.

Servers run in this process (uvicorn in a thread, on a socket bound to a free 127.0.0.1 port) and are
driven with the official `openai` client, plus httpx where the client cannot send what a test needs
(malformed JSON, oversized bodies, disconnects). The model is the tiny recurrent HRMGemma of
test_generate.py (open gates, a random halting head, so tokens halt at different cycles), saved as a
model directory with a real SentencePiece tokenizer; everything runs in fp32.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from test_generate import _corpus, random_ids, recurrent_model

from hrm_mega.checkpoint.consolidate import load_model
from hrm_mega.checkpoint.model_dir import save_model_dir
from hrm_mega.config import Config, DataConfig
from hrm_mega.inference.generate import generate
from hrm_mega.inference.serve.cache import PagedCache
from hrm_mega.inference.serve.engine import Busy, Engine, Request, SamplingParams, wait_all
from hrm_mega.inference.serve.text import TextStream, gemma_chat_prompt
from hrm_mega.models.kv_cache import KVCache
from hrm_mega.models.paged_kv_cache import pool_for

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

CONTEXT = 256
KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A model directory (context 256) whose config's data.path holds a real SentencePiece tokenizer."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("serve")
    data = root / "data"
    data.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=str(data / "tokenizer"), vocab_size=60,
        model_type="unigram", bos_id=1, eos_id=2, pad_id=0, unk_id=3, num_threads=1,
    )  # fmt: skip
    model = recurrent_model(seed=14, max_position=CONTEXT)
    config = Config(model=model.config, data=DataConfig(path=str(data)))
    return save_model_dir(model.state_dict(), config, root / "model")


@pytest.fixture(scope="module")
def sp(checkpoint: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(checkpoint.parent / "data" / "tokenizer.model"))


@pytest.fixture(scope="module")
def model(checkpoint: Path):
    return load_model(checkpoint)[0].eval()


class Server:
    """`hrm-mega serve ARGS` in this process: uvicorn in a thread on a free 127.0.0.1 port."""

    def __init__(self, argv: list[str]) -> None:
        from hrm_mega.entry.serve import bind, build, build_parser

        self.app, self.engine, self.settings = build(build_parser().parse_args(argv))
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(checkpoint: Path):
    s = Server([str(checkpoint), "--device", "cpu", "--max-batch", "16"])
    yield s
    s.close()


@pytest.fixture(scope="module")
def keyed(checkpoint: Path):
    s = Server([str(checkpoint), "--device", "cpu", "--api-key", KEY, "--max-body-bytes", "4096"])
    yield s
    s.close()


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------------
# Joining caches and the engine (no HTTP)
# --------------------------------------------------------------------------------------------------


def test_concat_pads_on_the_left_and_aligns_cycle_steps() -> None:
    """Two caches of different lengths and step counts join into one whose rows decode exactly as they
    would alone; trim_padding then drops the padding that the shorter row no longer needs."""
    model = recurrent_model(seed=3)
    short, long = random_ids(1, 3, seed=1), random_ids(1, 9, seed=2)
    caches, logits_alone = [], []
    for ids, cycles in ((short, 1), (long, 3)):  # 1 cycle: fewer slots per layer than 3 cycles
        cache = KVCache()
        with torch.no_grad():
            model.infer(ids, max_cycles=cycles, cache=cache)
        caches.append(cache)
    assert caches[0].steps("blocks.0.H.0") == 1 and caches[1].steps("blocks.0.H.0") == 3
    joined = KVCache.concat(caches)
    assert joined.length == 9 and joined.valid[0].tolist() == [False] * 6 + [True] * 3
    assert joined.steps("blocks.0.H.0") == 3 and joined.slots["blocks.0.L.0"][0].length == 3  # window-1
    token = torch.tensor([[5], [6]])
    cycles = torch.tensor([1, 3])
    with torch.no_grad():
        together, c_together = model.infer(token, position_ids=torch.tensor([[3], [9]]), max_cycles=cycles,
                                           attention_mask=torch.ones_like(token), cache=joined)  # fmt: skip
        for row, cache in enumerate(caches):
            alone, c_alone = model.infer(token[row : row + 1], max_cycles=int(cycles[row]), cache=cache)
            logits_alone.append(alone)
            assert torch.equal(c_alone[:, 0], c_together[:, row])
    assert (together - torch.cat(logits_alone)).abs().max() < 1e-5
    joined.select(torch.tensor([0]))  # the long row leaves: 6 padding positions lead every remaining row
    assert joined.trim_padding() == 6 and joined.length == 4 and joined.slots["blocks.0.H.0"][2].length == 4
    assert KVCache.concat([caches[0]]).length == caches[0].length


def _alone(model, prompt: list[int], p: SamplingParams, kv_pool=None) -> tuple[list[int], list[int]]:
    """What `hrm-mega generate` computes for this one prompt: tokens and per-token cycles."""
    kwargs = dict(max_new_tokens=p.max_tokens, max_cycles=p.max_cycles, halt_threshold=p.halt_threshold,
                  kv_pool=kv_pool)  # fmt: skip
    if p.greedy:
        kwargs["greedy"] = True
    else:
        kwargs.update(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed)
    g = generate(model, torch.tensor([prompt]), **kwargs)
    return g.tokens[0].tolist(), g.cycles[0].sum(-1).tolist()


@pytest.mark.parametrize("kv", ["rectangular", "paged", "paged-offload", "paged-int8"])
def test_rows_that_join_and_leave_compute_what_they_would_alone(kv: str) -> None:
    """Requests arrive while others decode (staggered), with their own lengths, max_cycles, thresholds
    and samplers: each gets the tokens and cycles of generating alone; rows left at once when done.
    Paged: every block resident, or 48 resident blocks of 4 positions (the rest offloaded), or int8
    keys/values (alone: generate with an int8 pool too, since int8 changes logits slightly)."""
    model = recurrent_model(seed=14, max_position=CONTEXT)
    cache = None
    kv_dtype = "int8" if kv == "paged-int8" else "model"
    if kv != "rectangular":
        pool = pool_for(model, block_size=4, resident_blocks=48 if kv == "paged-offload" else None,
                        kv_dtype=kv_dtype)  # fmt: skip
        cache = PagedCache(model, pool)
    engine = Engine(model, eos_id=None, max_batch=4, cache=cache)
    specs = [
        SamplingParams(max_tokens=6, temperature=0.0, max_cycles=3, halt_threshold=0.5),
        SamplingParams(max_tokens=3, temperature=1.5, top_k=20, seed=7),
        SamplingParams(max_tokens=8, temperature=0.0),
        SamplingParams(max_tokens=5, temperature=0.8, top_p=0.9, seed=1, max_cycles=1),
        SamplingParams(max_tokens=4, temperature=0.0, halt_threshold=0.6, max_cycles=4),
        SamplingParams(max_tokens=7, temperature=2.0, seed=3, halt_threshold=0.4),
    ]
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (4, 9, 2, 6, 12, 3)]
    outputs: list[list] = [[] for _ in specs]
    requests = []
    for i, (prompt, p) in enumerate(zip(prompts, specs, strict=True)):
        requests.append(Request(prompt, p, sink=outputs[i].append))
        engine.submit(requests[-1])
        engine.step()  # one prefill + decode step per arrival: later requests join a running batch
    wait_all(engine, requests)
    stats = engine.stats()
    assert stats["running"] == 0 and stats["peak_rows"] == 4 and engine.cache.rows == 0
    if cache is not None:
        assert pool.blocks_in_use == 0
        assert (pool.counters["offloaded"] > 0) == (kv == "paged-offload")
    for i, (prompt, p) in enumerate(zip(prompts, specs, strict=True)):
        tokens = [t for o in outputs[i] for t in o.token_ids]
        cycles = [c for o in outputs[i] for c in o.cycles]
        alone_pool = pool_for(model, kv_dtype=kv_dtype) if kv_dtype != "model" else None
        assert (tokens, cycles) == _alone(model, prompt, p, alone_pool), i
        final = outputs[i][-1]
        assert final.finish_reason == "length" and final.usage.completion_tokens == p.max_tokens
        assert final.usage.cycles == sum(cycles)


def test_the_queue_is_bounded_and_cancelled_requests_leave() -> None:
    model = recurrent_model(seed=14, max_position=CONTEXT)
    engine = Engine(model, eos_id=None, max_batch=1, max_waiting=1)
    outputs: list = []
    requests = [
        Request([5, 6], SamplingParams(max_tokens=50, temperature=0.0), outputs.append) for _ in range(3)
    ]
    engine.submit(requests[0])
    engine.step()  # requests[0] runs
    engine.submit(requests[1])  # waits
    with pytest.raises(Busy, match="1 requests are waiting already"):
        engine.submit(requests[2])
    requests[0].cancel()
    requests[1].cancel()
    engine.step()
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
    assert [o.finish_reason for o in outputs if o.finish_reason] == ["cancelled", "cancelled"]


def test_text_stream_holds_back_stop_strings_and_incomplete_characters(sp) -> None:
    prompt = [sp.bos_id(), *sp.encode("12 plus")]
    new = sp.encode("7 is 19. 3 plus")
    whole = sp.decode(prompt + new)[len(sp.decode(prompt)) :]
    assert whole == " 7 is 19. 3 plus"  # the first new piece keeps its space
    stream = TextStream(sp.decode, prompt, ())
    assert "".join(stream.push(t) for t in new) + stream.finish() == whole
    stream = TextStream(sp.decode, prompt, ("19.",))
    deltas = []
    for t in new:
        deltas.append(stream.push(t))
        assert not "".join(deltas).endswith("1")  # "1" might begin "19.": held back until it does
        if stream.stopped:
            break
    assert "".join(deltas) == " 7 is " and stream.finish() == ""
    snowman = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"), [65], ())
    assert [snowman.push(b) for b in "\u2603".encode()] == ["", "", "\u2603"]


# --------------------------------------------------------------------------------------------------
# The HTTP API with the official client
# --------------------------------------------------------------------------------------------------


def _generate_cli(checkpoint: Path, prompts: list[str], capsys, extra: list[str]) -> list[str]:
    from hrm_mega.entry.generate import main

    argv = [str(checkpoint), *[a for p in prompts for a in ("--prompt", p)], "--device", "cpu", *extra]
    assert main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_completions_equal_hrm_mega_generate(server: Server, checkpoint: Path, sp, model, capsys) -> None:
    prompts = ["12 plus 7 is", "3 plus"]
    halting = {"max_cycles": 3, "halt_threshold": 0.5}
    lines = _generate_cli(checkpoint, prompts, capsys, ["--max-new-tokens", "8", "--max-cycles", "3",
                                                        "--halt-threshold", "0.5"])  # fmt: skip
    stats = json.loads(lines[-1])
    client = server.client()
    for prompt, line in zip(prompts, lines, strict=False):
        ids = [sp.bos_id(), *sp.encode(prompt)]
        expected = generate(model, torch.tensor([ids]), max_new_tokens=8, greedy=True, eos_id=sp.eos_id(),
                            vocab_limit=sp.get_piece_size(), **halting)  # fmt: skip
        n = int(expected.lengths[0])
        body = {**halting, "return_token_ids": True}
        done = client.completions.create(model="model", prompt=prompt, max_tokens=8, temperature=0,
                                         extra_body=body)  # fmt: skip
        choice = done.choices[0]
        assert sp.decode(ids) + choice.text == line  # what `hrm-mega generate` printed
        assert choice.token_ids == expected.tokens[0, :n].tolist()
        assert choice.finish_reason == ("stop" if expected.tokens[0, n - 1] == sp.eos_id() else "length")
        assert done.usage.completion_tokens == n and done.usage.prompt_tokens == len(ids)
        assert done.usage.cycles == int(expected.cycles[0, :n].sum())
        chunks = list(client.completions.create(model="model", prompt=prompt, max_tokens=8, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body=body))  # fmt: skip
        assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
        assert [t for c in chunks if c.choices for t in c.choices[0].token_ids] == choice.token_ids
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
        assert chunks[-1].usage.model_dump() == done.usage.model_dump()
    both = client.completions.create(
        model="model", prompt=prompts, max_tokens=8, temperature=0, extra_body=halting
    )
    assert [
        sp.decode([sp.bos_id(), *sp.encode(p)]) + c.text for p, c in zip(prompts, both.choices, strict=True)
    ] == lines[:-1]
    assert both.usage.completion_tokens == stats["tokens"]
    assert both.usage.mean_cycles == pytest.approx(stats["mean_cycles"], abs=1e-4)


def test_chat_equals_hrm_mega_generate_on_the_gemma_prompt(
    server: Server, checkpoint: Path, sp, capsys
) -> None:
    messages = [{"role": "system", "content": "add"}, {"role": "user", "content": "12 plus 7 is"}]
    rendered = gemma_chat_prompt([(m["role"], m["content"]) for m in messages])
    assert rendered == "<start_of_turn>user\nadd\n\n12 plus 7 is<end_of_turn>\n<start_of_turn>model\n"
    out = _generate_cli(checkpoint, [rendered], capsys, ["--max-new-tokens", "6"])
    printed = "\n".join(out[:-1])
    client = server.client()
    done = client.chat.completions.create(model="model", messages=messages, max_tokens=6, temperature=0)
    message = done.choices[0].message
    assert message.role == "assistant"
    assert sp.decode([sp.bos_id(), *sp.encode(rendered)]) + message.content == printed
    chunks = list(client.chat.completions.create(model="model", messages=messages, max_completion_tokens=6,
                                                 temperature=0, stream=True))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason


def test_per_request_cycles_sampling_and_stop_strings(server: Server, checkpoint: Path, sp, capsys) -> None:
    client = server.client()
    used = {}
    for cycles in (1, 3):
        r = client.completions.create(model="model", prompt="4 plus", max_tokens=5, temperature=0,
                                      extra_body={"max_cycles": cycles, "ignore_eos": True})  # fmt: skip
        assert r.usage.completion_tokens == 5
        used[cycles] = r.usage.cycles
    assert used == {1: 5 * 2 * 1, 3: 5 * 2 * 3}  # tokens x blocks x cycles: no halting threshold
    sampled = ["--temperature", "2", "--top-k", "20", "--seed", "5", "--max-new-tokens", "10"]
    line = _generate_cli(checkpoint, ["4 plus"], capsys, sampled)[0]
    for _ in range(2):  # the same seed gives hrm-mega generate's draws, every time
        r = client.completions.create(model="model", prompt="4 plus", max_tokens=10, temperature=2, seed=5,
                                      extra_body={"top_k": 20})  # fmt: skip
        assert sp.decode([sp.bos_id(), *sp.encode("4 plus")]) + r.choices[0].text == line
    full = client.completions.create(model="model", prompt="4 plus", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text  # fmt: skip
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    for stream in (False, True):
        r = client.completions.create(model="model", prompt="4 plus", max_tokens=12, temperature=0, stop=[stop],
                                      stream=stream, extra_body={"ignore_eos": True})  # fmt: skip
        chunks = list(r) if stream else [r]
        assert "".join(c.choices[0].text for c in chunks) == full[: full.index(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_models_and_health(server: Server) -> None:
    assert [m.id for m in server.client().models.list().data] == ["model"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert httpx.get(f"{server.url}/v1/models/model").json()["max_model_len"] == CONTEXT


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": "other", "prompt": "1"}, 404, "the model 'other' does not exist"),
        ({"model": "model", "prompt": "1", "max_tokens": -3}, 400, r"max_tokens=-3 must be >= 1"),
        (
            {"model": "model", "prompt": "1 " * 300},
            400,
            r"this model's context is 256 tokens, but the request",
        ),
        (
            {"model": "model", "prompt": "1", "max_tokens": "x"},
            400,
            "max_tokens: Input should be a valid integer",
        ),
        ({"model": "model", "prompt": "1", "n": 2}, 400, "n=2: this server returns one choice per prompt"),
        ({"model": "model", "prompt": "1", "max_cycles": 0}, 400, r"max_cycles=0 must be in \[1, 8\]"),
        ({"model": "model", "prompt": [[1, 999]]}, 400, r"token ids outside the vocabulary \[0, 60\)"),
        ({"prompt": "1"}, 400, "model: Field required"),
        (
            {"model": "model", "messages": [{"role": "assistant", "content": "hi"}]},
            400,
            "roles must alternate",
        ),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server: Server, body, status, message) -> None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(f"{server.url}{path}", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert re.search(message, error["message"]) and "\n" not in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    ok = server.client().completions.create(model="model", prompt="1", max_tokens=1, temperature=0)
    assert ok.usage.completion_tokens == 1


def test_malformed_json_and_the_client_error_classes(server: Server) -> None:
    r = httpx.post(f"{server.url}/v1/completions", content=b'{"model": "model", "prompt": ',
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the body is not valid JSON")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client().completions.create(model="nope", prompt="1")
    with pytest.raises(openai.BadRequestError, match="context is 256 tokens"):
        server.client().chat.completions.create(
            model="model", messages=[{"role": "user", "content": "1 " * 300}]
        )


def test_concurrent_streams_equal_each_request_alone(server: Server) -> None:
    """A smaller bench/serve_load.py: 16 streaming requests at once, of mixed prompt and output lengths,
    half greedy and half sampled with their own seeds, some with their own halting; each equals its run
    alone (one request at a time through the same server)."""
    client = server.client()
    jobs = []
    for i in range(16):
        extra = {"return_token_ids": True, "ignore_eos": i % 3 == 0}
        if i % 4 == 1:
            extra.update(max_cycles=3, halt_threshold=0.5)
        sampling = {"temperature": 0} if i % 2 == 0 else {"temperature": 1.3, "seed": 100 + i, "top_p": 0.95}
        prompt = " ".join(str((7 * i + k) % 50) for k in range(1 + i % 5)) + " plus"
        jobs.append(
            dict(model="model", prompt=prompt, max_tokens=2 + (5 * i) % 11, extra_body=extra, **sampling)
        )

    def run(job: dict) -> tuple[list[int], str, int]:
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **job))
        tokens = [t for c in chunks if c.choices for t in c.choices[0].token_ids]
        return tokens, "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage.cycles

    alone = [run(job) for job in jobs]
    peak = server.engine.counters["peak_rows"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    assert together == alone
    assert server.engine.counters["peak_rows"] >= 8 > peak  # they did share the batch
    assert all(len(t) >= 1 for t, _, _ in together)


def test_a_client_that_disconnects_frees_its_row(server: Server) -> None:
    body = {"model": "model", "prompt": "5 plus", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    before = server.engine.stats()
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        wait_until(lambda: server.engine.stats()["running"] == 1)
    wait_until(lambda: server.engine.stats()["running"] == 0)
    after = server.engine.stats()
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["tokens"] - before["tokens"] < 150  # the row left long before its 200 tokens
    with pytest.raises(httpx.ReadTimeout):  # not streamed: the server notices the closed connection too
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.0)
    wait_until(lambda: server.engine.stats()["cancelled"] == before["cancelled"] + 2)
    assert server.engine.stats()["running"] == 0


# --------------------------------------------------------------------------------------------------
# API key, body limit, binding
# --------------------------------------------------------------------------------------------------


def test_without_the_key_everything_but_health_is_401(keyed: Server) -> None:
    headers = {"authorization": "Bearer wrong-key-000"}
    requests = keyed.engine.stats()["requests"]
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("GET", "/v1/stats"), ("GET", "/v1/models/model"), ("GET", "/nope")]:  # fmt: skip
        for h in ({}, headers):
            r = httpx.request(method, f"{keyed.url}{path}", headers=h, json={"model": "model", "prompt": "1"})
            assert r.status_code == 401, (path, h)
            assert r.json()["error"]["code"] == "invalid_api_key" and "choices" not in r.json()
    assert keyed.engine.stats()["requests"] == requests  # nothing reached the engine
    assert httpx.get(f"{keyed.url}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        keyed.client("wrong-key-000").completions.create(model="model", prompt="1", max_tokens=1)
    ok = keyed.client(KEY).completions.create(model="model", prompt="1", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens >= 1


def test_a_body_over_the_limit_gets_413(keyed: Server) -> None:
    headers = {"authorization": f"Bearer {KEY}"}
    requests = keyed.engine.stats()["requests"]
    big = {"model": "model", "prompt": "1 " * 3000}
    r = httpx.post(f"{keyed.url}/v1/completions", json=big, headers=headers)
    assert r.status_code == 413 and "over the limit of 4096 bytes" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit applies to the bytes as they arrive
        yield json.dumps(big).encode()

    r = httpx.post(f"{keyed.url}/v1/completions", content=chunked(), headers=headers)
    assert r.status_code == 413
    assert keyed.engine.stats()["requests"] == requests


def test_binding_beyond_loopback_needs_a_key(checkpoint: Path, capsys, monkeypatch) -> None:
    from hrm_mega.entry.serve import is_loopback, main

    monkeypatch.delenv("HRM_MEGA_API_KEY", raising=False)
    assert main([str(checkpoint), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hrm-mega serve: error: --host 0.0.0.0 is not a loopback")
    assert "needs an API key (--api-key or $HRM_MEGA_API_KEY)" in err
    assert main([str(checkpoint), "--host", "0.0.0.0", "--api-key", "short"]) == 2
    assert "shorter than 8 characters" in capsys.readouterr().err
    assert [is_loopback(h) for h in ("127.0.0.1", "127.3.0.1", "::1", "localhost", "0.0.0.0", "10.0.0.1",
                                     "example.org")] == [True] * 4 + [False] * 3  # fmt: skip


def test_an_int8_kv_cache_is_a_flag_of_the_paged_cache(checkpoint: Path, model, sp, capsys) -> None:
    """--kv-cache paged --kv-dtype int8 serves generate's tokens with an int8 pool; without the paged
    cache the flag is one line."""
    from hrm_mega.entry.serve import main

    assert main([str(checkpoint), "--kv-dtype", "int8"]) == 2
    assert capsys.readouterr().err == "hrm-mega serve: error: --kv-dtype int8 needs --kv-cache paged\n"
    s = Server([str(checkpoint), "--device", "cpu", "--kv-cache", "paged", "--kv-dtype", "int8"])
    try:
        assert s.engine.cache.pool.kv_dtype == "int8"
        r = s.client().completions.create(model="model", prompt="12 plus 7 is", max_tokens=8, temperature=0,
                                          extra_body={"return_token_ids": True})  # fmt: skip
    finally:
        s.close()
    prompt = [sp.bos_id(), *sp.encode("12 plus 7 is")]
    g = generate(model, torch.tensor([prompt]), max_new_tokens=8, greedy=True, eos_id=sp.eos_id(),
                 vocab_limit=sp.get_piece_size(), kv_pool=pool_for(model, kv_dtype="int8"))  # fmt: skip
    tokens = r.choices[0].token_ids
    assert len(tokens) >= 1 and tokens == g.tokens[0, : len(tokens)].tolist()


# --------------------------------------------------------------------------------------------------
# Versioned artifacts and hot swap
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def candidates(checkpoint: Path, tmp_path_factory) -> dict[str, Path]:
    """Swap candidates: another model (passes the default canary), one with a NaN weight (fails it), one
    whose weights say a newer format version, and a directory that is no model directory."""
    from safetensors.torch import load_file, save_file

    from hrm_mega.checkpoint.integrity import write_checksums

    root = tmp_path_factory.mktemp("candidates")
    config = Config(model=recurrent_model(seed=14, max_position=CONTEXT).config)
    good = save_model_dir(recurrent_model(seed=15, max_position=CONTEXT).state_dict(), config, root / "good")
    state = recurrent_model(seed=16, max_position=CONTEXT).state_dict()
    state["blocks.0.H.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    nan = save_model_dir(state, config, root / "nan")
    newer = save_model_dir(
        recurrent_model(seed=15, max_position=CONTEXT).state_dict(), config, root / "newer"
    )
    weights = newer / "model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "hrm-mega/model/99"})
    write_checksums(newer)
    (root / "step-00000010" / "client").mkdir(parents=True)
    return {"good": good, "nan": nan, "newer": newer, "training": root / "step-00000010"}


def test_a_newer_format_version_is_refused_with_one_line(candidates: dict[str, Path]) -> None:
    from hrm_mega.checkpoint.model_dir import CheckpointError

    with pytest.raises(CheckpointError, match=r"format version 99 is newer than this hrm-mega reads \(1\)"):
        load_model(candidates["newer"])


@pytest.mark.slow
def test_hot_swap_under_load_drops_nothing_and_a_failing_canary_is_refused(
    checkpoint: Path, candidates: dict[str, Path], sp
) -> None:
    """12 streams run while a swap to another model is asked for: every stream completes on the model it
    started with, requests that arrive during the swap wait and get the new model; a candidate with a NaN weight fails the canary, a
    newer format and a training checkpoint are refused (409, one line), and the new model keeps
    serving; a rollback brings the first model back; without the key nothing happens (401)."""
    old_model = load_model(checkpoint)[0].eval()
    new_model = load_model(candidates["good"])[0].eval()
    s = Server([str(checkpoint), "--device", "cpu", "--api-key", KEY, "--max-batch", "16", "--kv-cache", "paged",
                "--kv-block-size", "8", "--kv-resident-blocks", "400"])  # fmt: skip
    client = s.client(KEY)
    auth = {"Authorization": f"Bearer {KEY}"}

    def job(i: int) -> dict:
        prompt = " ".join(str((3 * i + k) % 40) for k in range(1 + i % 4)) + " plus"
        return dict(model="model", prompt=prompt, max_tokens=8 + i % 4, temperature=0,
                    extra_body={"return_token_ids": True, "ignore_eos": True})  # fmt: skip

    def run(i: int) -> tuple[list[int], str | None]:
        chunks = list(client.completions.create(stream=True, **job(i)))
        return [t for c in chunks if c.choices for t in c.choices[0].token_ids], chunks[-1].choices[
            0
        ].finish_reason

    def alone(model, i: int) -> list[int]:
        prompt = torch.tensor([[sp.bos_id(), *sp.encode(job(i)["prompt"])]])
        g = generate(
            model, prompt, max_new_tokens=job(i)["max_tokens"], greedy=True, vocab_limit=sp.get_piece_size()
        )
        return g.tokens[0].tolist()

    def swap(path: Path) -> httpx.Response:
        return httpx.post(f"{s.url}/admin/swap", json={"model": str(path)}, headers=auth, timeout=120)

    try:
        with ThreadPoolExecutor(16) as pool:
            before = [pool.submit(run, i) for i in range(12)]
            wait_until(lambda: s.engine.stats()["running"] == 12)
            swapped = pool.submit(swap, candidates["good"])
            wait_until(lambda: s.engine._swap is not None or swapped.done())
            during = [pool.submit(run, i) for i in range(12, 15)]  # queued until the swap is done
            response = swapped.result()
            results = [f.result() for f in before + during]
        assert response.status_code == 200, response.text
        assert response.json()["model"] == str(candidates["good"]) and response.json()["canary"]["passed"]
        assert all(reason == "length" for _, reason in results)  # nothing dropped
        for i, (tokens, _) in enumerate(results):
            assert tokens == alone(old_model if i < 12 else new_model, i), i
        assert s.engine.stats()["swaps"] == 1

        for name, message in (("nan", "failed the canary (prompt 0: non-finite logits)"),
                              ("newer", "format version 99 is newer than this hrm-mega reads"),
                              ("training", "not an hrm-mega model directory")):  # fmt: skip
            refused = swap(candidates[name])
            assert refused.status_code == 409 and message in refused.json()["error"]["message"], refused.text
            assert "\n" not in refused.json()["error"]["message"]
        assert run(0)[0] == alone(new_model, 0)  # the new model still serves
        assert httpx.post(f"{s.url}/admin/swap", json={"model": str(checkpoint)}).status_code == 401
        back = httpx.post(f"{s.url}/admin/rollback", headers=auth, timeout=120)
        assert back.status_code == 200 and back.json()["model"] == str(checkpoint)
        assert run(1)[0] == alone(old_model, 1)
    finally:
        s.close()


# --------------------------------------------------------------------------------------------------
# Images in chat
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_chat_with_an_image_equals_generate_with_it(
    tiny_image_text: Path, tmp_path: Path, server: Server
) -> None:
    """An image_url part (a data: URI) is placed and preprocessed as `hrm-mega generate --image` does: the
    answer's tokens are generate's with the same picture. URLs, bad base64 and image parts to a text-only
    model are 400s."""
    import base64

    import sentencepiece as spm
    from conftest import TINY_VISION
    from test_lm_training import TINY_LM

    from hrm_mega.config import load_config
    from hrm_mega.entry.generate import image_prompts
    from hrm_mega.models import build_model

    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "configs/lm/hrmgemma_tiny.yaml",
                         [*TINY_LM, *TINY_VISION, f"data.path={tiny_image_text / 'images'}", "model.max_position=256"])  # fmt: skip
    model = build_model(config.model).init_weights(0).eval()
    tokenizer_file = tiny_image_text / "images/tokenizer.model"
    directory = save_model_dir(
        model.state_dict(), config, tmp_path / "vlm", {"tokenizer.model": tokenizer_file}
    )
    picture = next((tiny_image_text / "grids").rglob("*.png"))
    uri = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    s = Server([str(directory), "--device", "cpu", "--kv-cache", "paged", "--kv-block-size", "4"])
    try:
        content = [{"type": "text", "text": "read "}, {"type": "image_url", "image_url": {"url": uri}}]
        r = s.client().chat.completions.create(model="vlm", messages=[{"role": "user", "content": content}],
                                               max_tokens=6, temperature=0, extra_body={"return_token_ids": True})  # fmt: skip
        tok = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
        text = gemma_chat_prompt([("user", "read <start_of_image>")])
        prompts, pixels = image_prompts([text], [str(picture)], tok, config, [tok.bos_id()])
        assert r.usage.prompt_tokens == len(prompts[0]) and config.model.vision.image_token_id in prompts[0]
        g = generate(model, torch.tensor(prompts), max_new_tokens=6, greedy=True, pixel_values=pixels,
                     vocab_limit=tok.get_piece_size())  # fmt: skip
        tokens = r.choices[0].token_ids
        assert len(tokens) >= 1 and tokens == g.tokens[0, : len(tokens)].tolist()
        for url, message in (("https://example.com/a.png", "must be a data: URI"),
                             ("data:image/png;base64,@@@", "base64 data is malformed")):  # fmt: skip
            bad = [{"type": "image_url", "image_url": {"url": url}}]
            with pytest.raises(openai.BadRequestError, match=message):
                s.client().chat.completions.create(model="vlm", messages=[{"role": "user", "content": bad}])
    finally:
        s.close()
    with pytest.raises(openai.BadRequestError, match="this server takes text only"):
        server.client().chat.completions.create(
            model="model", messages=[{"role": "user", "content": content}]
        )
