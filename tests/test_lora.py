"""LoRA on built engines (voltacache.pipeline.lora): parity with diffusers' load_lora_weights + fuse_lora, the base
engines untouched, kohya files, variants and their cache scope, and one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import PROMPT, cli, fused_pipeline, levels, one_error_line, write_lora

from voltacache.errors import InvalidRequest, UsageError, VoltacacheError
from voltacache.pipeline.lora import LoraFile
from voltacache.pipeline.stable_diffusion import StableDiffusion
from voltacache.request import LoraRequest
from voltacache.runtime.backends import BACKENDS

STEPS, SEED = 8, 3


@pytest.fixture(scope="module")
def lora_sd(engines_dir, lora_files):
    files = {name: LoraFile.open(name, path) for name, path in lora_files.items()}
    return StableDiffusion.from_engines(engines_dir, loras=files)


def ours(sd, **fields):
    return np.asarray(sd(PROMPT, steps=STEPS, seed=SEED, scheduler="ddim", cache_mode="off", **fields).images[0])


def theirs(pipe):
    from helpers import diffusers_image

    return np.asarray(diffusers_image(pipe, "ddim", SEED, steps=STEPS))


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_lora_image_equals_diffusers_fused(lora_sd, tiny_pipe, lora_files, scale):
    image = ours(lora_sd, loras=(("style", scale),))
    expected = theirs(fused_pipeline(tiny_pipe, [(lora_files["style"], scale)]))
    worst, _ = levels(image, expected)
    assert worst <= 1, worst
    assert levels(image, theirs(tiny_pipe))[0] > 10  # the LoRA shows: not the base image


def test_two_loras_equal_diffusers_adapters_fused(lora_sd, tiny_pipe, lora_files):
    image = ours(lora_sd, loras=(("style", 0.5), ("other", 0.8)))
    expected = theirs(fused_pipeline(tiny_pipe, [(lora_files["style"], 0.5), (lora_files["other"], 0.8)]))
    assert levels(image, expected)[0] <= 1


def test_removing_the_lora_gives_the_base_image_back_exactly(lora_sd, sd):
    base = ours(sd)
    assert not np.array_equal(ours(lora_sd, loras=(("style", 1.0),)), base)
    assert np.array_equal(ours(lora_sd), base)


def test_kohya_file_gives_the_same_image(lora_sd):
    assert np.array_equal(ours(lora_sd, loras=(("style_kohya", 0.7),)), ours(lora_sd, loras=(("style", 0.7),)))


def test_variants_stay_resident_up_to_the_limit(engines_dir, lora_files):
    files = {name: LoraFile.open(name, path) for name, path in lora_files.items()}
    sd = StableDiffusion.from_engines(engines_dir, loras=files, resident=1)
    ours(sd, loras=(("style", 1.0),))
    ours(sd, loras=(("style", 1.0),))
    assert sd.loras.switches == 1 and sd.loras.last_switch_seconds > 0
    ours(sd, loras=(("other", 1.0),))
    ours(sd, loras=(("style", 1.0),))  # evicted by `other`: built again
    assert sd.loras.switches == 3 and len(sd.loras.variants) == 1


def test_a_lora_image_is_never_served_for_the_base_model_or_another_lora(lora_sd, tmp_path):
    from voltacache.cache.layers import CacheSettings, open_cache

    settings = CacheSettings(index=str(tmp_path / "cache.db"), embedder="minilm")
    cache = open_cache(settings, lora_sd.export.fingerprint, lora_sd.export.geometry.pooled_dim)
    request = dict(steps=STEPS, seed=SEED, scheduler="ddim")
    first = lora_sd(PROMPT, cache=cache, loras=(("style", 1.0),), **request)
    assert first.cache == "miss"
    base = lora_sd(PROMPT, cache=cache, **request)
    other = lora_sd(PROMPT, cache=cache, loras=(("style", 0.5),), **request)
    assert base.cache == "miss" and other.cache == "miss"
    again = lora_sd(PROMPT, cache=cache, loras=(("style", 1.0),), **request)
    assert again.cache == "semantic" and np.array_equal(np.asarray(again.images[0]), np.asarray(first.images[0]))


def test_unknown_lora_name_is_refused(lora_sd):
    with pytest.raises(InvalidRequest, match="lora 'nope': not registered here"):
        lora_sd(PROMPT, steps=2, loras=(("nope", 1.0),))


def test_lora_for_another_architecture_is_refused(engines_dir, sd2_tiny, tmp_path):
    from voltacache.compile.checkpoint import load_pipeline

    foreign = write_lora(load_pipeline(sd2_tiny[0]), tmp_path / "sd2.safetensors")
    sd = StableDiffusion.from_engines(engines_dir, loras={"sd2": LoraFile.open("sd2", foreign)})
    with pytest.raises(UsageError, match="a LoRA for another architecture"):
        sd(PROMPT, steps=2, loras=(("sd2", 1.0),))
    assert np.asarray(sd(PROMPT, steps=2, seed=1).images[0]).shape[-1] == 3  # the pipeline goes on
    # a deployment refuses it when it is registered, not when a request names it
    result = cli("deploy", "--engines", engines_dir, "--repo", tmp_path / "repo", "--lora", f"sd2={foreign}")
    one_error_line(result, 2, "--lora sd2", "a LoRA for another architecture")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("option", ["style", "=x.safetensors", "a b=x.safetensors"])
def test_deploy_lora_option_refusals(engines_dir, tmp_path, option):
    result = cli("deploy", "--engines", engines_dir, "--repo", tmp_path / "repo", "--lora", option)
    one_error_line(result, 2, "--lora")
    assert not (tmp_path / "repo").exists()


def test_lora_with_deepcache(lora_sd, sd):
    """DeepCache's shallow steps run on the variant too: N=2 with the LoRA is close to N=1 with it,
    far from the base model at N=2."""
    cached = ours(lora_sd, loras=(("style", 1.0),), cache_interval=2)
    uncached = ours(lora_sd, loras=(("style", 1.0),))
    base = ours(sd, cache_interval=2)
    assert np.abs(cached.astype(int) - uncached).mean() < np.abs(cached.astype(int) - base).mean()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a.safetensors", ("a.safetensors", 1.0)),
        ("a:0.5", ("a", 0.5)),
        ("C:/x/a.safetensors:2", ("C:/x/a.safetensors", 2.0)),
    ],
)
def test_parse_lora(text, expected):
    assert LoraRequest.parse(text) == expected


def test_generate_with_lora_in_process(engines_dir, lora_files, tmp_path):
    out = tmp_path / "cat.png"
    base = tmp_path / "base.png"
    args = ("generate", PROMPT, "--engines", engines_dir, "--steps", "4", "--seed", "1")
    assert cli(*args, "--output", base).exit_code == 0
    result = cli(*args, "--output", out, "--lora", f"{lora_files['style']}:0.8", "--json")
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert levels(Image.open(out), Image.open(base))[0] > 10


@pytest.mark.parametrize(
    "lora, fragments",
    [
        ("missing.safetensors", ("--lora", "missing.safetensors", "no such file")),
        ("{pickle}", ("--lora", ".bin", "only .safetensors")),
        ("{torn}", ("not a LoRA file diffusers can read",)),
        ("{style}:99", ("scale", "99")),
    ],
)
def test_generate_lora_refusals(engines_dir, lora_files, tmp_path, lora, fragments):
    (tmp_path / "w.bin").write_bytes(b"x")
    (tmp_path / "torn.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    lora = lora.format(pickle=tmp_path / "w.bin", torn=tmp_path / "torn.safetensors", style=lora_files["style"])
    result = cli(
        "generate", PROMPT, "--engines", engines_dir, "--steps", "2", "--output", tmp_path / "x.png", "--lora", lora
    )
    one_error_line(result, 2, *fragments)
    assert not (tmp_path / "x.png").exists()


TRT_OK, TRT_WHY = BACKENDS["tensorrt"].available()


@pytest.mark.skipif(not TRT_OK, reason=f"TensorRT refit needs tensorrt and a GPU: {TRT_WHY}")
def test_tensorrt_refit_matches_the_onnxruntime_variant(onnx_fp32, engines_dir, lora_files, tmp_path):
    """Refittable engines take a LoRA by refit; the refitted U-Net equals ONNX Runtime's variant, and the
    base engine is left as it was. Engines built without --refittable refuse in one line."""
    from voltacache.compile.build import build_engines
    from voltacache.runtime.engines import load_engines
    from voltacache.specs import UNET_DEEP

    files = {"style": LoraFile.open("style", lora_files["style"])}
    build_engines(onnx_fp32, tmp_path / "trt", backend="tensorrt", refittable=True)
    trt = StableDiffusion.from_engines(tmp_path / "trt", loras=files)
    ort = StableDiffusion.from_engines(engines_dir, loras=files)
    spec = trt.runners[UNET_DEEP].spec.for_images(1)
    feeds = {t.name: np.random.default_rng(0).standard_normal(t.shape).astype(t.dtype) for t in spec.inputs}
    before = trt.runners[UNET_DEEP].infer(feeds)
    loras = (("style", 0.8),)
    a = trt.loras.runners(loras, trt.runners)[UNET_DEEP].infer(feeds)
    b = ort.loras.runners(loras, ort.runners)[UNET_DEEP].infer(feeds)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=2e-2, rtol=2e-2)
    after = trt.runners[UNET_DEEP].infer(feeds)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    build_engines(onnx_fp32, tmp_path / "fixed", backend="tensorrt")
    fixed = StableDiffusion.from_engines(tmp_path / "fixed", loras=files)
    with pytest.raises(VoltacacheError, match="not refittable; rebuild with `voltacache build --refittable`"):
        fixed(PROMPT, steps=2, loras=loras)
    assert load_engines(tmp_path / "trt").manifest.refittable


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda e: e.update(precision="int8"), "not on int8 engines"),
        (lambda e: e["components"]["unet_deep"].pop("lora_targets"), "did not record its LoRA targets"),
    ],
)
def test_engines_that_cannot_take_a_lora_refuse_it(engines_dir, lora_files, change, message):
    import copy

    from voltacache.pipeline.lora import Loras
    from voltacache.runtime.manifests import ExportManifest, read_engine_manifest

    data = copy.deepcopy(read_engine_manifest(engines_dir).export.to_json())
    change(data)
    loras = Loras({"style": LoraFile.open("style", lora_files["style"])}, ExportManifest.from_json(data))
    loras.check(())  # no LoRA: nothing to refuse
    with pytest.raises(InvalidRequest, match=message):
        loras.check((("style", 1.0),))


def test_lora_with_inpainting_equals_diffusers(lora_sd, tiny_pipe, lora_files):
    """A LoRA and a mask together: diffusers' inpainting pipeline over the fused modules."""
    from helpers import INIT, MASK, diffusers_inpaint

    loras = (("style", 0.8),)
    ours_image = lora_sd(
        PROMPT, steps=8, seed=5, scheduler="ddim", init_image=INIT, mask_image=MASK, strength=0.8, loras=loras
    )
    expected = diffusers_inpaint(fused_pipeline(tiny_pipe, [(lora_files["style"], 0.8)]), "ddim", 5, 8, 0.8)
    assert levels(ours_image.images[0], expected)[0] <= 1


@pytest.fixture(scope="module")
def fp16_engines(onnx_fp16_branch0, tmp_path_factory):
    """The tiny model in fp16, the export's default: its weights reach ONNX Runtime's kernels through casts."""
    from voltacache.compile.build import build_engines

    out = tmp_path_factory.mktemp("fp16") / "engines"
    build_engines(onnx_fp16_branch0, out, backend="onnxruntime")
    return out


def weights_written_in(runner, values: dict, path):
    """The engine file with `values` written into its weights: what a variant must compute."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(runner.path))
    for tensor in model.graph.initializer:
        if tensor.name in values:
            tensor.CopyFrom(numpy_helper.from_array(values[tensor.name], tensor.name))
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    return path


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_variant_computes_what_the_engine_with_the_lora_written_in_computes(
    request, engines_dir, lora_files, tmp_path, precision
):
    """Each variant session equals, to the bit, a session over the engine file with the LoRA's weights
    written in: ONNX Runtime's rewrites (fp16 weights' casts folded to fp32, NCHWc's reordered Conv
    weights) see the replacements, not the file's weights (they did not, once: fp16 LoRAs did nothing)."""
    import onnxruntime as ort

    from voltacache.pipeline.lora import new_weights, touched

    engines = engines_dir if precision == "fp32" else request.getfixturevalue("fp16_engines")
    sd = StableDiffusion.from_engines(engines, loras={"style": LoraFile.open("style", lora_files["style"])})
    variant = sd.loras.runners((("style", 0.8),), sd.runners)
    changes = [sd.loras._changes("style", 0.8)]
    rng = np.random.default_rng(0)
    for name in ("text_encoder", "unet_deep", "unet_shallow"):
        base, targets = sd.runners[name], sd.loras.targets[name]
        values = new_weights(changes, targets, base.initializers(touched(changes, targets)))
        expected = ort.InferenceSession(str(weights_written_in(base, values, tmp_path / f"{name}.onnx")))
        feeds = {  # token ids, or samples, timesteps and features
            t.name: rng.integers(0, 100, t.shape).astype(t.dtype)
            if np.dtype(t.dtype).kind == "i"
            else rng.standard_normal(t.shape).astype(t.dtype)
            for t in base.spec.inputs
        }
        ours_out = variant[name].session.run(None, feeds)
        base_out = base.session.run(None, feeds)
        for got, want, was in zip(ours_out, expected.run(None, feeds), base_out):
            assert np.array_equal(got, want), name
            assert not np.array_equal(got, was), name  # the LoRA changes what the component computes


def test_engines_with_their_weights_inside_the_graph_refuse_a_lora(engines_dir, lora_files, tmp_path):
    """Engines an earlier build wrote keep the weights in the graph file: in process and at deploy, one
    line says to rebuild them."""
    import shutil

    import onnx

    old = tmp_path / "engines"
    shutil.copytree(engines_dir, old)
    model = onnx.load(str(old / "unet_deep.onnx"))
    (old / "unet_deep.onnx.data").unlink()
    onnx.save(model, str(old / "unet_deep.onnx"))
    args = ("generate", PROMPT, "--engines", old, "--steps", "2", "--output", tmp_path / "x.png")
    one_error_line(cli(*args, "--lora", lora_files["style"]), 1, "unet_deep.onnx", "voltacache build --force")
    assert not (tmp_path / "x.png").exists()
    assert cli(*args).exit_code == 0  # without a LoRA they run as they did
    result = cli("deploy", "--engines", old, "--repo", tmp_path / "repo", "--lora", f"style={lora_files['style']}")
    one_error_line(result, 2, "--lora", "unet_deep.onnx", "weights inside the graph", "voltacache build --force")
    assert not (tmp_path / "repo").exists()
