"""The Triton Python-backend models. triton_models/*/model.py are one-line adapters onto these classes.

Each `execute` returns one response per request; a bad request gets a TritonError response and
the model keeps serving. The denoiser runs the package's pipeline (`StableDiffusion.generate_images`)
with runners that are BLS calls into unet_deep / unet_shallow / vae_encoder / vae_decoder.
"""

from __future__ import annotations

import json
import secrets
import time
import traceback
from pathlib import Path

import numpy as np

from ..errors import InvalidRequest, VoltacacheError
from ..request import Request
from ..specs import ComponentSpec
from . import protocol as p


def pb():
    import triton_python_backend_utils as pb_utils  # only exists inside the Python-backend stub

    return pb_utils


class PythonModel:
    """Common plumbing: config parameters, per-request error responses."""

    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        self.parameters = {k: v["string_value"] for k, v in self.config.get("parameters", {}).items()}
        self.engines = Path(self.parameters["engines"])
        self.export = json.loads((self.engines / "engines.json").read_text())["export"]
        self.spec = p.serving_specs(self.export)[self.parameters.get("spec", self.config["name"])]
        self.setup()

    def setup(self):
        pass

    def execute(self, requests):
        pb_utils = pb()
        responses = []
        for request in requests:
            try:
                outputs = self.run(request)
                tensors = [
                    pb_utils.Tensor(t.name, np.ascontiguousarray(outputs[t.name]).astype(t.dtype))
                    for t in self.spec.outputs
                ]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except VoltacacheError as e:  # the request's fault, or a failure it names: say so and serve on
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.spec.name}: {e}")))
            except Exception as e:  # keep serving; the log keeps the traceback
                pb_utils.Logger.log_error(traceback.format_exc())
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.spec.name}: internal error {e!r}"))
                )
        return responses

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
        """The request's tensors as a checked Request (the edge checked it too; a server checks again)."""
        return Request.from_triton(lambda name: self.input(request, name, required=False)).check()


class TokenizerModel(PythonModel):
    """Checks the request, tokenizes it, stamps its arrival and says whether the denoiser's answer may
    come from Triton's response cache (serving/protocol.py)."""

    def setup(self):
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(self.engines / "tokenizer")
        self.batch = self.export["batch"]

    def run(self, request):
        from ..specs import INPUT_IDS
        from ..tokenizer import token_ids

        request = self.request(request)
        cacheable = request.cache_mode == "on" and request.seed is not None
        return {
            INPUT_IDS: token_ids(self.tokenizer, request.texts(self.batch)),
            p.RECEIVED_NS: np.array([time.monotonic_ns()], np.int64),
            p.RESPONSE_KEY: np.array([0 if cacheable else secrets.randbits(62) + 1], np.int64),
        }


class ComponentModel(PythonModel):
    """One engine component on ONNX Runtime (the CPU server has no onnxruntime backend)."""

    def setup(self):
        from ..build import load_engines

        self.runner = load_engines(self.engines, components=[self.spec.name]).runners[self.spec.name]

    def run(self, request):
        return self.runner.infer({t.name: self.input(request, t.name) for t in self.spec.inputs})


class BlsRunner:
    """The runner interface over a BLS call into another model of the repository."""

    def __init__(self, spec: ComponentSpec):
        self.spec = spec

    def infer(self, feeds):
        pb_utils = pb()
        request = pb_utils.InferenceRequest(
            model_name=self.spec.name,
            requested_output_names=self.spec.output_names,
            inputs=[pb_utils.Tensor(n, feeds[n]) for n in self.spec.input_names],
        )
        response = request.exec()
        if response.has_error():
            raise VoltacacheError(f"{self.spec.name}: {response.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in self.spec.output_names}


class DenoiserModel(PythonModel):
    def setup(self):
        from ..cache.layers import CacheSettings, open_cache
        from ..pipeline import StableDiffusion
        from ..specs import UNET_DEEP, UNET_SHALLOW, VAE_DECODER, VAE_ENCODER

        specs = p.serving_specs(self.export)
        runners = {name: BlsRunner(specs[name]) for name in (UNET_DEEP, UNET_SHALLOW, VAE_ENCODER, VAE_DECODER)}
        self.pipeline = StableDiffusion(runners, self.export, tokenizer=None)
        # the cross-request cache named by the deployment (voltacache deploy --cache), or None
        # (reported once in the server's log, where `voltacache serve` shows it, and served without)
        settings = CacheSettings.from_parameters(self.parameters)
        fingerprint, dim = self.export["fingerprint"], self.export["geometry"]["text_hidden"]
        self.cache = open_cache(settings, fingerprint, dim, warn=pb().Logger.log_warn)
        self.metrics = Metrics(pb(), self.spec.name)

    def run(self, request):
        from ..pipeline import Stats
        from ..specs import IMAGE, POOLED_EMBEDDING, TEXT_EMBEDDINGS

        started = time.perf_counter()
        stats = Stats()
        embeddings, pooled = self.input(request, TEXT_EMBEDDINGS), self.input(request, POOLED_EMBEDDING)
        request = self.request(request)
        self.pipeline.check(request)
        result = self.pipeline.generate_images(request, embeddings, pooled, stats, self.cache)
        self.metrics.record(stats, time.perf_counter() - started, result.cache, self.cache)
        return {
            # back to [-1, 1] for postprocess, exactly: it rounds every level to itself
            IMAGE: (result.images.astype(np.float32) / np.float32(127.5) - 1).transpose(0, 3, 1, 2),
            p.SEED_USED: np.array([result.seed], np.int64),
            p.UNET_DEEP_CALLS: np.array([stats.unet_deep_calls], np.int32),
            p.UNET_SHALLOW_CALLS: np.array([stats.unet_shallow_calls], np.int32),
            p.STEPS_COMPUTED: np.array([stats.steps], np.int32),
            p.CACHE_LAYER: np.array([result.cache.encode()], dtype=object),
            p.SIMILARITY: np.array([result.similarity], np.float32),
            p.COMPUTED_NS: np.array([time.monotonic_ns()], np.int64),
        }


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

    def record(self, stats, seconds: float, layer: str, cache) -> None:
        self.counter("voltacache_requests_total", "Requests denoised").increment(1)
        self.counter("voltacache_unet_deep_calls_total", "Full U-Net calls (DeepCache refresh steps)").increment(
            stats.unet_deep_calls
        )
        self.counter("voltacache_unet_shallow_calls_total", "Shallow U-Net calls (cached deep feature)").increment(
            stats.unet_shallow_calls
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
        from ..images import to_uint8
        from ..specs import IMAGE

        stats = {t.name: self.input(request, t.name) for t in p.STATS}
        if self.input(request, p.COMPUTED_NS)[0] < self.input(request, p.RECEIVED_NS)[0]:
            stats.update(
                {
                    p.UNET_DEEP_CALLS: np.array([0], np.int32),
                    p.UNET_SHALLOW_CALLS: np.array([0], np.int32),
                    p.STEPS_COMPUTED: np.array([0], np.int32),
                    p.CACHE_LAYER: np.array([b"exact"], dtype=object),
                    p.SIMILARITY: np.array([1.0], np.float32),
                }
            )
            self.metrics.cache_request("exact")
        return {p.IMAGES: to_uint8(self.input(request, IMAGE)), **stats}
