"""The Triton Python-backend models. triton_models/*/model.py are one-line adapters onto these classes.

Each `execute` returns one response per request; a bad request gets a TritonError response and
the model keeps serving. The denoiser runs the package's pipeline (`StableDiffusion.generate_images`)
with runners that are BLS calls into unet_deep / unet_shallow / vae_encoder / vae_decoder.
"""

from __future__ import annotations

import functools
import json
import secrets
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import CacheUnavailable, InvalidRequest, UsageError, VoltacacheError
from ..request import LORAS, Request
from ..result import Result
from ..runtime.manifests import read_engine_manifest
from ..specs import TEXT_ENCODER, ComponentSpec
from . import protocol as p


def pb():
    import triton_python_backend_utils as pb_utils  # only exists inside the Python-backend stub

    return pb_utils


class PythonModel:
    """Common plumbing: config parameters, per-request error responses."""

    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        self.repository = Path(args["model_repository"]).parent  # the model's folder is inside it
        self.parameters = {k: v["string_value"] for k, v in self.config.get("parameters", {}).items()}
        self.engines = Path(self.parameters["engines"])
        self.manifest = read_engine_manifest(self.engines, "engines")
        self.export = self.manifest.export
        self.spec = p.serving_specs(self.export)[self.parameters.get("spec", self.config["name"])]
        self.setup()

    def setup(self):
        pass

    def registered_loras(self):
        """The LoRAs the deployment registered (deploy --lora; none: an empty registry), keeping the
        variants deploy --lora-resident asked for."""
        from ..pipeline.lora import Loras

        resident = int(self.parameters.get(p.LORA_RESIDENT) or 1)
        return Loras.from_registry(self.repository / p.LORA_FOLDER, self.export, resident, self.manifest.backend)

    def execute(self, requests):
        return [self.respond(self.run, request) for request in requests]

    def respond(self, outputs: Callable[..., dict], *args):
        """The response for `outputs(*args)`, or the error response for what it raised."""
        pb_utils = pb()
        try:
            tensors = outputs(*args)
        except Exception as e:
            return self.error_response(e)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(t.name, np.ascontiguousarray(tensors[t.name]).astype(t.dtype))
                for t in self.spec.outputs
                if t.name in tensors  # the denoiser answers a generation or a search: each its own outputs
            ]
        )

    def error_response(self, error: Exception):
        pb_utils = pb()
        if isinstance(error, VoltacacheError):  # the request's fault, or a failure it names: say so and serve on
            # INVALID_ARG: the request is wrong (as a UsageError exits 2 in process); else INTERNAL
            code = pb_utils.TritonError.INVALID_ARG if isinstance(error, UsageError) else pb_utils.TritonError.INTERNAL
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.spec.name}: {error}", code))
        # keep serving; the log keeps the traceback
        pb_utils.Logger.log_error("".join(traceback.format_exception(error)))
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.spec.name}: internal error {error!r}"))

    def run(self, request) -> dict:
        raise NotImplementedError

    def input(self, request, name, required=True):
        tensor = pb().get_input_tensor_by_name(request, name)
        if tensor is None:
            if required:
                raise InvalidRequest(f"missing input {name}")
            return None
        return tensor.as_numpy()

    def request(self, request) -> Request:
        """The request's tensors as a Request (absent ones take its defaults), not yet checked."""
        return Request.from_triton(lambda name: self.input(request, name, required=False))


class TokenizerModel(PythonModel):
    """Checks the request, tokenizes it, stamps its arrival and says whether the denoiser's answer may
    come from Triton's response cache (serving/protocol.py)."""

    def setup(self):
        from ..runtime.tokenizer import load_tokenizers

        self.tokenizers = load_tokenizers(self.engines, self.export)
        self.batch = self.export.batch

    def run(self, request):
        from ..runtime.tokenizer import check_prompt_length, text_encoder_feeds

        request = self.request(request).check()  # this process's one check: a bad request stops here
        check_prompt_length(self.tokenizers, request, self.export.max_prompt_chunks)
        cacheable = request.cache_mode == "on" and request.seed is not None
        feeds = text_encoder_feeds(self.tokenizers, request.texts(self.batch))
        return {
            **feeds,
            # the text encoder applies the request's LoRAs (a variant), so the denoiser never encodes again
            p.LORA_ROWS: p.lora_rows(request.loras, len(next(iter(feeds.values())))),
            p.RECEIVED_NS: np.array([time.monotonic_ns()], np.int64),
            p.RESPONSE_KEY: np.array([0 if cacheable else secrets.randbits(62) + 1], np.int64),
        }


class ComponentModel(PythonModel):
    """One engine component on ONNX Runtime (the CPU server has no onnxruntime backend)."""

    def setup(self):
        from ..runtime.engines import load_engines

        self.runner = load_engines(self.engines, components=[self.spec.name], served=True).runners[self.spec.name]
        # the deployment's LoRAs (deploy --lora): a request naming some runs on a variant of this engine
        self.loras = self.registered_loras()
        self.metrics = Metrics(pb(), self.spec.name)

    def execute(self, requests):
        """Triton's dynamic batcher may hand over several requests: one engine call over all of them
        (each on its own when one names LoRAs)."""
        lora = any(self.request_loras(r) for r in requests)
        if len(requests) == 1 or lora:
            return super().execute(requests)
        feeds = []
        for request in requests:
            try:
                feeds.append(self.feeds(request))
            except Exception as e:
                feeds.append(self.error_response(e))
        good = [f for f in feeds if isinstance(f, dict)]
        try:
            out = self.runner.infer({n: np.concatenate([f[n] for f in good]) for n in self.spec.input_names})
        except Exception:  # answer each on its own, so that the error is told to whom it concerns
            return super().execute(requests)
        rows = np.cumsum([len(f[self.spec.input_names[0]]) for f in good])[:-1]
        parts = iter(zip(*(np.split(out[n], rows) for n in self.spec.output_names)))
        return [
            self.respond(lambda: dict(zip(self.spec.output_names, next(parts)))) if isinstance(f, dict) else f
            for f in feeds
        ]

    def feeds(self, request) -> dict:
        return {t.name: self.input(request, t.name) for t in self.spec.inputs}

    def run(self, request):
        return self.runner_for(request).infer(self.feeds(request))

    def request_loras(self, request) -> tuple:
        rows = pb().get_input_tensor_by_name(request, LORAS)
        return () if rows is None else p.parse_lora_rows(rows.as_numpy())

    def runner_for(self, request):
        """The base engine, or the variant of the request's LoRAs (built if it is not resident)."""
        loras = self.request_loras(request)
        if not loras:
            return self.runner
        self.loras.check(loras)
        switches = self.loras.switches
        runner = self.loras.runners(loras, {self.spec.name: self.runner})[self.spec.name]
        if self.loras.switches != switches:
            self.metrics.counter("voltacache_lora_switches_total", "LoRA variants built").increment(1)
            self.metrics.counter(
                "voltacache_lora_switch_seconds_total", "Seconds spent building LoRA variants"
            ).increment(self.loras.last_switch_seconds)
        return runner


def bls(model: str, feeds: dict, outputs: list[str]) -> dict:
    """A BLS call into another model of the repository: the named outputs, or a VoltacacheError
    carrying that model's error."""
    pb_utils = pb()
    request = pb_utils.InferenceRequest(
        model_name=model,
        requested_output_names=outputs,
        inputs=[pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in feeds.items()],
    )
    response = request.exec()
    if response.has_error():
        raise VoltacacheError(response.error().message())
    return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs}


class BlsRunner:
    """The runner interface over a BLS call into another model of the repository; `loras`: the (name,
    scale) pairs the called model applies (it holds the variant)."""

    def __init__(self, spec: ComponentSpec, loras: tuple = ()):
        self.spec, self.loras = spec, loras

    def infer(self, feeds):
        feeds = {n: feeds[n] for n in self.spec.input_names}
        if self.loras:  # a row per image row, as the engine's inputs (the text encoder's are batched by Triton)
            feeds[LORAS] = p.lora_rows(self.loras, len(feeds[self.spec.input_names[0]]))
        try:
            return bls(self.spec.name, feeds, self.spec.output_names)
        except VoltacacheError as e:
            raise VoltacacheError(f"{self.spec.name}: {e}") from None


class ServedLoras:
    """The denoiser's side of the deployment's LoRAs: the registry (to check and scope requests), and
    runners that ask the component models for their variant. One runners dict per variant, so the
    step batcher runs requests of the same LoRAs in one call."""

    def __init__(self, registry):
        import threading

        self.registry, self.variants = registry, {}
        self.lock = threading.Lock()  # Triton's execute thread and the step batcher's both ask

    def check(self, loras) -> None:
        self.registry.check(loras)

    def key(self, loras) -> tuple:
        return self.registry.key(loras)

    def runners(self, loras, base: dict) -> dict:
        if not loras:
            return base
        from ..pipeline.lora import LORA_COMPONENTS

        key = self.key(loras)
        with self.lock:
            if key not in self.variants:
                if len(self.variants) >= 4 * self.registry.resident:
                    self.variants.pop(next(iter(self.variants)))
                variant = {n: BlsRunner(base[n].spec, loras) for n in LORA_COMPONENTS if n in base}
                self.variants[key] = {**base, **variant}
            return self.variants[key]


class DenoiserModel(PythonModel):
    """The pipeline between the text encoder and postprocess, with runners that are BLS calls.

    With step batching (the default deployment) one instance serves every request: `execute` hands
    each request to a StepBatcher thread and returns; the thread answers through the request's
    response sender, so Triton's response cache and plain (non-streaming) clients work as before.
    Without it, each instance denoises one request at a time (`deploy --no-step-batching`)."""

    def setup(self):
        from ..cache.layers import CacheSettings, open_cache
        from ..pipeline.batching import StepBatcher
        from ..pipeline.calibration import load_calibration
        from ..pipeline.stable_diffusion import StableDiffusion
        from ..runtime.tokenizer import load_tokenizers
        from ..specs import UNET_DEEP, UNET_SHALLOW, VAE_DECODER, VAE_ENCODER, is_controlnet

        specs = p.serving_specs(self.export)
        controlnets = [name for name in self.export.components if is_controlnet(name)]
        names = (TEXT_ENCODER, UNET_DEEP, UNET_SHALLOW, VAE_ENCODER, VAE_DECODER, *controlnets)
        runners = {name: BlsRunner(specs[name]) for name in names}
        # the engines folder's calibrated DeepCache schedules, as read when the model loads
        calibration = load_calibration(self.engines, self.export.fingerprint)
        # the deployment's LoRAs: a request naming some is encoded again here, by their text encoder variant
        registry = self.registered_loras()
        loras = ServedLoras(registry)
        # the ensemble's text encoder encodes every prompt, LoRAs applied; the tokenizers weigh weighted ones
        tokenizers = load_tokenizers(self.engines, self.export)
        self.pipeline = StableDiffusion(runners, self.export, tokenizers, calibration, loras)
        # the cross-request cache named by the deployment (voltacache deploy --cache), or None
        # (reported once in the server's log, where `voltacache serve` shows it, and served without)
        settings = CacheSettings.from_parameters(self.parameters)
        fingerprint, dim = self.export.fingerprint, self.export.geometry.pooled_dim
        self.cache = open_cache(settings, fingerprint, dim, warn=pb().Logger.log_warn)
        self.cache_index = settings.index
        self.metrics = Metrics(pb(), self.spec.name)
        self.cancels = Cancellations()
        self.batcher = None
        if self.parameters.get(p.STEP_BATCHING) == "on":
            self.batcher = StepBatcher(self.pipeline, self.cache, on_tick=self.metrics.tick).start()

    def execute(self, requests):
        if self.batcher is None:
            return super().execute(requests)
        from ..pipeline.batching import Ticket

        for request in requests:
            sender = request.get_response_sender()
            if self.is_direct(request):  # a search or a cancel: answered here, between the batcher's ticks
                self.send(sender, self.respond(self.direct, request))
                continue
            try:
                inputs = self.inputs(request)
            except Exception as e:
                self.send(sender, self.error_response(e))
                continue
            # `done` holds the request: Triton frees its tensors once it is answered
            done = functools.partial(self.answer, sender, request)
            self.batcher.submit(Ticket(*inputs, done=done, cancelled=self.cancels.watch(request)))
        return None

    def finalize(self):
        if self.batcher is not None:
            self.batcher.close()

    def answer(self, sender, request, result, error) -> None:
        """The step batcher's `done`: the request's response, from the batcher's thread."""
        from ..pipeline.batching import Cancelled

        self.cancels.forget(request)
        if isinstance(error, Cancelled):
            self.metrics.counter("voltacache_cancelled_requests_total", "Requests whose client went away").increment(1)
        self.send(sender, self.error_response(error) if error is not None else self.respond(self.outputs, result))

    @staticmethod
    def send(sender, response) -> None:
        sender.send(response, flags=pb().TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def inputs(self, request):
        """(Request, text embeddings, pooled embedding) of a Triton request; the ensemble's text encoder
        applied the request's LoRAs (their variant). Checked once, where it enters the batcher (or `run`)."""
        from ..specs import POOLED_EMBEDDING, TEXT_EMBEDDINGS

        embeddings, pooled = self.input(request, TEXT_EMBEDDINGS), self.input(request, POOLED_EMBEDDING)
        request = self.request(request)
        # the ensemble encoded the prompts' plain text; weights are weighed here, with BLS text-encoder calls
        return request, *self.pipeline.weigh(request, embeddings, pooled)

    def is_search(self, request) -> bool:
        return pb().get_input_tensor_by_name(request, p.SEARCH) is not None

    def is_direct(self, request) -> bool:
        """A request sent to the denoiser itself: a cache search, or a cancel."""
        return self.is_search(request) or pb().get_input_tensor_by_name(request, p.CANCEL) is not None

    def direct(self, request) -> dict:
        if self.is_search(request):
            return self.search(request)
        value = self.input(request, p.CANCEL).reshape(-1)[0]
        target = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        found = self.cancels.cancel(target)
        return {p.CANCELLED: np.array([int(found)], np.int32)}

    def search(self, request) -> dict:
        """A cache_search request: this process holds the cache (a milvus-lite index opens in one)."""
        from ..cache.search import SearchQuery, search, to_triton
        from ..runtime.tokenizer import pooled_chunks
        from ..specs import POOLED_EMBEDDING

        query = SearchQuery.from_triton(lambda name: self.input(request, name, required=False)).check()
        if self.cache is None:
            if self.cache_index is None:
                raise InvalidRequest("this deployment keeps no cache to search; deploy with --cache")
            raise CacheUnavailable(f"cache {self.cache_index} did not open when the server started; see its log")
        pooled = self.input(request, POOLED_EMBEDDING, required=query.embeds and self.cache.embedder.name == "clip")
        # the conditional text's chunks (Request.texts: the negatives come first), as a generation embeds it
        chunks = None if pooled is None else pooled_chunks(pooled, 2 * self.pipeline.batch)[self.pipeline.batch]
        return to_triton(search(self.cache, query, chunks))

    def run(self, request):
        if self.is_direct(request):
            return self.direct(request)
        started = time.perf_counter()
        request, embeddings, pooled = self.inputs(request)
        self.pipeline.check(request)
        result = self.pipeline.generate_images(request, embeddings, pooled, cache=self.cache)
        result.seconds = time.perf_counter() - started
        return self.outputs(result)

    def outputs(self, generation) -> dict:
        """The result's tensors (uint8 images, as the client gets them) and when it was computed."""
        self.metrics.record(generation.stats, generation.seconds, generation.cache, self.cache)
        return {**generation.report().to_triton(), p.COMPUTED_NS: np.array([time.monotonic_ns()], np.int64)}


class Cancellations:
    """How a request in the step batcher learns that its client went away. Triton 2.51 checks an
    ensemble's cancellation only between its steps, so the denoiser never sees it (docs/robustness.md);
    a client that goes away sends CANCEL with its request's id instead (every voltacache call carries a
    fresh one), and a request also ends at its deadline (its `timeout`, the client's own), which frees
    the slot of a client killed before it could say so. A direct gRPC call's own cancellation counts too."""

    REMEMBER_S = 300  # a cancel may arrive before its request reached the denoiser (tokenizer, text encoder)

    def __init__(self):
        import threading

        self.lock = threading.Lock()
        self.asked: dict[str, float] = {}  # request id -> when its cancel arrived
        self.watched: dict[str, int] = {}  # request id -> requests of that id in the batcher

    def watch(self, request) -> Callable[[], str | None]:
        """The ticket's `cancelled`: why the request should stop now, or None."""
        request_id = request.request_id() or ""
        timeout_us = request.timeout() if hasattr(request, "timeout") else 0
        deadline = time.monotonic() + timeout_us / 1e6 if timeout_us else None
        if request_id:
            with self.lock:
                self.watched[request_id] = self.watched.get(request_id, 0) + 1

        def cancelled() -> str | None:
            if request.is_cancelled():
                return "cancelled by its client"
            if request_id and request_id in self.asked:
                return "cancelled by its client"
            if deadline is not None and time.monotonic() > deadline:
                return f"past its deadline ({timeout_us / 1e6:g} s)"
            return None

        return cancelled

    def forget(self, request) -> None:
        request_id = request.request_id() or ""
        with self.lock:
            if self.watched.get(request_id, 0) > 1:
                self.watched[request_id] -= 1
            else:
                self.watched.pop(request_id, None)

    def cancel(self, request_id: str) -> bool:
        """Cancel the requests of this id; whether one was in the batcher."""
        if not request_id:
            raise InvalidRequest("CANCEL: give the request id of the request to cancel")
        now = time.monotonic()
        with self.lock:
            self.asked = {k: t for k, t in self.asked.items() if now - t < self.REMEMBER_S}
            self.asked[request_id] = now
            return request_id in self.watched


class Metrics:
    """Custom Prometheus counters on Triton's metrics port."""

    def __init__(self, pb_utils, model: str):
        self.pb_utils, self.model = pb_utils, model
        self.families = {}  # a family must outlive its metrics
        self.metrics = {}
        self.last = {}

    def counter(self, name: str, description: str, **labels):
        if name not in self.families:
            self.families[name] = self.pb_utils.MetricFamily(
                name=name, description=description, kind=self.pb_utils.MetricFamily.COUNTER
            )
        key = (name, tuple(sorted(labels.items())))
        if key not in self.metrics:
            self.metrics[key] = self.families[name].Metric(labels={"model": self.model, **labels})
        return self.metrics[key]

    def cache_request(self, layer: str) -> None:
        self.counter(
            "voltacache_cache_requests_total",
            "Requests by cache layer (exact, semantic, approximate, miss, off)",
            layer=layer,
        ).increment(1)

    def tick(self, tick) -> None:
        """One step-batcher tick. Occupancy = images / calls per U-Net; queue and tick time as sums
        (Prometheus: rate(sum) / rate(count))."""
        self.counter("voltacache_ticks_total", "Step-batcher ticks").increment(1)
        self.counter("voltacache_tick_seconds_total", "Seconds spent in step-batcher ticks").increment(tick.seconds)
        for call, images in (("deep", tick.deep_images), ("shallow", tick.shallow_images)):
            if images:
                self.counter("voltacache_tick_calls_total", "U-Net calls made by ticks", call=call).increment(1)
                self.counter(
                    "voltacache_tick_images_total", "Images in those calls (batch occupancy)", call=call
                ).increment(images)
        if tick.queue_seconds:
            self.counter("voltacache_queued_requests_total", "Requests admitted by ticks").increment(
                len(tick.queue_seconds)
            )
            self.counter(
                "voltacache_queue_seconds_total", "Seconds requests waited before a tick admitted them"
            ).increment(sum(tick.queue_seconds))

    def record(self, stats, seconds: float, layer: str, cache) -> None:
        self.counter("voltacache_requests_total", "Requests denoised").increment(1)
        self.counter("voltacache_unet_deep_calls_total", "Full U-Net calls (DeepCache refresh steps)").increment(
            stats.unet_deep_calls
        )
        self.counter("voltacache_unet_shallow_calls_total", "Shallow U-Net calls (cached deep feature)").increment(
            stats.unet_shallow_calls
        )
        self.counter("voltacache_controlnet_calls_total", "ControlNet calls (one per ControlNet per step)").increment(
            stats.controlnet_calls
        )
        self.counter("voltacache_steps_total", "Denoising steps computed").increment(stats.steps)
        self.counter("voltacache_step_seconds_total", "Seconds spent in denoising steps").increment(seconds)
        self.cache_request(layer)
        if cache is not None:  # the cache counts totals; the counters move by what changed since
            totals = {
                ("voltacache_cache_steps_skipped_total", "Denoising steps the caches saved"): cache.counts[
                    "steps_skipped"
                ],
                ("voltacache_cache_evictions_total", "Cache entries evicted"): cache.store.evictions,
                ("voltacache_cache_bytes_stored_total", "Bytes written to the cache"): cache.store.bytes_written,
            }
            for (name, description), total in totals.items():
                self.counter(name, description).increment(total - self.last.get(name, 0))
                self.last[name] = total


class PostprocessModel(PythonModel):
    """uint8 pixels, and the denoiser's report, or for a response Triton's cache gave the denoiser
    (computed before this request arrived) an exact hit with nothing computed."""

    def setup(self):
        self.metrics = Metrics(pb(), self.spec.name)

    def run(self, request):
        result = Result.from_triton(lambda name: self.input(request, name))
        if self.input(request, p.COMPUTED_NS)[0] < self.input(request, p.RECEIVED_NS)[0]:
            result = result.exact_hit()
            self.metrics.cache_request("exact")
        return result.to_triton()


class CacheSearchModel(PythonModel):
    """The cache's search API (voltacache.cache.search): embeds the query text as a generation embeds
    its prompt (tokenizer, then text_encoder), and asks the denoiser, which holds the cache."""

    def setup(self):
        from ..cache.layers import CacheSettings
        from ..cache.search import QueryEncoder
        from ..runtime.tokenizer import load_tokenizers

        tokenizers = load_tokenizers(self.engines, self.export)
        text_encoder = BlsRunner(p.serving_specs(self.export)[TEXT_ENCODER])
        self.encoder = QueryEncoder(tokenizers, text_encoder, self.export.batch)
        # only the clip embedder reads the text encoder's pooled output; the sentence embedder, the text
        self.pooled = CacheSettings.from_parameters(self.parameters).embedder == "clip"

    def run(self, request):
        from ..cache.search import SearchQuery
        from ..specs import POOLED_EMBEDDING

        query = SearchQuery.from_triton(lambda name: self.input(request, name, required=False)).check()
        feeds = query.to_triton()
        if query.embeds and self.pooled:  # every row: the denoiser's input is the text encoder's output
            feeds[POOLED_EMBEDDING] = self.encoder.pooled(query.text)
        # a fresh key: Triton's response cache on the denoiser never answers a search (entries change)
        feeds[p.RESPONSE_KEY] = np.array([secrets.randbits(62) + 1], np.int64)
        try:
            return bls(p.DENOISER, feeds, [t.name for t in p.SEARCH_OUTPUTS])
        except VoltacacheError as e:  # the denoiser's message already names the model
            raise VoltacacheError(str(e).removeprefix(f"{p.DENOISER}: ")) from None
