# The two commands of README.md; each does its own set-up on a fresh machine.
#   make demo   build, then run the main job
#   make test   build (Python extension and the CMake library), then run the test suite
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
CMAKE_BUILD_DIR ?= build-cmake
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py pyproject.toml

.PHONY: demo test deps data data-if-missing build cmake-build bench bench-quick bench-train-step gpu-check gpu-check-dry cuda-emulator cuda-mutants clean

# torch is installed only when missing, pinned to the version these machines carry (a bare
# `pip install torch` would pull gigabytes of CUDA packages); a GPU box keeps its own CUDA torch.
# pip runs only when a required module is missing, so a machine without network that has them all
# never calls it. tensorly is optional (installed along when pip runs at all): without it the
# Tucker-decomposition tests skip (tests/conftest.py). onnx, onnxscript and onnxruntime are the
# `kdfast[export]` extra (ONNX export and its tests, which skip without them): installed when missing,
# and a failed install (no network) only warns.
deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==$(TORCH_VERSION)"
	@$(PYTHON) -c "import ninja, numpy, pytest, pytest_benchmark, matplotlib, sklearn, tqdm, yaml" 2>/dev/null || \
		$(PYTHON) -m pip install setuptools wheel ninja numpy pytest pytest-benchmark matplotlib tensorly scikit-learn tqdm PyYAML
	@$(PYTHON) -c "import onnx, onnxscript, onnxruntime" 2>/dev/null || $(PYTHON) -m pip install onnx onnxscript onnxruntime || \
		echo "warning: could not install onnx/onnxscript/onnxruntime: the ONNX export tests will skip"

# Rebuilt only when a source changed (the stamp records the last successful build).
.build-stamp: $(SOURCES) | deps
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e .
	@touch $@

build: .build-stamp

$(CMAKE_BUILD_DIR)/libkdfast.so: $(SOURCES) CMakeLists.txt | deps
	cmake -S . -B $(CMAKE_BUILD_DIR) -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build $(CMAKE_BUILD_DIR) -j $$(nproc)

cmake-build: $(CMAKE_BUILD_DIR)/libkdfast.so

# The main job: the tour of every source paper on the embedded digits data (kdfast.cli.demo): one
# teacher, then a section per method (Tucker + KD + robustness, BSS, data-free KD, KR, SRM). About
# 4 min on 2 idle CPU cores after the build; one report in demo-output/.
DEMO_OUT ?= demo-output
demo: build
	$(PYTHON) -m kdfast info
	$(PYTHON) -m kdfast demo --out $(DEMO_OUT)
	@echo "demo report: $(DEMO_OUT)/report.md (plots: training_curves.png, robustness.png)"

# The loss benchmark on the quick CPU shapes, and the KD training-step benchmark, quick mode,
# reported to demo-output/ (markdown tables + PNG charts).
bench-quick: build
	@mkdir -p $(DEMO_OUT)
	KDFAST_BENCH_QUICK=1 $(PYTHON) -m pytest -c benchmarks/pytest.ini benchmarks/bench_losses.py -q \
		--benchmark-json=$(DEMO_OUT)/bench.json --kdfast-oom=$(DEMO_OUT)/oom.json
	$(PYTHON) benchmarks/report.py $(DEMO_OUT)/bench.json --oom $(DEMO_OUT)/oom.json --out $(DEMO_OUT)/losses-quick --no-json
	KDFAST_BENCH_QUICK=1 $(PYTHON) -m pytest -c benchmarks/pytest.ini benchmarks/bench_train_step.py -q \
		--benchmark-json=$(DEMO_OUT)/train-step.json
	$(PYTHON) benchmarks/report_train_step.py $(DEMO_OUT)/train-step.json --out $(DEMO_OUT)/train-step-quick --no-json
	@echo "benchmark reports: $(DEMO_OUT)/losses-quick.md, $(DEMO_OUT)/train-step-quick.md"

# Fashion-MNIST, the real dataset of kdfast.data.load("fashion-mnist") and the experiments: Debian's package
# dataset-fashion-mnist puts its four IDX files in $(FASHION_MNIST_DIR), where kdfast looks first.
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
FASHION_MNIST_FILE := $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz
data:
	@if [ -f $(FASHION_MNIST_FILE) ]; then echo "Fashion-MNIST is installed in $(FASHION_MNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist; \
	else \
		echo "no apt-get on this machine: download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,"; \
		echo "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from https://github.com/zalandoresearch/fashion-mnist"; \
		echo "into DIR/fashion-mnist/ and export KDFAST_DATA=DIR (or pass root=, data.root, --root); see docs/data.md"; \
		exit 1; \
	fi

# Run by `make test`: installs the package only when it is missing, apt-get exists and no password is
# needed (root, or sudo -n); never fails. Without the files the tests that need them skip, saying why.
data-if-missing:
	@[ -f $(FASHION_MNIST_FILE) ] || ! command -v apt-get >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	} || echo "make test: could not install dataset-fashion-mnist (see make data); the tests that need it will skip"

test: build cmake-build data-if-missing
	KDFAST_CMAKE_LIB=$(CMAKE_BUILD_DIR)/libkdfast.so $(PYTHON) -m pytest tests -q

# Full loss benchmark (about 20 min on 2 CPU cores); commit the report under benchmarks/results/<device>/
# (one folder per machine, e.g. cpu-amd-epyc-2core; file names say the benchmark and, where it matters, the threads).
BENCH_DEVICE ?= cpu
bench: build
	$(PYTHON) -m pytest -c benchmarks/pytest.ini benchmarks/bench_losses.py \
		--benchmark-json=build/bench.json --kdfast-oom=build/bench-oom.json
	$(PYTHON) benchmarks/report.py build/bench.json --oom build/bench-oom.json --out benchmarks/results/$(BENCH_DEVICE)/losses

# Full KD training-step benchmark (resnet20 / resnet56 / resnet32x4 teachers).
bench-train-step: build
	$(PYTHON) -m pytest -c benchmarks/pytest.ini benchmarks/bench_train_step.py --benchmark-json=build/train-step.json
	$(PYTHON) benchmarks/report_train_step.py build/train-step.json --out benchmarks/results/$(BENCH_DEVICE)/train-step

# Everything a lent GPU must tell us (tools/gpu_check.py; at most 8 minutes on an H200): environment
# and measured ceilings, in-place CUDA build (no pip, no CMake), cuobjdump resource/SASS summary, the
# CUDA kernel tests, compute-sanitizer, the CUDA-event benchmark. Files in $(OUT): summary.md first.
OUT ?= gpu-check-out
gpu-check:
	$(PYTHON) tools/gpu_check.py --out $(OUT)

# The same stages on the CPU with tiny shapes (tests/build/test_gpu_check.py runs it under `make test`).
gpu-check-dry:
	$(PYTHON) tools/gpu_check.py --dry-run --out $(OUT)

# The CUDA kernels without a GPU (docs/cuda.md; both also run under `make test`): the exact-barrier
# emulator suite (plain and ASan+UBSan builds, ~3 min on 2 cores) with the ptxas resource check, and the
# mutation check that every seeded kernel fault fails the suite (~5 min).
cuda-emulator:
	$(PYTHON) -m pytest tests/ops/test_cuda_emulator.py tests/build/test_ptxas_resources.py -q

cuda-mutants:
	$(PYTHON) tools/emulator_mutants.py

clean:
	rm -rf build $(CMAKE_BUILD_DIR) $(DEMO_OUT) kdfast/_C*.so .build-stamp *.egg-info
