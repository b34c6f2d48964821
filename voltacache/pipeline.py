"""The denoising pipeline over runners, readable top to bottom like diffusers' `__call__`.

The same class runs in process (runners over local engines) and inside Triton's Python backend
(the denoiser builds it with runners that are BLS calls). Scheduler state and the DeepCache
feature live in local variables of one call: nothing is shared between requests.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .deepcache import full_steps
from .errors import VoltacacheError
from .schedulers import SCHEDULERS, make_scheduler
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

MAX_STEPS = 1000
TEXT_MEMO_SIZE = 256


class InvalidRequest(VoltacacheError):
    """A request rejected before any compute; the message names the argument."""


@dataclass
class Stats:
    steps: int = 0
    text_memo_hits: int = 0
    unet_deep_calls: int = 0
    unet_shallow_calls: int = 0
    seconds: dict = field(default_factory=lambda: defaultdict(float))

    def timed(self, name, runner, feeds):
        started = time.perf_counter()
        out = runner.infer(feeds)
        self.seconds[name] += time.perf_counter() - started
        return out


@dataclass(frozen=True)
class Sampling:
    """How one request samples: checked once, then carried through every stage."""

    steps: int = 50
    guidance: float = 7.5
    seed: int | None = None
    scheduler: str = "pndm"
    cache_interval: int = 1
    cache_schedule: str = "uniform"
    strength: float = 0.8  # img2img only

    def check(self) -> None:
        """Reject a bad value before any compute, naming the argument."""
        steps, guidance, interval, strength = self.steps, self.guidance, self.cache_interval, self.strength
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
            raise InvalidRequest(f"steps {steps!r}: must be an integer from 1 to {MAX_STEPS}")
        if not isinstance(guidance, (int, float, np.floating)) or not math.isfinite(guidance):
            raise InvalidRequest(f"guidance {guidance!r}: must be a finite number")
        if self.scheduler not in SCHEDULERS:
            raise InvalidRequest(f"scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        if not isinstance(interval, (int, np.integer)) or not 1 <= interval <= MAX_STEPS:
            raise InvalidRequest(f"cache_interval {interval!r}: must be an integer from 1 to {MAX_STEPS}")
        if self.cache_schedule not in ("uniform", "nonuniform"):
            raise InvalidRequest(f"cache_schedule {self.cache_schedule!r}: use uniform or nonuniform")
        if not (isinstance(strength, (int, float, np.floating)) and 0.0 < strength <= 1.0):
            raise InvalidRequest(f"strength {strength!r}: must be in (0, 1]")


@dataclass
class Generation:
    images: list
    seed: int
    stats: Stats
    pooled_embedding: np.ndarray | None = None
    seconds: float = 0.0
    cache: str = "off"  # semantic | approximate | miss | off
    similarity: float = 0.0


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

    def __call__(
        self,
        prompt,
        negative_prompt="",
        steps: int = 50,
        guidance: float = 7.5,
        seed: int | None = None,
        scheduler: str = "pndm",
        cache_interval: int = 1,
        cache_schedule: str = "uniform",
        height: int | None = None,
        width: int | None = None,
        init_image=None,
        strength: float = 0.8,
        cache=None,
        cache_mode: str = "on",
    ) -> Generation:
        """`cache`: a voltacache.cache.layers.RequestCache; `cache_mode` on, off or refresh (regenerate
        and store, never serve)."""
        started = time.perf_counter()
        # 1. Check inputs before any compute
        prompts, negatives = self.check_prompts(prompt, negative_prompt)
        sampling = Sampling(steps, guidance, seed, scheduler, cache_interval, cache_schedule, strength)
        sampling.check()
        self.check_size(height, width)
        image = load_image(init_image, self.width, self.height) if init_image is not None else None
        stats = Stats()

        # 2. Encode the prompt (negative first, as diffusers concatenates them); an exact repeat skips the
        # encoder unless every cache is off
        embeddings, pooled = self.encode_prompt(prompts, negatives, stats, memo=cache_mode != "off")

        # 3-7. Cache lookup, timesteps, latents, denoising, decoding
        result = self.generate_images(prompts, negatives, embeddings, pooled, sampling, image, stats, cache, cache_mode)
        result.images = [Image.fromarray(x) for x in result.images]
        result.seconds = time.perf_counter() - started
        return result

    def generate_images(
        self,
        prompts,
        negatives,
        embeddings,
        pooled,
        sampling: Sampling,
        image=None,
        stats=None,
        cache=None,
        cache_mode="on",
    ) -> Generation:
        """Text embeddings -> uint8 images, through the cross-request cache: what the Triton denoiser runs."""
        stats = stats if stats is not None else Stats()
        pooled_prompt = pooled[len(prompts) :]

        # 3. Cross-request cache: a stored image, or a stored latent K steps in. An init image and its
        # strength are part of the scope, and K counts the steps this request would run.
        use_cache = cache is not None and cache_mode != "off"
        steps = sampling.steps
        run_steps = denoising_steps(steps, sampling.strength if image is not None else None)
        decision = None
        if use_cache:
            vector = cache.embedder.embed(prompts[0], pooled_prompt[0])
            scope = cache.scope(
                size=(self.height, self.width),
                steps=steps,
                guidance=float(sampling.guidance),
                scheduler=sampling.scheduler,
                negative=negatives[0],
                interval=sampling.cache_interval,
                schedule=sampling.cache_schedule,
                batch=self.batch,
                **({} if image is None else {"init": fingerprint(image), "strength": float(sampling.strength)}),
            )
            decision = cache.lookup(vector, scope, run_steps, sampling.seed) if cache_mode == "on" else None
            if decision is not None and decision.layer == "semantic":
                return Generation(
                    decision.image, decision.seed, stats, pooled_prompt, 0.0, "semantic", decision.similarity
                )
        start = (decision.latent, decision.start_step) if decision is not None and decision.latent is not None else None
        capture = cache.checkpoints(run_steps) if use_cache and start is None else set()

        # 4-6. Timesteps, latents, denoising
        latents, seed, checkpoints = self.generate_latents(
            embeddings, sampling, image, stats, start=start, capture=capture
        )

        # 7. Decode, and remember the result for later requests
        images = to_uint8(self.decode_latents(latents, stats))
        layer, similarity = "off", 0.0
        if use_cache:
            layer = decision.layer if decision is not None else "miss"
            similarity = decision.similarity if decision is not None else 0.0
            cache.remember(vector, scope, seed, run_steps, images, checkpoints)
        return Generation(images, seed, stats, pooled_prompt, 0.0, layer, similarity)

    def generate_latents(self, embeddings, sampling: Sampling, image=None, stats=None, start=None, capture=frozenset()):
        """Text embeddings -> final latents (the part of generate_images between the cache and the VAE).

        `start`: (latent, K) from the approximate cache: begin K steps in. `capture`: the step counts
        after which to keep a copy of the latents (for the cache). Returns latents, seed and captures.
        """
        stats = stats if stats is not None else Stats()
        seed = random_seed() if sampling.seed is None else int(sampling.seed)
        generator = torch.Generator("cpu").manual_seed(seed)

        # 3. Prepare timesteps
        sched = make_scheduler(sampling.scheduler, self.scheduler_config)
        skipped = start[1] if start is not None else 0
        strength = sampling.strength if image is not None else None
        timesteps = self.prepare_timesteps(sched, sampling.steps, strength, skipped)

        # 4. Prepare latents: from the seed, from the encoded init image noised to the first timestep,
        # or from a cached latent K steps in
        if start is not None:
            latents = torch.from_numpy(np.asarray(start[0], dtype=np.float32))
        else:
            latents = self.prepare_latents(sched, generator, timesteps, image, stats)

        # 5. Denoise, the full U-Net on DeepCache's refresh steps and the shallow one in between
        refresh = full_steps(len(timesteps), sampling.cache_interval, sampling.cache_schedule)
        captured = {}
        latents = self.denoise(
            latents,
            embeddings,
            sched,
            timesteps,
            sampling.guidance,
            refresh,
            generator,
            stats,
            on_step=lambda n, x: captured.update({n: x.numpy().copy()}) if n in capture else None,
        )
        return latents, seed, captured

    def check_prompts(self, prompt, negative_prompt) -> tuple[list[str], list[str]]:
        prompts = [prompt] * self.batch if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * self.batch if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(prompts) != self.batch or len(negatives) != self.batch:
            raise InvalidRequest(f"prompt: the engines take {self.batch} prompt(s) per call, got {len(prompts)}")
        if not all(isinstance(p, str) for p in prompts + negatives):
            raise InvalidRequest("prompt and negative_prompt must be text")
        return prompts, negatives

    def check_size(self, height=None, width=None) -> None:
        if (height or self.height) != self.height or (width or self.width) != self.width:
            raise InvalidRequest(
                f"size {width or self.width}x{height or self.height}: these engines are static at "
                f"{self.width}x{self.height}; export and build for another size"
            )

    def tokenize(self, texts: list[str]) -> np.ndarray:
        length = self.tokenizer.model_max_length
        for text in texts:
            n = len(self.tokenizer(text).input_ids)
            if n > length:
                warnings.warn(f"prompt of {n} tokens truncated to CLIP's {length}: {text[:60]!r}...", stacklevel=3)
        ids = self.tokenizer(texts, padding="max_length", max_length=length, truncation=True).input_ids
        return np.asarray(ids, dtype=np.int32)

    def encode_prompt(self, prompts, negatives, stats: Stats, memo: bool = True):
        key = tuple(negatives + prompts)
        if memo and key in self.text_memo:  # an exact repeat: the text encoder's output is a pure function of the ids
            self.text_memo.move_to_end(key)
            stats.text_memo_hits += 1
            return self.text_memo[key]
        ids = self.tokenize(negatives + prompts)
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
            stats.steps += 1
            if on_step is not None:
                on_step(i + 1, latents)
        return latents

    def decode_latents(self, latents: torch.Tensor, stats: Stats) -> np.ndarray:
        """Latents -> float image in [-1, 1], NCHW."""
        feeds = {LATENT: (latents / self.scaling_factor).numpy().astype(np.float32)}
        return stats.timed(VAE_DECODER, self.runners[VAE_DECODER], feeds)[IMAGE]


def denoising_steps(steps: int, strength: float | None) -> int:
    """How many of `steps` a request runs: all of them, or img2img's strength share."""
    return steps if strength is None else min(int(steps * strength), steps)


def fingerprint(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def random_seed() -> int:
    return int(np.random.SeedSequence().generate_state(1)[0] >> 1)


def step_kwargs(scheduler, generator) -> dict:
    """eta and generator where the scheduler's step takes them (diffusers' prepare_extra_step_kwargs)."""
    import inspect

    params = set(inspect.signature(scheduler.step).parameters)
    return {k: v for k, v in {"eta": 0.0, "generator": generator}.items() if k in params}


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC, rounded as diffusers' image processor does."""
    image = np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return (image * 255).round().astype(np.uint8)


def load_image(source, width: int, height: int) -> np.ndarray:
    """An init image (path or PIL) as the [-1, 1] NCHW batch of one the VAE encoder takes."""
    try:
        image = source if isinstance(source, Image.Image) else Image.open(source)
        image = image.convert("RGB")
    except (OSError, ValueError) as e:
        raise InvalidRequest(f"init image {source}: cannot be read ({e})") from e
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return (array * 2 - 1).transpose(2, 0, 1)[None]
