import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from voltacache.checkpoint import load_pipeline
from voltacache.errors import CheckpointError
from voltacache.single_file import save_single_file


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


def test_sdxl_folder_refused(tiny_dir, tmp_path):
    folder = tmp_path / "xl"
    shutil.copytree(tiny_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="SDXL"):
        load_pipeline(folder)


@pytest.mark.parametrize(
    "key, family",
    [
        ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", "SDXL"),
        ("model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight", "SD3"),
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
