#!/usr/bin/env bash
# One short device session: install, run the Triton tests on the GPU (compiled, float32, bfloat16
# and float64), the kernel benchmark, then the models' training throughput on the card.
# Each step has its own time limit so that one slow compile cannot eat the session.
# Results land in $OUT (or ./gpu_out). Run from the repository root on the GPU machine:
#   bash benchmarks/gpu_check.sh            (STEPS="tests bench models" by default)
# Steps: tests, par_tests (one pytest process per id in $TESTS), bench ($BENCH_ARGS, bfloat16 unless
# they say otherwise), bench32 ($BENCH32_ARGS, float32), tune ($TUNE_ARGS), profile,
# models, models_compiled ($COMPILED_SPECS under torch.compile), graphs ($GRAPH_SPECS' forward +
# backward captured as one CUDA graph), or any shell word.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
STEPS=${STEPS:-tests bench models}
export PYTHONUNBUFFERED=1
{
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# the card's image has torch and triton but no registry: the pure dependencies travel in .bench/site
export PYTHONPATH=$PWD/.bench/site${PYTHONPATH:+:$PYTHONPATH}
pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "root' user"
if ! (cd /tmp && python -c "import nlc.backends.torch.ops"); then
  # no editable install (this copy is thrown away): links give nlc/ the installed layout
  ln -sfn "$PWD/backends" nlc/backends && ln -sfn "$PWD/runtime" nlc/runtime
  export PYTHONPATH=$PWD:$PYTHONPATH
  (cd /tmp && python -c "import nlc.backends.torch.ops as m; print('nlc ops from', m.__file__)")
fi
export NLC_TEST_DEVICE=cuda TRITON_INTERPRET=0 NLC_CACHE_DIR=$PWD/.nlc_cache
for step in $STEPS; do
  echo "== $step $(date -u +%T)"
  case $step in
    par_tests) i=0; for t in ${TESTS:-}; do i=$((i+1))     # one process per test id: the compiles run side by side
                 (timeout ${T_TESTS:-110} python -m pytest -p no:cacheprovider "$t" 2>&1 | tail -4 > "$OUT/test_$i.txt"; echo "rc $? $t" >> "$OUT/test_$i.txt") &
               done; wait; cat "$OUT"/test_*.txt ;;
    tune) timeout ${T_TUNE:-300} python benchmarks/tune.py ${TUNE_ARGS:-} | tee "$OUT/tune.md" ;;
    profile) timeout ${T_PROFILE:-200} python benchmarks/profile_gpu.py ${PROFILE_ARGS:-} ;;
    tests) timeout ${T_TESTS:-110} python -m pytest -x -p no:cacheprovider ${TESTS:-tests/backends/test_triton_delta.py} ${EXTRA_TESTS:-} 2>&1 | tail -15 ;;
    bench) timeout ${T_BENCH:-200} python benchmarks/kernels.py --fla .bench --out "$OUT/kernels_bf16.md" ${BENCH_ARGS:-} ;;
    bench32) timeout ${T_BENCH32:-150} python benchmarks/kernels.py --dtype fp32 --out "$OUT/kernels_fp32.md" ${BENCH32_ARGS:-} ;;
    models) timeout ${T_MODELS:-100} python benchmarks/models.py --device cuda --T 4096 --repeats 3 --no-ops \
              --specs ${MODEL_SPECS:-transformer,gated_deltanet,titans,hope} --backend ${MODEL_BACKENDS:-torch,auto} ${MODEL_ARGS:-} ;;
    graphs) timeout ${T_GRAPHS:-150} python benchmarks/models.py --device cuda --T 4096 --repeats 3 --no-ops \
              --cuda-graphs --specs ${GRAPH_SPECS:-transformer,titans,hope} --backend torch ;;   # one CUDA graph per step
    models_compiled) timeout ${T_MODELS:-100} python benchmarks/models.py --device cuda --T 4096 --repeats 3 --no-ops \
              --compile --specs ${COMPILED_SPECS:-hope} --backend torch ;;   # the scans' hot loops under torch.compile
    *) timeout ${T_OTHER:-100} bash -c "$step" ;;
  esac
done
echo "== done $(date -u +%T)"
} 2>&1 | tee "$OUT/log.txt"
