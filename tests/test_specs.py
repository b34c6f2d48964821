import pytest

from voltacache.specs import (
    COMPONENTS,
    DEEP_FEATURE,
    UNET_DEEP,
    UNET_SHALLOW,
    ComponentSpec,
    Geometry,
    component_specs,
)
from voltacache.unet_split import shallow_layer_count


@pytest.fixture(scope="module")
def geometry(tiny_pipe):
    return Geometry.from_pipeline(tiny_pipe, shallow_layer_count(tiny_pipe.unet, "block"))


def test_shapes_follow_batch_and_size(geometry):
    specs = component_specs(geometry, batch=3, height=128, width=64)
    assert set(specs) == set(COMPONENTS)
    deep = {t.name: t.shape for t in specs[UNET_DEEP].outputs}
    assert deep[DEEP_FEATURE] == (6, 64, 16, 8)  # guidance doubles the batch; latents are 1/8 of the image
    assert specs[UNET_SHALLOW].inputs[-1] == specs[UNET_DEEP].outputs[-1]


def test_size_must_fit_the_unet(geometry):
    with pytest.raises(ValueError, match="multiples of 64"):
        component_specs(geometry, 1, 96, 64)


def test_json_round_trip(geometry):
    for name, spec in component_specs(geometry, 1, 64, 64).items():
        assert ComponentSpec.from_json(name, spec.to_json()) == spec
