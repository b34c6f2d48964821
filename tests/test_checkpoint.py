import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from voltacache.compile.checkpoint import load_pipeline
from voltacache.compile.single_file import checkpoint_family, safetensors_header, save_single_file
from voltacache.errors import CheckpointError


def weights_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_loads_diffusers_folder(tiny_dir, tiny_pipe):
    assert type(tiny_pipe).__name__ == "StableDiffusionPipeline"
    assert tiny_pipe.unet.config.block_out_channels == (32, 64, 64, 64) or list(
        tiny_pipe.unet.config.block_out_channels
    ) == [32, 64, 64, 64]


def test_single_file_round_trip(tiny_dir, tiny_pipe, tmp_path):
    path = save_single_file(tiny_pipe, tmp_path / "tiny.safetensors")
    loaded = load_pipeline(path, config=tiny_dir)
    for component in ("unet", "vae", "text_encoder"):
        assert weights_equal(getattr(tiny_pipe, component), getattr(loaded, component)), component
    assert loaded.tokenizer("a photo").input_ids == [49406, 320, 1125, 49407]
    # without --config, the tiny widths do not fit SD 1.5's: refused with the remedy, in our words only
    with pytest.raises(CheckpointError, match="do not fit the SD 1.x configs voltacache ships") as refused:
        load_pipeline(path)
    assert "needs --config DIR" in str(refused.value) and "ignore_mismatched_sizes" not in str(refused.value)


# preset -> family, pipeline class, scheduler class, prediction type, pad token of each tokenizer
FAMILY_PRESETS = {
    "sd2-tiny": ("SD 2.x", "StableDiffusionPipeline", "DDIMScheduler", "v_prediction", {"tokenizer": "!"}),
    "sdxl-tiny": (
        "SDXL",
        "StableDiffusionXLPipeline",
        "EulerDiscreteScheduler",
        "epsilon",
        {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
    ),
}


@pytest.fixture(scope="module", params=list(FAMILY_PRESETS))
def family_single_file(request, tmp_path_factory):
    """(preset, its pipeline, a folder of its configs, the single file written from it)."""
    from voltacache.compile.presets import random_pipeline

    root = tmp_path_factory.mktemp(request.param)
    pipe = random_pipeline(request.param)
    pipe.save_pretrained(root / "folder")
    return request.param, pipe, root / "folder", save_single_file(pipe, root / "model.safetensors")


def test_single_file_family_read_from_header(family_single_file):
    preset, _, _, path = family_single_file
    assert checkpoint_family(safetensors_header(path)) == FAMILY_PRESETS[preset][0]


def test_single_file_round_trip_sd2_and_sdxl(family_single_file):
    preset, pipe, folder, path = family_single_file
    _, pipeline_class, scheduler_class, prediction_type, pad_tokens = FAMILY_PRESETS[preset]
    # the tiny widths are not the shipped configs': read against the preset's own folder
    loaded = load_pipeline(path, config=folder)
    assert type(loaded).__name__ == pipeline_class
    assert type(loaded.scheduler).__name__ == scheduler_class
    assert loaded.scheduler.config.prediction_type == prediction_type
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, component, None) is not None:
            assert weights_equal(getattr(pipe, component), getattr(loaded, component)), component
    for name, pad in pad_tokens.items():
        assert getattr(loaded, name).pad_token == pad, name


@pytest.mark.slow
def test_single_file_against_shipped_sd15_configs_reports_shape_mismatch(tiny_pipe, tmp_path):
    # tiny weights against SD 1.5's configs: a clear error naming the file, not a crash deep in diffusers
    path = save_single_file(tiny_pipe, tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="tiny.safetensors"):
        load_pipeline(path)


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_pickle_file_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=r"pickle.*--allow-pickle"):
        load_pipeline(path)


def test_pickle_weights_in_folder_refused(tiny_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_dir, folder)
    unet = folder / "unet"
    from safetensors.torch import load_file

    torch.save(load_file(unet / "diffusion_pytorch_model.safetensors"), unet / "diffusion_pytorch_model.bin")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"unet.*pickle"):
        load_pipeline(folder)
    assert load_pipeline(folder, allow_pickle=True).unet is not None


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors: no such file"):
        load_pipeline(tmp_path / "nope.safetensors")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(CheckpointError, match="no model_index.json"):
        load_pipeline(tmp_path)


def test_folder_missing_component(tiny_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_dir, folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(CheckpointError, match="missing component folder.*vae"):
        load_pipeline(folder)


def test_sdxl_folder_without_its_second_encoder_or_a_refiner_is_refused(tiny_dir, tmp_path):
    folder = tmp_path / "xl"
    shutil.copytree(tiny_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(CheckpointError, match=r"missing component folder\(s\): text_encoder_2, tokenizer_2$"):
        load_pipeline(folder)
    # a refiner: SDXL's img2img pipeline with only the second text encoder
    (folder / "text_encoder").rename(folder / "text_encoder_2")
    (folder / "tokenizer").rename(folder / "tokenizer_2")
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    with pytest.raises(CheckpointError, match="text_encoder, tokenizer .an SDXL refiner.*is not supported"):
        load_pipeline(folder)
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(CheckpointError, match="a SD3 pipeline .StableDiffusion3Pipeline.; voltacache supports"):
        load_pipeline(folder)


@pytest.mark.parametrize(
    "key, family",
    [
        ("model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight", "SD3"),
        ("double_blocks.0.img_attn.qkv.weight", "Flux"),
    ],
)
def test_other_family_single_file_refused(tmp_path, key, family):
    path = tmp_path / "other.safetensors"
    save_file({key: torch.zeros(2, 2), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match=f"other.safetensors: a {family} checkpoint"):
        load_pipeline(path)


def test_unknown_safetensors_refused(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="lora.safetensors: not a Stable Diffusion checkpoint"):
        load_pipeline(path)


def test_corrupt_safetensors_reported_by_name(tmp_path):
    path = tmp_path / "torn.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="torn.safetensors: not a readable safetensors"):
        load_pipeline(path)


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("weights", ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"])
def test_truncated_component_weights_named(tiny_dir, tmp_path, weights):
    folder = tmp_path / "torn"
    shutil.copytree(tiny_dir, folder)
    cut_in_half(folder / weights)
    with pytest.raises(CheckpointError, match=f"torn/{weights}: corrupt or truncated weights"):
        load_pipeline(folder)


def test_truncated_single_file_named(tiny_pipe, tmp_path):
    path = save_single_file(tiny_pipe, tmp_path / "tiny.safetensors")
    cut_in_half(path)
    with pytest.raises(CheckpointError, match="tiny.safetensors: not a readable safetensors file .*truncated"):
        load_pipeline(path)


def test_cli_export_of_truncated_weights_is_one_line(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from voltacache.cli import app

    folder = tmp_path / "torn"
    shutil.copytree(tiny_dir, folder)
    cut_in_half(folder / "vae" / "diffusion_pytorch_model.safetensors")
    result = CliRunner().invoke(app, ["export", "--model", str(folder), "--out", str(tmp_path / "onnx")])
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "vae/diffusion_pytorch_model.safetensors: corrupt or truncated weights" in lines[0]
    assert not (tmp_path / "onnx").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["torn"]


def test_single_file_replaced_only_when_ours_and_forced(tiny_pipe, tmp_path):
    from voltacache.errors import OutputExists

    path = save_single_file(tiny_pipe, tmp_path / "tiny.safetensors")
    with pytest.raises(OutputExists, match="--single-file .*tiny.safetensors: holds an earlier .*--force"):
        save_single_file(tiny_pipe, path)
    save_single_file(tiny_pipe, path, force=True)
    user = tmp_path / "downloaded.safetensors"
    save_file({"x": torch.zeros(2)}, str(user))
    before = user.read_bytes()
    with pytest.raises(OutputExists, match="downloaded.safetensors: not a single-file checkpoint"):
        save_single_file(tiny_pipe, user, force=True)
    assert user.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloaded.safetensors", "tiny.safetensors"]
