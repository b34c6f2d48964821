import pytest

from voltacache.compile.unet_split import shallow_layer_count
from voltacache.specs import (
    COMPONENTS,
    DEEP_FEATURE,
    ROWS_PER_IMAGE,
    SAMPLE,
    TIMESTEP,
    UNET_DEEP,
    UNET_SHALLOW,
    VAE_DECODER,
    ComponentSpec,
    Geometry,
    component_specs,
)


@pytest.fixture(scope="module")
def geometry(tiny_pipe):
    return Geometry.from_pipeline(tiny_pipe, shallow_layer_count(tiny_pipe.unet, "block"))


def test_shapes_follow_batch_and_size(geometry):
    specs = component_specs(geometry, batch=3, height=128, width=64)
    assert set(specs) == set(COMPONENTS)
    deep = {t.name: t.shape for t in specs[UNET_DEEP].outputs}
    assert deep[DEEP_FEATURE] == (6, 64, 16, 8)  # guidance doubles the batch; latents are 1/8 of the image
    assert specs[UNET_SHALLOW].inputs[-1] == specs[UNET_DEEP].outputs[-1]


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_every_tensor_has_its_rows_per_image_at_any_number_of_images(geometry, n):
    one, specs = component_specs(geometry, 1, 64, 64), component_specs(geometry, n, 64, 64)
    for name, spec in specs.items():
        assert spec.rows_per_image == ROWS_PER_IMAGE[name] and spec.images == n
        assert spec == one[name].for_images(n) == specs[name].for_images(n)
        for t in (*spec.inputs, *spec.outputs):
            assert t.shape[0] == n * ROWS_PER_IMAGE[name]
    shapes = {t.name: t.shape for t in specs[UNET_DEEP].inputs}
    assert shapes[TIMESTEP] == (2 * n,) and shapes[SAMPLE][0] == 2 * n  # a timestep per row
    assert specs[VAE_DECODER].inputs[0].shape == (n, 4, 8, 8)


def test_size_must_fit_the_unet(geometry):
    with pytest.raises(ValueError, match="multiples of 64"):
        component_specs(geometry, 1, 96, 64)


def test_json_round_trip(geometry):
    for name, spec in component_specs(geometry, 1, 64, 64).items():
        assert ComponentSpec.from_json(name, spec.to_json()) == spec
