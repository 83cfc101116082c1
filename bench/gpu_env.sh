# Sourced by the bench/gpu_*.sh scripts from the repo root, with $OUT set and the script's name
# as $1: makes $OUT, puts the repo on PYTHONPATH, runs the real Triton kernels (no interpreter,
# no forced backend), names the commit for the results (AFD_COMMIT), and defines stamp(), which
# prints seconds since the start under the script's name.
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET AFD_KERNEL_BACKEND
export AFD_COMMIT=${AFD_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
start=$(date +%s)
_gpu_script=$1
stamp() { echo "[$_gpu_script $(($(date +%s) - start))s] $*"; }
