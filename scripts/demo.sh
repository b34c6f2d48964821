#!/usr/bin/env bash
# The main job on the embedded shapes model (tiny, trained here: images follow the prompt):
# init -> export -> build -> deploy -> serve -> generate -> check the image against the prompt -> stop.
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin/voltacache
DEMO=build/demo
ENGINES=engines/demo
REPO=triton_models/generated/demo
PROMPT="a red circle on a blue background"
PORTS=(${DEMO_PORTS:-18000 18001 18002})

# --force: a second `make demo` replaces what the first one wrote (and only that: anything else is refused)
$V init-tiny "$DEMO/model" --preset shapes --force
$V export --model "$DEMO/model" --out "$DEMO/onnx" --precision fp32 --force   # fp32: what a CPU serves fastest
$V build --onnx "$DEMO/onnx" --out "$ENGINES" --force
$V deploy --engines "$ENGINES" --repo "$REPO"

$V serve --repo "$REPO" --http-port "${PORTS[0]}" --grpc-port "${PORTS[1]}" --metrics-port "${PORTS[2]}" \
  --log-file "$DEMO/tritonserver.log" 2> "$DEMO/serve.log" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
until grep -q "ready" "$DEMO/serve.log"; do
  kill -0 $SERVER 2>/dev/null || { cat "$DEMO/serve.log"; exit 1; }
  sleep 0.5
done
cat "$DEMO/serve.log"

$V generate --url "127.0.0.1:${PORTS[1]}" "$PROMPT" -o "$DEMO/shapes.png" --force \
  --steps 20 --scheduler ddim --guidance 5 --cache-interval 3 --seed 0 --json
kill -TERM $SERVER; wait $SERVER || true
trap - EXIT
$V check-shapes "$DEMO/shapes.png" "$PROMPT"
echo "image: $DEMO/shapes.png"
