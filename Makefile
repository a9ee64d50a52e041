# pbv-onnx: environments, exported models, demo, tests, benchmarks.
# Two environments: .venv/export (PyTorch, for the export stage) and .venv/runtime (no PyTorch).

PYTHON ?= python3
VENV := .venv
EXPORT_PY := $(VENV)/export/bin/python
RUNTIME_PY := $(VENV)/runtime/bin/python
SHARED ?= ../shared
WEIGHTS ?= $(SHARED)/weights/mobilenet_v2_imagenet.pth
BUILD := build
ARCH ?= mobilenet_v2
LAYER ?= features.18
OUT ?= models/$(ARCH)-$(LAYER).onnx
EXPORT_ARGS ?=

.PHONY: envs export models demo test test-runtime test-export bench clean

envs: $(VENV)/export/.done $(VENV)/runtime/.done

$(VENV)/export/.done: pyproject.toml
	$(PYTHON) -m venv $(VENV)/export
	$(EXPORT_PY) -m pip install -q --upgrade pip
	$(EXPORT_PY) -m pip install -q -e '.[export,demo,test]'
	touch $@

$(VENV)/runtime/.done: pyproject.toml
	$(PYTHON) -m venv $(VENV)/runtime
	$(RUNTIME_PY) -m pip install -q --upgrade pip
	$(RUNTIME_PY) -m pip install -q -e '.[demo,test]'
	@! $(RUNTIME_PY) -c 'import torch' 2>/dev/null || (echo "torch leaked into the runtime environment" && false)
	touch $@

# make export ARCH=vgg16 LAYER=features.29 WEIGHTS=IMAGENET1K_V1
export: $(VENV)/export/.done
	$(VENV)/export/bin/pbv-onnx export --arch $(ARCH) --layer $(LAYER) --weights $(WEIGHTS) --out $(OUT) $(EXPORT_ARGS)

test: envs models test-export test-runtime

test-runtime: $(VENV)/runtime/.done
	$(VENV)/runtime/bin/pytest -q tests/runtime

test-export: $(VENV)/export/.done
	$(VENV)/export/bin/pytest -q tests/export

clean:
	rm -rf $(BUILD)
