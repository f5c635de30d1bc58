"""`sana serve`: an OpenAI-compatible HTTP image API (FastAPI on uvicorn) over one loaded model.

The model (and any LoRA or ControlNet) is chosen here, at start; nothing a request sends reaches the file
system. Once the model is loaded and the socket listens, one line goes to stdout:
`sana serve: http://HOST:PORT (model NAME)`. SIGTERM or Ctrl-C: uvicorn stops accepting connections and lets
the open ones finish, then the engine drains its queue; a second Ctrl-C exits at once. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

from sana.cli.options import add_low_memory_options, low_memory_settings
from sana.errors import UserError

API_KEY_ENV = "SANA_API_KEY"

EXAMPLE = (
    "example:\n  sana serve --model Efficient-Large-Model/Sana_600M_1024px_diffusers --device cuda --dtype bf16"
)
OUT_OF_MEMORY = (
    "try --offload model, --quantize int8, --low-memory, --dtype bf16, or a smaller --max-batch or --max-side"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder or Hub id (default: the model shipped with the package)")
    p.add_argument("--model-name", help="the model id clients see and send (default: the folder's name or Hub id)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="compute dtype")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps")
    add_low_memory_options(p, "keep the text encoder on the CPU between batches")
    p.add_argument(
        "--no-chi", action="store_true", help="do not prefix prompts with the complex human instruction"
    )
    p.add_argument("--chi-file", help="use this file's exact contents as the complex human instruction")
    p.add_argument(
        "--lora", help="LoRA weights to merge at start: a pytorch_lora_weights.safetensors or its folder"
    )
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of the LoRA (0: none, 1: as trained)")
    p.add_argument(
        "--controlnet",
        help="a Sana ControlNet folder or Hub id to steer the model with, for requests that send a control_image "
        "(a model folder with a controlnet/ brings its own)",
    )
    p.add_argument("--max-batch", type=int, default=8, help="most images in one pipeline call")
    p.add_argument("--max-queue", type=int, default=64, help="most images waiting; beyond it requests get a 429")
    p.add_argument(
        "--api-key",
        help=f"require `Authorization: Bearer KEY` on every route but /health, the page and /v1/config "
        f"(default: ${API_KEY_ENV}, else no key)",
    )
    p.add_argument("--max-side", type=int, default=4096, help="largest image side a request may ask for (pixels)")
    p.add_argument("--max-steps", type=int, default=100, help="most sampling steps a request may ask for")
    p.add_argument("--max-images", type=int, default=8, help="most images (n) in one request")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted")
    p.add_argument(
        "--max-upload-bytes",
        type=int,
        default=16 << 20,
        help="largest image edit body accepted (its image and mask files)",
    )
    p.add_argument(
        "--keep-seconds", type=float, default=3600.0, help="how long generated images stay downloadable"
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=300.0,
        help="on SIGTERM/Ctrl-C, seconds to let open requests and queued work finish",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level")
    p.add_argument("--no-access-log", action="store_true", help="no log line per request")


def check_args(args: argparse.Namespace) -> None:
    """Cheap checks, before the model loads."""
    low_memory_settings(args)
    for name in ("max_batch", "max_queue", "max_side", "max_steps", "max_images"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_side % 32:
        raise UserError(f"--max-side must be a multiple of 32, got {args.max_side}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {args.port}")
    if args.keep_seconds <= 0 or args.shutdown_timeout < 0:
        raise UserError("--keep-seconds must be > 0 and --shutdown-timeout >= 0")
    if args.max_body_bytes < 1024:
        raise UserError(f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}")
    if args.max_upload_bytes < 1024:
        raise UserError(f"--max-upload-bytes must be >= 1024, got {args.max_upload_bytes}")


def model_name(args: argparse.Namespace, model: str | Path) -> str:
    if args.model_name:
        return args.model_name
    path = Path(model)
    return path.name if path.is_dir() else str(model)


def display_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else "[::1]" if host == "::" else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def run(args: argparse.Namespace) -> int:
    check_args(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if args.lora:
        from sana.lora import lora_file

        lora_file(args.lora)  # a missing file fails before the model loads
    if args.controlnet:
        from sana.pretrained import controlnet_dir

        controlnet_dir(args.controlnet)  # a folder that is no ControlNet fails before the model loads

    import logging

    import uvicorn

    from sana.pipeline import SanaPipeline
    from sana.pretrained import choose_instruction, default_model
    from sana.server.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("sana.server.access").disabled = args.no_access_log
    from sana.server.engine import cpu_threads_for_worker

    model = args.model or default_model()
    memory = low_memory_settings(args)
    torch_threads = cpu_threads_for_worker()  # before loading: the main thread only loads, the worker computes
    pipe = SanaPipeline.from_pretrained(
        model,
        dtype=args.dtype,
        device=args.device,
        instruction=choose_instruction(args.no_chi, args.chi_file),
        controlnet=args.controlnet,
        **{**memory, "quantize": None if args.lora else memory["quantize"]},  # with a LoRA: after the merge
    )
    if args.lora:
        pipe.load_lora(args.lora, args.lora_scale)
        if memory["quantize"]:
            from sana.quantization import quantize_pipeline_transformer

            quantize_pipeline_transformer(pipe, memory["quantize"])
    name = model_name(args, model)
    app = create_app(
        pipe,
        model_name=name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        api_key=api_key,
        max_side=args.max_side,
        max_steps=args.max_steps,
        max_images=args.max_images,
        max_body_bytes=args.max_body_bytes,
        max_upload_bytes=args.max_upload_bytes,
        keep_seconds=args.keep_seconds,
        drain_timeout=args.shutdown_timeout,
        torch_threads=torch_threads,
    )

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:  # listening: say where, once
                port = args.port
                for server in self.servers:
                    for sock in server.sockets:
                        port = sock.getsockname()[1]
                        break
                print(f"sana serve: {display_url(args.host, port)} (model {name})", flush=True)

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,  # the app writes its own access log (logger sana.server.access)
        timeout_graceful_shutdown=args.shutdown_timeout,
    )
    # uvicorn re-raises the signal that stopped it once it is done; with these no-op handlers in place of the
    # defaults, a graceful stop (SIGTERM, one Ctrl-C) ends the process with status 0.
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _ignore(signum, frame) -> None:
    pass
