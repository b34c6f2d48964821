import pytest
import torch

from voltacache.compile.unet_split import UNetDeep, UNetShallow, shallow_layer_count


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    # a timestep per row, as the exported graphs take them (rows of different requests share a call)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([741.0, 20.0]), torch.randn(2, 77, 64, generator=g)


@pytest.mark.parametrize("branch, layers, channels", [("block", 2, 64), ("0", 1, 32)])
def test_split_reproduces_unsplit_unet_exactly(tiny_pipe, inputs, branch, layers, channels):
    unet = tiny_pipe.unet
    assert shallow_layer_count(unet, branch) == layers
    with torch.no_grad():
        reference = unet(*inputs).sample
        noise, deep = UNetDeep(unet, layers)(*inputs)
        shallow = UNetShallow(unet, layers)(*inputs, deep)
    assert deep.shape == (2, channels, 8, 8)
    assert torch.equal(noise, reference)
    assert torch.equal(shallow, reference)


def test_shallow_uses_a_stale_feature(tiny_pipe, inputs):
    # A deep feature from another step changes the result: the shallow model really consumes it.
    sample, t, context = inputs
    with torch.no_grad():
        _, deep = UNetDeep(tiny_pipe.unet, 2)(sample, torch.tensor([10.0]), context)
        fresh = tiny_pipe.unet(sample, t, context).sample
        stale = UNetShallow(tiny_pipe.unet, 2)(sample, t, context, deep)
    assert not torch.allclose(fresh, stale)


def test_branch_0_is_cheaper_than_block(tiny_pipe):
    def used_parameters(layers):
        shallow = UNetShallow(tiny_pipe.unet, layers)
        counted = []
        hooks = [m.register_forward_hook(lambda m, i, o: counted.append(m)) for m in tiny_pipe.unet.modules()]
        with torch.no_grad():
            shallow(
                torch.zeros(2, 4, 8, 8),
                torch.tensor([1.0]),
                torch.zeros(2, 77, 64),
                torch.zeros(2, 64 if layers == 2 else 32, 8, 8),
            )
        for h in hooks:
            h.remove()
        return sum(p.numel() for m in set(counted) for p in m.parameters(recurse=False))

    assert used_parameters(1) < used_parameters(2) < sum(p.numel() for p in tiny_pipe.unet.parameters())


def test_unknown_branch(tiny_pipe):
    with pytest.raises(ValueError, match="use 'block' or a layer number"):
        shallow_layer_count(tiny_pipe.unet, "7")


@pytest.fixture(scope="module")
def sdxl_unet():
    from voltacache.compile.presets import random_pipeline

    return random_pipeline("sdxl-tiny").unet


@pytest.mark.parametrize("branch, layers, channels", [("block", 3, 64), ("2", 3, 64), ("1", 2, 32), ("0", 1, 32)])
def test_split_reproduces_sdxls_unet_exactly(sdxl_unet, branch, layers, channels):
    """SDXL: a 3-level U-Net whose first down block has no attention, and added conditions (pooled text
    embedding, time ids) on the time embedding: the split still equals the unsplit U-Net bit for bit."""
    unet = sdxl_unet
    g = torch.Generator().manual_seed(0)
    sample, t, context = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([741.0, 20.0]), torch.randn(2, 77, 96)
    pooled, time_ids = torch.randn(2, 64, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64], [32, 48, 8, 4, 64, 32]])
    assert shallow_layer_count(unet, branch) == layers
    with torch.no_grad():
        reference = unet(sample, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        noise, deep = UNetDeep(unet, layers)(sample, t, context, pooled, time_ids)
        shallow = UNetShallow(unet, layers)(sample, t, context, deep, pooled, time_ids)
        without_conditions = UNetShallow(unet, layers)(sample, t, context, deep, pooled, time_ids * 0)
    assert deep.shape == (2, channels, 8, 8)
    assert torch.equal(noise, reference) and torch.equal(shallow, reference)
    assert not torch.allclose(without_conditions, reference)  # the shallow path reads the conditions too
