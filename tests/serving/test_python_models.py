"""The Triton Python models (voltacache.serving.python_models) in process, without a tritonserver.

`triton_python_backend_utils` is the stand-in in pb_utils_stub.py. Each model is initialized as the
Python backend does it (`initialize(args)`, model_config being Triton's JSON of the config that
`voltacache deploy` writes) and driven through `execute(requests)`. The denoiser's BLS calls reach
ONNX Runtime runners over the session's engines. What only a real server shows (batching, the
ensembles, the response cache, the metrics port) is tested in test_triton.py.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from google.protobuf.json_format import MessageToJson

from voltacache.request import Request
from voltacache.runtime.engines import load_engines
from voltacache.runtime.manifests import read_engine_manifest
from voltacache.serving import protocol as p
from voltacache.serving.deploy import python_config
from voltacache.serving.python_models import ComponentModel, DenoiserModel, PostprocessModel, TokenizerModel
from voltacache.specs import (
    COMPONENTS,
    INPUT_IDS,
    TEXT_ENCODER,
    UNET_DEEP,
    UNET_SHALLOW,
    VAE_DECODER,
    VAE_ENCODER,
)

from . import pb_utils_stub as stub

PROMPT = "a photo of an astronaut riding a horse"
BLS_TARGETS = (UNET_DEEP, UNET_SHALLOW, VAE_ENCODER, VAE_DECODER)


@pytest.fixture(scope="module")
def pb_utils():
    """The stub installed as triton_python_backend_utils for this module's tests."""
    name = "triton_python_backend_utils"
    saved = sys.modules.get(name)
    stub.reset()
    sys.modules[name] = stub
    yield stub
    stub.reset()
    if saved is None:
        sys.modules.pop(name, None)
    else:
        sys.modules[name] = saved


@pytest.fixture(autouse=True)
def fresh_log(pb_utils):
    pb_utils.LOGS.clear()
    pb_utils.CALLS.clear()


@pytest.fixture(scope="module")
def specs(engines_dir):
    return p.serving_specs(read_engine_manifest(engines_dir).export)


def triton_args(config) -> dict:
    """initialize()'s args as the Python backend passes them: the config as Triton prints it to JSON
    (proto field names, fields at their defaults included)."""
    try:
        text = MessageToJson(config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    except TypeError:  # protobuf < 5.26
        text = MessageToJson(config, preserving_proto_field_name=True, including_default_value_fields=True)
    return {
        "model_config": text,
        "model_instance_kind": "CPU",
        "model_instance_name": f"{config.name}_0_0",
        "model_instance_device_id": "0",
        "model_repository": "",
        "model_version": "1",
        "model_name": config.name,
    }


def load(model_class, name, engines_dir, specs, **parameters):
    config = python_config(specs[name], engines_dir)
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    model = model_class()
    model.initialize(triton_args(config))
    return model


@pytest.fixture(scope="module")
def runners(engines_dir):
    """The engines on ONNX Runtime, as `voltacache generate --engines` runs them."""
    return load_engines(engines_dir).runners


@pytest.fixture(scope="module")
def models(pb_utils, engines_dir, specs, runners):
    """The models of the txt2img / img2img ensembles, each initialized once, and the BLS targets
    (unet_deep, unet_shallow, vae_encoder, vae_decoder) routed to ONNX Runtime runners."""
    for name in BLS_TARGETS:
        pb_utils.register(name, runners[name].infer)
    return {
        p.TOKENIZER: load(TokenizerModel, p.TOKENIZER, engines_dir, specs),
        TEXT_ENCODER: load(ComponentModel, TEXT_ENCODER, engines_dir, specs),
        p.DENOISER: load(DenoiserModel, p.DENOISER, engines_dir, specs),
        p.POSTPROCESS: load(PostprocessModel, p.POSTPROCESS, engines_dir, specs),
    }


def check_tensors(spec_tensors, tensors: dict) -> None:
    """What Triton checks before a model sees a request: declared dtype and shape (-1: any)."""
    for t in spec_tensors:
        if t.name not in tensors:
            continue
        array = tensors[t.name]
        assert array.dtype == np.dtype(t.dtype), (t.name, array.dtype, t.dtype)
        assert len(array.shape) == len(t.shape), (t.name, array.shape, t.shape)
        assert all(d == -1 or d == n for d, n in zip(t.shape, array.shape)), (t.name, array.shape, t.shape)


def make_request(tensors: dict) -> stub.InferenceRequest:
    return stub.InferenceRequest(inputs=[stub.Tensor(name, array) for name, array in tensors.items()])


def outputs(response) -> dict:
    assert not response.has_error(), response.error().message()
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


def step(model, spec, tensors: dict) -> dict:
    """One request through a model, given the tensors its config declares as inputs (those present)."""
    inputs = {t.name: tensors[t.name] for t in spec.inputs if t.name in tensors}
    check_tensors(spec.inputs, inputs)
    (response,) = model.execute([make_request(inputs)])
    out = outputs(response)
    check_tensors(spec.outputs, out)
    # every output of the model's config (the denoiser's search outputs answer a search only)
    assert set(out) == set(spec.output_names) - p.DIRECT_NAMES
    return out


def ensemble(models, specs, request: Request) -> dict:
    """tokenizer -> text_encoder -> denoiser -> postprocess, wired by tensor name as the ensembles are."""
    tensors = dict(request.to_triton())
    for name in (p.TOKENIZER, TEXT_ENCODER, p.DENOISER, p.POSTPROCESS):
        tensors.update(step(models[name], specs[name], tensors))
    return tensors


def encode(models, specs, request: Request) -> dict:
    """The request's tensors and what tokenizer and text_encoder add: all the denoiser's inputs."""
    tensors = dict(request.to_triton())
    for name in (p.TOKENIZER, TEXT_ENCODER):
        tensors.update(step(models[name], specs[name], tensors))
    return tensors


def denoiser_inputs(specs, tensors: dict) -> dict:
    return {n: tensors[n] for n in specs[p.DENOISER].input_names if n in tensors}


def counters(**labels) -> dict:
    names = ("requests", "unet_deep_calls", "unet_shallow_calls", "steps")
    return {n: stub.metric_value(f"voltacache_{n}_total", model=p.DENOISER, **labels) for n in names}


def reference_ids(engines_dir, texts):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(engines_dir / "tokenizer")
    return np.asarray(tokenizer(texts, padding="max_length", max_length=77, truncation=True).input_ids, np.int32)


# --- tokenizer ---


def test_tokenizer_gives_negative_then_prompt_ids_and_stamps_the_request(models, specs, engines_dir):
    tokenizer = models[p.TOKENIZER]
    batch = read_engine_manifest(engines_dir).export.batch
    request = Request(PROMPT, negative_prompt="blurry", steps=4, seed=1, scheduler="ddim")
    out = step(tokenizer, specs[p.TOKENIZER], request.to_triton())
    assert np.array_equal(out[INPUT_IDS], reference_ids(engines_dir, ["blurry"] * batch + [PROMPT] * batch))
    assert out[INPUT_IDS][batch, :3].tolist() == [49406, 320, 1125]  # CLIP's ids: <start> a photo
    assert out[p.RESPONSE_KEY][0] == 0  # a seeded request with the cache on may be answered from Triton's cache
    for changes in (dict(seed=None), dict(cache_mode="off"), dict(cache_mode="refresh")):
        uncacheable = request.replace(**changes)
        assert step(tokenizer, specs[p.TOKENIZER], uncacheable.to_triton())[p.RESPONSE_KEY][0] != 0
    assert stub.LOGS == []


def test_bad_requests_get_errors_and_the_others_in_the_same_execute_succeed(models, engines_dir):
    tokenizer = models[p.TOKENIZER]
    good = Request(PROMPT, steps=4, seed=1, scheduler="ddim").to_triton()
    bad = {
        "empty prompt": {**good, p.PROMPT: np.array([b"   "], dtype=object)},
        "invalid utf-8": {**good, p.PROMPT: np.array([b"\xff\xfe bad"], dtype=object)},
        "huge prompt": {**good, p.PROMPT: np.array([b"a " * 5000], dtype=object)},
        "missing input": {k: v for k, v in good.items() if k != p.PROMPT},  # every other input has a default
        "zero steps": {**good, p.STEPS: np.array([0], np.int32)},
        "unknown scheduler": {**good, p.SCHEDULER: np.array([b"heun-9000"], dtype=object)},
        "unknown cache mode": {**good, p.CACHE: np.array([b"sometimes"], dtype=object)},
    }
    batch = [good, *bad.values(), good]
    responses = tokenizer.execute([make_request(t) for t in batch])
    assert len(responses) == len(batch)
    first, last = outputs(responses[0]), outputs(responses[-1])
    assert np.array_equal(first[INPUT_IDS], last[INPUT_IDS])
    for case, response in zip(bad, responses[1:-1]):
        assert response.has_error(), case
        message = response.error().message()
        assert message.startswith(f"{p.TOKENIZER}: ") and "internal error" not in message, (case, message)
    assert "PROMPT" in responses[1 + list(bad).index("missing input")].error().message()
    assert stub.LOGS == []  # a bad request is the client's fault: no traceback in the server log


def test_unexpected_exception_is_an_internal_error_and_logged(models, monkeypatch):
    tokenizer = models[p.TOKENIZER]
    run = tokenizer.run

    def failing(request):
        if stub.get_input_tensor_by_name(request, p.PROMPT).as_numpy()[0] == b"explode":
            raise RuntimeError("boom")
        return run(request)

    monkeypatch.setattr(tokenizer, "run", failing)
    good = Request(PROMPT, steps=4, seed=1, scheduler="ddim").to_triton()
    responses = tokenizer.execute(
        [make_request(good), make_request({**good, p.PROMPT: np.array([b"explode"], dtype=object)}), make_request(good)]
    )
    assert not responses[0].has_error() and not responses[2].has_error()
    assert responses[1].has_error()
    assert responses[1].error().message() == f"{p.TOKENIZER}: internal error RuntimeError('boom')"
    errors = [message for level, message in stub.LOGS if level == "ERROR"]
    assert len(errors) == 1 and "Traceback" in errors[0] and "RuntimeError: boom" in errors[0]


# --- postprocess ---


def denoised(specs, computed_ns: int, received_ns: int, seed: int = 0) -> dict:
    image_spec = next(t for t in specs[p.POSTPROCESS].inputs if t.name == p.IMAGES)
    return {
        p.IMAGES: np.random.default_rng(seed).integers(0, 256, image_spec.shape, dtype=np.uint8),
        p.SEED_USED: np.array([7], np.int64),
        p.UNET_DEEP_CALLS: np.array([3], np.int32),
        p.UNET_SHALLOW_CALLS: np.array([6], np.int32),
        p.CONTROLNET_CALLS: np.array([3], np.int32),
        p.STEPS_COMPUTED: np.array([9], np.int32),
        p.CACHE_LAYER: np.array([b"miss"], dtype=object),
        p.SIMILARITY: np.array([0.5], np.float32),
        p.COMPUTED_NS: np.array([computed_ns], np.int64),
        p.RECEIVED_NS: np.array([received_ns], np.int64),
    }


def test_postprocess_passes_the_denoisers_uint8_images_and_report(models, specs):
    """The images stay uint8 from the denoiser's decode to the client: no float round trip."""
    tensors = denoised(specs, computed_ns=2_000, received_ns=1_000)
    out = step(models[p.POSTPROCESS], specs[p.POSTPROCESS], tensors)
    assert out[p.IMAGES].dtype == np.uint8 and np.array_equal(out[p.IMAGES], tensors[p.IMAGES])
    for t in p.STAT_TENSORS:
        assert np.array_equal(out[t.name], tensors[t.name]), t.name


def test_postprocess_reports_a_response_older_than_its_request_as_exact(models, specs):
    exact = stub.metric_value("voltacache_cache_requests_total", model=p.POSTPROCESS, layer="exact")
    tensors = denoised(specs, computed_ns=1_000, received_ns=2_000)
    out = step(models[p.POSTPROCESS], specs[p.POSTPROCESS], tensors)
    assert out[p.CACHE_LAYER][0] == b"exact" and out[p.SEED_USED][0] == 7
    assert (out[p.UNET_DEEP_CALLS][0], out[p.UNET_SHALLOW_CALLS][0], out[p.STEPS_COMPUTED][0]) == (0, 0, 0)
    assert out[p.CONTROLNET_CALLS][0] == 0
    assert stub.metric_value("voltacache_cache_requests_total", model=p.POSTPROCESS, layer="exact") == exact + 1


# --- component models ---


def test_component_model_equals_its_engine(pb_utils, engines_dir, specs, runners):
    rng = np.random.default_rng(0)
    for name in COMPONENTS:
        feeds = {
            t.name: rng.integers(0, 49408, t.shape).astype(t.dtype)
            if t.dtype.startswith("int")
            else rng.standard_normal(t.shape).astype(t.dtype)
            for t in runners[name].spec.inputs  # the engine's shapes (Triton's have -1 where any length goes)
        }
        served = step(load(ComponentModel, name, engines_dir, specs), specs[name], feeds)
        local = runners[name].infer(feeds)
        for t in specs[name].outputs:
            assert np.array_equal(served[t.name], local[t.name]), (name, t.name)


def test_component_model_refuses_a_request_without_its_input(models):
    (response,) = models[TEXT_ENCODER].execute([make_request({})])
    assert response.has_error() and response.error().message() == f"{TEXT_ENCODER}: missing input {INPUT_IDS}"


# --- denoiser (BLS into unet_deep / unet_shallow / vae_encoder / vae_decoder) ---


def test_denoiser_equals_in_process_and_counts_its_unet_calls(models, specs, sd):
    request = Request(PROMPT, steps=9, seed=11, scheduler="ddim", cache_interval=3)
    before = counters()
    off = stub.metric_value("voltacache_cache_requests_total", model=p.DENOISER, layer="off")
    out = ensemble(models, specs, request)
    local = sd(request)
    assert np.array_equal(out[p.IMAGES][0], np.asarray(local.images[0]))
    assert (out[p.UNET_DEEP_CALLS][0], out[p.UNET_SHALLOW_CALLS][0], out[p.STEPS_COMPUTED][0]) == (3, 6, 9)
    assert out[p.SEED_USED][0] == 11 and out[p.CACHE_LAYER][0] == b"off"
    # the BLS calls made, and the counters moved by exactly those
    assert {n: stub.CALLS.get(n, 0) for n in BLS_TARGETS} == {
        UNET_DEEP: 3,
        UNET_SHALLOW: 6,
        VAE_ENCODER: 0,
        VAE_DECODER: 1,
    }
    moved = {k: v - before[k] for k, v in counters().items()}
    assert moved == {"requests": 1, "unet_deep_calls": 3, "unet_shallow_calls": 6, "steps": 9}
    assert stub.metric_value("voltacache_cache_requests_total", model=p.DENOISER, layer="off") == off + 1


def test_denoiser_requests_in_one_execute_are_independent(models, specs, sd):
    """Python-backend batching hands several requests to one execute(): each gets its own deep feature
    and seed, a bad one among them an error, and the counters move by what the good ones computed."""
    first = Request(PROMPT, steps=6, seed=21, scheduler="ddim", cache_interval=3)
    second = Request("a red circle on a blue background", steps=5, seed=22, scheduler="euler", cache_interval=2)
    encoded = [encode(models, specs, request) for request in (first, second)]
    good = [denoiser_inputs(specs, t) for t in encoded]
    bad = {**good[0], p.STEPS: np.array([0], np.int32)}
    before = counters()
    responses = models[p.DENOISER].execute([make_request(good[0]), make_request(bad), make_request(good[1])])
    assert responses[1].has_error() and "internal error" not in responses[1].error().message()
    for request, t, response in zip((first, second), encoded, (responses[0], responses[2])):
        served = step(models[p.POSTPROCESS], specs[p.POSTPROCESS], {**t, **outputs(response)})
        assert np.array_equal(served[p.IMAGES][0], np.asarray(sd(request).images[0])), request.seed
    assert stub.CALLS[UNET_DEEP] == 2 + 3 and stub.CALLS[UNET_SHALLOW] == 4 + 2
    moved = {k: v - before[k] for k, v in counters().items()}
    assert moved == {"requests": 2, "unet_deep_calls": 5, "unet_shallow_calls": 6, "steps": 11}


def test_denoiser_img2img_equals_in_process(models, specs, sd):
    init = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    request = Request(PROMPT, steps=10, seed=4, scheduler="ddim", init_image=init, strength=0.5)
    out = ensemble(models, specs, request)
    assert out[p.STEPS_COMPUTED][0] == 5 and stub.CALLS[VAE_ENCODER] == 1
    assert np.array_equal(out[p.IMAGES][0], np.asarray(sd(request).images[0]))


def test_a_failed_bls_call_fails_that_request_only(models, specs, sd, monkeypatch):
    request = Request(PROMPT, steps=4, seed=3, scheduler="ddim", cache_interval=2)
    t = encode(models, specs, request)
    inputs = denoiser_inputs(specs, t)

    def lost(feeds):
        raise RuntimeError("engine lost")

    with monkeypatch.context() as m:
        m.setitem(stub.MODELS, UNET_SHALLOW, lost)
        (response,) = models[p.DENOISER].execute([make_request(inputs)])
    assert response.has_error()
    message = response.error().message()
    assert message.startswith(f"{p.DENOISER}: ") and UNET_SHALLOW in message and "engine lost" in message
    (response,) = models[p.DENOISER].execute([make_request(inputs)])  # the model serves on
    served = step(models[p.POSTPROCESS], specs[p.POSTPROCESS], {**t, **outputs(response)})
    assert np.array_equal(served[p.IMAGES][0], np.asarray(sd(request).images[0]))


# --- denoiser with step batching (the default deployment): answers from its batcher's thread ---


@pytest.fixture(scope="module")
def batching_denoiser(models, engines_dir, specs):
    model = load(DenoiserModel, p.DENOISER, engines_dir, specs, **{p.STEP_BATCHING: "on"})
    yield model
    model.finalize()


def answered(request, timeout=120) -> stub.InferenceResponse:
    assert request.sender.finished.wait(timeout), "no final response"
    (response,) = request.sender.responses
    return response


def test_batching_denoiser_answers_each_request_from_shared_unet_calls(models, batching_denoiser, specs, sd):
    requests = [
        Request(PROMPT, steps=6, seed=31, scheduler="ddim", cache_interval=3),
        Request("a red circle on a blue background", steps=5, seed=32, scheduler="euler", cache_interval=2),
        Request(PROMPT, steps=0, seed=33),  # bad: fails alone, at once
    ]
    encoded = [encode(models, specs, r) for r in requests[:2]]
    bad = {**denoiser_inputs(specs, encoded[0]), p.STEPS: np.array([0], np.int32)}
    calls = sum(stub.CALLS.get(n, 0) for n in (UNET_DEEP, UNET_SHALLOW))
    sent = [make_request(denoiser_inputs(specs, t)) for t in encoded] + [make_request(bad)]
    assert batching_denoiser.execute(sent) is None  # answered later, through each request's sender
    assert answered(sent[2]).has_error()
    for request, t, triton_request in zip(requests, encoded, sent):
        served = step(models[p.POSTPROCESS], specs[p.POSTPROCESS], {**t, **outputs(answered(triton_request))})
        assert np.array_equal(served[p.IMAGES][0], np.asarray(sd(request).images[0])), request.seed
    # 11 steps of U-Net work in fewer calls: the two requests shared them
    assert sum(stub.CALLS.get(n, 0) for n in (UNET_DEEP, UNET_SHALLOW)) - calls < 11
    assert stub.metric_value("voltacache_tick_images_total", model=p.DENOISER, call="deep") >= 5


def test_batching_denoiser_drops_a_cancelled_request(models, batching_denoiser, specs):
    t = encode(models, specs, Request(PROMPT, steps=400, seed=34, scheduler="ddim"))
    request = make_request(denoiser_inputs(specs, t))
    before = stub.metric_value("voltacache_cancelled_requests_total", model=p.DENOISER)
    batching_denoiser.execute([request])
    request.cancelled = True  # the client went away
    response = answered(request, timeout=30)
    assert response.has_error() and "cancelled" in response.error().message()
    assert stub.metric_value("voltacache_cancelled_requests_total", model=p.DENOISER) == before + 1
