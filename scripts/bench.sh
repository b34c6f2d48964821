#!/usr/bin/env bash
# make bench: side-by-side benchmarks. The tiny model takes minutes; the SD 1.5 architecture (random
# weights, 256x256, 20 DDIM steps) takes about 20 minutes per round on 2 cores: SD15_REPEATS rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin/voltacache

[ -f build/bench/tiny_model/model_index.json ] || $V init-tiny build/bench/tiny_model --seed 0
R=docs/results F=docs/figures  # make bench updates the committed results; a script run by hand writes to build/
$V bench --model build/bench/tiny_model --workdir build/bench/tiny --size 64 --steps 20 --repeats 5 \
  --triton-branches block,0 --name bench_tiny --out $R/bench_tiny.json --figures $F

.venv/bin/python scripts/bench_serving.py --engines build/bench/tiny/engines_block_64 --steps 20 --repeats 9 \
  --out docs/results/serving_tiny.json
# serving throughput at 1-16 concurrent clients: the step-batching denoiser against per-request denoisers
.venv/bin/python scripts/bench_throughput.py --engines build/bench/tiny/engines_block_64 --steps 10,20 --label tiny \
  --out $R/throughput_tiny.json --figure $F/throughput_tiny.png

# the cross-request cache: a prompt workload (cache on vs off) and hit latency at 10k / 100k entries
.venv/bin/python scripts/bench_cache_workload.py --engines build/bench/tiny/engines_block_64 --requests 240 --steps 50 \
  --out $R/cache_workload.json --figure $F/cache_workload.png
.venv/bin/python scripts/bench_cache_lookup.py --entries 10000 100000 --lookups 300 --out $R/cache_lookup.json

# quality under caching on the trained shapes model: adherence and PSNR for DeepCache N and approximate K
[ -f build/shapes/model/model_index.json ] || $V init-tiny build/shapes/model --preset shapes
.venv/bin/python scripts/eval_shapes_quality.py --model build/shapes/model --out $R/shapes_quality.json \
  --figure $F/shapes_quality.png --pareto $F/shapes_schedules_pareto.png

[ -f build/sd15/model/model_index.json ] || $V init-tiny build/sd15/model --preset sd15
$V bench --model build/sd15/model --workdir build/bench/sd15 --size 256 --steps 20 --repeats "${SD15_REPEATS:-3}" \
  --name bench_sd15 --out $R/bench_sd15.json --figures $F

# int8 U-Nets: quality on the shapes model, then speed side by side with fp32 on the SD 1.5 architecture
.venv/bin/python scripts/eval_int8_quality.py --model build/shapes/model --out $R/shapes_quality_int8.json
$V bench --model build/sd15/model --workdir build/bench/sd15 --size 256 --steps 20 --repeats 1 --intervals 1,3 \
  --deepcache-intervals 3 --branches 0 --triton-branches "" --precisions fp32,int8 --name bench_sd15_int8 \
  --out $R/bench_sd15_int8.json --figures $F
# CPU engines at the machine's limit (issue 31): every CPU backend and precision of one export, side by side
S=build/bench/sd15cpu
for p in fp32 bf16 int8; do
  [ -f $S/onnx_$p/manifest.json ] || $V export --model build/sd15/model --out $S/onnx_$p --precision $p \
    --height 256 --width 256 --deepcache-branch 0 --batch-sizes 1
done
for b in "ort_fp32 fp32 onnxruntime" "ov_f32 fp32 openvino" "ov_bf16 bf16 openvino" "ort_int8 int8 onnxruntime" \
  "ov_int8 int8 openvino"; do
  set -- $b
  [ -f $S/$1/engines.json ] || $V build --onnx $S/onnx_$2 --out $S/$1 --backend $3
done
.venv/bin/python scripts/bench_cpu_engines.py --model build/sd15/model --engines ort-fp32=$S/ort_fp32 \
  --engines ov-f32=$S/ov_f32 --engines ov-bf16=$S/ov_bf16 --engines ort-int8=$S/ort_int8 \
  --engines ov-int8=$S/ov_int8 --out $R/cpu_engines_sd15.json --figure $F/cpu_engines_sd15.png
.venv/bin/python scripts/profile_unet.py --engines ort-int8=$S/ort_int8 --engines ov-int8=$S/ov_int8 \
  --engines ov-bf16=$S/ov_bf16 --out $R/profile_unet_sd15.json
# their quality on the shapes model: adherence and PSNR of every CPU backend and precision (40 min)
for seed in 1000 2000; do   # one run of 168 captions moves by 2-3 points: two seeds, pooled in docs/benchmarks.md
  suffix=$([ $seed = 1000 ] || echo _seed$seed)
  .venv/bin/python scripts/eval_int8_quality.py --model build/shapes/model --backends onnxruntime,openvino \
    --seed $seed --out $R/shapes_quality_cpu$suffix.json
done

# serving throughput on the SD 1.5 architecture (fewer requests: about 15 s per image here)
.venv/bin/python scripts/bench_throughput.py --engines build/bench/sd15/engines_0_256 --concurrency 1,2,4,8 \
  --requests 8 --steps 4,8 --warmup 2 --label sd15_256 --out $R/throughput_sd15_256.json \
  --figure $F/throughput_sd15_256.png

# SDXL (issue 18): the full architecture with random weights (14 GB). Its fp16 export at 512 within this
# machine's 24 GiB (peak memory and time), then diffusers, DeepCache's helper, voltacache and Triton at
# 256x256, 10 DDIM steps, each group in a process of its own (the weights fit once, not three times).
.venv/bin/python scripts/measure_export.py --preset sdxl --size 512 --precision fp16 --out build/export_sdxl \
  --json $R/export_sdxl.json
$V bench --model build/export_sdxl/model --workdir build/bench/sdxl --size 256 --steps 10 --repeats 2 \
  --intervals 1,3 --deepcache-intervals 3 --branches block --isolate --name bench_sdxl --out $R/bench_sdxl.json \
  --figures $F
