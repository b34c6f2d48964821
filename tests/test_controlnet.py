"""ControlNet as a runtime input of prebuilt engines (issue 33): the request's fields and their wire codec, the
split U-Nets with residuals against diffusers' U-Net, parity with diffusers' ControlNet pipelines (one and two
ControlNets, start/end ranges, img2img, inpainting, SDXL), DeepCache's reused and fresh residuals, step batching,
the cache's scope and the refusals."""

import json

import numpy as np
import pytest
import torch
from helpers import INIT, MASK, PROMPT, cli, levels, one_error_line
from PIL import Image

from voltacache.cache.embedders import ClipPooledEmbedder
from voltacache.cache.layers import RequestCache
from voltacache.cache.store import CacheStore
from voltacache.errors import CheckpointError, InvalidRequest, UsageError
from voltacache.images import canny
from voltacache.pipeline.controlnet import active_steps
from voltacache.pipeline.stable_diffusion import Stats
from voltacache.request import ControlNetRequest, Request
from voltacache.schedulers import make_scheduler
from voltacache.specs import residual_layout

MAX_LEVELS, MAX_FRACTION = 1, 0.005  # as tests/test_pipeline.py: fp32 ONNX Runtime against PyTorch
CONTROL = np.random.default_rng(3).integers(0, 256, (48, 40, 3), dtype=np.uint8)  # another size: resized
OTHER = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def csd(controlled):
    from voltacache.pipeline.stable_diffusion import StableDiffusion

    return StableDiffusion.from_engines(controlled)


def diffusers_controlnet(pipe, controlnet_dirs, names, scales, images, seed=5, steps=10, kind="txt2img", **kwargs):
    """diffusers' own ControlNet pipeline (txt2img, img2img or inpaint) over `pipe`'s modules, DDIM."""
    import diffusers

    nets = [diffusers.ControlNetModel.from_pretrained(controlnet_dirs[name]) for name in names]
    controlnet = nets[0] if len(nets) == 1 else diffusers.MultiControlNetModel(nets)
    cls = {
        "txt2img": diffusers.StableDiffusionControlNetPipeline,
        "img2img": diffusers.StableDiffusionControlNetImg2ImgPipeline,
        "inpaint": diffusers.StableDiffusionControlNetInpaintPipeline,
    }[kind]
    scheduler = make_scheduler("ddim", dict(pipe.scheduler.config))
    other = cls(**{**pipe.components, "scheduler": scheduler}, controlnet=controlnet)
    other.set_progress_bar_config(disable=True)
    pil = [Image.fromarray(image) for image in images]
    control = pil[0] if len(nets) == 1 else pil
    images_kw = {"image": control} if kind == "txt2img" else {"control_image": control}
    scale = scales[0] if len(nets) == 1 else list(scales)
    return other(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed),
        controlnet_conditioning_scale=scale,
        height=64,
        width=64,
        **images_kw,
        **kwargs,
    ).images[0]


# -- the request ------------------------------------------------------------------------------------------


def test_control_fields_travel_the_wire():
    request = Request.of(
        PROMPT, controlnets={"canny": 0.8, "depth": 0.5}, control_images=[CONTROL, CONTROL], control_end=0.6
    ).check()
    assert request.controlnets == (("canny", 0.8), ("depth", 0.5)) and isinstance(
        request.controlnets[0], ControlNetRequest
    )
    back = Request.from_triton(request.to_triton().get)
    assert back == request and len(back.control_images) == 2 and np.array_equal(back.control_image(1), CONTROL)
    assert "CONTROL_IMAGE" not in Request(PROMPT).to_triton()  # an uncontrolled request sends none of it
    about = request.description()
    assert about["controlnets"] == [["canny", 0.8], ["depth", 0.5]] and about["control_images"] == 2


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"control_images": CONTROL}, "control_image: name the ControlNet"),
        ({"controlnets": {"canny": 1.0}}, "control_image: 0 given for 1 ControlNets"),
        ({"controlnets": {"a": 1.0, "b": 1.0, "c": 1.0}, "control_images": [CONTROL] * 2}, "2 given for 3"),
        ({"controlnets": {"canny": 1.0}, "control_images": CONTROL[..., 0]}, "control_image: must be uint8"),
        ({"controlnets": {"canny": 99.0}, "control_images": CONTROL}, "controlnet canny scale 99"),
        ({"controlnets": {"bad name": 1.0}, "control_images": CONTROL}, "controlnet 'bad name': a name"),
        ({"controlnets": {"c": 1.0}, "control_images": CONTROL, "control_start": 0.7, "control_end": 0.3}, "start <"),
        ({"controlnets": {"c": 1.0}, "control_images": CONTROL, "control_residuals": "stale"}, "choose one of reuse"),
        ({"controlnets": {"c": 1.0}, "control_images": "/nonexistent.png"}, "control_image /nonexistent.png: no such"),
    ],
)
def test_bad_control_fields_are_one_line(fields, message):
    with pytest.raises(InvalidRequest, match=message) as caught:
        Request.of(PROMPT, **fields).check()
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("steps, start, end", [(10, 0.0, 1.0), (10, 0.2, 0.7), (7, 0.1, 0.5), (20, 0.5, 1.0)])
def test_active_steps_are_diffusers_controlnet_keep(steps, start, end):
    keep = [1.0 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps)]  # diffusers' own rule
    assert active_steps(steps, start, end) == [k == 1.0 for k in keep]


def test_canny_preprocessor_gives_white_edges_on_black():
    photo = np.zeros((64, 64, 3), np.uint8)
    photo[16:48, 16:48] = (200, 40, 40)
    edges = canny(photo)
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert edges[32, 16].all() or edges[32, 15].all()  # on the square's border
    assert not edges[32, 32].any() and not edges[2, 2].any()  # not inside it, nor in the flat background


# -- the split U-Nets with residuals ----------------------------------------------------------------------


def test_residual_layout_is_the_controlnets(tiny_pipe):
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(tiny_pipe.unet)
    sample, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 10.0])
    with torch.no_grad():
        down, mid = controlnet(sample, t, torch.randn(2, 77, 64), torch.rand(2, 3, 64, 64), return_dict=False)
    layout = residual_layout(tiny_pipe.unet.config)
    assert [(r.shape[1], 8 // r.shape[2]) for r in (*down, mid)] == list(layout)


def test_split_unets_with_residuals_equal_diffusers_unet(tiny_pipe):
    from voltacache.compile.unet_split import UNetDeep, UNetShallow

    unet = tiny_pipe.unet
    layout = residual_layout(unet.config)
    gen = torch.Generator().manual_seed(0)
    sample, t, context = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10.0, 10.0]), torch.randn(2, 77, 64)
    residuals = [torch.randn(2, c, 8 // s, 8 // s, generator=gen) for c, s in layout]
    with torch.no_grad():
        expected = unet(
            sample,
            t,
            context,
            down_block_additional_residuals=residuals[:-1],
            mid_block_additional_residual=residuals[-1],
        ).sample
        for layers in (1, 2):
            noise, deep = UNetDeep(unet, layers)(sample, t, context, *residuals)
            shallow = UNetShallow(unet, layers)(sample, t, context, deep, *residuals[:layers])
            assert torch.equal(noise, expected) and torch.allclose(shallow, expected, atol=1e-5)


# -- parity with diffusers ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "names, scales, extra",
    [
        (("canny",), (0.8,), {}),
        (("canny", "depth"), (0.8, 0.5), {}),
        (("canny",), (1.0,), {"control_start": 0.2, "control_end": 0.7}),
        (("canny", "depth"), (1.2, 0.6), {"control_start": 0.3, "control_end": 0.9}),
    ],
)
def test_txt2img_equals_diffusers_controlnet_pipeline(csd, tiny_pipe, controlnet_dirs, names, scales, extra):
    images = [CONTROL, OTHER][: len(names)]
    ours = csd(
        PROMPT,
        steps=10,
        seed=5,
        scheduler="ddim",
        controlnets=tuple(zip(names, scales)),
        control_images=images,
        **extra,
    )
    theirs_extra = {"control_guidance_start": extra.get("control_start", 0.0)} | {
        "control_guidance_end": extra.get("control_end", 1.0)
    }
    theirs = diffusers_controlnet(tiny_pipe, controlnet_dirs, names, scales, images, **theirs_extra)
    worst, fraction = levels(ours.images[0], theirs)
    assert worst <= MAX_LEVELS and fraction <= MAX_FRACTION
    plain = csd(PROMPT, steps=10, seed=5, scheduler="ddim")
    assert levels(ours.images[0], plain.images[0])[0] > 5  # the ControlNets did something
    active = sum(active_steps(10, extra.get("control_start", 0.0), extra.get("control_end", 1.0)))
    assert ours.report().controlnet_calls == active * len(names)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_img2img_and_inpainting_equal_diffusers(csd, tiny_pipe, controlnet_dirs, kind):
    fields = dict(init_image=INIT, strength=0.7) | ({"mask_image": MASK} if kind == "inpaint" else {})
    ours = csd(PROMPT, steps=10, seed=5, scheduler="ddim", controlnets={"canny": 0.9}, control_images=CONTROL, **fields)
    theirs_fields = dict(image=Image.fromarray(INIT), strength=0.7)
    if kind == "inpaint":
        theirs_fields["mask_image"] = Image.fromarray(MASK)
    theirs = diffusers_controlnet(tiny_pipe, controlnet_dirs, ("canny",), (0.9,), [CONTROL], kind=kind, **theirs_fields)
    worst, fraction = levels(ours.images[0], theirs)
    assert worst <= MAX_LEVELS and fraction <= MAX_FRACTION
    assert ours.report().controlnet_calls == 7  # the steps strength 0.7 runs


@pytest.mark.slow
def test_uncontrolled_request_on_controlled_engines_is_the_plain_image(csd, sd):
    """Zero residuals: the image of engines exported without ControlNets."""
    ours, plain = csd(PROMPT, steps=8, seed=2, scheduler="ddim"), sd(PROMPT, steps=8, seed=2, scheduler="ddim")
    assert levels(ours.images[0], plain.images[0])[0] <= MAX_LEVELS
    assert ours.report().controlnet_calls == 0


# -- DeepCache, step batching, the cache ---------------------------------------------------------------------


@pytest.mark.slow
def test_deepcache_reuses_residuals_or_runs_fresh(csd):
    request = dict(steps=10, seed=5, scheduler="ddim", controlnets={"canny": 1.0}, control_images=CONTROL)
    reuse = csd(PROMPT, cache_interval=3, control_residuals="reuse", **request)
    fresh = csd(PROMPT, cache_interval=3, control_residuals="fresh", **request)
    full = csd(PROMPT, **request)
    assert (reuse.stats.unet_deep_calls, reuse.stats.unet_shallow_calls) == (4, 6)
    assert reuse.report().controlnet_calls == 4 and fresh.report().controlnet_calls == 10  # ceil(10 / 3), every step
    assert levels(reuse.images[0], fresh.images[0])[0] > 0  # the shallow steps saw other residuals
    for cached in (reuse, fresh):  # both stay close to the uncached image
        assert np.abs(np.asarray(cached.images[0], int) - np.asarray(full.images[0], int)).mean() < 12


@pytest.mark.slow
def test_step_batching_mixes_controlled_and_plain_requests(csd):
    """One tick's U-Net call serves controlled and uncontrolled requests, and one ControlNet call every request
    that runs that ControlNet (with its own scale and image); each image is its own alone."""
    fields = dict(steps=6, seed=1, scheduler="ddim")
    requests = [
        Request.of(PROMPT, **fields, controlnets={"canny": 1.0}, control_images=CONTROL),
        Request.of(PROMPT, **fields),
        Request.of(PROMPT, **fields, controlnets={"canny": 0.6, "depth": 0.9}, control_images=[OTHER, CONTROL]),
    ]
    alone = [csd(r).images[0] for r in requests]
    works = []
    for request in requests:
        stats = Stats()
        embeddings, pooled = csd.encode_prompt(request, stats)
        works.append(csd.begin(request, embeddings, pooled, stats))
    calls = {name: [] for name in ("unet_deep", "controlnet_canny", "controlnet_depth")}
    for name, log in calls.items():
        runner = csd.runners[name]
        runner.infer = lambda feeds, log=log, infer=runner.infer: log.append(len(feeds["sample"])) or infer(feeds)
    try:
        while not all(w.done for w in works):
            assert not csd.step([w for w in works if not w.done])
    finally:
        for name in calls:
            del csd.runners[name].infer
    together = [np.asarray(g.images) for g in csd.finish(works)]
    assert calls == {"unet_deep": [6] * 6, "controlnet_canny": [4] * 6, "controlnet_depth": [2] * 6}
    assert [w.stats.controlnet_calls for w in works] == [6, 0, 12]
    for image, reference in zip(together, alone):
        assert np.array_equal(image[0], np.asarray(reference))


@pytest.mark.slow
def test_cache_is_scoped_by_controlnet_scale_range_and_image(csd, tmp_path):
    store = CacheStore(str(tmp_path / "index.db"), tmp_path / "blobs", dim=64, embedder="clip")
    cache = RequestCache(store, ClipPooledEmbedder(64), "tiny-controlnet")
    request = dict(steps=6, seed=2, scheduler="ddim", controlnets={"canny": 1.0}, control_images=CONTROL, cache=cache)
    first, repeat = csd(PROMPT, **request), csd(PROMPT, **request)
    assert (first.cache, repeat.cache) == ("miss", "semantic")
    for change in (
        {"controlnets": {"depth": 1.0}},
        {"controlnets": {"canny": 0.5}},
        {"control_images": OTHER},
        {"control_end": 0.5},
        {"controlnets": (), "control_images": ()},
    ):
        assert csd(PROMPT, **{**request, **change}).cache == "miss", change


# -- refusals --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_refusals_name_the_controlnet(csd, sd):
    fields = dict(steps=4, controlnets={"openpose": 1.0}, control_images=CONTROL)
    with pytest.raises(InvalidRequest, match="controlnet 'openpose': these engines have no ControlNet of that name; "):
        csd(PROMPT, **fields)
    with pytest.raises(InvalidRequest, match="these engines were exported without ControlNets; export with"):
        sd(PROMPT, **{**fields, "controlnets": {"canny": 1.0}})


@pytest.mark.slow
def test_export_refuses_a_controlnet_of_another_family(tiny_dir, tmp_path):
    from voltacache.compile.controlnets import write_controlnet
    from voltacache.compile.export import export_model
    from voltacache.compile.options import ExportOptions

    xl = write_controlnet(tmp_path / "xl", "controlnet-sdxl-tiny")
    with pytest.raises(CheckpointError, match="--controlnet xl: made for another family or size of model") as caught:
        export_model(tiny_dir, tmp_path / "onnx", ExportOptions(precision="fp32", controlnets=(("xl", xl),)))
    assert "\n" not in str(caught.value) and not (tmp_path / "onnx").exists()


def test_export_options_refuse_before_anything_loads(tmp_path):
    from voltacache.compile.controlnets import check_controlnet_path, parse_controlnet
    from voltacache.compile.options import ExportOptions

    with pytest.raises(UsageError, match="give NAME=PATH"):
        parse_controlnet("canny")
    with pytest.raises(UsageError, match="a name is letters"):
        parse_controlnet("can ny=x")
    with pytest.raises(UsageError, match="no such file or folder"):
        check_controlnet_path("canny", tmp_path / "missing")
    with pytest.raises(UsageError, match="not a ControlNet folder"):
        check_controlnet_path("canny", tmp_path)
    twice = ExportOptions(controlnets=(("a", tmp_path), ("a", tmp_path)))
    with pytest.raises(UsageError, match="names one ControlNet twice"):
        twice.check()
    with pytest.raises(UsageError, match="--controlnet with --sizes"):
        ExportOptions(controlnets=(("a", tmp_path),), sizes=((64, 64), (64, 128))).check()


@pytest.mark.slow
def test_cli_generates_with_controlnet_and_refuses_in_one_line(controlled, tmp_path):
    control = tmp_path / "photo.png"
    Image.fromarray(CONTROL).save(control)
    out = tmp_path / "out.png"
    args = ["generate", PROMPT, "--engines", str(controlled), "--steps", "6", "--seed", "3", "--scheduler", "ddim"]
    ok = cli(
        *args,
        "--controlnet",
        "canny:0.7",
        "--control-image",
        control,
        "--control-preprocess",
        "canny",
        "-o",
        out,
        "--json",
    )
    assert ok.exit_code == 0, ok.output
    record = json.loads(ok.stdout)
    assert record["controlnet_calls"] == 6 and out.is_file()
    for extra, message in (
        (["--controlnet", "canny"], "--controlnet: give the control image it follows with --control-image"),
        (["--control-image", control], "--control-image: give it with --controlnet NAME"),
        (["--controlnet", "canny", "--control-image", tmp_path / "no.png"], "--control-image"),
        (["--controlnet", "canny", "--control-image", control, "--control-preprocess", "hed"], "choose one of"),
        (["--controlnet", "nope", "--control-image", control], "controlnet 'nope'"),
    ):
        one_error_line(cli(*args, *extra, "-o", tmp_path / "bad.png"), 2, message)


@pytest.fixture(scope="module")
def sdxl_controlled(tmp_path_factory):
    """sdxl-tiny exported with an SDXL ControlNet (its added conditions in the ControlNet too)."""
    from voltacache.compile.build import build_engines
    from voltacache.compile.controlnets import write_controlnet
    from voltacache.compile.export import export_model
    from voltacache.compile.options import ExportOptions
    from voltacache.compile.presets import write_pipeline

    root = tmp_path_factory.mktemp("sdxl-controlnet")
    model = write_pipeline(root / "model", "sdxl-tiny", seed=0)
    controlnet = write_controlnet(root / "canny", "controlnet-sdxl-tiny", seed=0)
    export_model(model, root / "onnx", ExportOptions(precision="fp32", controlnets=(("canny", controlnet),)))
    build_engines(root / "onnx", root / "engines", backend="onnxruntime")
    return model, controlnet, root / "engines"


@pytest.mark.slow
def test_sdxl_equals_diffusers_xl_controlnet_pipeline(sdxl_controlled):
    import diffusers

    from voltacache.compile.checkpoint import load_pipeline
    from voltacache.pipeline.stable_diffusion import StableDiffusion

    model, controlnet, engines = sdxl_controlled
    sd = StableDiffusion.from_engines(engines)
    fields = dict(steps=8, seed=4, scheduler="ddim", controlnets={"canny": 0.7}, control_images=CONTROL)
    ours = sd(PROMPT, control_end=0.8, **fields)
    pipe = load_pipeline(model)
    other = diffusers.StableDiffusionXLControlNetPipeline(
        **{**pipe.components, "scheduler": make_scheduler("ddim", dict(pipe.scheduler.config))},
        controlnet=diffusers.ControlNetModel.from_pretrained(controlnet),
        add_watermarker=False,
    )
    other.set_progress_bar_config(disable=True)
    theirs = other(
        PROMPT,
        image=Image.fromarray(CONTROL),
        num_inference_steps=8,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(4),
        controlnet_conditioning_scale=0.7,
        control_guidance_end=0.8,
        height=64,
        width=64,
    ).images[0]
    worst, fraction = levels(ours.images[0], theirs)
    assert worst <= MAX_LEVELS and fraction <= MAX_FRACTION
    plain = sd(PROMPT, **{**fields, "controlnets": (), "control_images": ()})
    assert levels(ours.images[0], plain.images[0])[0] > 5


def test_single_file_controlnet_loads_offline_and_a_torn_one_is_refused(controlnet_dirs, tiny_pipe, tmp_path):
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    from voltacache.compile.controlnets import load_controlnet

    folder = ControlNetModel.from_pretrained(controlnet_dirs["canny"])
    single = tmp_path / "canny.safetensors"
    save_file({k: v.contiguous() for k, v in folder.state_dict().items()}, single)
    loaded = load_controlnet("canny", single, tiny_pipe.unet.config)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in folder.state_dict().items())
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(single.read_bytes()[: single.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="--controlnet canny=.*torn.safetensors: cannot be loaded") as caught:
        load_controlnet("canny", torn, tiny_pipe.unet.config)
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_lora_and_controlnet_together_equal_diffusers(controlled, tiny_pipe, controlnet_dirs, lora_files):
    """A LoRA changes the U-Nets and the text encoder, not the ControlNet: as diffusers' load_lora_weights +
    fuse_lora on the ControlNet pipeline's U-Net and text encoder."""
    from helpers import fused_pipeline

    from voltacache.pipeline.lora import LoraFile
    from voltacache.pipeline.stable_diffusion import StableDiffusion

    sd = StableDiffusion.from_engines(controlled, loras={"style": LoraFile.open("style", lora_files["style"])})
    fields = dict(controlnets={"canny": 0.8}, control_images=CONTROL)
    ours = sd(PROMPT, steps=10, seed=5, scheduler="ddim", loras={"style": 0.7}, **fields)
    fused = fused_pipeline(tiny_pipe, [(lora_files["style"], 0.7)])
    theirs = diffusers_controlnet(fused, controlnet_dirs, ("canny",), (0.8,), [CONTROL])
    assert levels(ours.images[0], theirs)[0] <= MAX_LEVELS
    assert levels(ours.images[0], sd(PROMPT, steps=10, seed=5, scheduler="ddim", **fields).images[0])[0] > 5


@pytest.mark.slow
def test_int8_unets_take_fp32_residuals_and_stay_close(tiny_dir, controlnet_dirs, csd, tmp_path):
    """int8 U-Nets calibrated with and without the ControlNet's residuals: a controlled image stays close to the
    fp32 engines' (tests/test_quantize.py's bound), the residual inputs and the ControlNet stay fp32, and the
    export's fingerprint is not the plain int8 export's."""
    import math

    from voltacache.compile.build import build_engines
    from voltacache.compile.export import export_model
    from voltacache.compile.options import Calibration, ExportOptions
    from voltacache.pipeline.stable_diffusion import StableDiffusion
    from voltacache.runtime.manifests import read_manifest

    calibration = Calibration(prompts=("a red circle on a blue background", "a photo of a cat"), steps=6)
    options = ExportOptions(
        precision="int8", calibration=calibration, controlnets=(("canny", controlnet_dirs["canny"]),)
    )
    export_model(tiny_dir, tmp_path / "onnx", options)
    manifest = read_manifest(tmp_path / "onnx")
    assert manifest.components["controlnet_canny"].precision == "fp32"
    assert manifest.components["unet_deep"].precision == "int8"
    assert all(t.dtype == "float32" for t in manifest.components["unet_deep"].spec.inputs)
    plain = ExportOptions(precision="int8", calibration=calibration).fingerprint(manifest.model_fingerprint)
    assert manifest.fingerprint != plain
    build_engines(tmp_path / "onnx", tmp_path / "engines", backend="onnxruntime")
    int8 = StableDiffusion.from_engines(tmp_path / "engines")
    fields = dict(steps=20, seed=7, scheduler="ddim", guidance=5.0, controlnets={"canny": 1.0}, control_images=CONTROL)
    for extra in ({}, {"cache_interval": 3}):
        a, b = int8(PROMPT, **fields, **extra), csd(PROMPT, **fields, **extra)
        mse = ((np.asarray(a.images[0], float) - np.asarray(b.images[0], float)) ** 2).mean()
        assert 10 * math.log10(255**2 / mse) >= 28.0  # tests/test_quantize.py's MIN_PSNR_DB
