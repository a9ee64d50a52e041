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

.PHONY: envs export models demo test lint test-runtime test-export bench gpu-check clean

envs: $(VENV)/export/.done $(VENV)/runtime/.done

$(VENV)/export/.done: pyproject.toml
	$(PYTHON) -m venv $(VENV)/export
	$(EXPORT_PY) -m pip install -q --upgrade pip
	$(EXPORT_PY) -m pip install -q -e '.[export,demo,test]'
	touch $@

$(VENV)/runtime/.done: pyproject.toml
	$(PYTHON) -m venv $(VENV)/runtime
	$(RUNTIME_PY) -m pip install -q --upgrade pip
	$(RUNTIME_PY) -m pip install -q -e '.[demo,test,nwb]'
	@! $(RUNTIME_PY) -c 'import torch' 2>/dev/null || (echo "torch leaked into the runtime environment" && false)
	touch $@

# What a rig machine installs: `pip install .`, no extras, not editable (measured by `make bench`).
CORE_PY := $(VENV)/core/bin/python
$(VENV)/core/.done: pyproject.toml $(wildcard pbv_onnx/*.py pbv_onnx/*/*.py cli/*.py export/*.py)
	rm -rf $(VENV)/core
	$(PYTHON) -m venv $(VENV)/core
	$(CORE_PY) -m pip install -q --upgrade pip
	$(CORE_PY) -m pip install -q .
	@! $(CORE_PY) -c 'import torch' 2>/dev/null || (echo "torch leaked into the core environment" && false)
	touch $@

# make export ARCH=vgg16 LAYER=features.29 WEIGHTS=IMAGENET1K_V1
export: $(VENV)/export/.done
	$(VENV)/export/bin/pbv-onnx export --arch $(ARCH) --layer $(LAYER) --weights $(WEIGHTS) --out $(OUT) $(EXPORT_ARGS)

# Models the runtime tests use, exported with the export environment. MobileNetV2 features.18
# (the demo backbone) needs the offline weights in ../shared.
TEST_MODELS := $(BUILD)/models/resnet18_avg.onnx \
  $(if $(wildcard $(WEIGHTS)),$(BUILD)/models/mobilenet_v2-features.18.onnx)

# re-exported when the export code changes (the graph it writes is what the runtime tests test)
EXPORT_SRC := $(wildcard export/*.py export/graph/*.py) pbv_onnx/runtime/modelfile.py

models: $(TEST_MODELS)

$(BUILD)/models/resnet18_avg.onnx: $(EXPORT_SRC) | $(VENV)/export/.done
	$(VENV)/export/bin/pbv-onnx export --arch resnet18 --layer layer4 --weights none --seed 0 --pool avg \
	  --resize 112x112 --out $@ --force

$(BUILD)/models/mobilenet_v2-%.onnx: $(EXPORT_SRC) | $(VENV)/export/.done
	$(VENV)/export/bin/pbv-onnx export --arch mobilenet_v2 --layer $* --weights $(WEIGHTS) \
	  --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5 --resize 224x224 --out $@ --force

test: envs models lint test-export test-runtime

# ruff's rules and style live in pyproject.toml; `ruff format .` applies the style
lint: $(VENV)/runtime/.done
	$(VENV)/runtime/bin/ruff check .
	$(VENV)/runtime/bin/ruff format --check .

test-runtime: $(VENV)/runtime/.done
	$(VENV)/runtime/bin/pytest -q tests/runtime

test-export: $(VENV)/export/.done
	$(VENV)/export/bin/pytest -q tests/export

clean:
	rm -rf $(BUILD)

# ---- benchmark (not part of `make test`; ~3 min on 2 cores): bench/results/latest.{md,json} ----
BENCH_ARGS ?=
bench: $(VENV)/export/.done $(VENV)/runtime/.done $(VENV)/core/.done
	$(EXPORT_PY) bench/run.py $(BENCH_ARGS)
	$(RUNTIME_PY) bench/fit_speed.py
	@if [ -f $(DEMO)/readouts.nc ]; then $(EXPORT_PY) bench/memory_study.py; \
	  else echo "bench/memory_study.py skipped: it measures the demo's study (make demo first)"; fi

# On a machine with an NVIDIA GPU and onnxruntime-gpu (bench/gpu_check.sh says what it needs)
gpu-check:
	bash bench/gpu_check.sh

# ---- demo: real photos, synthetic body-selective channels with a known answer (build/demo/) ----
# Weights: ../shared/weights' offline MobileNetV2 (its own preprocessing: 224x224, mean/std 0.5)
# when present, else torchvision's IMAGENET1K_V1 (downloaded or cached). Never random weights.
DEMO := $(BUILD)/demo
DEMO_LAYER ?= features.18
# Ground truth: a sparse w* on the readout's own unpooled features (the same at every position) and a
# rectifying nonlinearity (pbv_onnx/demo/synthetic.py); another DEMO_GT_LAYER (e.g. features.14) gives
# channels the readout cannot represent, and then cos(w_hat, w*) is undefined.
DEMO_GT_LAYER ?= features.18
DEMO_MODEL := $(DEMO)/mobilenet_v2-$(DEMO_LAYER).onnx
DEMO_GT_MODEL := $(DEMO)/mobilenet_v2-$(DEMO_GT_LAYER).onnx
DEMO_WEIGHTS = $(if $(wildcard $(WEIGHTS)),--weights $(WEIGHTS) --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5,--weights IMAGENET1K_V1)
DEMO_ARGS ?=
PBV := $(VENV)/runtime/bin/pbv-onnx

.PHONY: validate

demo: $(DEMO)/report/index.html
	@echo "demo report: $(abspath $(DEMO)/report/index.html)"

# re-exported when the export code changes; the feature cache of the model it replaces goes with it
$(DEMO)/mobilenet_v2-%.onnx: $(EXPORT_SRC) | $(VENV)/export/.done
	@$(VENV)/export/bin/pbv-onnx export --arch mobilenet_v2 --layer $* $(DEMO_WEIGHTS) --resize 224x224 --out $@ --force \
	  || { echo "make demo: could not export mobilenet_v2 with ImageNet weights. Supply them with" \
	       "'make demo WEIGHTS=/path/to/mobilenet_v2.pth' (a torchvision mobilenet_v2 state_dict; offline" \
	       "weights use mean/std 0.5), or run once with network access so torchvision can fetch" \
	       "IMAGENET1K_V1." >&2; exit 1; }
	rm -f $(DEMO)/features.nc

$(DEMO)/experiment/responses.nc: $(DEMO_GT_MODEL) $(addprefix pbv_onnx/demo/,sources.py stimuli.py synthetic.py build.py) | $(VENV)/runtime/.done
	$(PBV) demo build --gt-model $(DEMO_GT_MODEL) --out $(DEMO)/experiment --force $(DEMO_ARGS)

$(DEMO)/readouts.nc: $(DEMO)/experiment/responses.nc $(DEMO_MODEL)
	$(PBV) fit --model $(DEMO_MODEL) --responses $(DEMO)/experiment/responses.nc --features $(DEMO)/features.nc --out $@ --force

$(DEMO)/evaluate/channels.csv: $(DEMO)/readouts.nc
	$(PBV) evaluate --readouts $< --responses $(DEMO)/experiment/responses.nc --out $(DEMO)/evaluate --force

$(DEMO)/report/index.html: $(DEMO)/readouts.nc $(DEMO)/evaluate/channels.csv
	$(PBV) explain --model $(DEMO_MODEL) --readouts $(DEMO)/readouts.nc --responses $(DEMO)/experiment/responses.nc \
	  --features $(DEMO)/features.nc --top-objects 3 --out $(DEMO)/report --force

# The validation study (issue 21; about 6 min on 2 cores, budget 10): build/demo/validation.{md,json}. The export stage
# first re-exports the backbone with its top blocks randomised, cumulatively (sanity check; export/sanity.py).
SANITY_BLOCKS ?= features.18 features.17 features.16
VALIDATE_ARGS ?=
$(DEMO)/sanity/cascade.json: $(EXPORT_SRC) export/sanity.py | $(VENV)/export/.done
	$(EXPORT_PY) -m pbv_onnx.export.sanity --arch mobilenet_v2 --layer $(DEMO_LAYER) $(DEMO_WEIGHTS) \
	  --resize 224x224 --blocks $(SANITY_BLOCKS) --out-dir $(DEMO)/sanity

validate: $(DEMO)/readouts.nc $(DEMO)/sanity/cascade.json
	$(PBV) demo validate --model $(DEMO_MODEL) --readouts $(DEMO)/readouts.nc --experiment $(DEMO)/experiment \
	  --cascade $(DEMO)/sanity --out $(DEMO)/validation.md $(VALIDATE_ARGS)
