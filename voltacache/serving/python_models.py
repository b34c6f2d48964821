"""The Triton Python-backend models. triton_models/*/model.py are one-line adapters onto these classes.

Each `execute` returns one response per request; a bad request gets a TritonError response and
the model keeps serving. The denoiser runs the package's pipeline (`StableDiffusion.generate_images`)
with runners that are BLS calls into unet_deep / unet_shallow / vae_encoder / vae_decoder.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import numpy as np

from ..errors import VoltacacheError
from ..specs import ComponentSpec
from . import protocol as p


def pb():
    import triton_python_backend_utils as pb_utils  # only exists inside the Python-backend stub

    return pb_utils


class BadRequest(VoltacacheError):
    pass


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
            except (BadRequest, VoltacacheError, ValueError, UnicodeDecodeError) as e:
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
                raise BadRequest(f"missing input {name}")
            return None
        return tensor.as_numpy()

    def text(self, request, name) -> str:
        raw = self.input(request, name).reshape(-1)[0]
        raw = raw if isinstance(raw, bytes) else str(raw).encode()
        if len(raw) > p.MAX_PROMPT_BYTES:
            raise BadRequest(f"{name} is {len(raw)} bytes; at most {p.MAX_PROMPT_BYTES}")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRequest(f"{name} is not valid UTF-8 ({e.reason} at byte {e.start})") from e


class TokenizerModel(PythonModel):
    def setup(self):
        from transformers import CLIPTokenizer

        from ..pipeline import StableDiffusion

        tokenizer = CLIPTokenizer.from_pretrained(self.engines / "tokenizer")
        self.pipeline = StableDiffusion({}, self.export, tokenizer)

    def run(self, request):
        prompt, negative = self.text(request, p.PROMPT), self.text(request, p.NEGATIVE_PROMPT)
        if not prompt.strip():
            raise BadRequest("PROMPT is empty")
        prompts, negatives = self.pipeline.check_prompts(prompt, negative)
        return {self.spec.outputs[0].name: self.pipeline.tokenize(negatives + prompts)}


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
        from ..pipeline import StableDiffusion
        from ..specs import UNET_DEEP, UNET_SHALLOW, VAE_DECODER, VAE_ENCODER

        specs = p.serving_specs(self.export)
        runners = {name: BlsRunner(specs[name]) for name in (UNET_DEEP, UNET_SHALLOW, VAE_ENCODER, VAE_DECODER)}
        self.pipeline = StableDiffusion(runners, self.export, tokenizer=None)
        # the cross-request cache named by the deployment (voltacache deploy --cache), or None
        from ..cache.layers import CacheSettings

        settings = CacheSettings.from_parameters(self.parameters)
        self.cache = settings.open(self.export["fingerprint"], self.export["geometry"]["text_hidden"])
        self.metrics = DenoiserMetrics(pb())

    def run(self, request):
        from PIL import Image

        from ..pipeline import Sampling, Stats, load_image
        from ..specs import IMAGE, POOLED_EMBEDDING, TEXT_EMBEDDINGS

        started = time.perf_counter()
        seed = int(self.input(request, p.SEED)[0])
        strength = self.input(request, p.STRENGTH, required=False)
        sampling = Sampling(
            steps=int(self.input(request, p.STEPS)[0]),
            guidance=float(self.input(request, p.GUIDANCE)[0]),
            seed=None if seed == p.RANDOM_SEED else seed,
            scheduler=self.text(request, p.SCHEDULER),
            cache_interval=int(self.input(request, p.CACHE_INTERVAL)[0]),
            strength=float(strength[0]) if strength is not None else Sampling.strength,
        )
        sampling.check()
        mode = self.text(request, p.CACHE)
        pixels = self.input(request, p.INIT_IMAGE, required=False)
        if mode not in ("on", "off", "refresh"):
            raise BadRequest(f"CACHE {mode!r}: use on, off or refresh")
        image = (
            load_image(Image.fromarray(pixels), self.pipeline.width, self.pipeline.height)
            if pixels is not None
            else None
        )
        prompts, negatives = self.pipeline.check_prompts(
            self.text(request, p.PROMPT), self.text(request, p.NEGATIVE_PROMPT)
        )
        stats = Stats()
        result = self.pipeline.generate_images(
            prompts,
            negatives,
            self.input(request, TEXT_EMBEDDINGS),
            self.input(request, POOLED_EMBEDDING),
            sampling,
            image=image,
            stats=stats,
            cache=self.cache,
            cache_mode=mode,
        )
        self.metrics.record(stats, time.perf_counter() - started, result, self.cache)
        return {
            # back to [-1, 1] for postprocess, exactly: it rounds every level to itself
            IMAGE: (result.images.astype(np.float32) / np.float32(127.5) - 1).transpose(0, 3, 1, 2),
            p.SEED_USED: np.array([result.seed], np.int64),
            p.UNET_DEEP_CALLS: np.array([stats.unet_deep_calls], np.int32),
            p.UNET_SHALLOW_CALLS: np.array([stats.unet_shallow_calls], np.int32),
            p.STEPS_COMPUTED: np.array([stats.steps], np.int32),
            p.CACHE_LAYER: np.array([result.cache.encode()], dtype=object),
            p.SIMILARITY: np.array([result.similarity], np.float32),
        }


class DenoiserMetrics:
    """Custom Prometheus counters on Triton's metrics port."""

    def __init__(self, pb_utils):
        self.pb_utils = pb_utils
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
            self.metrics[key] = self.families[name].Metric(labels={"model": "denoiser", **labels})
        return self.metrics[key]

    def record(self, stats, seconds: float, result, cache) -> None:
        self.counter("voltacache_requests_total", "Requests denoised").increment(1)
        self.counter("voltacache_unet_deep_calls_total", "Full U-Net calls (DeepCache refresh steps)").increment(
            stats.unet_deep_calls
        )
        self.counter("voltacache_unet_shallow_calls_total", "Shallow U-Net calls (cached deep feature)").increment(
            stats.unet_shallow_calls
        )
        self.counter("voltacache_steps_total", "Denoising steps computed").increment(stats.steps)
        self.counter("voltacache_step_seconds_total", "Seconds spent in denoising steps").increment(seconds)
        self.counter(
            "voltacache_cache_requests_total",
            "Requests by cache layer (semantic, approximate, miss, off)",
            layer=result.cache,
        ).increment(1)
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
    def run(self, request):
        from ..pipeline import to_uint8
        from ..specs import IMAGE

        return {p.IMAGES: to_uint8(self.input(request, IMAGE))}
