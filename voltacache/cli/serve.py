"""`voltacache deploy | serve | ui`: a Triton model repository, its server, and a page over it (voltacache.serving)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ..cache.layers import CacheSettings
from ..errors import BadConfiguration
from ..pipeline.lora import RESIDENT_VARIANTS
from .app import CACHE_BANDS, CACHE_THRESHOLD, app, err, fail, user_errors


@app.command()
@user_errors
def deploy(
    engines: Path = typer.Option(..., help="Folder written by `voltacache build`."),
    repo: Path = typer.Option(
        ...,
        help="Model repository to write: a new or empty folder, or one deploy wrote before, which is generated "
        "output and is replaced whole once the new one is complete (no --force needed). Any other folder is "
        "refused, as is one that is, holds or lies inside --engines.",
    ),
    component_backend: str = typer.Option(
        "python",
        help="python (the engines' own runner in a Python model: the CPU server), onnxruntime (NGC) or tensorrt.",
    ),
    step_batching: bool = typer.Option(
        True,
        help="One denoiser batches the U-Net steps of every request in flight (requests join and leave at step "
        "boundaries). --no-step-batching: --denoiser-instances denoisers, one request each.",
    ),
    denoiser_instances: int | None = typer.Option(
        None, help="With --no-step-batching: denoiser instances, requests denoised in parallel (default 2)."
    ),
    cache: str = typer.Option("off", help="Cross-request cache index: off, a milvus-lite file, or a Milvus URL."),
    cache_embedder: str = typer.Option("clip", help="clip (the pipeline's pooled output) or minilm."),
    blob_store: str | None = typer.Option(None, help="Blob folder or s3://bucket/prefix (needed with a Milvus URL)."),
    cache_ttl: float = typer.Option(CacheSettings.ttl_s, help="Seconds an entry may be served."),
    cache_policy: str = typer.Option(CacheSettings.policy, help="Eviction: lcbfu, fifo, lifo, lru, lfu or random."),
    cache_max_entries: int | None = typer.Option(None, help="Capacity in entries."),
    cache_max_bytes: int | None = typer.Option(None, help="Capacity in bytes."),
    cache_threshold: float = CACHE_THRESHOLD,
    cache_bands: str = CACHE_BANDS,
    lora: list[str] = typer.Option(
        [], help="NAME=FILE: register a LoRA (.safetensors) that requests may name, with a scale. Repeatable."
    ),
    lora_resident: int | None = typer.Option(
        None, help=f"LoRA variants each engine keeps loaded (1-16; default {RESIDENT_VARIANTS})."
    ),
    drop_lora: list[str] = typer.Option(
        [], help="NAME: unregister a LoRA the repository registered before (they are kept otherwise). Repeatable."
    ),
):
    """Write a Triton model repository with the txt2img / img2img ensembles."""
    from ..pipeline.lora import registrations
    from ..serving.deploy import deploy as write_repository

    registered = registrations(lora)

    try:
        settings = CacheSettings(
            None if cache == "off" else cache,
            cache_embedder,
            blob_store,
            cache_ttl,
            cache_policy,
            cache_max_entries,
            cache_max_bytes,
            cache_threshold,
            cache_bands,
        )
    except BadConfiguration as e:  # deploy names the index option --cache
        raise BadConfiguration(str(e).replace("--cache-index ", "--cache ", 1)) from None
    print(
        write_repository(
            engines,
            repo,
            component_backend,
            denoiser_instances,
            settings,
            step_batching,
            registered,
            lora_resident,
            tuple(drop_lora),
        )
    )


@app.command()
@user_errors
def serve(
    repo: Path = typer.Option(..., help="Triton model repository written by `voltacache deploy`."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 exposes the server to the network)."),
    http_port: int = typer.Option(8000),
    grpc_port: int = typer.Option(8001),
    metrics_port: int = typer.Option(8002),
    cache_mb: int = typer.Option(256, help="Triton response cache size in MiB (exact duplicate requests)."),
    log_file: Path | None = typer.Option(
        None, help="Write tritonserver's log here (default: a temporary file, kept only if it fails)."
    ),
):
    """Start tritonserver on a model repository; stops cleanly on Ctrl-C or SIGTERM."""
    from ..serving.server import StartInterrupted, TritonServer, serve_until_signalled

    def ready(server):
        err.print(
            f"tritonserver ready: http {server.http_url}  grpc {server.grpc_url}  metrics {server.metrics_url}",
            soft_wrap=True,
        )
        for line in server.warnings():
            err.print(escape(line), style="yellow", soft_wrap=True)

    server = TritonServer(repo, host, http_port, grpc_port, metrics_port, cache_mb * 1024 * 1024, log_file)
    try:
        serve_until_signalled(server, ready)
    except StartInterrupted as e:
        name, code = e.signal.name, 128 + e.signal.value
        raise fail(f"interrupted by {name} while tritonserver was starting; stopped it", code) from None
    err.print("tritonserver stopped")


@app.command("ui")
@user_errors
def ui(
    url: str = typer.Option(..., help="HOST:PORT of a voltacache Triton server (gRPC, or HTTP with --protocol)."),
    protocol: str = typer.Option("grpc", help="grpc or http."),
    host: str = typer.Option("127.0.0.1", help="Address the page listens on (0.0.0.0: every interface)."),
    port: int = typer.Option(7860, help="Port the page listens on."),
):
    """A web page over a served deployment: recommendations as you type, the stored images nearest
    your prompt, and Generate through the ensemble, with the cache layer that answered."""
    from ..serving.client import Client
    from ..serving.server import check_port
    from ..ui.app import serve_page

    check_port("--port", host, port)  # before anything: a port that cannot be bound is the command line's
    client = Client(url, protocol)
    client.image_shape()  # a server that does not answer: one line now, not on the first click
    err.print(f"voltacache ui on http://{host}:{port} (Ctrl-C stops it)", soft_wrap=True)
    serve_page(client, host, port)
