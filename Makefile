# Every target sets itself up: `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo_outputs
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench gpu-check clean monailabel-env monailabel-start monailabel-test

# torch first (a local CPU/CUDA wheel pair), then the package, so nothing pulls another torch.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	MPLCONFIGDIR=$$(mktemp -d) $(PY) -m common.cli demo --out $(DEMO_OUT)

# every cache and temporary file of the suite goes to one throwaway folder, never the home directory;
# tests/monailabel needs MONAI Label's own environment: the whole suite (no PYTEST_ARGS, what CI runs) goes on with
# `make monailabel-test` (building .venv-monailabel if needed), and fails if either part fails
test: $(STAMP)
	$(PY) -m flake8 common tests
	@tmp=$$(mktemp -d); \
	TMPDIR=$$tmp MPLCONFIGDIR=$$tmp/matplotlib YOLO_CONFIG_DIR=$$tmp/ultralytics HF_HOME=$$tmp/huggingface \
	$(PY) -m pytest -n 2 --dist loadgroup --ignore=tests/monailabel $(PYTEST_ARGS); rc=$$?; rm -rf $$tmp; \
	if [ -z "$(strip $(PYTEST_ARGS))" ]; then $(MAKE) --no-print-directory monailabel-test || rc=1; fi; exit $$rc

lint: $(STAMP)
	$(PY) -m flake8 common tests

# one small CPU setting per benchmark, each well under a minute on 2 cores (the bundles' docs give measured figures)
bench: $(STAMP)
	$(PY) -m common.cli benchmark iris --device cpu --size small --image_size 64 --num_classes 3 --amp true
	$(PY) -m common.cli benchmark csr --device cpu --backbone resnet18_os16 --image_size 192 --batch_size 16
	$(PY) -m common.cli benchmark ct --device cpu --size tiny,small --repeats 3
	$(PY) -m common.cli benchmark yolo --device cpu --model yolov5n.yaml --image_size 256 --num_images 32

# every GPU figure of the docs in one table, under 8 minutes on one GPU (refuses to run without CUDA)
gpu-check: $(STAMP)
	$(PY) -m common.cli gpu_check --device cuda --out gpu_check/rows.json

# MONAI Label 0.8.5 pins older pydicom, numpy, dicomweb-client and pynetdicom, so it gets its own environment with
# the same torch and this collection installed into it (monailabel_app/README.md).
ML_VENV := .venv-monailabel
ML_PY := $(ML_VENV)/bin/python
ML_STAMP := $(ML_VENV)/.installed

$(ML_STAMP): setup.cfg pyproject.toml monailabel_app/constraints.txt monailabel_app/requirements.txt
	test -x $(ML_PY) || $(PYTHON) -m venv $(ML_VENV)
	$(ML_PY) -m pip install -q --upgrade pip
	$(ML_PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(ML_PY) -m pip install -q -c monailabel_app/constraints.txt -r monailabel_app/requirements.txt -e ".[dev]"
	$(ML_PY) -m pip install -q --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
	touch $(ML_STAMP)

monailabel-env: $(ML_STAMP)

# serves every bundle offline on loopback: make monailabel-start STUDIES=/path/to/studies [ML_PORT=8000]
STUDIES ?=
ML_PORT ?= 8000
monailabel-start: $(ML_STAMP)
	@test -n "$(STUDIES)" || { echo "usage: make monailabel-start STUDIES=/path/to/studies"; exit 2; }
	$(ML_PY) -m monailabel.main start_server --app monailabel_app --studies $(STUDIES) --host 127.0.0.1 --port $(ML_PORT)

monailabel-test: $(ML_STAMP)
	@tmp=$$(mktemp -d); \
	TMPDIR=$$tmp MPLCONFIGDIR=$$tmp/matplotlib YOLO_CONFIG_DIR=$$tmp/ultralytics HF_HOME=$$tmp/huggingface \
	$(ML_PY) -m pytest -p no:cacheprovider tests/monailabel $(PYTEST_ARGS); rc=$$?; rm -rf $$tmp; exit $$rc

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
