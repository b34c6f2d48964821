import numpy as np
import pytest

from voltacache.errors import VoltacacheError
from voltacache.runtime.engines import load_engines
from voltacache.runtime.runners import Runner, TorchRunner, pad_rows, plan_calls
from voltacache.specs import COMPONENTS, NOISE_PRED, TEXT_ENCODER, UNET_DEEP


@pytest.fixture(scope="module")
def runners(engines_dir):
    return load_engines(engines_dir).runners


def feeds_for(spec, n=None, seed=0):
    """Random feeds for n images (default: the spec's own), a different timestep on every row."""
    rng = np.random.default_rng(seed)
    spec = spec.for_images(n) if n else spec
    feeds = {}
    for t in spec.inputs:
        if t.dtype == "int32":
            feeds[t.name] = rng.integers(0, 49407, t.shape).astype(t.dtype)
        elif t.name == "timestep":
            feeds[t.name] = rng.integers(0, 1000, t.shape).astype(t.dtype)
        else:
            feeds[t.name] = rng.standard_normal(t.shape).astype(t.dtype)
    return feeds


def rows_of(feeds, i, per_image):
    return {k: v[i * per_image : (i + 1) * per_image] for k, v in feeds.items()}


def test_onnxruntime_matches_torch(runners, tiny_pipe):
    from voltacache.compile.components import torch_modules

    spec = runners[UNET_DEEP].spec
    torch_runner = TorchRunner(torch_modules(tiny_pipe, 2)[UNET_DEEP], spec)
    assert torch_runner.sizes == ()  # PyTorch runs any number of images in one call
    for n in (1, 3):
        feeds = feeds_for(spec, n)
        a, b = runners[UNET_DEEP].infer(feeds), torch_runner.infer(feeds)
        assert a.keys() == b.keys() == set(spec.output_names)
        for name in a:
            np.testing.assert_allclose(a[name], b[name], atol=1e-4)


@pytest.mark.parametrize("name", COMPONENTS)
def test_any_number_of_images_equals_each_image_alone(runners, name):
    # 1, 2, 3 images in one call; 9 is above the largest size (8): two calls, 8 then 1
    runner = runners[name]
    assert runner.sizes == (1, 2, 4, 8)
    per_image = runner.spec.rows_per_image
    for n in (1, 2, 3, 9) if name == UNET_DEEP else (3,):
        feeds = feeds_for(runner.spec, n, seed=n)
        out = runner.infer(feeds)
        for t in runner.spec.for_images(n).outputs:
            assert out[t.name].shape == t.shape and out[t.name].dtype == np.float32
        for i in range(n):
            alone = runner.infer(rows_of(feeds, i, per_image))
            for k in out:
                # measured on the tiny model: bit-identical (max abs difference 0.0)
                np.testing.assert_allclose(rows_of(out, i, per_image)[k], alone[k], rtol=0, atol=1e-5)


def test_wrong_shape_is_a_clear_error(runners):
    runner = runners[TEXT_ENCODER]
    with pytest.raises(
        VoltacacheError,
        match=r"text_encoder: input 'input_ids' is int32\[1, 77\], expected int32\[2n, 77\] \(n >= 1 images\)",
    ):
        runner.infer({"input_ids": np.zeros((1, 77), np.int32)})
    with pytest.raises(VoltacacheError, match="missing input 'input_ids'"):
        runner.infer({})
    with pytest.raises(VoltacacheError, match=r"is int64\[4, 77\], expected int32\[4, 77\] \(2 images\)"):
        runner.infer({"input_ids": np.zeros((4, 77), np.int64)})
    # the first input says how many images: the others must agree
    feeds = feeds_for(runners[UNET_DEEP].spec, 2)
    feeds["encoder_hidden_states"] = feeds["encoder_hidden_states"][:2]
    with pytest.raises(
        VoltacacheError,
        match=r"'encoder_hidden_states' is float32\[2, 77, 64\], expected float32\[4, 77, 64\] \(2 images\)",
    ):
        runners[UNET_DEEP].infer(feeds)


def test_plan_calls():
    sizes = (1, 2, 4, 8)
    # ONNX Runtime: exactly n, split above the largest size
    assert plan_calls(3, sizes, pad=False) == [(0, 3, 3)]
    assert plan_calls(19, sizes, pad=False) == [(0, 8, 8), (8, 8, 8), (16, 3, 3)]
    # TensorRT: the smallest profile that holds the rest
    assert plan_calls(3, sizes, pad=True) == [(0, 3, 4)]
    assert plan_calls(8, sizes, pad=True) == [(0, 8, 8)]
    assert plan_calls(9, sizes, pad=True) == [(0, 8, 8), (8, 1, 1)]
    assert plan_calls(13, (2, 4), pad=True) == [(0, 4, 4), (4, 4, 4), (8, 4, 4), (12, 1, 2)]
    assert plan_calls(5, (), pad=True) == [(0, 5, 5)]  # no sizes: any n at once
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert pad_rows(a, 3) is a
    np.testing.assert_array_equal(pad_rows(a, 4), [[0, 1], [2, 3], [4, 5], [0, 0]])


class PaddingRunner(Runner):
    """What Runner.infer hands a TensorRT runner, without TensorRT: static sizes, padded calls."""

    pads = True

    def __init__(self, spec, sizes):
        self.spec, self.sizes, self.calls = spec, sizes, []

    def _infer(self, feeds):
        rows = len(feeds["sample"])
        assert rows // 2 in self.sizes and all(len(v) == rows for v in feeds.values())
        self.calls.append((rows // 2, int((np.abs(feeds["sample"]).sum(axis=(1, 2, 3)) == 0).sum())))
        # a row-wise function of the inputs, like the U-Net: each output row depends on its input row alone
        noise = feeds["sample"] * feeds["timestep"][:, None, None, None]
        return {NOISE_PRED: noise, "deep_feature": np.zeros((rows, 64, 8, 8), np.float32)}


def test_padded_runner_pads_splits_and_slices(runners):
    spec = runners[UNET_DEEP].spec
    runner = PaddingRunner(spec, (2, 4))
    for n, calls in {1: [(2, 2)], 3: [(4, 2)], 4: [(4, 0)], 9: [(4, 0), (4, 0), (2, 2)]}.items():
        runner.calls.clear()
        feeds = feeds_for(spec, n, seed=n)
        out = runner.infer(feeds)
        assert runner.calls == calls  # (images it ran at, zero rows among them)
        assert out[NOISE_PRED].shape == (2 * n, 4, 8, 8) and out["deep_feature"].shape == (2 * n, 64, 8, 8)
        np.testing.assert_array_equal(out[NOISE_PRED], feeds["sample"] * feeds["timestep"][:, None, None, None])


def test_served_sessions_do_not_spin_in_process_ones_do(engines_dir):
    from voltacache.runtime.engines import load_engines

    key = "session.intra_op.allow_spinning"
    served = load_engines(engines_dir, components=["vae_decoder"], served=True).runners["vae_decoder"]
    local = load_engines(engines_dir, components=["vae_decoder"]).runners["vae_decoder"]
    assert served.session.get_session_options().get_session_config_entry(key) == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ONNX Runtime's default: spin
        local.session.get_session_options().get_session_config_entry(key)
