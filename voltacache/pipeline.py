"""The denoising pipeline over runners, readable top to bottom like diffusers' `__call__`.

The same class runs in process (runners over local engines) and inside Triton's Python backend
(the denoiser builds it with runners that are BLS calls). Scheduler state and the DeepCache
feature live in local variables of one call: nothing is shared between requests.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .deepcache import full_steps
from .errors import InvalidRequest
from .images import fit_image, to_uint8, to_unit_range
from .request import Images, Request, denoising_steps
from .schedulers import make_scheduler
from .specs import (
    CONTEXT,
    DEEP_FEATURE,
    IMAGE,
    INPUT_IDS,
    LATENT,
    LATENT_MEAN,
    LATENT_STD,
    NOISE_PRED,
    POOLED_EMBEDDING,
    SAMPLE,
    TEXT_EMBEDDINGS,
    TEXT_ENCODER,
    TIMESTEP,
    UNET_DEEP,
    UNET_SHALLOW,
    VAE_DECODER,
    VAE_ENCODER,
)
from .tokenizer import token_ids

TEXT_MEMO_SIZE = 256


@dataclass
class Stats:
    steps: int = 0  # denoising steps computed (not U-Net calls: PNDM calls it once more than its steps)
    text_memo_hits: int = 0
    unet_deep_calls: int = 0
    unet_shallow_calls: int = 0
    seconds: dict = field(default_factory=lambda: defaultdict(float))

    def timed(self, name, runner, feeds):
        started = time.perf_counter()
        out = runner.infer(feeds)
        self.seconds[name] += time.perf_counter() - started
        return out


@dataclass
class Generation:
    images: list
    seed: int
    stats: Stats
    pooled_embedding: np.ndarray | None = None
    seconds: float = 0.0
    cache: str = "off"  # semantic | approximate | miss | off
    similarity: float = 0.0

    def report(self) -> Images:
        """The request's result as every path reports it (pixels stacked, the counts from the stats)."""
        pixels = np.stack([np.asarray(image) for image in self.images])
        stats = self.stats
        return Images(
            pixels,
            self.seed,
            stats.unet_deep_calls,
            stats.unet_shallow_calls,
            stats.steps,
            self.seconds,
            self.cache,
            self.similarity,
        )


class StableDiffusion:
    def __init__(self, runners: dict, export: dict, tokenizer):
        self.runners = runners
        self.export = export
        self.tokenizer = tokenizer
        self.batch, self.height, self.width = export["batch"], export["height"], export["width"]
        self.vae_scale = export["geometry"]["vae_scale"]
        self.latent_channels = export["geometry"]["latent_channels"]
        self.scaling_factor = export["scaling_factor"]
        self.scheduler_config = export["scheduler_config"]
        self.text_memo = OrderedDict()  # (negatives + prompts) -> (embeddings, pooled), least recent first

    @classmethod
    def from_engines(cls, engine_dir, cuda_graph: bool = False) -> StableDiffusion:
        from transformers import CLIPTokenizer

        from .build import load_engines

        engines = load_engines(engine_dir, cuda_graph=cuda_graph)
        return cls(engines.runners, engines.export, CLIPTokenizer.from_pretrained(Path(engine_dir) / "tokenizer"))

    def __call__(self, request: Request | str, /, *, cache=None, **fields) -> Generation:
        """`sd("a cat", steps=20, seed=1)` or `sd(Request(...))`: the fields of voltacache.request.Request.
        `init_image` may be a path, a PIL image or uint8 pixels. `cache`: a
        voltacache.cache.layers.RequestCache, consulted as the request's `cache_mode` says."""
        started = time.perf_counter()
        # 1. Check inputs before any compute
        request = Request.of(request, **fields)
        self.check(request)
        stats = Stats()

        # 2. Encode the prompt (negative first, as diffusers concatenates them); an exact repeat skips the
        # encoder unless every cache is off
        embeddings, pooled = self.encode_prompt(request, stats)

        # 3-7. Cache lookup, timesteps, latents, denoising, decoding
        result = self.generate_images(request, embeddings, pooled, stats, cache)
        result.images = [Image.fromarray(x) for x in result.images]
        result.seconds = time.perf_counter() - started
        return result

    def check(self, request: Request) -> None:
        """The request's own checks, then what these engines can do."""
        request.check()
        request.check_size(self.height, self.width)

    def generate_images(self, request: Request, embeddings, pooled, stats=None, cache=None) -> Generation:
        """Text embeddings -> uint8 images, through the cross-request cache: what the Triton denoiser runs."""
        stats = stats if stats is not None else Stats()
        pooled_prompt = pooled[self.batch :]  # the conditional half (request.texts: negatives first)
        image = to_unit_range(fit_image(request.init_image, self.width, self.height)) if request.img2img else None

        # 3. Cross-request cache: a stored image, or a stored latent K steps in. An init image and its
        # strength are part of the scope, and K counts the steps this request would run.
        use_cache = cache is not None and request.cache_mode != "off"
        run_steps = denoising_steps(request.steps, request.strength if request.img2img else None)
        decision = None
        if use_cache:
            vector = cache.embedder.embed(request.prompt, pooled_prompt[0])
            scope = cache.scope(
                size=(self.height, self.width),
                steps=request.steps,
                guidance=float(request.guidance),
                scheduler=request.scheduler,
                negative=request.negative_prompt,
                interval=request.cache_interval,
                schedule=request.cache_schedule,
                batch=self.batch,
                **({"init": fingerprint(image), "strength": float(request.strength)} if request.img2img else {}),
            )
            decision = cache.lookup(vector, scope, run_steps, request.seed) if request.cache_mode == "on" else None
            if decision is not None and decision.layer == "semantic":
                return Generation(
                    decision.image, decision.seed, stats, pooled_prompt, 0.0, "semantic", decision.similarity
                )
        start = (decision.latent, decision.start_step) if decision is not None and decision.latent is not None else None
        capture = cache.checkpoints(run_steps) if use_cache and start is None else set()

        # 4-6. Timesteps, latents, denoising
        latents, seed, checkpoints = self.generate_latents(embeddings, request, image, stats, start, capture)

        # 7. Decode, and remember the result for later requests
        images = to_uint8(self.decode_latents(latents, stats))
        layer, similarity = "off", 0.0
        if use_cache:
            layer = decision.layer if decision is not None else "miss"
            similarity = decision.similarity if decision is not None else 0.0
            cache.remember(vector, scope, seed, run_steps, images, checkpoints)
        return Generation(images, seed, stats, pooled_prompt, 0.0, layer, similarity)

    def generate_latents(self, embeddings, request: Request, image=None, stats=None, start=None, capture=frozenset()):
        """Text embeddings -> final latents (the part of generate_images between the cache and the VAE).

        `image`: the init image as the VAE encoder takes it (img2img). `start`: (latent, K) from the
        approximate cache: begin K steps in. `capture`: the step counts after which to keep a copy of
        the latents (for the cache). Returns latents, seed and captures.
        """
        stats = stats if stats is not None else Stats()
        seed = random_seed() if request.seed is None else int(request.seed)
        generator = torch.Generator("cpu").manual_seed(seed)

        # 3. Prepare timesteps
        sched = make_scheduler(request.scheduler, self.scheduler_config, request.steps)
        skipped = start[1] if start is not None else 0
        strength = request.strength if image is not None else None
        timesteps = self.prepare_timesteps(sched, request.steps, strength, skipped)

        # 4. Prepare latents: from the seed, from the encoded init image noised to the first timestep,
        # or from a cached latent K steps in
        if start is not None:
            latents = torch.from_numpy(np.asarray(start[0], dtype=np.float32))
        else:
            latents = self.prepare_latents(sched, generator, timesteps, image, stats)

        # 5. Denoise, the full U-Net on DeepCache's refresh steps and the shallow one in between
        refresh = full_steps(len(timesteps), request.cache_interval, request.cache_schedule)
        captured = {}
        latents = self.denoise(
            latents,
            embeddings,
            sched,
            timesteps,
            request.guidance,
            refresh,
            generator,
            stats,
            on_step=lambda n, x: captured.update({n: x.numpy().copy()}) if n in capture else None,
        )
        stats.steps += denoising_steps(request.steps, strength) - skipped
        return latents, seed, captured

    def encode_prompt(self, request: Request, stats: Stats):
        """(embeddings, pooled) of request.texts; the memo is skipped when the request turns every cache off."""
        key = tuple(request.texts(self.batch))
        memo = request.cache_mode != "off"
        if memo and key in self.text_memo:  # an exact repeat: the text encoder's output is a pure function of the ids
            self.text_memo.move_to_end(key)
            stats.text_memo_hits += 1
            return self.text_memo[key]
        ids = token_ids(self.tokenizer, list(key))
        out = stats.timed(TEXT_ENCODER, self.runners[TEXT_ENCODER], {INPUT_IDS: ids})
        self.text_memo[key] = out[TEXT_EMBEDDINGS], out[POOLED_EMBEDDING]
        if len(self.text_memo) > TEXT_MEMO_SIZE:
            self.text_memo.popitem(last=False)
        return self.text_memo[key]

    def prepare_timesteps(self, scheduler, steps: int, strength: float | None, skipped: int = 0):
        """The timesteps to run: img2img drops the first (1 - strength) of the schedule, as diffusers'
        get_timesteps, and an approximate-cache start the `skipped` steps after that."""
        scheduler.set_timesteps(steps)
        begin = steps - denoising_steps(steps, strength) + skipped
        if strength is None and skipped == 0:
            return scheduler.timesteps
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin * scheduler.order)
        timesteps = scheduler.timesteps[begin * scheduler.order :]
        if len(timesteps) == 0:
            raise InvalidRequest(f"strength {strength}: leaves no denoising step out of {steps}")
        return timesteps

    def prepare_latents(self, scheduler, generator, timesteps, image, stats: Stats) -> torch.Tensor:
        shape = (self.batch, self.latent_channels, self.height // self.vae_scale, self.width // self.vae_scale)
        if image is None:
            return torch.randn(shape, generator=generator, dtype=torch.float32) * scheduler.init_noise_sigma
        out = stats.timed(VAE_ENCODER, self.runners[VAE_ENCODER], {IMAGE: np.repeat(image, self.batch, axis=0)})
        mean, std = torch.from_numpy(out[LATENT_MEAN]), torch.from_numpy(out[LATENT_STD])
        # the latent distribution's sample, then the noise, in diffusers' order of generator draws
        latents = (mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)) * self.scaling_factor
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        return scheduler.add_noise(latents, noise, timesteps[:1].repeat(self.batch))

    def denoise(
        self, latents, embeddings, scheduler, timesteps, guidance, refresh, generator, stats: Stats, on_step=None
    ):
        extra = step_kwargs(scheduler, generator)
        deep = None
        for i, t in enumerate(timesteps):
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            feeds = {
                SAMPLE: model_input.numpy().astype(np.float32),
                TIMESTEP: np.array([float(t)], dtype=np.float32),
                CONTEXT: embeddings,
            }
            if i in refresh or deep is None:
                out = stats.timed(UNET_DEEP, self.runners[UNET_DEEP], feeds)
                deep = out[DEEP_FEATURE]
                stats.unet_deep_calls += 1
            else:
                out = stats.timed(UNET_SHALLOW, self.runners[UNET_SHALLOW], {**feeds, DEEP_FEATURE: deep})
                stats.unet_shallow_calls += 1
            uncond, cond = torch.from_numpy(out[NOISE_PRED]).chunk(2)
            noise = uncond + guidance * (cond - uncond) if guidance > 1 else cond
            latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, latents)
        return latents

    def decode_latents(self, latents: torch.Tensor, stats: Stats) -> np.ndarray:
        """Latents -> float image in [-1, 1], NCHW."""
        feeds = {LATENT: (latents / self.scaling_factor).numpy().astype(np.float32)}
        return stats.timed(VAE_DECODER, self.runners[VAE_DECODER], feeds)[IMAGE]


def fingerprint(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def random_seed() -> int:
    return int(np.random.SeedSequence().generate_state(1)[0] >> 1)


def step_kwargs(scheduler, generator) -> dict:
    """eta and generator where the scheduler's step takes them (diffusers' prepare_extra_step_kwargs)."""
    import inspect

    params = set(inspect.signature(scheduler.step).parameters)
    return {k: v for k, v in {"eta": 0.0, "generator": generator}.items() if k in params}
