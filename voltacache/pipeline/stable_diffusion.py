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

import numpy as np
import torch
from PIL import Image

from ..errors import InvalidRequest
from ..images import fit_image, fit_mask, to_uint8, to_unit_range
from ..prompts import parse
from ..request import Request, denoising_steps, unset
from ..result import Result
from ..runtime.tokenizer import join_chunks, load_tokenizers, text_encoder_feeds
from ..schedulers import make_scheduler
from ..specs import (
    CONTEXT,
    DEEP_FEATURE,
    IMAGE,
    LATENT,
    LATENT_MEAN,
    LATENT_STD,
    NOISE_PRED,
    POOLED_EMBEDDING,
    SAMPLE,
    TEXT_EMBEDDINGS,
    TEXT_ENCODER,
    TIME_IDS,
    TIMESTEP,
    UNET_DEEP,
    UNET_SHALLOW,
    VAE_DECODER,
    VAE_ENCODER,
    controlnet_component,
    is_residual,
)
from .calibration import NoScheduleCalibration, load_calibration
from .capabilities import Capabilities
from .controlnet import Control, control_image, residual_feeds, run_jobs
from .deepcache import AdaptiveSchedule, FixedSchedule, full_steps
from .lora import RESIDENT_VARIANTS, Loras

TEXT_MEMO_SIZE = 256


@dataclass
class Stats:
    steps: int = 0  # denoising steps computed (not U-Net calls: PNDM calls it once more than its steps)
    text_memo_hits: int = 0
    unet_deep_calls: int = 0
    unet_shallow_calls: int = 0
    controlnet_calls: int = 0
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

    def report(self) -> Result:
        """The request's result as every path reports it (uint8 pixels stacked, the counts from the stats)."""
        return Result(
            images=np.stack([np.asarray(image, np.uint8) for image in self.images]),
            seed=self.seed,
            unet_deep_calls=self.stats.unet_deep_calls,
            unet_shallow_calls=self.stats.unet_shallow_calls,
            controlnet_calls=self.stats.controlnet_calls,
            steps_computed=self.stats.steps,
            seconds=self.seconds,
            cache=self.cache,
            similarity=self.similarity,
        )


@dataclass
class Inpainting:
    """What inpainting adds to one request's steps, as diffusers' StableDiffusionInpaintPipeline computes it.

    `mask`: the binarized mask at latent size (1: repaint), one row per image. A 9-channel U-Net reads
    `masked_image_latents` (the init image's kept part, encoded) and the mask beside the latents; for a
    4-channel one, every step puts the init image's latents, noised to the next timestep, back where the
    mask keeps the image (`image_latents` and `noise`)."""

    mask: torch.Tensor
    masked_image_latents: torch.Tensor | None = None  # 9-channel U-Nets
    image_latents: torch.Tensor | None = None  # 4-channel U-Nets: latent blending
    noise: torch.Tensor | None = None

    def unet_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """The U-Net's sample for the guidance pair's rows: the scaled latents, then the mask and the masked image."""
        if self.masked_image_latents is None:
            return sample
        return torch.cat([sample, torch.cat([self.mask] * 2), torch.cat([self.masked_image_latents] * 2)], dim=1)

    def blend(self, latents: torch.Tensor, scheduler, next_t) -> torch.Tensor:
        """After a step (4-channel U-Nets): the image's latents where the mask keeps it, noised to `next_t`
        (None after the last step: not noised)."""
        if self.image_latents is None:
            return latents
        kept = self.image_latents
        if next_t is not None:
            kept = scheduler.add_noise(kept, self.noise, torch.tensor([next_t]))
        return (1 - self.mask) * kept + self.mask * latents


@dataclass
class Work:
    """One request's denoising in flight: its scheduler, latents, DeepCache feature and step index,
    and what its cache entry needs. `StableDiffusion.step` advances many works together; nothing in
    here is shared between requests."""

    request: Request
    embeddings: np.ndarray
    scheduler: object
    timesteps: torch.Tensor
    latents: torch.Tensor
    schedule: FixedSchedule | AdaptiveSchedule  # which steps refresh the deep feature
    generator: torch.Generator
    seed: int
    stats: Stats
    capture: set
    conditions: dict = field(default_factory=dict)  # the U-Net's other inputs, the same every step (SDXL's)
    runners: dict = field(default_factory=dict)  # the engines it steps on: the base ones, or its LoRAs' variant
    inpainting: Inpainting | None = None
    control: Control | None = None  # the request's ControlNets
    residual_inputs: dict = field(default_factory=dict)  # U-Net -> its ControlNet residual inputs (none: no ControlNet)
    captured: dict = field(default_factory=dict)
    deep: np.ndarray | None = None
    index: int = 0
    # the cross-request cache's part (set by StableDiffusion.begin)
    pooled: np.ndarray | None = None
    run_steps: int = 0
    cache: object = None
    vector: np.ndarray | None = None
    scope: str | None = None
    about: dict | None = None  # the request, described for a person browsing the cache
    decision: object = None

    def __post_init__(self):
        self.extra = step_kwargs(self.scheduler, self.generator)

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def full(self) -> bool:
        """Whether this step runs the full U-Net (a DeepCache refresh step, or no feature yet)."""
        due = self.schedule.due(self.index, self.latents)  # asked on every step: the adaptive rule reads each
        return due or self.deep is None

    def feeds(self) -> dict[str, np.ndarray]:
        """This step's U-Net rows: the guidance pair (unconditional, then conditional), a timestep per row; the
        request's ControlNets run here, alone (`StableDiffusion.step` runs a tick's together)."""
        feeds, jobs = self.inputs()
        return self.with_residuals(feeds, run_jobs([jobs], [self.stats])[0])

    def inputs(self) -> tuple[dict[str, np.ndarray], list]:
        """This step's U-Net feeds but the ControlNet residuals, and the ControlNet calls they need."""
        t, full = self.timesteps[self.index], self.full
        latents = self.scheduler.scale_model_input(torch.cat([self.latents] * 2), t)
        sample = self.inpainting.unet_sample(latents) if self.inpainting is not None else latents
        sample = sample.numpy().astype(np.float32)
        timestep = np.full(len(sample), float(t), np.float32)
        feeds = {SAMPLE: sample, TIMESTEP: timestep, CONTEXT: self.embeddings, **self.conditions}
        if not full:
            feeds[DEEP_FEATURE] = self.deep
        if self.control is None or not self.residual_inputs.get(UNET_DEEP):
            return feeds, []
        # the ControlNets read the latents alone, inpainting or not
        return feeds, self.control.jobs(self.index, full, latents.numpy().astype(np.float32), feeds)

    def with_residuals(self, feeds: dict, outputs: list[dict]) -> dict[str, np.ndarray]:
        """Engines exported with ControlNets: the feeds with the request's residuals (from `outputs`, this step's
        ControlNet calls, or the last full step's), zeros where it has none."""
        full = DEEP_FEATURE not in feeds  # as `inputs` decided it: a shallow step reads the cached feature
        wanted = self.residual_inputs.get(UNET_DEEP if full else UNET_SHALLOW, ())
        if not wanted:
            return feeds
        given = self.control.residuals(self.index, full, outputs, wanted) if self.control else {}
        return feeds | residual_feeds(wanted, len(feeds[SAMPLE]), given)

    def advance(self, noise_pred: np.ndarray, deep_feature: np.ndarray | None = None) -> None:
        """Guidance, then the scheduler's step; keeps a refreshed deep feature and the latents the cache asks for."""
        if deep_feature is not None:
            self.deep = deep_feature
            self.stats.unet_deep_calls += 1
        else:
            self.stats.unet_shallow_calls += 1
        noise = guided(noise_pred, self.request.guidance)
        t = self.timesteps[self.index]
        self.latents = self.scheduler.step(torch.from_numpy(noise), t, self.latents, **self.extra, return_dict=False)[0]
        if self.inpainting is not None:
            later = self.index + 1 < len(self.timesteps)
            self.latents = self.inpainting.blend(
                self.latents, self.scheduler, self.timesteps[self.index + 1] if later else None
            )
        self.index += 1
        if self.index in self.capture:
            self.captured[self.index] = self.latents.numpy().copy()


class StableDiffusion:
    def __init__(self, runners: dict, export: dict, tokenizers: list, calibration=None, loras: Loras | None = None):
        self.runners = runners
        self.export = export
        self.tokenizers = tokenizers  # one per text encoder input (SDXL: two); none in the Triton denoiser
        self.batch, self.sizes = export.batch, export.image_sizes  # (height, width) served, the default first
        self.batch_sizes = export.batch_sizes  # images per engine call the engines were built for
        self.family = export.family
        self.vae_scale = export.geometry.vae_scale
        self.latent_channels = export.geometry.latent_channels
        self.zero_empty_negative = export.zero_empty_negative
        self.scaling_factor = export.scaling_factor
        self.scheduler_config = export.scheduler_config
        self.text_memo = OrderedDict()  # (negatives + prompts) -> (embeddings, pooled), least recent first
        # where calibrated DeepCache schedules place their full steps (voltacache calibrate)
        self.calibration = calibration or NoScheduleCalibration(
            "these engines have no calibration; run `voltacache calibrate`"
        )
        # the LoRAs a request may name, and the engine variants they make (voltacache.pipeline.lora)
        self.loras = loras if loras is not None else Loras({}, export)
        # what a request may ask of these engines, as the CLI checks it before they load
        self.capabilities = Capabilities(export, self.calibration, self.loras, tokenizers)
        self.weighting = None  # compel's prompt weighting over these engines (made when a prompt first needs it)
        self.inpainting_unet = self.capabilities.inpainting_unet  # SD 1.5 inpainting's 9-channel U-Net
        self.size_conditioned = self.capabilities.size_conditioned  # SDXL's time ids
        # engines exported with ControlNets: the residual inputs of each U-Net (zeros for a request without any)
        specs = export.specs()
        self.residual_inputs = {
            name: [t for t in specs[name].inputs if is_residual(t.name)] for name in (UNET_DEEP, UNET_SHALLOW)
        }

    @classmethod
    def from_engines(
        cls, engine_dir, cuda_graph: bool = False, loras: dict | None = None, resident: int = RESIDENT_VARIANTS
    ) -> StableDiffusion:
        """`loras`: {name: LoraFile} a request may name (generate --lora), or a `Loras` already made."""
        from ..runtime.engines import load_engines

        engines = load_engines(engine_dir, cuda_graph=cuda_graph)
        tokenizers = load_tokenizers(engine_dir, engines.export)
        calibration = load_calibration(engine_dir, engines.export.fingerprint)
        if not isinstance(loras, Loras):
            loras = Loras(loras or {}, engines.export, resident, engines.manifest.backend)
        return cls(engines.runners, engines.export, tokenizers, calibration, loras)

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
        self.capabilities.check(request.check())

    def runners_for(self, request: Request) -> dict:
        """The engines a request runs on: the base ones, or its LoRAs' variant of them."""
        return self.loras.runners(request.loras, self.runners)

    def size(self, request: Request) -> tuple[int, int]:
        """The (height, width) of the request's images: its own, or the engines' default."""
        return request.size(self.sizes[0])

    def size_conditions(self, request: Request) -> list[int] | None:
        """SDXL's time ids: original size, crop top-left, target size (height, width each); the image's size
        and no crop unless the request gives them, as diffusers defaults them. None for other models."""
        if not self.size_conditioned:
            return None
        size = self.size(request)
        return [*(request.original_size or size), *(request.crop_top_left or (0, 0)), *(request.target_size or size)]

    def unet_conditions(self, request: Request, pooled: np.ndarray) -> dict[str, np.ndarray]:
        """The U-Net's added conditions for every row (SDXL's pooled text embedding and time ids), or none."""
        if not self.size_conditioned:
            return {}
        time_ids = np.tile(np.asarray(self.size_conditions(request), np.float32), (len(pooled), 1))
        return {POOLED_EMBEDDING: pooled, TIME_IDS: time_ids}

    def generate_images(self, request: Request, embeddings, pooled, stats=None, cache=None) -> Generation:
        """Text embeddings -> uint8 images, through the cross-request cache: what the Triton denoiser runs.

        One request is the step batcher's work with a batch of one: begin, step until done, finish."""
        work = self.begin(request, embeddings, pooled, stats, cache)
        if isinstance(work, Generation):
            return work
        self.run(work)
        return self.finish([work])[0]

    def begin(self, request: Request, embeddings, pooled, stats=None, cache=None) -> Work | Generation:
        """Steps 3-4 for one request: the cache lookup, then its timesteps and first latents (a Work to
        step), or the finished Generation when the semantic cache answers it. `embeddings` and `pooled`: the
        text encoder's output for request.texts, a row per chunk of each text (runtime.tokenizer)."""
        stats = stats if stats is not None else Stats()
        embeddings, pooled, pooled_chunks = join_chunks(embeddings, pooled, 2 * self.batch)
        pooled_prompt = pooled[self.batch :]  # the conditional half (request.texts: negatives first)
        if self.zero_empty_negative and not request.negative_prompt:
            # SDXL's force_zeros_for_empty_prompt: no negative prompt is all zeros, not the encoded ""
            embeddings, pooled = zero_unconditional(embeddings, self.batch), zero_unconditional(pooled, self.batch)
        height, width = self.size(request)
        image = to_unit_range(fit_image(request.init_image, width, height)) if request.img2img else None

        # 3. Cross-request cache: a stored image, or a stored latent K steps in. An init image and its
        # strength are part of the scope, and K counts the steps this request would run.
        use_cache = cache is not None and request.cache_mode != "off"
        run_steps = denoising_steps(request.steps, request.strength if request.img2img else None)
        decision = vector = scope = None
        if use_cache:
            vector = cache.embedder.embed(request.prompt, pooled_chunks[self.batch])  # every chunk of the prompt
            scope = cache.scope(**self.cache_scope(request, image))
            decision = cache.lookup(vector, scope, run_steps, request.seed) if request.cache_mode == "on" else None
            if decision is not None and decision.layer == "semantic":
                return Generation(
                    decision.image, decision.seed, stats, pooled_prompt, 0.0, "semantic", decision.similarity
                )
        start = (decision.latent, decision.start_step) if decision is not None and decision.latent is not None else None
        capture = cache.checkpoints(run_steps) if use_cache and start is None else set()
        work = self.start_denoising(embeddings, request, image, stats, start, capture, pooled)
        work.pooled, work.run_steps = pooled_prompt, run_steps
        if use_cache:
            work.cache, work.vector, work.scope, work.decision = cache, vector, scope, decision
            work.about = request.description() | {"height": height, "width": width}
        return work

    def start_denoising(
        self, embeddings, request: Request, image=None, stats=None, start=None, capture=frozenset(), pooled=None
    ):
        """Timesteps and first latents of one request, as a Work that `step` advances.

        `image`: the init image as the VAE encoder takes it (img2img). `start`: (latent, K) from the
        approximate cache: begin K steps in. `capture`: the step counts after which to keep a copy of
        the latents (for the cache). `pooled`: the pooled text embeddings, which SDXL's U-Net reads.
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
        # or from a cached latent K steps in; inpainting also prepares its mask and masked image
        inpainting, shape = None, self.latent_shape(request)
        if request.inpaint:
            latents, inpainting = self.prepare_inpainting(
                sched, generator, timesteps, image, self.mask(request), request.strength == 1.0, stats, shape
            )
        elif start is None:
            latents = self.prepare_latents(sched, generator, timesteps, image, stats, shape)
        if start is not None:
            latents = torch.from_numpy(np.asarray(start[0], dtype=np.float32))

        # DeepCache: the full U-Net on its refresh steps, the shallow one on the cached feature in between
        schedule = self.deepcache_schedule(request, timesteps)
        stats.steps += denoising_steps(request.steps, strength) - skipped
        conditions = self.unet_conditions(request, pooled)
        runners = self.runners_for(request)
        control = None
        if request.controlled:  # the ControlNets' range counts the steps from img2img's first, before the cache's
            rows = 2 * self.batch
            control = Control.of(request, runners, self.size(request), rows, len(timesteps), skipped)
        return Work(
            request,
            embeddings,
            sched,
            timesteps,
            latents,
            schedule,
            generator,
            seed,
            stats,
            set(capture),
            conditions,
            runners=runners,
            inpainting=inpainting,
            control=control,
            residual_inputs=self.residual_inputs,
        )

    def deepcache_schedule(self, request: Request, timesteps) -> FixedSchedule | AdaptiveSchedule:
        """Which of the run's steps refresh the deep feature (voltacache.pipeline.deepcache)."""
        if request.cache_schedule == "adaptive":
            return AdaptiveSchedule(request.threshold)
        if request.cache_schedule == "calibrated":
            return FixedSchedule(self.calibration.refreshes(request.steps, timesteps, request.cache_interval))
        return FixedSchedule(full_steps(len(timesteps), request.cache_interval, request.cache_schedule))

    def cache_scope(self, request: Request, image=None) -> dict:
        """What a cache entry of this request is scoped by: each field of the request that changes the image
        (declared on Request's fields: a new field is scoped by default), read as these engines read it, and
        what the engines add: the image's size, their batch and family, SDXL's effective size conditioning, and the
        calibration a calibrated schedule runs on. `image`: the init image as the engines take it."""
        read = {
            "value": lambda value: list(value) if isinstance(value, tuple) else value,
            "threshold": lambda _: request.threshold,
            "image": lambda _: fingerprint(image),
            "mask": lambda _: fingerprint(self.mask(request)),
            # a LoRA's image is never another's, nor the base model's: each file's content and scale
            "loras": lambda _: [list(key) for key in self.loras.key(request.loras)],
            # a controlled image is never another ControlNet's, scale's or control image's, nor an uncontrolled one
            "controlnets": lambda value: [[name, scale, self.controlnet_fingerprint(name)] for name, scale in value],
            "control_images": lambda value: [fingerprint(control_image(image, width, height, 1)) for image in value],
            "size": None,  # the image's, below (a size the engines do not serve is refused)
            "size_conditioning": None,  # effective, below
        }
        height, width = self.size(request)
        effective = {"threshold"}  # read as the request runs, set or left to its default
        scope = {"size": list(self.size(request)), "batch": self.batch, "family": self.family}
        for name, (kind, value) in request.scoped_fields().items():
            if read[kind] is not None and (kind in effective or not unset(value)):
                scope[name] = read[kind](value)
        if self.size_conditioned:
            scope["size_conditions"] = self.size_conditions(request)
        prompt = parse(request.prompt)
        if prompt.weighted:  # the embedding the cache looks up by is the plain text's; its weights are the scope
            scope["prompt_weights"] = [list(fragment) for fragment in prompt.fragments]
        if request.cache_schedule == "calibrated":
            scope["calibration"] = self.calibration.id
        return scope

    def controlnet_fingerprint(self, name: str) -> str | None:
        """The weights of the engines' ControlNet `name`, as the export recorded them."""
        return self.export.components[controlnet_component(name)].report.get("weights_fingerprint")

    def generate_latents(
        self, embeddings, request: Request, image=None, stats=None, start=None, capture=frozenset(), pooled=None
    ):
        """encode_prompt's output -> final latents, seed and captured latents (generate_images without cache, VAE)."""
        embeddings, pooled, _ = join_chunks(embeddings, pooled, 2 * self.batch)
        work = self.start_denoising(embeddings, request, image, stats, start, capture, pooled)
        self.run(work)
        return work.latents, work.seed, work.captured

    def run(self, work: Work) -> None:
        """Step one work to its end (the step batcher steps many together instead)."""
        while not work.done:
            for _, error in self.step([work]):
                raise error

    def step(self, works: list[Work]) -> list[tuple[Work, Exception]]:
        """5. One denoising step of every work: one unet_deep call over those on a DeepCache refresh step
        and one unet_shallow call over the rest, each work's rows side by side (its guidance pair together);
        works on different LoRA variants, or with prompts of different lengths (their context), run in
        separate calls.

        A call that fails is retried work by work, so that one bad request fails alone; returns the
        works that failed, with why (the others have stepped)."""
        failed, variants = [], defaultdict(list)
        for work in works:
            variants[id(work.runners), work.embeddings.shape, work.latents.shape].append(work)
        for group in variants.values():
            deep, shallow = [w for w in group if w.full], [w for w in group if not w.full]
            failed += self._step_group(UNET_DEEP, deep) + self._step_group(UNET_SHALLOW, shallow)
        return failed

    def _step_group(self, name: str, works: list[Work]) -> list[tuple[Work, Exception]]:
        try:
            return self._step(name, works)
        except Exception as e:
            if len(works) == 1:
                return [(works[0], e)]
        failed = []
        for work in works:
            try:
                failed += self._step(name, [work])
            except Exception as e:
                failed.append((work, e))
        return failed

    def _step(self, name: str, works: list[Work]) -> list[tuple[Work, Exception]]:
        if not works:
            return []
        # each work's inputs, then the ControlNets of the tick (one call per ControlNet over every work that runs it)
        prepared = [w.inputs() for w in works]
        outputs = run_jobs([jobs for _, jobs in prepared], [w.stats for w in works])
        feeds = [w.with_residuals(f, out) for w, (f, _), out in zip(works, prepared, outputs)]
        started = time.perf_counter()
        out = works[0].runners[name].infer({k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
        seconds = time.perf_counter() - started
        rows = np.cumsum([len(f[SAMPLE]) for f in feeds])[:-1]
        noise = np.split(out[NOISE_PRED], rows)
        deep = np.split(out[DEEP_FEATURE], rows) if DEEP_FEATURE in out else [None] * len(works)
        failed = []
        for work, noise_pred, feature in zip(works, noise, deep):
            work.stats.seconds[name] += seconds
            try:
                work.advance(noise_pred, feature)
            except Exception as e:
                failed.append((work, e))
        return failed

    def finish(self, works: list[Work]) -> list[Generation]:
        """6-7. Decode the finished works in one VAE call per image size, and remember each result for later
        requests."""
        decoded, sizes = {}, defaultdict(list)
        for work in works:
            sizes[work.latents.shape].append(work)
        for group in sizes.values():
            decoding = Stats()
            images = to_uint8(self.decode_latents(torch.cat([w.latents for w in group]), decoding))
            for work, pixels in zip(group, np.split(images, len(group))):
                decoded[id(work)] = pixels, decoding.seconds[VAE_DECODER]
        results = []
        for work in works:
            pixels, seconds = decoded[id(work)]
            work.stats.seconds[VAE_DECODER] += seconds
            layer, similarity = "off", 0.0
            if work.cache is not None:
                layer = work.decision.layer if work.decision is not None else "miss"
                similarity = work.decision.similarity if work.decision is not None else 0.0
                work.cache.remember(
                    work.vector, work.scope, work.seed, work.run_steps, pixels, work.captured, work.about
                )
            results.append(Generation(pixels, work.seed, work.stats, work.pooled, 0.0, layer, similarity))
        return results

    def encode_prompt(self, request: Request, stats: Stats):
        """The text encoder's (embeddings, pooled) of request.texts, a row per chunk of each text (`begin`
        joins them), weighted prompts weighed; the memo is skipped when the request turns every cache off."""
        texts = request.texts(self.batch)
        key = (self.loras.key(request.loras), request.negative_prompt, request.prompt)  # a LoRA changes the encoder
        memo = request.cache_mode != "off"
        if memo and key in self.text_memo:  # an exact repeat: the text encoder's output is a pure function of the ids
            self.text_memo.move_to_end(key)
            stats.text_memo_hits += 1
            return self.text_memo[key]
        runner = self.runners_for(request)[TEXT_ENCODER]
        out = stats.timed(TEXT_ENCODER, runner, text_encoder_feeds(self.tokenizers, texts))
        self.text_memo[key] = self.weigh(request, out[TEXT_EMBEDDINGS], out[POOLED_EMBEDDING])
        if len(self.text_memo) > TEXT_MEMO_SIZE:
            self.text_memo.popitem(last=False)
        return self.text_memo[key]

    def weigh(self, request: Request, embeddings: np.ndarray, pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The text encoder's (embeddings, pooled) rows of request.texts (plain text, voltacache.prompts), with
        each weighted text's chunks as compel weighs them (voltacache.pipeline.weighting), and SDXL's pooled
        embedding (its first chunk's row) as compel pools it. A text's rows past its own chunks stay the empty
        chunks it was padded with."""
        prompts = request.weighted(self.batch)
        if not any(prompt.weighted for prompt in prompts):
            return embeddings, pooled
        if self.weighting is None:
            from .weighting import PromptWeighting

            self.weighting = PromptWeighting(self.tokenizers, self.export.geometry)
        runner, chunks, weighed = self.runners_for(request)[TEXT_ENCODER], len(embeddings) // len(prompts), {}
        embeddings, pooled = embeddings.copy(), pooled.copy()
        for i, prompt in enumerate(prompts):
            if prompt.weighted:
                if prompt not in weighed:
                    weighed[prompt] = self.weighting.embeddings(runner, prompt)
                hidden, pooled_text = weighed[prompt]
                hidden = hidden.reshape(-1, *embeddings.shape[1:])
                embeddings[i * chunks : i * chunks + len(hidden)] = hidden
                if pooled_text is not None:
                    pooled[i * chunks] = pooled_text
        return embeddings, pooled

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

    def latent_shape(self, request: Request) -> tuple[int, int, int, int]:
        """The latents of the request's images: (batch, channels, height, width)."""
        height, width = self.size(request)
        return self.batch, self.latent_channels, height // self.vae_scale, width // self.vae_scale

    def prepare_latents(self, scheduler, generator, timesteps, image, stats: Stats, shape) -> torch.Tensor:
        if image is None:
            return torch.randn(shape, generator=generator, dtype=torch.float32) * scheduler.init_noise_sigma
        # the latent distribution's sample, then the noise, in diffusers' order of generator draws
        latents = self.encode_image(np.repeat(image, self.batch, axis=0), generator, stats)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        return scheduler.add_noise(latents, noise, timesteps[:1].repeat(self.batch))

    def mask(self, request: Request) -> np.ndarray:
        """The request's inpainting mask at the image's size, binarized (1: repaint): (1, 1, height, width)."""
        height, width = self.size(request)
        return fit_mask(request.mask_image, width, height)

    def prepare_inpainting(self, scheduler, generator, timesteps, image, mask, from_noise: bool, stats: Stats, shape):
        """(first latents, Inpainting) as diffusers' StableDiffusionInpaintPipeline prepares them, generator
        draws in its order: the init image's latents (unless a 9-channel U-Net starts from pure noise at
        strength 1, `from_noise`), the noise, then the masked image's latents. `shape`: the latents'."""
        image_latents = None
        if not self.inpainting_unet or not from_noise:
            image_latents = self.encode_image(image, generator, stats).repeat(self.batch, 1, 1, 1)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if from_noise:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(self.batch))
        masked_image = (image * (mask < 0.5)).astype(np.float32)
        masked_image_latents = self.encode_image(masked_image, generator, stats).repeat(self.batch, 1, 1, 1)
        latent_mask = torch.nn.functional.interpolate(torch.from_numpy(mask), size=shape[2:]).repeat(
            self.batch, 1, 1, 1
        )
        if self.inpainting_unet:
            return latents, Inpainting(latent_mask, masked_image_latents=masked_image_latents)
        return latents, Inpainting(latent_mask, image_latents=image_latents, noise=noise)

    def encode_image(self, image: np.ndarray, generator, stats: Stats) -> torch.Tensor:
        """[-1, 1] NCHW pixels -> scaled latents: a sample of the VAE's latent distribution, drawn from `generator`."""
        out = stats.timed(VAE_ENCODER, self.runners[VAE_ENCODER], {IMAGE: image})
        mean, std = torch.from_numpy(out[LATENT_MEAN]), torch.from_numpy(out[LATENT_STD])
        return (mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)) * self.scaling_factor

    def decode_latents(self, latents: torch.Tensor, stats: Stats) -> np.ndarray:
        """Latents -> float image in [-1, 1], NCHW."""
        feeds = {LATENT: (latents / self.scaling_factor).numpy().astype(np.float32)}
        return stats.timed(VAE_DECODER, self.runners[VAE_DECODER], feeds)[IMAGE]


def guided(noise_pred: np.ndarray, guidance: float) -> np.ndarray:
    """Classifier-free guidance over the pair's rows (unconditional first), as diffusers computes it."""
    uncond, cond = np.split(noise_pred, 2)
    return uncond + guidance * (cond - uncond) if guidance > 1 else cond


def zero_unconditional(rows: np.ndarray, batch: int) -> np.ndarray:
    """The rows with the first `batch` (the negative prompt's) zeroed."""
    rows = rows.copy()
    rows[:batch] = 0
    return rows


def fingerprint(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def random_seed() -> int:
    return int(np.random.SeedSequence().generate_state(1)[0] >> 1)


def step_kwargs(scheduler, generator) -> dict:
    """eta and generator where the scheduler's step takes them (diffusers' prepare_extra_step_kwargs)."""
    import inspect

    params = set(inspect.signature(scheduler.step).parameters)
    return {k: v for k, v in {"eta": 0.0, "generator": generator}.items() if k in params}
