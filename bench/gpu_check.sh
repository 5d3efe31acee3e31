#!/usr/bin/env bash
# Everything issue 4 needs from a CUDA machine, in stages that fit the device tool's 600 s per call:
#   bash bench/gpu_check.sh            tests + bench (about 8-9 minutes on an H100)
#   bash bench/gpu_check.sh compile    the fixed job again with the engine under torch.compile (~3 min)
#   bash bench/gpu_check.sh dist       the fixed job in one process (a thread) and under torchrun with one
#                                      rank, alternating, and both timings (~4-5 min)
# Stages:
#   tests    install the carried wheels (bitsandbytes, liger-kernel, pytest) into /tmp/site, print the
#            versions and what torch's varlen_attn takes, then pytest -m gpu tests/engine/test_gpu.py;
#   bench    the benchmark in GPU mode, both jobs, the engine's monitoring on and off;
#   compile  the fixed job with an extra engine side under torch_compile (inductor);
#   dist     bench.dist_vs_thread: tunedeck-train and tunedeck-train --nproc-per-node 1 (torchrun; with one
#            rank the engine's distributed hooks do nothing) on the fixed job, each a fresh command,
#            thread/torchrun/torchrun/thread; prints tokens/s and ms/step of both and whether the last
#            losses are equal.
# Run from the repository root, with the wheels in .whl/ (see docs/BENCHMARKS.md for how to fetch
# them). Everything is tee'd to $OUT (default ./gpu-check-out): gpu_check.log, pytest_gpu.txt,
# bench_gpu.log/json, bench_compile.log/json, bench_dist.log/json.
set -u
STAGES="${*:-tests bench}"
has() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
PY="${PYTHON:-python3}"
t0=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }

stamp "install wheels"
# Every carried wheel: bitsandbytes, liger-kernel, datasets and its own needs, pytest (docs/BENCHMARKS.md).
WHEELS=$(ls .whl/*.whl 2>/dev/null)
if [ -n "$WHEELS" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $WHEELS || echo "wheel install failed"
fi
# The checkout's folders as the one package they install as (pyproject's package-dir), without
# installing: tunedeck/ plus links to engine/, gui/ and resources/. $PWD stays on the path for bench/.
PKG=/tmp/tunedeck-pkg
rm -rf "$PKG" && mkdir -p "$PKG/tunedeck" && cp tunedeck/*.py "$PKG/tunedeck/"
for d in engine gui resources; do ln -s "$PWD/$d" "$PKG/tunedeck/$d"; done
export PYTHONPATH="/tmp/site:$PKG:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TUNEDECK_CACHE="${TUNEDECK_CACHE:-/tmp/tunedeck-cache}"
export TOKENIZERS_PARALLELISM=false

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 60 $PY - <<'EOF'
import inspect, platform, torch, transformers, peft
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "peft", peft.__version__)
for mod in ("liger_kernel", "bitsandbytes", "triton", "pytest"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:
        print(mod, "NOT importable:", type(e).__name__, e)
try:
    from torch.nn.attention.varlen import varlen_attn
    print("varlen_attn", inspect.signature(varlen_attn))
    from tunedeck.engine import attention
    print("engine.attention.varlen_kernel features", attention.varlen_kernel() and attention.varlen_kernel()[1])
except Exception as e:
    print("varlen_attn NOT available:", type(e).__name__, e)
EOF

if has tests; then
  stamp "pytest -m gpu"
  timeout 210 $PY -m pytest -m gpu -q -p no:cacheprovider -rs tests/engine/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.txt"
fi

if has bench; then
  stamp "benchmark (gpu mode, both jobs, monitoring on/off)"
  timeout 300 $PY -m bench.vs_trainer --mode gpu --job all --steps 20 --warmup 10 --repeats 2 --monitoring \
    --out "$OUT/bench_gpu.json" 2>&1 | grep -v "^{'loss'" | tee "$OUT/bench_gpu.log"
fi

if has compile; then
  # Warm-up 15 steps: the first compiles (a minute or two); the timed ones must not include it.
  stamp "benchmark (gpu mode, fixed job, engine with torch.compile as an extra side)"
  timeout 330 $PY -m bench.vs_trainer --mode gpu --job fixed --steps 20 --warmup 15 --repeats 1 \
    --variant compile:train.torch_compile=true --out "$OUT/bench_compile.json" 2>&1 \
    | grep -v "^{'loss'" | tee "$OUT/bench_compile.log"
fi

if has dist; then
  stamp "one process vs torchrun with one rank (fixed job)"
  timeout 420 $PY -m bench.dist_vs_thread --mode gpu --nproc 1 --steps 20 --warmup 5 --repeats 2 \
    --out "$OUT/bench_dist.json" 2>&1 | tee "$OUT/bench_dist.log"
fi

stamp "done"
