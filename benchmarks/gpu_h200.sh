#!/usr/bin/env bash
# One prepared GPU benchmark run for a single-H200 host (16 CPU cores), ~8 minutes in all.
#
#   WinTok at the official so400m-256 sizes with RANDOM weights in bf16, without and with a
#   so400m-sized SigLIP teacher (random weights, made here with save_pretrained), on a corpus of
#   real JPEGs made here: limit, pipeline, decode, naive baseline, Ray Data, scaling, and the
#   in-process worker breakdown; img/s, MFU, GPU utilisation (nvidia-smi sampling), peak memory.
#
# Usage (the repository root is the working directory):
#   OUT=/some/dir bash benchmarks/gpu_h200.sh        # results: $OUT/results.{json,md,png}, $OUT/log.txt
#
# Packages. The machine's own CUDA torch is kept when it sees a GPU (a CPU wheel would be
# useless); only when there is none is ${TORCH_SPEC:-torch==2.14.1} installed. Missing Python
# packages (ray, webdataset, braceexpand, ... ) come from wheels in ./.whl when that folder
# exists (no registry needed: see benchmarks/RESULTS.md, "GPU run"), else from the package
# registry with `pip install -e '.[bench]'`.
#
# Knobs (environment): IMAGES (12000), SHARD_SIZE (375 -> 32 shards), BATCH (256), DECODE_THREADS
# (decoders per worker; default: the pipeline's, a GPU worker's CPU share - 2), SCALING_N (1500 -> 1500 and 15000), BUDGET (seconds for the benchmark itself, 420),
# PYTHON (python3), WORK (scratch, /tmp/wintok-bench: the corpus is ~1 GB and stays out of $OUT).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/_work/gpu}
WORK=${WORK:-/tmp/wintok-bench}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 RAY_DEDUP_LOGS=0
T0=$(date +%s)
echo "== $(date -u +%FT%TZ) $(hostname) — $(nproc) CPUs"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true

# ---------------------------------------------------------------- packages
if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "== no CUDA torch here: installing ${TORCH_SPEC:-torch==2.14.1}"
  $PY -m pip install -q "${TORCH_SPEC:-torch==2.14.1}" || exit 1
fi
NEED='import webdataset, braceexpand, psutil, pandas, pyarrow, transformers, safetensors, fsspec, yaml, tqdm, matplotlib'
NEED_RAY='import ray, ray.data'
if ! $PY -c "$NEED; $NEED_RAY" 2>/dev/null; then
  if compgen -G '.whl/*.whl' >/dev/null; then
    echo "== installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "== installing the package and its bench extras from the registry"
    $PY -m pip install -q -e '.[bench]' || echo "pip install failed (no registry?): going on with what is here"
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # Ray workers inherit it
$PY -c "$NEED; import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
  || { echo "missing packages, see above"; exit 1; }
# Without Ray (e.g. a machine that cannot install it) the sections that need no Ray still run:
# the limit with and without the teacher (img/s, MFU), decode, the worker in-process, the naive loader.
if $PY -c "$NEED_RAY; print('ray', ray.__version__)"; then
  ONLY=limit,pipeline,decode,naive,raydata,scaling,inproc
else
  echo "== ray is not importable: running only the sections that need no Ray"
  ONLY=limit,decode,inproc,naive
fi
echo "== packages ready after $(( $(date +%s) - T0 )) s"

# ---------------------------------------------------------------- the run
# the pipeline picks the decoder count (pipeline.cluster.shape_for) unless DECODE_THREADS is given
DECODE=()
[ -n "${DECODE_THREADS:-}" ] && DECODE=(--decode-threads "$DECODE_THREADS")
# limit and pipeline first (with and without the teacher), then decode, the peers, scaling, breakdown;
# --budget skips (and reports) what no longer fits.
$PY -m benchmarks \
  --preset wintok-so400m-256 --images "${IMAGES:-12000}" --shard-size "${SHARD_SIZE:-375}" --pool 1500 \
  --make-teacher "$WORK/teacher-siglip-so400m-256" --teacher-arch so400m-256 \
  --only "$ONLY" --teacher-sections limit,pipeline,inproc \
  --batch-size "${BATCH:-256}" ${DECODE[@]+"${DECODE[@]}"} --decode-mode "${DECODE_MODE:-processes,threads}" \
  --scaling-images "${SCALING_N:-1500}" --scaling-factor 10 \
  --limit-seconds 4 --section-timeout 200 --budget "${BUDGET:-420}" \
  --work "$WORK" --json "$OUT/results.json" --markdown "$OUT/results.md" --png "$OUT/results.png"
rc=$?
echo "== bench exit $rc after $(( $(date +%s) - T0 )) s; results in $OUT"
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv || true
exit $rc
