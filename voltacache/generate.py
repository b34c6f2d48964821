"""`voltacache generate`: the same request in process or through Triton, the same JSON record out."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .cache.layers import CacheSettings
from .errors import VoltacacheError


@dataclass
class GenerateOptions:
    """The pipeline's keyword arguments as the CLI gives them. Not pipeline.Sampling: that module
    imports torch and diffusers, which `generate --url` (a Triton client) must not need."""

    negative_prompt: str = ""
    steps: int = 50
    guidance: float = 7.5
    seed: int | None = None
    scheduler: str = "pndm"
    cache_interval: int = 1
    cache_schedule: str = "uniform"
    height: int | None = None
    width: int | None = None
    init_image: Path | None = None
    strength: float = 0.8


def output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i + 1}{output.suffix}") for i in range(count)]


def record(
    path: Path,
    prompt: str,
    options: GenerateOptions,
    seed: int,
    deep: int,
    shallow: int,
    steps: int,
    seconds: float,
    **extra,
) -> dict:
    return {
        "path": str(path),
        "prompt": prompt,
        "seed": seed,
        "steps": options.steps,
        "scheduler": options.scheduler,
        "guidance": options.guidance,
        "cache_interval": options.cache_interval,
        "unet_deep_calls": deep,
        "unet_shallow_calls": shallow,
        "steps_computed": steps,
        "seconds": round(seconds, 4),
        **extra,
    }


def save(images, paths) -> None:
    for image, path in zip(images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path)


def generate_in_process(
    engines: Path,
    prompts: list[str],
    options: GenerateOptions,
    output: Path,
    cache: CacheSettings = CacheSettings(),
    cache_mode: str = "on",
) -> list[dict]:
    from .pipeline import InvalidRequest, StableDiffusion

    pipe = StableDiffusion.from_engines(engines)
    request_cache = cache.open(pipe.export["fingerprint"], pipe.export["geometry"]["text_hidden"])
    paths = iter(output_paths(output, len(prompts) * pipe.batch))
    records = []
    for prompt in prompts:
        kwargs = asdict(options)
        try:
            result = pipe(prompt, **kwargs, cache=request_cache, cache_mode=cache_mode)
        except InvalidRequest as e:
            raise VoltacacheError(str(e)) from e
        targets = [next(paths) for _ in result.images]
        save(result.images, targets)
        stats = result.stats
        records += [
            record(
                path,
                prompt,
                options,
                result.seed,
                stats.unet_deep_calls,
                stats.unet_shallow_calls,
                stats.steps,
                result.seconds,
                component_seconds={k: round(v, 4) for k, v in stats.seconds.items()},
                cache=result.cache,
                similarity=round(result.similarity, 4),
            )
            for path in targets
        ]
    return records


def generate_served(
    url: str,
    protocol: str,
    prompts: list[str],
    options: GenerateOptions,
    output: Path,
    concurrency: int,
    console,
    cache_mode: str = "on",
) -> list[dict]:
    from rich.progress import Progress

    from .serving.client import Client

    if options.cache_schedule != "uniform" or options.height or options.width:
        raise VoltacacheError("through Triton: the uniform DeepCache schedule at the engines' size")
    init = np.asarray(Image.open(options.init_image).convert("RGB")) if options.init_image else None
    client_options = dict(
        negative_prompt=options.negative_prompt,
        steps=options.steps,
        guidance=options.guidance,
        scheduler=options.scheduler,
        cache_interval=options.cache_interval,
        init_image=init,
        strength=options.strength,
        cache=cache_mode,
    )
    clients = {}

    def one(index_prompt):
        index, prompt = index_prompt
        client = clients.setdefault(threading.get_ident(), Client(url, protocol))  # one channel per thread
        seed = options.seed + index if options.seed is not None else None
        return prompt, client.generate(prompt, seed=seed, **client_options)

    results = []
    with Progress(console=console, transient=len(prompts) == 1) as bars:
        task = bars.add_task("generating", total=len(prompts))
        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            for result in pool.map(one, enumerate(prompts)):
                results.append(result)
                bars.advance(task)
    batch = results[0][1].images.shape[0]
    paths = iter(output_paths(output, len(prompts) * batch))
    records = []
    for prompt, served in results:
        targets = [next(paths) for _ in range(batch)]
        save(served.images, targets)
        records += [
            record(
                path,
                prompt,
                options,
                served.seed,
                served.unet_deep_calls,
                served.unet_shallow_calls,
                served.steps_computed,
                served.seconds,
                cache=served.cache,
                similarity=round(served.similarity, 4),
            )
            for path in targets
        ]
    return records
