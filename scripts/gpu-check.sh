#!/usr/bin/env bash
# GPU readiness check: one script, under 8 minutes on one GPU, every result in one file.
#
#   bash scripts/gpu-check.sh [RESULT_FILE]     (default: $OUT/gpu-check.json, else artifacts/gpu-check.json)
#
# 1. the CUDA equivalence tests: a member of a pack of K against its pack of one, mlp_si and convnet_si,
#    TF32 off, rtol 1e-3 (hessian_trace 1e-2) — tests/test_packed.py::test_cuda_pack_member_matches_its_pack_of_one;
# 2. `python -m engine bench --json --device cuda`: the digits demo, convnet_si-32 throughput and overheads,
#    and the packed ConvNetSI-32 sweep figures — model-epochs/s at K = 1, 8, 16, 32 with the standard
#    metrics and with sharpness every epoch, TF32 on/off and channels_last at K = 8.
#
# On a lent machine whose image lacks SQLAlchemy (the store), carry its wheel in .whl/ (see the device
# tool's README): python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#   --platform manylinux2014_x86_64 -d .whl sqlalchemy==2.1.9   — and name .whl in `carry`.
set -uo pipefail
cd "$(dirname "$0")/.."
result="${1:-${OUT:-artifacts}/gpu-check.json}"
work="$(mktemp -d)"
mkdir -p "$(dirname "$result")"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$work/gpu.txt" 2>&1
timeout 180 python3 -m pytest -q -rs -p no:cacheprovider tests/test_packed.py -k cuda > "$work/equivalence.txt" 2>&1
echo $? > "$work/equivalence.rc"
timeout 270 python3 -m engine bench --json --device cuda > "$work/bench.json" 2> "$work/bench.err"
echo $? > "$work/bench.rc"
python3 - "$work" "$result" "$start" <<'EOF'
import json, pathlib, sys, time
work, result, start = pathlib.Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
read = lambda name: (work / name).read_text() if (work / name).exists() else ""
try:
    bench = json.loads(read("bench.json"))
except ValueError:
    bench = None
summary = {"gpu": read("gpu.txt").strip(), "seconds": time.time() - start,
           "equivalence": {"exit_code": int(read("equivalence.rc") or -1), "output": read("equivalence.txt")[-4000:]},
           "bench": {"exit_code": int(read("bench.rc") or -1), "result": bench, "stderr": read("bench.err")[-4000:]}}
if bench:
    packs = bench["packed"]["packs"]
    summary["packed_convnet_si_32_model_epochs_per_s"] = {
        k: {"standard_metrics": p["model_epochs_per_s"]["standard_metrics"],
            "sharpness_every_epoch": p["model_epochs_per_s"]["sharpness_every_epoch"]} for k, p in packs.items()}
pathlib.Path(result).write_text(json.dumps(summary, indent=2))
print(json.dumps({k: v for k, v in summary.items() if k != "bench"}, indent=2))
EOF
