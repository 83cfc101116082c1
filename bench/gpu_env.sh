# Sourced by the bench/gpu_*.sh scripts from the repo root, with $OUT set and the script's name
# as $1: makes $OUT, puts the repo on PYTHONPATH, installs the wheels bench/gpu_prep.sh left in
# .whl/ when the call carried that folder (msgspec, pyzmq and llguidance: the device image has none of them),
# says which of afd's imports are still missing, runs the real Triton kernels (no interpreter,
# no forced backend), names the commit for the results (AFD_COMMIT: the caller's, else the one
# gpu_prep.sh wrote to .whl/commit, else git's, else "unknown"; the device copy has no .git),
# and defines stamp(), which prints seconds since the start under the script's name.
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET AFD_KERNEL_BACKEND
start=$(date +%s)
_gpu_script=$1
stamp() { echo "[$_gpu_script $(($(date +%s) - start))s] $*"; }
rm -rf /tmp/afd_wheels  # a warm machine's earlier call left its own
if compgen -G ".whl/*.whl" >/dev/null; then
  for wheel in .whl/*.whl; do  # one by one: a wheel this machine refuses stops only itself
    timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --root-user-action=ignore --upgrade --target /tmp/afd_wheels "$wheel"
  done
  if [ -d /tmp/afd_wheels ]; then
    export PYTHONPATH="$PYTHONPATH:/tmp/afd_wheels"
  fi
fi
python3 -c "
import importlib.util
needs = {'msgspec': 'every engine', 'zmq': 'pyzmq: layouts of several ranks', 'llguidance': 'structured output',
         'msgpack': 'tests that forge rank messages', 'safetensors': 'weights', 'transformers': 'tokenizers',
         'pytest': 'tests'}
missing = [f'{m} ({why})' for m, why in needs.items() if importlib.util.find_spec(m) is None]
hint = (' -- bash bench/gpu_prep.sh on the CPU machine, then carry .whl'
        if {'msgspec', 'zmq', 'llguidance'} & {m.split()[0] for m in missing} else '')
print('missing here: ' + '; '.join(missing) + hint if missing else 'imports: all found')
"
if [ -z "${AFD_COMMIT:-}" ] && [ -s .whl/commit ]; then
  AFD_COMMIT=$(cat .whl/commit)
fi
export AFD_COMMIT=${AFD_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
