import numpy as np
import pytest

from voltacache.build import load_engines
from voltacache.errors import VoltacacheError
from voltacache.runners import TorchRunner
from voltacache.specs import TEXT_ENCODER, UNET_DEEP


@pytest.fixture(scope="module")
def runners(engines_dir):
    return load_engines(engines_dir).runners


def feeds_for(spec, seed=0):
    rng = np.random.default_rng(seed)
    return {
        t.name: (rng.integers(0, 49407, t.shape) if t.dtype == "int32" else rng.standard_normal(t.shape)).astype(
            t.dtype
        )
        for t in spec.inputs
    }


def test_onnxruntime_matches_torch(runners, tiny_pipe):
    from voltacache.components import torch_modules

    spec = runners[UNET_DEEP].spec
    torch_runner = TorchRunner(torch_modules(tiny_pipe, 2)[UNET_DEEP], spec)
    feeds = feeds_for(spec)
    a, b = runners[UNET_DEEP].infer(feeds), torch_runner.infer(feeds)
    assert a.keys() == b.keys() == set(spec.output_names)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-4)


def test_wrong_shape_is_a_clear_error(runners):
    spec = runners[TEXT_ENCODER].spec
    with pytest.raises(
        VoltacacheError, match=r"text_encoder: input 'input_ids' is int32\[1, 77\], expected int32\[2, 77\]"
    ):
        runners[TEXT_ENCODER].infer({"input_ids": np.zeros((1, 77), np.int32)})
    with pytest.raises(VoltacacheError, match="missing input 'input_ids'"):
        runners[TEXT_ENCODER].infer({})
    with pytest.raises(VoltacacheError, match="is int64"):
        runners[TEXT_ENCODER].infer({"input_ids": np.zeros(spec.inputs[0].shape, np.int64)})
