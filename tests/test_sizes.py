"""Several image sizes from one engine set (export --sizes): the graphs' height and width dynamic, traced where
no U-Net level is one pixel and checked at every size; each size's image equals diffusers' own at that size;
a size not built is refused in one line naming the sizes built; step batching runs one call per size."""

import numpy as np
import pytest
from conftest import SIZES
from helpers import PROMPT, cli, close_to_diffusers, diffusers_image, levels, one_error_line

from voltacache.compile.options import ExportOptions, parse_sizes
from voltacache.errors import InvalidRequest, UsageError, VoltacacheError
from voltacache.pipeline.stable_diffusion import StableDiffusion, Stats
from voltacache.request import Request
from voltacache.runtime.manifests import read_engine_manifest, read_manifest
from voltacache.specs import IMAGE_SIDES, LATENT_SIDES, SAMPLE, UNET_DEEP, VAE_DECODER


@pytest.fixture(scope="module")
def sized(sizes_engines):
    return StableDiffusion.from_engines(sizes_engines)


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
def test_each_size_equals_diffusers_at_that_size(sized, tiny_pipe, size):
    height, width = size
    ours = sized(PROMPT, steps=8, seed=4, scheduler="ddim", height=height, width=width).images[0]
    assert ours.size == (width, height)
    assert close_to_diffusers(ours, diffusers_image(tiny_pipe, "ddim", 4, steps=8, height=height, width=width))


@pytest.mark.slow
def test_the_default_is_the_first_size_and_matches_engines_of_that_size_alone(sized, sd):
    # the multi-size graphs cost nothing in images: the one-size engines' image, within a level
    ours = sized(PROMPT, steps=6, seed=2, scheduler="ddim").images[0]
    assert ours.size == (64, 64)
    assert levels(ours, sd(PROMPT, steps=6, seed=2, scheduler="ddim").images[0])[0] <= 1


@pytest.mark.slow
def test_a_size_not_built_is_refused_naming_the_sizes(sized, sizes_engines, sd):
    with pytest.raises(InvalidRequest, match=r"^size 128x128: these engines serve 64x64, 128x64, 64x128; export"):
        sized(PROMPT, height=128, width=128)
    with pytest.raises(InvalidRequest, match="size 64x192: these engines serve"):
        sized(PROMPT, height=192)  # the width left out is the default's
    with pytest.raises(InvalidRequest, match=r"static at 64x64; export with --sizes"):
        sd(PROMPT, width=128)
    result = cli("generate", "a cat", "--engines", sizes_engines, "--height", "192")
    one_error_line(result, 2, "size 64x192: these engines serve 64x64, 128x64, 64x128")


@pytest.mark.slow
def test_the_manifests_name_the_sizes_and_the_graphs_keep_the_sides_dynamic(sizes_engines):
    import onnx

    export = read_engine_manifest(sizes_engines).export
    assert export.image_sizes == SIZES and export.size == SIZES[0]
    onnx_dir = sizes_engines.parent / "onnx"  # the fixture exports beside its engines
    assert read_manifest(onnx_dir).image_sizes == SIZES
    spec = export.components[UNET_DEEP].spec
    assert spec.latent_sizes == ((8, 8), (8, 16), (16, 8)) and export.components[VAE_DECODER].spec.image_scale == 8
    for name, sides in ((UNET_DEEP, LATENT_SIDES), ("vae_encoder", IMAGE_SIDES)):
        entry = read_manifest(onnx_dir).components[name]
        assert entry.report["tensorrt_lint"]["ok"], entry.report["tensorrt_lint"]  # a profile per size
        graph = onnx.load(str(onnx_dir / entry.file), load_external_data=False).graph
        assert tuple(d.dim_param for d in graph.input[0].type.tensor_type.shape.dim[2:]) == sides


@pytest.mark.slow
def test_a_runner_refuses_latents_of_a_size_not_built(sized):
    runner = sized.runners[UNET_DEEP]
    feeds = {t.name: t.zeros() for t in runner.spec.for_images(1, 1, (16, 16)).inputs}
    with pytest.raises(VoltacacheError, match=r"unet_deep: latents of 16x16; the engine takes 8x8, 8x16, 16x8"):
        runner.infer(feeds)
    feeds = {t.name: t.zeros() for t in runner.spec.for_images(2, 1, (8, 16)).inputs}
    assert runner.infer(feeds)["noise_pred"].shape == (4, 4, 8, 16)
    assert feeds[SAMPLE].shape[2:] == (8, 16)


@pytest.mark.slow
def test_step_batching_runs_one_call_per_size_and_each_image_equals_its_run_alone(sized):
    # DeepCache too: the shallow U-Net at each size on the deep feature of that size
    requests = [
        dict(height=64, width=128, cache_interval=2),
        dict(height=128, width=64, cache_schedule="adaptive"),
        dict(height=64, width=128, seed=9),
    ]
    alone = [np.asarray(sized(PROMPT, steps=5, scheduler="ddim", **{"seed": 1, **r}).images[0]) for r in requests]
    works = []
    for fields in requests:
        request = Request(PROMPT, steps=5, scheduler="ddim", **{"seed": 1, **fields})
        works.append(sized.begin(request, *sized.encode_prompt(request, Stats())))
    calls = []
    runner = sized.runners[UNET_DEEP]
    original = runner.infer

    def counting(feeds):
        calls.append(feeds[SAMPLE].shape)
        return original(feeds)

    runner.infer = counting
    try:
        while not all(w.done for w in works):
            assert not sized.step([w for w in works if not w.done])
    finally:
        del runner.infer  # the class's own again, for the module's other tests
    together = [np.asarray(g.images) for g in sized.finish(works)]
    for image, reference in zip(together, alone):
        assert np.array_equal(image.reshape(reference.shape), reference)
    assert sorted({shape[2:] for shape in calls}) == [(8, 16), (16, 8)] and (4, 4, 8, 16) in calls


@pytest.mark.slow
def test_the_cache_scopes_entries_by_size(sized):
    landscape, portrait = (sized.cache_scope(Request(PROMPT, height=h, width=w)) for h, w in SIZES[1:])
    assert landscape["size"] == [64, 128] and portrait["size"] == [128, 64]


@pytest.mark.slow
def test_img2img_and_inpainting_resize_to_the_requested_size(sized):
    init = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    mask = np.zeros((50, 70), np.uint8)
    mask[10:30, 10:40] = 255
    image = sized(PROMPT, steps=4, seed=1, init_image=init, strength=0.5, height=128, width=64).images[0]
    assert image.size == (64, 128)
    painted = sized(PROMPT, steps=4, seed=1, init_image=init, mask_image=mask, height=64, width=128).images[0]
    assert painted.size == (128, 64)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512x512,768x512", ((512, 512), (512, 768))),
        ("640X384", ((384, 640),)),
        ("sdxl", ((1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832), (768, 1344), (1344, 768))),
    ],
)
def test_sizes_are_width_by_height_or_a_named_set(text, expected):
    assert parse_sizes(text) == expected
    options = ExportOptions(sizes=expected)
    options.check()
    assert (options.height, options.width) == expected[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sizes", "512"], "--sizes '512': give WIDTHxHEIGHT sizes separated by commas"),
        (["--sizes", "512x500"], "--sizes 512x500: width and height multiples of 64"),
        (["--sizes", "512x512", "--height", "512"], "--sizes names every size"),
    ],
)
def test_impossible_sizes_are_refused_before_the_export(tmp_path, args, message):
    result = cli("export", "--model", tmp_path / "none", "--out", tmp_path / "out", *args)
    one_error_line(result, 2, message)
    assert not (tmp_path / "out").exists()


def test_too_many_sizes_are_refused():
    with pytest.raises(UsageError, match="up to 16"):
        ExportOptions(sizes=tuple((64 * k, 64) for k in range(1, 18))).check()


@pytest.mark.slow
def test_sdxl_at_each_size_equals_diffusers(sdxl_tiny, tmp_path):
    """SDXL's size conditioning follows the image's size: diffusers' at that size, by default."""
    from voltacache.compile.build import build_engines
    from voltacache.compile.checkpoint import load_pipeline
    from voltacache.compile.export import export_model

    model = sdxl_tiny[0]
    export_model(model, tmp_path / "onnx", ExportOptions(precision="fp32", sizes=((64, 64), (64, 128))))
    build_engines(tmp_path / "onnx", tmp_path / "engines", backend="onnxruntime")
    sd, pipe = StableDiffusion.from_engines(tmp_path / "engines"), load_pipeline(model)
    for height, width in ((64, 128), (64, 64)):
        ours = sd(PROMPT, steps=6, seed=5, scheduler="ddim", height=height, width=width).images[0]
        assert close_to_diffusers(ours, diffusers_image(pipe, "ddim", 5, steps=6, height=height, width=width))


@pytest.mark.slow
def test_openvino_engines_serve_every_size_as_onnx_runtime_does(sized, sizes_engines, tmp_path):
    from voltacache.compile.build import build_engines

    build_engines(sizes_engines.parent / "onnx", tmp_path / "openvino", backend="openvino")
    openvino = StableDiffusion.from_engines(tmp_path / "openvino")
    for height, width in SIZES[1:]:
        request = dict(steps=4, seed=1, scheduler="ddim", height=height, width=width)
        ours = openvino(PROMPT, **request).images[0]
        assert ours.size == (width, height) and levels(ours, sized(PROMPT, **request).images[0])[0] <= 2


@pytest.mark.slow
def test_a_lora_at_another_size_equals_diffusers_fused(sizes_engines, tiny_pipe, lora_files):
    from helpers import fused_pipeline

    from voltacache.pipeline.lora import LoraFile

    sd = StableDiffusion.from_engines(sizes_engines, loras={"style": LoraFile.open("style", lora_files["style"])})
    request = dict(steps=6, seed=3, scheduler="ddim", height=128, width=64, cache_mode="off")
    ours = sd(PROMPT, loras=(("style", 0.8),), **request).images[0]
    fused = fused_pipeline(tiny_pipe, [(lora_files["style"], 0.8)])
    assert close_to_diffusers(ours, diffusers_image(fused, "ddim", 3, steps=6, height=128, width=64))
