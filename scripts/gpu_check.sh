#!/usr/bin/env bash
# The GPU checks of docs/gpu.md, in one go, on a machine with CUDA: the `cuda` test cases, the
# swap and transfer benchmarks' CUDA rows, which UCX protocol GPU messages take, and the engine
# demo on the GPU. Run from the repository root with a Python that has a CUDA torch:
#
#   PYTHON=python3 OUT=gpu_out bash scripts/gpu_check.sh
#
# The dependencies must be importable by that Python (installed, or on PYTHONPATH: peer processes
# keep it). On a machine without network, carry wheels for Python 3.12 made elsewhere with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64
# ...` of ucxx-cu13, libucxx-cu13, libucx-cu13 (<1.22), librmm-cu13, rmm-cu13, rapids-logger and
# quicktok-v1, and install them with `pip install --no-deps --target DIR`.
# Each step writes its log under $OUT; benchmark tables land in benchmarks/results/ as usual.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/examples/serving:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
T0=$(date +%s)
step() { echo "[+$(($(date +%s) - T0))s] $*"; }

step environment
{ nvidia-smi; "$PY" -c "import torch, ucxx; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ucxx', ucxx.__version__, torch.cuda.get_device_name())"; } >"$OUT/env.log" 2>&1
tail -1 "$OUT/env.log"

step "the cuda test cases"
timeout 300 "$PY" -m pytest -k cuda tests -p no:cacheprovider --timeout 240 -q -rA >"$OUT/cuda_tests.log" 2>&1
grep -E "^(PASSED|FAILED|SKIPPED|ERROR)|passed|failed" "$OUT/cuda_tests.log"

step "swap and transfer benchmarks, CUDA rows"
timeout 300 "$PY" -m pytest -k cuda benchmarks/test_swap_bench.py benchmarks/test_transfer_bench.py \
    --benchmark-enable -q -s -p no:cacheprovider 2>&1 | tee "$OUT/bench.log" | grep -vE "^\s*$"

step "UCX protocols of GPU messages"
# UCX logs to stdout, which the peer processes use for their replies: send it to files
rm -f /tmp/mempool-ucxlog.*
UCX_LOG_FILE=/tmp/mempool-ucxlog.%p UCX_LOG_LEVEL=info UCX_PROTO_INFO=y timeout 120 "$PY" -m pytest \
    tests/transport/test_transfer.py::test_device_tier_blocks_round_trip_bit_exact -k ucx-cuda \
    -p no:cacheprovider -q 2>&1 | tail -2
grep -hE "ep_cfg|intra-node cfg|from cuda|cuda_ipc" /tmp/mempool-ucxlog.* 2>/dev/null | cut -c1-300 >"$OUT/ucx_protocols.log"
grep -h "from cuda" -A3 "$OUT/ucx_protocols.log" | head -8

step "engine demo on the GPU"
timeout 300 "$PY" -m memserve.engine_demo --device cuda --conversations 3 --turns 3 >"$OUT/engine_demo.log" 2>&1
tail -4 "$OUT/engine_demo.log"
step done
