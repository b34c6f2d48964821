#!/usr/bin/env bash
# make bench: side-by-side benchmarks. The tiny model takes minutes; the SD 1.5 architecture (random
# weights, 256x256, 20 DDIM steps) takes about 20 minutes per round on 2 cores: SD15_REPEATS rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin/voltacache

[ -f build/bench/tiny_model/model_index.json ] || $V init-tiny build/bench/tiny_model --seed 0
$V bench --model build/bench/tiny_model --workdir build/bench/tiny --size 64 --steps 20 --repeats 5 \
  --triton-branches block,0 --name bench_tiny

.venv/bin/python scripts/bench_serving.py --engines build/bench/tiny/engines_block_64 --steps 20 --repeats 9 \
  --out docs/results/serving_tiny.json
# serving throughput at 1-16 concurrent clients: the step-batching denoiser against per-request denoisers
.venv/bin/python scripts/bench_throughput.py --engines build/bench/tiny/engines_block_64 --steps 10,20 --label tiny

# the cross-request cache: a prompt workload (cache on vs off) and hit latency at 10k / 100k entries
.venv/bin/python scripts/bench_cache_workload.py --engines build/bench/tiny/engines_block_64 --requests 240 --steps 50
.venv/bin/python scripts/bench_cache_lookup.py --entries 10000 100000 --lookups 300

# quality under caching on the trained shapes model: adherence and PSNR for DeepCache N and approximate K
[ -f build/shapes/model/model_index.json ] || $V init-tiny build/shapes/model --preset shapes
.venv/bin/python scripts/eval_shapes_quality.py --model build/shapes/model

[ -f build/sd15/model/model_index.json ] || $V init-tiny build/sd15/model --preset sd15
$V bench --model build/sd15/model --workdir build/bench/sd15 --size 256 --steps 20 --repeats "${SD15_REPEATS:-3}" \
  --name bench_sd15

# int8 U-Nets: quality on the shapes model, then speed side by side with fp32 on the SD 1.5 architecture
.venv/bin/python scripts/eval_int8_quality.py --model build/shapes/model
$V bench --model build/sd15/model --workdir build/bench/sd15 --size 256 --steps 20 --repeats 1 --intervals 1,3 \
  --deepcache-intervals 3 --branches 0 --triton-branches "" --precisions fp32,int8 --name bench_sd15_int8
.venv/bin/python scripts/bench_int8.py --fp32 build/bench/sd15/engines_0_256 \
  --int8 "$(ls -d build/bench/sd15/engines_0_256_int8_* | head -1)"

# serving throughput on the SD 1.5 architecture (fewer requests: about 15 s per image here)
.venv/bin/python scripts/bench_throughput.py --engines build/bench/sd15/engines_0_256 --concurrency 1,2,4,8 \
  --requests 8 --steps 4,8 --warmup 2 --label sd15_256

# SDXL (issue 18): the full architecture with random weights (14 GB). Its fp16 export at 512 within this
# machine's 24 GiB (peak memory and time), then diffusers, DeepCache's helper, voltacache and Triton at
# 256x256, 10 DDIM steps, each group in a process of its own (the weights fit once, not three times).
.venv/bin/python scripts/measure_export.py --preset sdxl --size 512 --precision fp16 --out build/export_sdxl
$V bench --model build/export_sdxl/model --workdir build/bench/sdxl --size 256 --steps 10 --repeats 2 \
  --intervals 1,3 --deepcache-intervals 3 --branches block --isolate --name bench_sdxl
