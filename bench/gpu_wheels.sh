#!/usr/bin/env bash
# Fill bench/wheels/ with what bench/gpu_check.sh installs on a CUDA machine that has only torch and timm
# and no network: a wheel of transfer itself and of each dependency it lacks there, at the versions
# installed here, built for that machine's Python. Run it here, where pip reaches PyPI:
#
#   bash bench/gpu_wheels.sh              # everything beyond torch/torchvision/timm and their own needs (~110 MB)
#   MINIMAL=1 bash bench/gpu_wheels.sh    # only what this workplace's CUDA image lacks (albumentations and
#                                         # hydra with their needs, ~10 MB; it has OpenCV, SciPy, scikit-learn,
#                                         # matplotlib: /work/.library/device/KINDS.md)
#   PY=3.11 bash bench/gpu_wheels.sh      # another target Python (default 3.12, x86-64 Linux)
#
# bench/wheels/ is ignored by git (bench/.gitignore); carry it with the checkout to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12}
OUT=${OUT:-bench/wheels}
ALBUMENTATIONS="albumentations albucore pydantic pydantic-core annotated-types typing-inspection stringzilla simsimd"
HYDRA="hydra-core omegaconf"  # and antlr4-python3-runtime, built below
SCIENCE="opencv-python-headless scipy scikit-learn joblib threadpoolctl matplotlib contourpy cycler fonttools
         kiwisolver pyparsing python-dateutil six tqdm"
names="$ALBUMENTATIONS $HYDRA"
[ "${MINIMAL:-0}" = 1 ] || names="$names $SCIENCE"
pins=$(python - $names <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PY
)
mkdir -p "$OUT"
platforms=()
for n in 39 35 34 31 28 27 24 17 5; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# transfer itself, and hydra's parser antlr4-python3-runtime (published as a source archive only; pure Python)
python -m pip wheel -q --no-deps -w "$OUT" . "antlr4-python3-runtime==$(python -c 'from importlib.metadata import version; print(version("antlr4-python3-runtime"))')"
# shellcheck disable=SC2086
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    "${platforms[@]}" -d "$OUT" $pins
ls "$OUT"
du -sh "$OUT"
