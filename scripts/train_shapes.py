"""Train the tiny preset on procedural shapes: the real, small text-to-image model that voltacache embeds.

The recipe is the one measured in docs/platform.md, on a 2-core CPU in under 30 minutes: the VAE first, then
scaling factor = 1/latent std, then the U-Net jointly with CLIP's text encoder from its seeded random init
(--freeze-text-encoder keeps that init and encodes the ~430 distinct captions once: faster, worse on held-out
pairs). A probe scores held-out captions along the way (--probe-every). Everything is reproducible from
(--seed, step counts); the defaults are the recipe of the shipped weights.

    python scripts/train_shapes.py                          # train, ship fp16 weights, evaluate
    python scripts/train_shapes.py --evaluate-only voltacache/weights/shapes
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image, ImageDraw
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from voltacache.benchmark import library_versions
from voltacache.compile.clip_vocab import clip_tokenizer
from voltacache.compile.presets import SD15_CONFIG_DIR, assemble, component_config
from voltacache.shapes import dataset

REPO = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = REPO / "voltacache" / "weights" / "shapes"
PROGRESS = {"mininterval": 5.0, "dynamic_ncols": True}  # a log file, not a terminal: few redraws
UNET_LR, POLISH_LR = 1e-3, 5e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "build" / "shapes-train")
    p.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR, help="where the shipped fp16 weights go")
    p.add_argument("--vae-steps", type=int, default=600)
    p.add_argument("--vae", type=Path, default=None, help="a VAE folder this script wrote: reuse it, skip its training")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--unet-steps", type=int, default=3150, help="steps at constant LR, averaged by the EMA")
    p.add_argument(
        "--polish-steps",
        type=int,
        default=450,
        help=f"then restart from the EMA average and train this many steps more with the LR falling from "
        f"{POLISH_LR:g} to 0; these weights ship (0: the EMA average ships)",
    )
    p.add_argument("--unet-batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument(
        "--partial-captions",
        type=float,
        default=0.3,
        help="share of U-Net samples captioned with one attribute pair only ('a red circle', 'a circle on a blue "
        "background'): it breaks the shortcut of learning each color pair as a bag of words",
    )
    p.add_argument(
        "--freeze-text-encoder",
        dest="train_text_encoder",
        action="store_false",
        help="keep the CLIP text encoder at its random init instead of training it with the U-Net (same optimizer "
        "and EMA)",
    )
    p.add_argument(
        "--probe-every",
        type=int,
        default=500,
        help="every N U-Net steps, score the U-Net as it would ship on the held-out captions (4 seeds each) for the "
        "curve; 0: off",
    )
    p.add_argument("--pool-per-combo", type=int, default=64, help="rendered images per trained caption")
    p.add_argument("--guidance", type=float, nargs="+", default=[5.0, 3.0, 7.5], help="first one is the headline")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--evaluate-only", type=Path, default=None, metavar="MODEL_DIR")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


# ---------------------------------------------------------------- data


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], the range SD's VAE works in."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------- VAE


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Multiplier of the base LR: linear warmup, then cosine down to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train_vae(args: argparse.Namespace) -> tuple[AutoencoderKL, list[float], float]:
    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_config(component_config("vae", "shapes"))
    vae.to(memory_format=torch.channels_last)  # 10% faster steps, as for the U-Net
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.vae_steps, 20, floor=0.0))
    rng = np.random.default_rng([args.seed, 1])
    noise = torch.Generator().manual_seed(args.seed + 1)
    losses, start = [], time.perf_counter()
    for _ in tqdm(range(args.vae_steps), desc="vae", **PROGRESS):
        x = to_tensor(dataset.sample(args.vae_batch, rng)[0]).contiguous(memory_format=torch.channels_last)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=noise)).sample
        # KL only keeps the latent near N(0, 1) in scale; at 1e-6 it does not blur the reconstruction.
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    vae.to(memory_format=torch.contiguous_format)  # what save_pretrained and inference expect
    return vae.eval().requires_grad_(False), losses, time.perf_counter() - start


@torch.no_grad()
def set_scaling_factor(vae: AutoencoderKL, seed: int) -> dict:
    """SD scales latents by a constant so they have unit variance; measure ours on 512 fresh images."""
    x = to_tensor(dataset.sample(512, np.random.default_rng([seed, 2]))[0])
    posterior = vae.encode(x).latent_dist
    latents = posterior.sample(generator=torch.Generator().manual_seed(seed + 2))
    scale = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scale)
    recon = vae.decode(posterior.mean).sample
    mse = F.mse_loss(recon, x).item()  # x in [-1, 1]: PSNR over a peak-to-peak of 2
    return {
        "scaling_factor": scale,
        "latent_mean": latents.mean().item(),
        "psnr_db": 10 * math.log10(4 / mse),
    }


# ---------------------------------------------------------------- text encoder


def random_text_encoder(seed: int) -> CLIPTextModel:
    """CLIP's text encoder at its seeded random init (what --freeze-text-encoder keeps; train_unet copies it)."""
    torch.manual_seed(seed)
    config = {k: v for k, v in component_config("text_encoder", "shapes").items() if k != "architectures"}
    return CLIPTextModel(CLIPTextConfig(**config)).eval().requires_grad_(False)


def token_ids(captions: list[str]) -> torch.Tensor:
    """What StableDiffusionPipeline.encode_prompt feeds the text encoder: the padded 77 tokens."""
    tok = clip_tokenizer()
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return ids.input_ids


def training_captions() -> list[str]:
    """TRAIN's captions; then per trained caption, in TRAIN order, its two partial captions, "a {color} {shape}"
    and "a {shape} on a {background} background"; then "", the unconditional prompt."""
    partial = [
        caption
        for c in dataset.TRAIN
        for caption in (f"a {c.color} {c.shape}", f"a {c.shape} on a {c.background} background")
    ]
    return [c.caption for c in dataset.TRAIN] + partial + [""]


# ---------------------------------------------------------------- U-Net


@torch.no_grad()
def latent_pool(vae: AutoencoderKL, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posterior mean/std of a fixed pool of rendered training images and each one's caption index.

    Encoding once is cheaper than running the VAE encoder every U-Net step, and 64 positions and sizes per
    caption is more variety than the U-Net sees in its budget anyway.
    """
    rng = np.random.default_rng([args.seed, 3])
    means, stds, labels = [], [], []
    for index, combo in enumerate(tqdm(dataset.TRAIN, desc="latent pool", **PROGRESS)):
        images = [render_combo(combo, rng) for _ in range(args.pool_per_combo)]
        posterior = vae.encode(to_tensor(np.stack(images))).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        labels.append(torch.full((args.pool_per_combo,), index))
    return torch.cat(means), torch.cat(stds), torch.cat(labels)


def render_combo(combo: dataset.Combo, rng: np.random.Generator) -> np.ndarray:
    return dataset.render(combo.color, combo.shape, combo.background, rng)


class EMA:
    """Exponential moving average of parameters, with the usual warmup so early steps don't freeze in."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in model.parameters()], 1 - decay)

    @torch.no_grad()
    def load_into(self, model: torch.nn.Module) -> torch.nn.Module:
        for s, p in zip(self.shadow, model.parameters()):
            p.copy_(s)
        return model

    def copy_to(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.load_into(copy.deepcopy(model))


def train_unet(
    args: argparse.Namespace,
    pool: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    text_encoder: CLIPTextModel,
    vae: AutoencoderKL,
) -> tuple[UNet2DConditionModel, CLIPTextModel, dict]:
    """Returns the U-Net and text encoder that ship (the one given, if frozen) and the run's log: per-step losses,
    seconds and the held-out probes."""
    torch.manual_seed(args.seed + 4)
    unet = UNet2DConditionModel.from_config(component_config("unet", "shapes")).train()
    noise_scheduler = DDPMScheduler.from_pretrained(SD15_CONFIG_DIR, subfolder="scheduler")
    scaling_factor = vae.config.scaling_factor
    ids = token_ids(training_captions())
    empty = len(ids) - 1  # the last caption is "": what the pipeline feeds as the unconditional prompt
    models = torch.nn.ModuleList([unet])
    if args.train_text_encoder:
        text_encoder = copy.deepcopy(text_encoder).train().requires_grad_(True)
        models.append(text_encoder)
    else:  # ~430 distinct captions: encode them once
        with torch.no_grad():
            embeddings = text_encoder(ids)[0]
    ema = EMA(models, 0.998)
    # fused: one kernel instead of a loop over ~200 tensors, 6% off each step (so also for the VAE and polishing)
    opt = torch.optim.AdamW(models.parameters(), lr=UNET_LR, fused=True)

    def current() -> tuple[UNet2DConditionModel, CLIPTextModel]:
        """What would ship if training stopped here: the EMA average, or the polished weights once polishing."""
        copies = (copy.deepcopy(models) if polishing else ema.copy_to(models)).eval().requires_grad_(False)
        unet = copies[0].to(memory_format=torch.contiguous_format)  # what save_pretrained and inference expect
        return unet, copies[1] if args.train_text_encoder else text_encoder

    means, stds, labels = pool
    gen = torch.Generator().manual_seed(args.seed + 5)
    # channels-last convolutions: 12% faster steps on this CPU (oneDNN), same model
    unet.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    losses, probes = [], []
    polishing = False
    bar = tqdm(range(args.unet_steps + args.polish_steps), desc="unet", **PROGRESS)
    for step in bar:
        if step == args.unet_steps:
            # The EMA average blurs fine detail (squares come out with concave sides); a short run from it with
            # the LR falling to 0, and fresh Adam moments, settles it.
            polishing = True
            ema.load_into(models)
            opt = torch.optim.AdamW(models.parameters(), lr=POLISH_LR, fused=True)
        if polishing:
            lr = POLISH_LR * (1 - (step - args.unet_steps) / args.polish_steps)
        else:
            lr = UNET_LR * min(1.0, (step + 1) / args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(labels), (args.unet_batch,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling_factor
        caption = labels[idx]
        if args.partial_captions:
            # every held-out pair's reverse is trained, so a model that reads the two colors as a set fits the
            # training data and swaps them on held-out prompts; one-attribute captions tie each color to its slot
            partial = torch.rand(args.unet_batch, generator=gen) < args.partial_captions
            which = torch.randint(2, (args.unet_batch,), generator=gen)
            caption = torch.where(partial, len(dataset.TRAIN) + 2 * labels[idx] + which, caption)
        drop = torch.rand(args.unet_batch, generator=gen) < 0.1  # classifier-free guidance needs the "" branch
        caption = torch.where(drop, empty, caption)
        if args.train_text_encoder:  # a quarter of a batch repeats a caption: encode each distinct one once
            distinct, inverse = caption.unique(return_inverse=True)
            text = text_encoder(ids[distinct])[0][inverse]
        else:
            text = embeddings[caption]
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (args.unet_batch,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps).contiguous(memory_format=torch.channels_last)
        pred = unet(noisy, timesteps, encoder_hidden_states=text).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        opt.step()
        if not polishing:
            ema.update(models, step)
        losses.append(loss.item())
        done = step + 1
        if done % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if args.probe_every and done % args.probe_every == 0:
            probing = time.perf_counter()
            probed_unet, probed_text_encoder = current()
            pipe = assemble("sd15", unet=probed_unet, vae=vae, text_encoder=probed_text_encoder)
            probes.append({"step": done, **probe_adherence(for_evaluation(pipe), args.guidance[0], args.eval_steps)})
            probes[-1]["seconds"] = time.perf_counter() - probing
            start += probes[-1]["seconds"]  # probing is not training time
            bar.write(f"step {done}: held-out {probes[-1]['held_out']:.1%}, trained {probes[-1]['trained']:.1%}")
    seconds = time.perf_counter() - start
    return *current(), {"losses": losses, "seconds": seconds, "probes": probes}


# ---------------------------------------------------------------- saving


def ship_weights(vae, text_encoder, unet, weights_dir: Path) -> int:
    """fp16 safetensors + config.json per component; fp16 halves the 26 MB, and fp32 CPU loads upcast."""
    for name, model in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet)):
        copy.deepcopy(model).to(torch.float16).save_pretrained(weights_dir / name, safe_serialization=True)
    return sum(f.stat().st_size for f in weights_dir.rglob("*") if f.is_file())


def load_for_evaluation(model_dir: Path) -> StableDiffusionPipeline:
    """A full diffusers folder, or the shipped component folders (no tokenizer or scheduler), in fp32."""
    if (model_dir / "model_index.json").is_file():
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, safety_checker=None)
    else:
        pipe = assemble(
            "sd15",
            unet=UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=torch.float32),
            vae=AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32),
            text_encoder=CLIPTextModel.from_pretrained(model_dir / "text_encoder", dtype=torch.float32),
        )
    return for_evaluation(pipe)


def for_evaluation(pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plot_losses(log: dict, probes: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if probes else 2, figsize=(16 if probes else 11, 4))
    for ax, name in zip(axes, ("vae", "unet")):
        losses = np.asarray(log[name])
        ax.plot(losses, alpha=0.3, lw=0.7, label="step")
        window = max(1, len(losses) // 50)
        if len(losses) >= window:
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(np.arange(window - 1, len(losses)), smooth, lw=1.5, label=f"mean of {window}")
        ax.set_yscale("log")
        ax.set_title(f"{name} loss ({len(losses)} steps)")
        ax.set_xlabel("step")
        ax.legend()
    if probes:
        ax = axes[2]
        steps = [p["step"] for p in probes]
        for split in ("trained", "held_out"):
            ax.plot(steps, [100 * p[split] for p in probes], marker="o", label=split.replace("_", "-"))
        ax.set_ylim(0, 100)
        ax.set_title("fully right (%), U-Net as it would ship, probe seeds")
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def generate(
    pipe: StableDiffusionPipeline, captions: list[str], guidance: float, steps: int, first_seed: int = 1000
) -> np.ndarray:
    """One image per caption, each from its own fixed seed (first_seed + its index), so runs compare image for image."""
    images = []
    for start in range(0, len(captions), 24):
        chunk = captions[start : start + 24]
        generators = [torch.Generator().manual_seed(first_seed + start + i) for i in range(len(chunk))]
        out = pipe(
            chunk,
            height=64,
            width=64,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="np",
        ).images
        images.append((out * 255).round().astype(np.uint8))
    return np.concatenate(images)


def probe_adherence(pipe: StableDiffusionPipeline, guidance: float, steps: int) -> dict:
    """Fully-right share of the held-out captions over 4 seeds each (96 images), and of every 5th trained caption
    (29, all three shapes): a cheap curve along training, on seeds the final evaluation does not use."""
    captions = [(c.caption, True) for c in dataset.HELD_OUT] * 4 + [(c.caption, False) for c in dataset.TRAIN[::5]]
    return fully_right(score(generate(pipe, [c for c, _ in captions], guidance, steps, first_seed=5000), captions))


def score(images: np.ndarray, captions: list[tuple[str, bool]]) -> dict:
    from voltacache.shapes.checker import check

    rows = [{"caption": c, "held_out": h, **check(img, c)} for img, (c, h) in zip(images, captions)]
    summary = {}
    for split, held in (("trained", False), ("held_out", True)):
        subset = [r for r in rows if r["held_out"] == held]
        summary[split] = {
            field: sum(r[field] for r in subset) / len(subset)
            for field in ("all_ok", "color_ok", "shape_ok", "background_ok")
        } | {"n": len(subset)}
    summary["failures"] = [r for r in rows if not r["all_ok"]]
    return summary


def fully_right(report: dict) -> dict:
    """A score() report as the fully-right share per split."""
    return {split: report[split]["all_ok"] for split in ("held_out", "trained")}


@torch.no_grad()
def reconstruction_adherence(vae: AutoencoderKL, draws: int = 3) -> dict:
    """Fully-right share of freshly drawn images (`draws` per combination) passed through the VAE at its posterior
    mean, per split: the ceiling the VAE puts on any U-Net's adherence."""
    images, captions = [], []
    for held, combos in ((False, dataset.TRAIN), (True, dataset.HELD_OUT)):
        rng = np.random.default_rng(123)
        picks = [c for c in combos for _ in range(draws)]
        images += [render_combo(c, rng) for c in picks]
        captions += [(c.caption, held) for c in picks]
    x = to_tensor(np.stack(images))
    recon = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mean).sample for chunk in x.split(64)])
    return fully_right(score(to_uint8(recon), captions))


def contact_sheet(images: np.ndarray, captions: list[tuple[str, bool]], report: dict, path: Path) -> None:
    """Every 5th trained caption (all shapes come up) and every held-out one, 2x, framed green (fully right) or red."""
    from voltacache.shapes.checker import check

    picks = [i for i, (_, held) in enumerate(captions) if held or i % 5 == 0]
    cols, cell, label = 8, 128, 28
    rows = math.ceil(len(picks) / cols)
    sheet = Image.new("RGB", (cols * (cell + 8), rows * (cell + 8 + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, i in enumerate(picks):
        caption, held = captions[i]
        x, y = (k % cols) * (cell + 8), (k // cols) * (cell + 8 + label)
        ok = check(images[i], caption)["all_ok"]
        draw.rectangle([x, y, x + cell + 7, y + cell + 7], fill=(40, 170, 60) if ok else (210, 40, 40))
        sheet.paste(Image.fromarray(images[i]).resize((cell, cell), Image.Resampling.NEAREST), (x + 4, y + 4))
        words = caption.split()  # "a C S on a B background"
        draw.text((x + 2, y + cell + 8), f"{words[1]} {words[2]}", fill="black")
        draw.text((x + 2, y + cell + 18), f"on {words[5]}" + (" (held out)" if held else ""), fill="black")
    sheet.save(path)


def evaluate(model_dir: Path, out_dir: Path, guidances: list[float], steps: int) -> dict:
    pipe = load_for_evaluation(model_dir)
    captions = dataset.evaluation_captions()
    results = {"model": str(model_dir), "scheduler": "DDIM", "steps": steps, "by_guidance": {}}
    for guidance in guidances:
        start = time.perf_counter()
        images = generate(pipe, [c for c, _ in captions], guidance, steps)
        report = score(images, captions)
        report["seconds"] = round(time.perf_counter() - start, 1)
        results["by_guidance"][str(guidance)] = report
        print(
            f"guidance {guidance}: trained {report['trained']['all_ok']:.1%} fully right, "
            f"held-out {report['held_out']['all_ok']:.1%}  ({report['seconds']} s)"
        )
        for split in ("trained", "held_out"):
            fields = ", ".join(f"{k} {v:.1%}" for k, v in report[split].items() if k.endswith("_ok"))
            print(f"    {split:9s} {fields}")
        if guidance == guidances[0]:
            contact_sheet(images, captions, report, out_dir / f"contact_sheet_g{guidance:g}.png")
    results["vae_reconstruction"] = reconstruction_adherence(pipe.vae)
    print(
        f"VAE reconstruction: trained {results['vae_reconstruction']['trained']:.1%} fully right, "
        f"held-out {results['vae_reconstruction']['held_out']:.1%}"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evaluation.json").write_text(json.dumps(results, indent=1))
    return results


# ---------------------------------------------------------------- main


def evaluation_record(args: argparse.Namespace, evaluation: dict) -> dict:
    adherence = {
        g: {split: r[split] for split in ("trained", "held_out")} for g, r in evaluation["by_guidance"].items()
    }
    return {
        "scheduler": "DDIM",
        "steps": args.eval_steps,
        "seeds": "1000 + caption index",
        "adherence": adherence,
        "vae_reconstruction": evaluation["vae_reconstruction"],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # channels-last convolutions under a trained text encoder differ in the 7th digit run to run without it
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.evaluate_only:
        evaluation = evaluate(args.evaluate_only, args.out, args.guidance, args.eval_steps)
        record_path = args.evaluate_only / "TRAINING.json"
        if record_path.is_file():  # shipped weights: their record shows the latest checker's scores
            record = json.loads(record_path.read_text())
            record["evaluation"] = evaluation_record(args, evaluation)
            record_path.write_text(json.dumps(record, indent=1) + "\n")
        return

    if args.vae:
        vae = AutoencoderKL.from_pretrained(args.vae, torch_dtype=torch.float32).eval().requires_grad_(False)
        saved = json.loads((args.vae / "training.json").read_text())
        vae_losses, vae_seconds, vae_stats = saved["losses"], saved["seconds"], saved["stats"]
    else:
        vae, vae_losses, vae_seconds = train_vae(args)
        vae_stats = set_scaling_factor(vae, args.seed)
        # Saved at once: a later run (e.g. a longer U-Net) can start from here with --vae.
        vae.save_pretrained(args.out / "vae", safe_serialization=True)
        record = {"seed": args.seed, "steps": args.vae_steps, "seconds": vae_seconds, "stats": vae_stats}
        (args.out / "vae" / "training.json").write_text(json.dumps(record | {"losses": vae_losses}))
    print(f"vae: {len(vae_losses)} steps in {vae_seconds / 60:.1f} min, {vae_stats}", flush=True)

    pool_start = time.perf_counter()
    pool = latent_pool(vae, args)
    pool_seconds = time.perf_counter() - pool_start
    print(f"latent pool: {len(pool[2])} images in {pool_seconds:.0f} s", flush=True)

    unet, text_encoder, unet_log = train_unet(args, pool, random_text_encoder(args.seed + 3), vae)
    unet_losses, unet_seconds = unet_log["losses"], unet_log["seconds"]
    train_seconds = vae_seconds + pool_seconds + unet_seconds  # a reused VAE counts at its recorded time
    steps = f"{args.unet_steps} + {args.polish_steps} polishing"
    print(f"unet: {steps} steps in {unet_seconds / 60:.1f} min; training total {train_seconds / 60:.1f} min")

    pipe_dir = args.out / "pipeline"
    assemble("sd15", unet=unet, vae=vae, text_encoder=text_encoder).save_pretrained(pipe_dir, safe_serialization=True)
    weights_bytes = ship_weights(vae, text_encoder, unet, args.weights_dir)
    log = {"vae": vae_losses, "unet": unet_losses}
    (args.out / "losses.json").write_text(json.dumps(log | {"probes": unet_log["probes"]}))
    plot_losses(log, unet_log["probes"], args.out / "losses.png")

    # Score what ships: the fp16 weights, read back the way a CPU user loads them.
    evaluation = evaluate(args.weights_dir, args.out, args.guidance, args.eval_steps)
    final = {name: float(np.mean(losses[-50:])) for name, losses in log.items()}
    record = {
        "command": shlex.join(["python", *sys.argv]),
        "reproduce": f"python scripts/train_shapes.py --seed {args.seed} --vae-steps {len(vae_losses)} "
        f"--unet-steps {args.unet_steps} --polish-steps {args.polish_steps} "
        f"--partial-captions {args.partial_captions:g}" + ("" if args.train_text_encoder else " --freeze-text-encoder"),
        "seed": args.seed,
        "vae_steps": len(vae_losses),
        "vae_reused_from": str(args.vae) if args.vae else None,
        "vae_batch": args.vae_batch,
        "unet_steps": args.unet_steps,
        "polish_steps": args.polish_steps,
        "unet_batch": args.unet_batch,
        "text_encoder": "trained jointly" if args.train_text_encoder else "frozen at random init",
        "held_out_probes": unet_log["probes"],
        "pool_images": len(pool[2]),
        "minutes": {
            "vae": round(vae_seconds / 60, 2),
            "latent_pool": round(pool_seconds / 60, 2),
            "unet": round(unet_seconds / 60, 2),
            "total_training": round(train_seconds / 60, 2),
        },
        "final_loss_mean_of_last_50": final,
        "vae": vae_stats,
        "weights_bytes_fp16": weights_bytes,
        "evaluation": evaluation_record(args, evaluation),
        "threads": args.threads,
        "versions": library_versions(),
    }
    (args.weights_dir / "TRAINING.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("unet_steps", "minutes", "final_loss_mean_of_last_50")}, indent=1))


if __name__ == "__main__":
    main()
