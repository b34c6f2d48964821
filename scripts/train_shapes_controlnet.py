"""Train a ControlNet for the shipped shapes model: the control image is the shape's mask, placed anywhere, and the
model draws the captioned shape there. It makes placement adherence measurable (voltacache.shapes.placement).

The ControlNet starts as a copy of the shapes U-Net's encoder and middle block (ControlNetModel.from_unet, zero
convolutions out), and only it trains: the U-Net, VAE and text encoder stay frozen, as in diffusers'
train_controlnet.py example. The loss is the usual epsilon MSE with the DDPM noise schedule of the model's
scheduler config; the ControlNet's residuals go into the U-Net as down_block_additional_residuals and
mid_block_additional_residual. Training images are the trained (color, shape, background) combinations drawn at
random boxes over the whole image (placement.render_at / random_box), encoded once to a latent pool as
scripts/train_shapes.py does; 10% of captions are dropped to "", the unconditional prompt, so both branches of
classifier-free guidance learn to follow the mask. One CPU thread by default; the defaults are the shipped recipe.

The evaluation generates (caption, random box) pairs with fixed seeds, DDIM, 20 steps, guidance 7.5, with the
ControlNet and without it (the plain pipeline, same prompts and seeds): the mean IoU of the drawn shape against the
box's mask, for both.

    python scripts/train_shapes_controlnet.py                 # train, ship fp16 weights, evaluate
    python scripts/train_shapes_controlnet.py --evaluate-only voltacache/weights/shapes-controlnet
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
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
)
from PIL import Image
from tqdm import tqdm

from voltacache.benchmark import library_versions, machine
from voltacache.compile.presets import trained_pipeline
from voltacache.shapes import dataset, placement
from voltacache.shapes.checker import check

REPO = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = REPO / "voltacache" / "weights" / "shapes-controlnet"
PROGRESS = {"mininterval": 5.0, "dynamic_ncols": True}  # a log file, not a terminal: few redraws
EVAL_SEED = 2000  # generation seeds: EVAL_SEED + pair index; the pairs come from rng(EVAL_SEED)
PROBE_SEED = 6000  # the probe's pairs and seeds, apart from the evaluation's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "build" / "shapes-controlnet-train")
    p.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR, help="where the shipped fp16 weights go")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW; linear warmup, then cosine down to 0")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--drop-caption", type=float, default=0.1, help='share of samples captioned "" (the CFG branch)')
    p.add_argument("--pool-per-combo", type=int, default=48, help="rendered (image, mask) pairs per trained caption")
    p.add_argument("--probe-every", type=int, default=250, help="every N steps, mean IoU on 12 probe pairs; 0: off")
    p.add_argument("--eval-pairs", type=int, default=48)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--evaluate-only", type=Path, default=None, metavar="CONTROLNET_DIR")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


# ---------------------------------------------------------------- data


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], the range SD's VAE works in."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def token_ids(pipe: StableDiffusionPipeline, captions: list[str]) -> torch.Tensor:
    """What StableDiffusionPipeline.encode_prompt feeds the text encoder: the padded 77 tokens."""
    tok = pipe.tokenizer
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return ids.input_ids


@torch.no_grad()
def latent_pool(pipe: StableDiffusionPipeline, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Posterior mean/std of a fixed pool of trained combinations drawn at random boxes, their masks (uint8, one
    channel: the control image's channels are equal) and caption indices. Encoding once is far cheaper than running
    the VAE encoder every step; 48 boxes per caption is ~7000 distinct placements."""
    rng = np.random.default_rng([args.seed, 3])
    means, stds, masks, labels = [], [], [], []
    for index, combo in enumerate(tqdm(dataset.TRAIN, desc="latent pool", **PROGRESS)):
        boxes = [placement.random_box(rng) for _ in range(args.pool_per_combo)]
        images = np.stack([placement.render_at(combo.color, combo.shape, combo.background, b) for b in boxes])
        posterior = pipe.vae.encode(to_tensor(images)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        masks.append(torch.from_numpy(np.stack([placement.control_image(combo.shape, b)[..., 0] for b in boxes])))
        labels.append(torch.full((args.pool_per_combo,), index))
    return {"mean": torch.cat(means), "std": torch.cat(stds), "mask": torch.cat(masks), "label": torch.cat(labels)}


def as_condition(masks: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) masks -> float (N, 3, H, W) in [0, 1]: what the ControlNet pipeline's image processor makes
    of a control image (RGB, not normalized to [-1, 1])."""
    return (masks.float() / 255.0)[:, None].expand(-1, 3, -1, -1)


# ---------------------------------------------------------------- training


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base LR: linear warmup, then cosine down to 0 (the last steps settle the weights, no EMA)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def train(args: argparse.Namespace, pipe: StableDiffusionPipeline, pool: dict) -> tuple[ControlNetModel, dict]:
    torch.manual_seed(args.seed + 4)
    unet = pipe.unet.eval().requires_grad_(False)
    controlnet = ControlNetModel.from_unet(unet).train()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    scaling_factor = pipe.vae.config.scaling_factor
    captions = [c.caption for c in dataset.TRAIN] + [""]
    empty = len(captions) - 1  # "": what the pipeline feeds as the unconditional prompt
    with torch.no_grad():  # frozen text encoder, 145 distinct captions: encode them once
        embeddings = pipe.text_encoder(token_ids(pipe, captions))[0]
    opt = torch.optim.AdamW(controlnet.parameters(), lr=args.lr, fused=True)
    gen = torch.Generator().manual_seed(args.seed + 5)
    # channels-last convolutions: faster steps on this CPU (oneDNN), as scripts/train_shapes.py measured
    unet.to(memory_format=torch.channels_last)
    controlnet.to(memory_format=torch.channels_last)
    means, stds, masks, labels = pool["mean"], pool["std"], pool["mask"], pool["label"]
    losses, probes = [], []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="controlnet", **PROGRESS)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(step, args.steps, args.warmup)
        idx = torch.randint(len(labels), (args.batch,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling_factor
        cond = as_condition(masks[idx]).contiguous(memory_format=torch.channels_last)
        drop = torch.rand(args.batch, generator=gen) < args.drop_caption
        text = embeddings[torch.where(drop, empty, labels[idx])]
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (args.batch,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps).contiguous(memory_format=torch.channels_last)
        down, mid = controlnet(noisy, timesteps, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
        pred = unet(
            noisy,
            timesteps,
            encoder_hidden_states=text,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        done = step + 1
        if done % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}")
        if args.probe_every and done % args.probe_every == 0 and done < args.steps:
            probing = time.perf_counter()
            probe = copy.deepcopy(controlnet).eval().requires_grad_(False).to(memory_format=torch.contiguous_format)
            iou = evaluate_pairs(pipe, probe, eval_pairs(12, PROBE_SEED), steps=10, guidance=args.guidance)["iou"]
            probes.append({"step": done, "iou": iou, "seconds": time.perf_counter() - probing})
            start += probes[-1]["seconds"]  # probing is not training time
            bar.write(f"step {done}: probe IoU {iou:.3f}, loss {np.mean(losses[-50:]):.4f}")
            torch.save(controlnet.state_dict(), args.out / "controlnet_last.pt")  # a run cut short keeps its work
    seconds = time.perf_counter() - start
    unet.to(memory_format=torch.contiguous_format)
    controlnet = controlnet.eval().requires_grad_(False).to(memory_format=torch.contiguous_format)
    return controlnet, {"losses": losses, "probes": probes, "seconds": seconds}


def ship_weights(controlnet: ControlNetModel, weights_dir: Path) -> int:
    """fp16 safetensors + config.json, a diffusers ControlNetModel folder; fp32 CPU loads upcast."""
    copy.deepcopy(controlnet).to(torch.float16).save_pretrained(weights_dir, safe_serialization=True)
    return sum(f.stat().st_size for f in weights_dir.glob("diffusion_pytorch_model*") if f.is_file())


# ---------------------------------------------------------------- evaluation


def eval_pairs(n: int, seed: int = EVAL_SEED) -> list[tuple[dataset.Combo, placement.Box]]:
    """n distinct trained combinations (all three shapes come up), each at a random box, from rng(seed)."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(dataset.TRAIN), size=n, replace=False)
    return [(dataset.TRAIN[int(i)], placement.random_box(rng)) for i in picks]


def controlnet_pipeline(pipe: StableDiffusionPipeline, controlnet: ControlNetModel):
    """The shapes pipeline's components plus the ControlNet, with a DDIM scheduler."""
    cn_pipe = StableDiffusionControlNetPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        controlnet=controlnet,
        scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    cn_pipe.set_progress_bar_config(disable=True)
    return cn_pipe


def plain_pipeline(pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    plain = StableDiffusionPipeline(**pipe.components, requires_safety_checker=False)
    plain.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    plain.set_progress_bar_config(disable=True)
    return plain


@torch.no_grad()
def generate(
    pipe: StableDiffusionPipeline,
    controlnet: ControlNetModel | None,
    pairs: list[tuple[dataset.Combo, placement.Box]],
    steps: int,
    guidance: float,
    first_seed: int,
) -> np.ndarray:
    """One image per pair from seed first_seed + its index, with the ControlNet or (None) the plain pipeline: the
    same starting noise either way, so the two compare image for image."""
    runner = plain_pipeline(pipe) if controlnet is None else controlnet_pipeline(pipe, controlnet)
    images = []
    for start in range(0, len(pairs), 24):
        chunk = pairs[start : start + 24]
        kwargs = {}
        if controlnet is not None:
            kwargs["image"] = [Image.fromarray(placement.control_image(c.shape, box)) for c, box in chunk]
        out = runner(
            [c.caption for c, _ in chunk],
            height=64,
            width=64,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(first_seed + start + i) for i in range(len(chunk))],
            output_type="np",
            **kwargs,
        ).images
        images.append((out * 255).round().astype(np.uint8))
    return np.concatenate(images)


def evaluate_pairs(pipe, controlnet, pairs, steps: int, guidance: float, first_seed: int = PROBE_SEED) -> dict:
    """Mean IoU of the drawn shape against each pair's mask, and the checker's reading of the caption's fields."""
    images = generate(pipe, controlnet, pairs, steps, guidance, first_seed)
    ious = [placement.iou(placement.drawn_mask(img), (c.shape, box)) for img, (c, box) in zip(images, pairs)]
    checks = [check(img, c.caption) for img, (c, _) in zip(images, pairs)]
    fields = {k: float(np.mean([r[k] for r in checks])) for k in ("all_ok", "color_ok", "shape_ok", "background_ok")}
    return {"iou": float(np.mean(ious)), "ious": [round(x, 3) for x in ious], "checker": fields, "images": images}


def contact_sheet(pairs, with_cn: np.ndarray, without: np.ndarray, path: Path, cols: int = 8) -> None:
    """Per pair, three cells in a column: the control mask, the image with the ControlNet, without it."""
    cell = 96
    rows = math.ceil(len(pairs) / cols)
    sheet = Image.new("RGB", (cols * (cell + 6), rows * (3 * cell + 12)), "white")
    for k, (combo, box) in enumerate(pairs):
        x, y = (k % cols) * (cell + 6), (k // cols) * (3 * cell + 12)
        for j, image in enumerate((placement.control_image(combo.shape, box), with_cn[k], without[k])):
            tile = Image.fromarray(image).resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(tile, (x, y + j * cell))
    sheet.save(path)


def evaluate(controlnet_dir: Path, out_dir: Path, n: int, steps: int, guidance: float) -> dict:
    """Score what ships: the fp16 folder read back in fp32, against the plain pipeline on the same pairs and seeds."""
    pipe = trained_pipeline("shapes")
    controlnet = ControlNetModel.from_pretrained(controlnet_dir, torch_dtype=torch.float32).eval()
    pairs = eval_pairs(n)
    results = {"pairs": n, "scheduler": "DDIM", "steps": steps, "guidance": guidance, "seeds": f"{EVAL_SEED} + index"}
    images = {}
    for name, model in (("controlnet", controlnet), ("baseline", None)):
        start = time.perf_counter()
        report = evaluate_pairs(pipe, model, pairs, steps, guidance, first_seed=EVAL_SEED)
        images[name] = report.pop("images")
        results[name] = report | {"seconds": round(time.perf_counter() - start, 1)}
        print(f"{name}: mean IoU {report['iou']:.3f}, checker {report['checker']}  ({results[name]['seconds']} s)")
    out_dir.mkdir(parents=True, exist_ok=True)
    contact_sheet(pairs, images["controlnet"], images["baseline"], out_dir / "contact_sheet.png")
    (out_dir / "evaluation.json").write_text(json.dumps(results, indent=1))
    return results


# ---------------------------------------------------------------- main


def evaluation_record(evaluation: dict) -> dict:
    return {
        k: v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk != "ious"}
        for k, v in evaluation.items()
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.evaluate_only:
        evaluation = evaluate(args.evaluate_only, args.out, args.eval_pairs, args.eval_steps, args.guidance)
        record_path = args.evaluate_only / "TRAINING.json"
        if record_path.is_file():  # shipped weights: their record shows the latest scores
            record = json.loads(record_path.read_text())
            record["evaluation"] = evaluation_record(evaluation)
            record_path.write_text(json.dumps(record, indent=1) + "\n")
        return

    pipe = trained_pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    pool_start = time.perf_counter()
    pool = latent_pool(pipe, args)
    pool_seconds = time.perf_counter() - pool_start
    print(f"latent pool: {len(pool['label'])} images in {pool_seconds:.0f} s", flush=True)

    controlnet, log = train(args, pipe, pool)
    train_seconds = pool_seconds + log["seconds"]
    print(f"controlnet: {args.steps} steps in {log['seconds'] / 60:.1f} min; total {train_seconds / 60:.1f} min")
    (args.out / "losses.json").write_text(json.dumps({"losses": log["losses"], "probes": log["probes"]}))

    args.weights_dir.mkdir(parents=True, exist_ok=True)
    weights_bytes = ship_weights(controlnet, args.weights_dir)
    evaluation = evaluate(args.weights_dir, args.out, args.eval_pairs, args.eval_steps, args.guidance)
    record = {
        "command": shlex.join(["python", *sys.argv]),
        "reproduce": f"python scripts/train_shapes_controlnet.py --seed {args.seed} --steps {args.steps} "
        f"--batch {args.batch} --lr {args.lr:g} --drop-caption {args.drop_caption:g} "
        f"--pool-per-combo {args.pool_per_combo}",
        "base_model": "voltacache/weights/shapes (frozen: U-Net, VAE, text encoder)",
        "seed": args.seed,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "warmup": args.warmup,
        "schedule": "linear warmup, cosine to 0; AdamW, grad clip 1.0",
        "drop_caption": args.drop_caption,
        "pool_images": len(pool["label"]),
        "probes": log["probes"],
        "seconds": {
            "latent_pool": round(pool_seconds, 1),
            "controlnet": round(log["seconds"], 1),
            "total_training": round(train_seconds, 1),
        },
        "final_loss_mean_of_last_50": float(np.mean(log["losses"][-50:])),
        "weights_bytes_fp16": weights_bytes,
        "evaluation": evaluation_record(evaluation),
        "threads": args.threads,
        "machine": machine(),  # the CPU model and its matrix flags, as every result records them
        "versions": library_versions(),
    }
    (args.weights_dir / "TRAINING.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("steps", "batch", "seconds", "weights_bytes_fp16")}, indent=1))


if __name__ == "__main__":
    main()
