#!/usr/bin/env bash
# Run on the CPU machine before a device call (any step of the plan in bench/results/README.md):
# puts in .whl/ (git-ignored) what bench/gpu_env.sh installs on the lent GPU, whose image has
# neither msgspec (control messages and outputs: every engine), pyzmq (layouts of several ranks:
# bench/gpu_mtp_kv.sh, the P/D graph test of bench/gpu_graphs.sh) nor llguidance (structured
# output), as wheels for its Python 3.12 on
# x86-64, and this checkout's commit (.whl/commit; "+dirty" with uncommitted changes to tracked
# files), which the device copy cannot read without .git. The call then names .whl in carry:
#
#   bash bench/gpu_prep.sh      # here; downloads only what .whl/ lacks (about 4 MB)
#   run(command="QUICK=1 bash bench/gpu_kernels.sh", carry=[".whl"], timeout_s=560)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
mkdir -p .whl
for spec in msgspec==0.22.0 pyzmq==27.3.0 llguidance==1.9.1; do
  # pyproject: msgspec>=0.18, pyzmq>=25, llguidance>=1.9,<2
  name=${spec%%==*}
  version=${spec##*==}
  if compgen -G ".whl/$name-$version-*.whl" >/dev/null; then
    continue
  fi
  rm -f .whl/"$name"-*.whl  # one version of each: two stop the install there
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_31_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec"
done
commit=$(git rev-parse --short HEAD)
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  commit="$commit+dirty"
fi
echo "$commit" >.whl/commit
ls -l .whl
