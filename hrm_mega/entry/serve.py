"""Serving entry point: `python -m hrm_mega.entry.serve CKPT [--host H] [--port P] ...` (`hrm-mega serve`).

Loads an HRMGemma and its SentencePiece tokenizer exactly as `hrm-mega generate` does (a training
checkpoint, a model directory or a consolidated .safetensors; --tokenizer, else the checkpoint's own,
else DATA/tokenizer.model of its config's data.path) and serves it over an OpenAI-compatible HTTP API
with continuous batching (hrm_mega/inference/serve; docs/serving.md).

It binds 127.0.0.1 by default. Any other address needs an API key (--api-key, or the HRM_MEGA_API_KEY
environment variable, which keeps it out of the process list); with a key set, every endpoint but
/health wants `Authorization: Bearer KEY`, and the admin endpoints (hot swap behind a canary,
rollback) are open. Once listening it prints one line, `hrm-mega serve: listening
on http://HOST:PORT (model NAME)`, so that a script that passed --port 0 learns the port.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Any

from hrm_mega.data.shards import TOKENIZER_FILE
from hrm_mega.entry.common import add_device_arg, resolve_device, run_main

API_KEY_ENV = "HRM_MEGA_API_KEY"
DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hrm-mega serve", description="serve an HRMGemma over an OpenAI-compatible HTTP API"
    )
    p.add_argument("checkpoint", help="training checkpoint dir, consolidated .safetensors, or model dir")
    p.add_argument(
        "--tokenizer",
        help=f"SentencePiece model (default: the checkpoint's own, else DATA/{TOKENIZER_FILE} of its data.path)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; the startup line names it)")
    p.add_argument(
        "--api-key", default=None,
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}); needed to bind beyond loopback",
    )  # fmt: skip
    p.add_argument("--served-model-name", help="the model's id in the API (default: the checkpoint's name)")
    p.add_argument("--max-batch", type=int, default=32, help="rows decoded together at most (default 32)")
    p.add_argument(
        "--max-waiting", type=int, default=256, help="requests queued beyond a full batch; more get 429"
    )
    p.add_argument(
        "--prefill-budget", type=int, default=4096,
        help="prompt tokens prefilled between two decode steps (at least one prompt; default 4096)",
    )  # fmt: skip
    p.add_argument(
        "--max-context", type=int,
        help="prompt + max_tokens at most (default: the model's model.max_position)",
    )  # fmt: skip
    p.add_argument(
        "--max-cycles-limit", type=int,
        help="largest per-request max_cycles (default: max(4 x model.h_cycles, 8))",
    )  # fmt: skip
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (413 past it)")
    p.add_argument(
        "--max-connections", type=int, default=512,
        help="open HTTP connections at most; uvicorn answers 503 past it (default 512)",
    )  # fmt: skip
    p.add_argument(
        "--chat-template",
        help="a Hugging Face style Jinja chat template file (default: Gemma's turn format)",
    )
    p.add_argument(
        "--chat-stop", action="append", default=None, metavar="TEXT",
        help="stop string of every chat request (repeatable; default <end_of_turn> with Gemma's format)",
    )  # fmt: skip
    p.add_argument("--no-bos", action="store_true", help="do not start prompts with the tokenizer's BOS")
    p.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="weights and activations (default fp32)"
    )
    p.add_argument(
        "--kv-cache", choices=("paged", "rectangular"), default="rectangular",
        help="rectangular: one tensor per (layer, cycle step) (default: fastest on CPU); paged: fixed-size "
        "blocks in a pool, with offload (--kv-resident-blocks)",
    )  # fmt: skip
    p.add_argument("--kv-block-size", type=int, default=16, help="positions per KV block (default 16)")
    p.add_argument(
        "--kv-resident-blocks", type=int,
        help="KV blocks kept on the model's device at most; the others go to host memory (a memory-mapped "
        "file on CPU) and come back when needed (default: no limit)",
    )  # fmt: skip
    p.add_argument("--kv-offload-dir", help="folder for the CPU offload files (default: the temp dir)")
    p.add_argument(
        "--kv-dtype", choices=("model", "int8"), default="model",
        help="how the paged cache stores keys/values: model (the model's dtype, default) or int8 (a scale "
        "per token and head: about 0.28x the fp32 bytes at head_dim 32, 0.25x at 256); needs --kv-cache paged",
    )  # fmt: skip
    p.add_argument(
        "--canary", metavar="JSONL",
        help='prompts a swap candidate must pass ({"prompt": TEXT, "expected": TEXT} per line; default: '
        "built-in prompts, checked for finite, non-degenerate output)",
    )  # fmt: skip
    p.add_argument(
        "--canary-min-agreement", type=float, default=0.9,
        help="share of the canary's expected tokens a candidate must reproduce (default 0.9)",
    )  # fmt: skip
    p.add_argument("--canary-max-tokens", type=int, default=16, help="tokens generated per canary prompt")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")
    add_device_arg(p)
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else $HRM_MEGA_API_KEY; refuses to bind beyond loopback without one."""
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if key is not None and len(key) < 8:
        raise ValueError("the API key is shorter than 8 characters; use a long random one")
    if key is None and not is_loopback(args.host):
        raise ValueError(
            f"--host {args.host} is not a loopback address: serving beyond this machine needs an API key "
            f"(--api-key or ${API_KEY_ENV})"
        )
    return key


def build(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Model, tokenizer, engine and app from the arguments: (app, engine, settings)."""
    import torch

    from hrm_mega.checkpoint.consolidate import load_model
    from hrm_mega.entry.generate import image_prompts, load_tokenizer

    try:
        from hrm_mega.inference.serve.api import ServeSettings, build_app
    except ImportError as e:
        raise ValueError(f"serving needs fastapi and uvicorn ({e}): pip install 'hrm-mega[serve]'") from None
    from hrm_mega.inference.serve.cache import PagedCache
    from hrm_mega.inference.serve.engine import Engine
    from hrm_mega.inference.serve.hotswap import HotSwap, load_canary
    from hrm_mega.inference.serve.text import GEMMA_STOP, gemma_chat_prompt, jinja_chat_prompt
    from hrm_mega.models.lm import HRMGemma
    from hrm_mega.models.paged_kv_cache import pool_for

    key = api_key(args)
    for name in ("max_batch", "prefill_budget", "max_body_bytes", "max_connections"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.max_waiting < 0:
        raise ValueError(f"--max-waiting {args.max_waiting} must be >= 0")
    chat_prompt = gemma_chat_prompt if args.chat_template is None else jinja_chat_prompt(args.chat_template)
    device = resolve_device(args.device)
    model, config = load_model(args.checkpoint)
    if not isinstance(model, HRMGemma):
        raise ValueError(
            f"{args.checkpoint}: a model.family={config.model.family} model; serving needs hrm_gemma"
        )
    tokenizer = load_tokenizer(args.tokenizer, args.checkpoint, config)
    if tokenizer.get_piece_size() > config.model.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.get_piece_size()} pieces but the model's "
            f"model.vocab_size={config.model.vocab_size}; is it the model's tokenizer?"
        )
    for name in ("max_context", "max_cycles_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.kv_block_size < 1 or (args.kv_resident_blocks is not None and args.kv_resident_blocks < 1):
        raise ValueError("--kv-block-size and --kv-resident-blocks must be >= 1")
    model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    if args.kv_cache != "paged" and (args.kv_resident_blocks is not None or args.kv_offload_dir is not None):
        raise ValueError("--kv-resident-blocks and --kv-offload-dir need --kv-cache paged")
    if args.kv_cache != "paged" and args.kv_dtype != "model":
        raise ValueError(f"--kv-dtype {args.kv_dtype} needs --kv-cache paged")
    cache = None
    if args.kv_cache == "paged":
        pool = pool_for(model, block_size=args.kv_block_size, resident_blocks=args.kv_resident_blocks,
                        offload_dir=args.kv_offload_dir, kv_dtype=args.kv_dtype)  # fmt: skip
        cache = PagedCache(model, pool)
    engine = Engine(
        model, eos_id=tokenizer.eos_id() if tokenizer.eos_id() >= 0 else None,
        vocab_limit=tokenizer.get_piece_size(), decode=tokenizer.decode, max_batch=args.max_batch,
        max_waiting=args.max_waiting, prefill_budget=args.prefill_budget, max_context=args.max_context,
        max_cycles_limit=args.max_cycles_limit, cache=cache,
    )  # fmt: skip
    bos_id = None if args.no_bos or tokenizer.bos_id() < 0 else tokenizer.bos_id()
    canary = load_canary(args.canary, tokenizer.encode, bos_id, max_tokens=args.canary_max_tokens,
                         min_agreement=args.canary_min_agreement)  # fmt: skip
    hot_swap = HotSwap(engine, canary, current=str(args.checkpoint), dtype=getattr(torch, args.dtype))
    image_prompt = None
    if config.model.vision is not None:  # chat image parts: placed and preprocessed as generate --image does
        bos = [] if bos_id is None else [bos_id]

        def image_prompt(text: str, images: list[bytes]) -> tuple[list[int], Any]:
            prompts, pixels = image_prompts([text], images, tokenizer, config, bos)
            return prompts[0], pixels

    default_stop = (GEMMA_STOP,) if args.chat_template is None else ()
    settings = ServeSettings(
        model_name=args.served_model_name or model_name(args.checkpoint), encode=tokenizer.encode,
        bos_id=bos_id, api_key=key, max_body_bytes=args.max_body_bytes, chat_prompt=chat_prompt,
        chat_stop=tuple(args.chat_stop) if args.chat_stop is not None else default_stop, hot_swap=hot_swap,
        image_prompt=image_prompt,
    )  # fmt: skip
    return build_app(engine, settings), engine, settings


def model_name(checkpoint: str) -> str:
    path = Path(checkpoint).resolve()
    return path.stem if path.suffix == ".safetensors" else path.name


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host.strip("[]"), port), family=family)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def run(args: argparse.Namespace) -> int:
    import uvicorn

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} must be in [0, 65535]")
    app, _, settings = build(args)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"hrm-mega serve: listening on http://{shown}:{port} (model {settings.model_name})", flush=True)
    config = uvicorn.Config(
        app, log_level=args.log_level, limit_concurrency=args.max_connections, timeout_graceful_shutdown=5,
    )  # fmt: skip
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("serve", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
