#!/usr/bin/env bash
# The GPU check as one prepared run: the whole test suite on the lent GPU, then benchmarks/gpu.py.
#
# A lent GPU machine has torch but no fastai, ipywidgets, bqplot, Fashion-MNIST or Bikeshare, and no
# package index (../shared/GPU.md); its device time is short (minutes), so everything it needs is made
# here and carried:
#
#   benchmarks/gpu_check.sh prepare    # here, once after `make install`: .whl/ and .data/ (in .gitignore)
#
# then, with the device tool (carry [".whl", ".data"]), from the project root:
#
#   bash benchmarks/gpu_check.sh run   # the tests, then the benchmark; or `tests` / `bench` alone
#
# Results go to $OUT (./gpu_out without it): gpu_env.txt, gpu_tests.log, gpu_tests.xml and the
# benchmark's gpu_* files (copy those into benchmarks/results/). Each part has its own cap, TESTS_S and
# BENCH_S seconds (240 and 330), so both fit in one 10-minute device call and a hang in one leaves the other.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-run}
OUT=${OUT:-$PWD/gpu_out}
TESTS_S=${TESTS_S:-240}
BENCH_S=${BENCH_S:-330}
TEST_WORKERS=${TEST_WORKERS:-8}  # pytest-xdist workers (that machine has 16 cores)
EXTRAS="requests:requests urllib3:urllib3 idna:idna certifi:certifi pyyaml:yaml anyio:anyio"

prepare() {
  set -e
  [ -x .venv/bin/python ] || { echo "run \`make install\` first: the wheels' versions come from .venv"; exit 1; }
  ../shared/gpu/fetch-wheels.sh
  # parallel tests (16 cores there), with the versions installed here when there are any
  local xdist execnet
  xdist=$(.venv/bin/pip show pytest-xdist 2>/dev/null | awk '/^Version:/{print "=="$2}' || true)
  execnet=$(.venv/bin/pip show execnet 2>/dev/null | awk '/^Version:/{print "=="$2}' || true)
  python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "pytest-xdist$xdist" "execnet$execnet"
  # what fastai imports beyond that image's packages; installed there only where missing (pip name:module)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl/extra $(for pm in $EXTRAS; do .venv/bin/pip show "${pm%%:*}" | awk '/^Name:/{n=$2} /^Version:/{print n"=="$2}'; done)
  # the data: Fashion-MNIST's IDX files, and Bikeshare's CSV as the one file of ISLP that datasets.bikeshare
  # reads (ISLP's wheel is 17 MB, too much to carry beside the rest)
  mkdir -p .data/ISLP/data
  cp -r "$(.venv/bin/python -c 'from benchmarks.fashion_mnist import FASHION_MNIST_DIR as d; print(d)')" .data/
  cp "$(.venv/bin/python -c 'import ISLP, pathlib; print(pathlib.Path(ISLP.__file__).parent / "data" / "Bikeshare.csv")')" \
    .data/ISLP/data/
  echo '"Only data/Bikeshare.csv of ISLP 0.6.0, carried to the GPU machine by benchmarks/gpu_check.sh."' \
    > .data/ISLP/__init__.py
  du -sh .whl .data
  echo "carry both (64 MiB at most): $(du -sch .whl .data | tail -1 | cut -f1)"
}

setup() {
  mkdir -p "$OUT"
  local wheels=(.whl/*.whl) pm
  for pm in $EXTRAS; do
    python3 -c "import ${pm#*:}" 2>/dev/null || wheels+=(.whl/extra/"$(echo "${pm%%:*}" | tr - _)"-*.whl)
  done
  rm -rf .site  # a warm machine keeps it from the last call
  python3 -m pip install -q --no-index --no-deps --no-compile --target .site "${wheels[@]}" || exit 1
  export PYTHONPATH=$PWD/.site:$PWD/.data:$PWD PYTHONUNBUFFERED=1
  # benchmarks/fashion_mnist.py reads Debian's folder; link the carried copy there when the machine lets us
  local fm=/usr/share/datasets/fashion-mnist
  if [ ! -e "$fm" ] && [ -d .data/fashion-mnist ]; then
    mkdir -p "$(dirname "$fm")" 2>/dev/null && ln -s "$PWD/.data/fashion-mnist" "$fm" 2>/dev/null \
      || echo "could not link $fm: the tests that need Fashion-MNIST will fail" | tee -a "$OUT/gpu_env.txt"
  fi
  { nvidia-smi -L 2>&1; python3 -c 'import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none: CPU only")'; } \
    | tee -a "$OUT/gpu_env.txt"
}

tests() {
  local par=()
  python3 -c 'import xdist' 2>/dev/null && par=(-n "$TEST_WORKERS" --dist loadfile)
  # the browser and notebook tests need Chromium and Jupyter, which that machine lacks
  timeout "$TESTS_S" python3 -m pytest -q -p no:cacheprovider --timeout=300 "${par[@]}" tests \
    --ignore=tests/test_browser.py --ignore=tests/test_notebooks.py --junitxml="$OUT/gpu_tests.xml" \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -40
  echo "tests: exit ${PIPESTATUS[0]} (124: stopped at ${TESTS_S} s)" | tee -a "$OUT/gpu_tests.log"
}

bench() {
  timeout "$BENCH_S" python3 benchmarks/gpu.py --data .data/fashion-mnist --out "$OUT" "$@"
  echo "bench: exit $? (124: stopped at ${BENCH_S} s)"
}

case $part in
  prepare) prepare ;;
  run) setup; tests; bench ;;
  tests) setup; tests ;;
  bench) shift; setup; bench "$@" ;;
  *) echo "usage: $0 prepare | run | tests | bench [gpu.py's options]"; exit 2 ;;
esac
