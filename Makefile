# weakseg — every target does its own set-up on a bare machine and is idempotent.
#   make demo    the main job (offline, generated data) -> outputs/demo/
#   make test    the test suite
#   make bench   microbenchmarks (verify, then time) -> benchmarks/results/
#   make wheel   a wheel with the compiled kernels -> dist/
#   make cpp-app the C++ embedding app (export/cpp) against the venv's libtorch -> build/cpp-app/weakseg_app
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTHON  ?= python3
TORCH   ?= torch==2.13.0 torchvision==0.28.0
# Runtime, build, test and benchmark dependencies (all from the package registry).
DEPS    := numpy tqdm safetensors pillow scikit-build-core cmake ninja pytest hypothesis expecttest \
           opencv-python-headless faiss-cpu open_clip_torch diffusers transformers scikit-image pycocotools \
           scikit-learn pydensecrf2 onnx onnxscript onnxruntime
export CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
UV      := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
STAMP   := $(VENV)/.weakseg-deps

.PHONY: help setup build test demo bench wheel wheel-check info clean cpp-app emu-sanitize

help:
	@echo "make demo | test | bench | wheel | cpp-app | setup | info | clean"

$(UV):
	$(PYTHON) -m pip install --user --quiet uv

# The environment: a uv venv with the CUDA build of torch (it also runs on the CPU) and the tools.
$(STAMP): Makefile tools/constraints.txt | $(UV)
	[ -x $(PY) ] || $(UV) venv $(VENV) --python $(PYTHON)
	VIRTUAL_ENV=$(VENV) $(UV) pip install --quiet -c tools/constraints.txt $(TORCH) $(DEPS)
	touch $(STAMP)

# The project, editable, built against the torch of the venv (CPU kernels + CUDA kernels when nvcc is found).
# CMake rebuilds incrementally, so this is cheap when nothing changed.
build: $(STAMP)
	VIRTUAL_ENV=$(VENV) $(UV) pip install --quiet --no-build-isolation --no-deps -e .

setup: build

test: build
	$(PY) -m pytest -q

demo: build
	$(PY) -m weakseg demo --out outputs/demo

bench: build
	$(PY) benchmarks/bench_ops.py --out benchmarks/results

info: build
	$(PY) -m weakseg info

wheel: $(STAMP)
	rm -rf dist && mkdir -p dist
	VIRTUAL_ENV=$(VENV) $(UV) build --wheel --no-build-isolation --out-dir dist . \
	  || $(PY) -m pip wheel --no-build-isolation --no-deps -w dist .
	@ls -l dist/*.whl

# Install the wheel into a scratch venv (sharing the torch of ours) and check its kernels.
wheel-check: wheel
	$(PY) tools/check_wheel.py dist/*.whl

# The C++ app (one translation unit; TensorRT backend only when TensorRT is found).
cpp-app: $(STAMP)
	$(VENV)/bin/cmake -S export/cpp -B build/cpp-app -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	$(VENV)/bin/cmake --build build/cpp-app -j $${CPP_APP_JOBS:-1}
	@ls -l build/cpp-app/weakseg_app

# The CUDA kernels on the CPU emulator (csrc/emu) under ThreadSanitizer and AddressSanitizer: a standalone
# driver (csrc/emu/sanitize/driver.cpp) runs every launcher in OS-thread mode against the CPU ops.
EMU_SAN_SRC := csrc/emu/cuda_emu.cpp $(wildcard csrc/emu/op_*.cpp) csrc/emu/sanitize/driver.cpp
emu-sanitize: $(STAMP)
	@set -e; T=$$($(PY) -c 'import os, torch; print(os.path.dirname(torch.__file__))'); \
	ABI=$$($(PY) -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))'); \
	for san in thread address; do \
	  out=build/emu-sanitize/$$san; mkdir -p $$out; \
	  for f in $(EMU_SAN_SRC); do o=$$out/$$(basename $$f .cpp).o; \
	    if [ ! -f $$o ] || [ $$f -nt $$o ] || [ -n "$$(find csrc kernels -newer $$o \( -name '*.h' -o -name '*.cuh' \
	      -o -name '*.cu' -o -path 'csrc/ops/*.cpp' \) | head -1)" ]; then echo "$$f $$o"; fi; \
	  done | xargs -r -n 2 -P $${EMU_SAN_JOBS:-2} sh -c 'echo "  '$$san': $$0"; g++ -std=c++17 -O1 -g -fPIC \
	    -fsanitize='$$san' -fno-omit-frame-pointer -I. -isystem '$$T'/include \
	    -isystem '$$T'/include/torch/csrc/api/include -D_GLIBCXX_USE_CXX11_ABI='$$ABI' -c $$0 -o $$1'; \
	  g++ -fsanitize=$$san $$out/*.o -o $$out/driver -L$$T/lib -ltorch -ltorch_cpu -lc10 -Wl,-rpath,$$T/lib; \
	  echo "== $$san sanitizer"; \
	  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WEAKSEG_EMU_MODE=threads TSAN_OPTIONS=halt_on_error=1 \
	    ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 $$out/driver; \
	done

clean:
	rm -rf build dist outputs .pytest_cache
