"""`voltacache generate`: the same requests in process or through Triton, the same records out.

A batch (`--prompts FILE`) keeps its work: each image is written (to a temporary sibling, then
renamed) as soon as it is done and its record yielded at once; a failed line is reported and the
others go on; on Ctrl-C what is finished stays on disk. Prompt i of the file (counting from 0) gets
seed + i, in process and served alike.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidRequest, OutputExists, ServerFailed, UsageError, VoltacacheError
from .outputs import check_writable
from .request import Request
from .result import Result


@dataclass
class Prompt:
    """One line of a prompts file (or the one prompt of the command line)."""

    line: int  # 1-based line in the file; 0 for a prompt given on the command line
    text: str


@dataclass
class Failure:
    prompt: Prompt
    message: str
    error: Exception | None = None

    def __str__(self) -> str:
        where = f"line {self.prompt.line}" if self.prompt.line else "the prompt"
        return f"{where} ({self.prompt.text[:40]!r}): {self.message}"


def read_prompts(path: Path) -> list[Prompt]:
    """Non-empty lines of a UTF-8 text file, with their line numbers."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--prompts {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--prompts {path}: is a folder; give a text file with one prompt per line") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--prompts {path}: not UTF-8 text (byte {e.start}); give one prompt per line") from None
    return [Prompt(i + 1, line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]


def requests_for(prompts: list[Prompt], template: Request) -> list[Request]:
    """One request per prompt; prompt i gets the template's seed + i (a random seed when it has none)."""
    seed = template.seed
    return [template.replace(prompt=p.text, seed=None if seed is None else seed + i) for i, p in enumerate(prompts)]


def output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i + 1}{output.suffix}") for i in range(count)]


def check_outputs(paths: list[Path], force: bool) -> None:
    """Refuse before any compute: a folder, an unknown image format, a place that cannot be written, or a
    file that exists (without --force)."""
    from PIL import Image

    first = paths[0]
    if first.is_dir():
        raise UsageError(f"-o {first}: is a folder; name an image file, such as {first / 'out.png'}")
    if first.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"-o {first}: {first.suffix or 'no extension'} is not an image format; use .png or .jpg")
    check_writable(first, "-o")
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OutputExists(f"-o {existing[0]}: exists{more}; pass --force to replace, or name another file")


def save(image, path: Path) -> None:
    """Write beside the target, then rename: a half-written image never takes the name."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def record(path: Path, request: Request, result: Result, **extra) -> dict:
    """The JSON record of one image, the same in process and served: what was asked, then the result."""
    asked = dict(
        prompt=request.prompt,
        steps=request.steps,
        scheduler=request.scheduler,
        guidance=request.guidance,
        cache_interval=request.cache_interval,
        cache_schedule=request.cache_schedule,
    )
    loras = {"loras": [list(pair) for pair in request.loras]} if request.loras else {}
    return {"path": str(path), **asked, **result.record(), **loras, **extra}


class Batch:
    """The images of a list of prompts: where each goes, and what failed."""

    def __init__(self, prompts: list[Prompt], template: Request, output: Path, per_request: int, force: bool):
        self.prompts, self.requests = prompts, requests_for(prompts, template)
        self.paths = output_paths(output, len(prompts) * per_request)
        self.per_request = per_request
        self.failures: list[Failure] = []
        self.written = 0
        check_outputs(self.paths, force)

    def finish(self, index: int, images, result, **extra):
        """Write request `index`'s images; yields their records."""
        targets = self.paths[index * self.per_request : (index + 1) * self.per_request]
        for image, path in zip(images, targets):
            save(image, path)
            self.written += 1
            yield record(path, self.requests[index], result, **extra)

    def fail(self, index: int, error: Exception) -> None:
        self.failures.append(Failure(self.prompts[index], str(error), error))


def check_in_process(engines: Path, template: Request, loras: dict | None = None):
    """What the engines can do, read from their manifest, against the request's options (and the LoRA
    files against their weights): a mistake is refused before any engine loads. Returns the Capabilities."""
    from .pipeline.capabilities import Capabilities

    capabilities = Capabilities.of_engines(engines, loras)
    capabilities.check(template)
    for name in loras or {}:
        capabilities.loras.components(name)
    return capabilities


def generate_in_process(engines: Path, batch: Batch, cache_settings=None, loras: dict | None = None):
    """Yield records as images are written, one request at a time. `loras`: {name: LoraFile} the
    requests name, each checked against the engines before the first image."""
    from .cache.layers import CacheSettings, open_cache

    capabilities = check_in_process(engines, batch.requests[0], loras)  # before torch and the engines load

    from .pipeline.stable_diffusion import StableDiffusion

    pipe = StableDiffusion.from_engines(engines, loras=capabilities.loras)
    if pipe.batch != batch.per_request:
        raise VoltacacheError(f"--engines {engines}: engines of batch {pipe.batch}, expected {batch.per_request}")
    # a cache that cannot be opened is reported once; the images come all the same
    cache = open_cache(cache_settings or CacheSettings(), pipe.export.fingerprint, pipe.export.geometry.pooled_dim)
    for index, request in enumerate(batch.requests):
        try:
            result = pipe(request, cache=cache)
        except InvalidRequest as e:
            if len(batch.requests) == 1:  # one prompt: its mistake is the command's
                raise
            batch.fail(index, e)
            continue
        stats = result.stats
        components = {k: round(v, 4) for k, v in stats.seconds.items()}
        extra = {"lora_switch_seconds": round(pipe.loras.last_switch_seconds, 4)} if request.loras else {}
        yield from batch.finish(index, result.images, result.report(), component_seconds=components, **extra)


def generate_served(url: str, protocol: str, batch: Batch, concurrency: int):
    """Yield records as responses arrive, `concurrency` requests in flight. The workers are daemon
    threads: on Ctrl-C the caller stops reading, the server is told to drop what is in flight (its
    slots freed), and the process ends without waiting for them."""
    from .serving.client import Client

    Client(url, protocol)  # a malformed URL or protocol fails here, once, not in every worker
    todo, done = queue.Queue(), queue.Queue()
    for item in enumerate(batch.requests):
        todo.put(item)
    clients = []

    def work():
        client = Client(url, protocol)  # one channel per thread
        clients.append(client)
        while True:
            try:
                index, request = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((index, client.generate(request), None))
            except VoltacacheError as e:
                done.put((index, None, e))

    for _ in range(max(1, min(concurrency, len(batch.requests)))):
        threading.Thread(target=work, daemon=True).start()
    finished = False
    try:
        for _ in batch.requests:
            index, served, error = done.get()
            if error is not None:
                batch.fail(index, error)
                if isinstance(error, ServerFailed):  # the server is gone: the rest would fail alike
                    raise error
                continue
            yield from batch.finish(index, served.images, served)
        finished = True
    finally:
        if not finished:  # Ctrl-C, or the caller stopped reading: free the server's slots
            todo.queue.clear()
            for client in list(clients):
                client.cancel(timeout_s=2)
