#!/usr/bin/env bash
# The GPU throughput check, one short script (a few minutes) for a CUDA machine that has only torch and
# timm installed and no network. From the repository root:
#
#   bash bench/gpu_wheels.sh      # once, where pip reaches PyPI: fills bench/wheels/ (see that script)
#   bash bench/gpu_check.sh       # on the GPU machine, with bench/wheels/ carried beside this script
#
# It installs transfer and whatever it lacks from bench/wheels/ (pip --no-index: nothing is fetched, what
# is installed already stays), builds a folder of photo-sized JPEGs (bench/photo_folder.py) unless ROOT
# names an image folder, then runs bench/throughput.py for resnet50 and tf_efficientnet_lite0 at 224 px,
# bf16 autocast, channels_last: eager with data.cache=ram and none, then torch.compile'd with ram. Each run prints one
# line: compute-only and end-to-end images/s for training and evaluation and their ratio. The lines are
# also written to $OUT/gpu_check.txt when OUT is set (else bench/out/gpu_check.txt). Last, a data-parallel smoke
# run: `transfer train trainer.processes=N` (N = GPUs, at least 2 processes) on the embedded digits for 2
# epochs — nccl between processes, or gloo when two share a lone GPU — whose test top-1 must equal
# `transfer eval` of its best.pt in one process.
#
# Settings (environment): ROOT (image folder), MODELS, SIZE (224), BATCH (128), ROUNDS (2), COMPILE (1),
# CACHES ("ram none"), WHEELS (bench/wheels), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-bench/wheels}
MODELS=${MODELS:-resnet50 tf_efficientnet_lite0}
SIZE=${SIZE:-224}
BATCH=${BATCH:-128}
ROUNDS=${ROUNDS:-2}
COMPILE=${COMPILE:-1}
CACHES=${CACHES:-ram none}
RESULTS=${OUT:-bench/out}/gpu_check.txt
mkdir -p "$(dirname "$RESULTS")"
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1

if ! $PYTHON -c "import transfer.engine.fit" 2>/dev/null; then
    if [ -d "$WHEELS" ]; then
        $PYTHON -m pip install -q --no-index --find-links "$WHEELS" --no-build-isolation --no-compile "$WHEELS"/transfer-*.whl \
            || { echo "gpu_check: installing from $WHEELS failed (see above)"; exit 1; }
    else
        echo "gpu_check: transfer's dependencies are missing and $WHEELS does not exist: run bench/gpu_wheels.sh where pip reaches PyPI, then carry $WHEELS here"
        exit 1
    fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the checkout's bench/ and transfer/ (an installed wheel is the same code)
$PYTHON - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device: "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none (CPU only: figures are not GPU figures)'}")
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true

ROOT=${ROOT:-/tmp/transfer-photos}
[ -d "$ROOT/train" ] || $PYTHON -m bench.photo_folder --out "$ROOT" --per-class 256 --test-per-class 64 >/dev/null
: > "$RESULTS"
status=0
for model in $MODELS; do
    for compile in 0 $([ "$COMPILE" = 1 ] && echo 1); do
        for cache in $([ "$compile" = 1 ] && echo "${CACHES%% *}" || echo "$CACHES"); do  # compiled: the first cache
            flags=(--model "$model" --size "$SIZE" --batch "$BATCH" --eval-batch 256 --amp bf16 --weights none
                   --root "$ROOT" --rounds "$ROUNDS" --cache "$cache")
            [ "$compile" = 1 ] && flags+=(--compile)
            line=$($PYTHON -m bench.throughput "${flags[@]}" 2>"${RESULTS%.txt}.err" | tail -1)
            if [[ "$line" == throughput* ]]; then
                echo "$line" | tee -a "$RESULTS"
            else
                echo "gpu_check: $model compile=$compile cache=$cache failed:"; tail -5 "${RESULTS%.txt}.err"; status=1
            fi
        done
    done
done

# data-parallel smoke run (nccl): one process per GPU, two on a single GPU
GPUS=$($PYTHON -c "import torch; print(torch.cuda.device_count())")
PROCESSES=$(( GPUS > 1 ? GPUS : 2 ))
DDP_RUN=$(mktemp -d)/ddp
if $PYTHON -m transfer train trainer.processes="$PROCESSES" trainer.epochs=2 trainer.progress=plain \
        hydra.run.dir="$DDP_RUN" model.pretrained=false > "${RESULTS%.txt}.ddp.log" 2>&1 \
   && $PYTHON -m transfer eval checkpoint="$DDP_RUN/best.pt" >> "${RESULTS%.txt}.ddp.log" 2>&1; then
    $PYTHON - "$DDP_RUN" <<'PY' | tee -a "$RESULTS"
import json, sys
run = sys.argv[1]
trained, alone = json.load(open(f"{run}/metrics.json")), json.load(open(f"{run}/eval-test/metrics.json"))
same = trained["test/top1"] == alone["test/top1"]
print(f"ddp: {json.load(open(f'{run}/run_info.json'))['batches']} test top1 {trained['test/top1']:.4f}, "
      f"eval in one process {alone['test/top1']:.4f}: {'same' if same else 'DIFFERENT'}")
sys.exit(0 if same else 1)
PY
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
else
    echo "gpu_check: the data-parallel smoke run failed:"; tail -5 "${RESULTS%.txt}.ddp.log"; status=1
fi
exit $status
