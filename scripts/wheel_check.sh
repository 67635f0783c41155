#!/usr/bin/env bash
# The installed-wheel check: sae_fast must work from a wheel, away from this checkout.
#
#   bash scripts/wheel_check.sh [PYTHON]          (make wheel-check; PYTHON default .venv/bin/python)
#
#  1. copies the working tree (tracked + untracked-not-ignored files, uncommitted edits
#     included, no build outputs: no sae_fast/_C.so) into a temporary folder and builds
#     the wheel there with PYTHON (`pip wheel . --no-deps --no-build-isolation`; compiles
#     the C++ extension, SAE_FAST_REQUIRE_EXT=1). The checkout's in-place _C.so is never
#     touched; the script fails if it changed. Also builds the sdist there (no compile).
#  2. checks both archives hold the demo's package data (sae_fast/assets/...), the
#     wheel the extension and the verl plugin, the sdist CMakeLists.txt and csrc/;
#  3. creates a fresh venv (no system site-packages), installs the wheel with its `hf`
#     extra and CPU torch, pinned by constraints.txt (the pip configuration of this
#     machine supplies the indexes, as for `make venv`);
#  4. in a temporary folder outside the checkout: the installed package finds its demo
#     assets inside that venv's site-packages and loads the shipped task and SAE, its
#     extension loads, and `sae-fast demo --tiny` exits 0 and prints its table.
#
# Env: MAX_JOBS (default 2), KEEP=1 keeps the temporary folder, DEMO_ARGS (extra flags
# for the demo, e.g. "--steps 12"), WHEEL_CHECK_TMP (parent of the temporary folder).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${1:-${PYTHON:-$REPO/.venv/bin/python}}
case "$PY" in  # absolute (the build runs elsewhere); keep a venv's bin/ path, not its target
  */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;;
  *) PY=$(command -v "$PY") ;;
esac
export MAX_JOBS=${MAX_JOBS:-2} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=$(mktemp -d "${WHEEL_CHECK_TMP:-${TMPDIR:-/tmp}}/sae_fast_wheel.XXXXXX")
cleanup() { if [ "${KEEP:-0}" = "1" ]; then echo "wheel-check: kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
t0=$(date +%s)
step() { echo "wheel-check [$(( $(date +%s) - t0 ))s] $*"; }
fail() { echo "wheel-check: FAIL: $*" >&2; exit 1; }

inplace_so() { stat -c '%Y %s' "$REPO/sae_fast/_C.so" 2>/dev/null || echo none; }
before=$(inplace_so)

# ---------------------------------------------------------------- 1. copy + build
step "copying the working tree into $WORK/src"
mkdir -p "$WORK/src" "$WORK/dist" "$WORK/run"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
   | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
   | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
[ ! -e "$WORK/src/sae_fast/_C.so" ] || fail "a built _C.so was copied"

step "building the wheel with $PY (MAX_JOBS=$MAX_JOBS)"
(cd "$WORK/src" && SAE_FAST_REQUIRE_EXT=1 "$PY" -m pip wheel . --no-deps --no-build-isolation \
   -q -w "$WORK/dist") > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; fail "wheel build"; }
WHEEL=$(ls "$WORK"/dist/sae_fast-*.whl)
step "built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"
step "building the sdist"
(cd "$WORK/src" && "$PY" setup.py -q sdist -d "$WORK/dist") > "$WORK/sdist.log" 2>&1 \
  || { tail -20 "$WORK/sdist.log"; fail "sdist build"; }
SDIST=$(ls "$WORK"/dist/sae_fast-*.tar.gz)
[ "$(inplace_so)" = "$before" ] || fail "the checkout's sae_fast/_C.so changed"
! grep -h "absent from the .packages. configuration" "$WORK/build.log" "$WORK/sdist.log" \
  || fail "setuptools ships a data folder that setup.py does not list as a package"

# ---------------------------------------------------------------- 2. archive contents
"$PY" - "$WHEEL" "$SDIST" "$REPO" <<'EOF'
import sys, tarfile, zipfile
from pathlib import Path

wheel, sdist, repo = sys.argv[1], sys.argv[2], Path(sys.argv[3])
assets = sorted(str(p.relative_to(repo)) for p in (repo / "sae_fast" / "assets").rglob("*")
                if p.is_file())
assert assets, "no files under sae_fast/assets"
in_wheel = set(zipfile.ZipFile(wheel).namelist())
record = next(n for n in in_wheel if n.endswith(".dist-info/RECORD"))
recorded = {ln.split(",")[0] for ln in zipfile.ZipFile(wheel).read(record).decode().splitlines()}
need = assets + ["sae_fast/_C.so", "sae_fast_verl/__init__.py", "sae_fast/train/demo_task.py"]
missing = [n for n in need if n not in in_wheel or n not in recorded]
assert not missing, f"wheel lacks {missing}"
top = tarfile.open(sdist).getnames()[0].split("/")[0]
in_sdist = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
# the sdist must rebuild the same wheel: the package data, CMakeLists.txt and the C++ sources
build_inputs = ["CMakeLists.txt", "setup.py", "pyproject.toml"] + sorted(
    str(p.relative_to(repo)) for p in (repo / "csrc").rglob("*") if p.is_file())
missing = [n for n in assets + build_inputs if n not in in_sdist]
assert not missing, f"sdist lacks {missing}"
print(f"wheel-check: wheel and sdist hold the {len(assets)} asset files "
      f"({', '.join(Path(a).name for a in assets)}); the sdist the {len(build_inputs)} build inputs")
EOF

# ---------------------------------------------------------------- 3. fresh venv
step "creating a fresh venv and installing the wheel (+ torch CPU, transformers)"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q -c "$REPO/constraints.txt" "torch==2.13.0+cpu" "${WHEEL}[hf]" \
  > "$WORK/install.log" 2>&1 || { tail -30 "$WORK/install.log"; fail "install"; }
step "installed $("$VPY" -m pip list --format=freeze 2>/dev/null | wc -l) packages: $("$VPY" -m pip list \
  --format=freeze 2>/dev/null | grep -iE '^(sae.fast|torch|transformers)==' | tr '\n' ' ')"

# ---------------------------------------------------------------- 4. run outside the checkout
cd "$WORK/run"
export SAE_FAST_CACHE="$WORK/cache"
step "the installed package finds its assets (cwd $PWD)"
"$VPY" - "$REPO" <<'EOF'
import sys, sysconfig
from pathlib import Path

repo = Path(sys.argv[1]).resolve()
site = Path(sysconfig.get_paths()["purelib"]).resolve()
import sae_fast
import sae_fast.train.demo_task as d
from sae_fast.sae import load_sae

pkg = Path(sae_fast.__file__).resolve().parent
assert pkg.is_relative_to(site) and not pkg.is_relative_to(repo), pkg
sae_dir, data_dir = d.demo_sae_dir().resolve(), d.demo_data_dir().resolve()
for p in (sae_dir, data_dir):
    assert p.is_relative_to(site) and p.is_dir(), p
    print(f"  {p}: {sorted(f.name for f in p.iterdir())}")
task = d.load_demo_task(model_path=str(sae_dir))  # no model load: any existing folder
assert Path(task.sae_path).resolve() == sae_dir and Path(task.train_path).is_file()
sae = load_sae(task.sae_path)
assert (sae.d_in, sae.d_sae) == (576, 4608), (sae.d_in, sae.d_sae)
import torch, sae_fast._C  # noqa: E401,F401  the compiled extension from the wheel
print(f"  demo task: feature {task.feature}, layer {task.layer}, word {task.word!r}; "
      f"SAE {sae.d_in}x{sae.d_sae} loads; _C at {Path(sae_fast._C.__file__).name}")
EOF

step "sae-fast demo --tiny ${DEMO_ARGS:-}"
# shellcheck disable=SC2086
rc=0
"$WORK/venv/bin/sae-fast" demo --tiny --no-progress --output-dir "$WORK/run/demo" ${DEMO_ARGS:-} \
  > "$WORK/demo.log" 2>&1 || rc=$?
[ "$rc" = 0 ] || { tail -40 "$WORK/demo.log"; fail "sae-fast demo --tiny exited $rc"; }
for row in "unsteered" "random strengths" "best constant strength" "learned predictor" "95% CI"; do
  grep -q "$row" "$WORK/demo.log" || { tail -40 "$WORK/demo.log"; fail "the demo table lacks '$row'"; }
done
tail -15 "$WORK/demo.log"
[ "$(inplace_so)" = "$before" ] || fail "the checkout's sae_fast/_C.so changed"
step "OK"
