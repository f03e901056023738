# Thin layer over the `lab` CLI: each target is one `lab ...` call. Branching lives in lab/cli.py.
.PHONY: help setup setup-ray lock bench doctor images ray-node fixture train merge serve ask probe load stop adapter key job e2e report runs dashboard compare reproduce lint test test-fast clean

PYTHON  ?= python3
HW      ?= auto
RECIPE  ?=
SET     ?=
RUN     ?=
MODEL   ?=
PORT    ?=
CONCURRENCY ?=
REQUESTS ?=
TIME_LIMIT ?=
Q       ?= Who are you?
BASE_URL ?=
RESUME  ?=
ADAPTER ?=
SHAPE   ?= embedded
STEPS   ?= 40
PROFILE ?=
# GPUS=N: train: N processes through accelerate launch (DIST=ddp|fsdp2|zero3|<accelerate config>);
#         serve: one model split over N GPUs (vLLM tensor parallelism)
GPUS    ?=
DIST    ?= ddp
A       ?=
B       ?=
# local: train and serve on this host; docker: in the images of compose.yaml; empty: $LAB_RUNTIME,
# else docker when an engine answers, else local.
RUNTIME ?=
WHEELS  ?=
# AMD GPU architecture (gfx1151, gfx942, ...): this host's, read from the amdgpu driver, unless set.
GPU_ARCH ?= $(shell $(PYTHON) -c 'from lab.device.hardware import gpu_arch; print(gpu_arch()[0])' 2>/dev/null || echo gfx1151)
CA_BUNDLE ?=
LOCK    ?=
# PyTorch's CPU wheels (requirements/torch-cpu.txt) come from their own index; set it empty to
# use only PyPI and pip's find-links (offline hosts, as compose.yaml's LAB_CPU_TORCH_INDEX_URL).
LAB_CPU_TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
export LAB_CPU_TORCH_INDEX_URL
# Which pinned environment to install (requirements/*-<PINS>.txt): the GPU a host has, else cpu.
PINS    ?= $(if $(filter cuda rocm cpu,$(HW)),$(HW),$(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || ( (command -v rocminfo || test -e /dev/kfd) >/dev/null 2>&1 && echo rocm) || echo cpu))$(if $(filter 12,$(CUDA)),12)
# CUDA=12: NVIDIA drivers older than 580 and V100s: the cuda12 lock (PyTorch 2.9, CUDA 12.8) and,
# for the images, a CUDA 12.8 PyTorch base (compose.yaml's LAB_CUDA_PINS, LAB_CUDA_BASE_IMAGE).
CUDA    ?=
ifeq ($(CUDA),12)
export LAB_CUDA_PINS ?= cuda12
export LAB_CUDA_BASE_IMAGE ?= pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
endif

VENV     := .venv
TRAIN_PY := $(VENV)/train/bin/python
SERVE_PY := $(VENV)/serve/bin/python
HARNESS_PY := $(VENV)/harness/bin/python
RAY_PY   := $(VENV)/ray/bin/python
# The lab runs vLLM from its own environment (it pins its own transformers).
export LAB_SERVE_PYTHON := $(abspath $(SERVE_PY))
# RUNTIME=docker: the host only drives containers and probes them, so it needs no torch.
ifeq ($(RUNTIME),docker)
SETUP_STAMPS := $(VENV)/harness/.done
LAB      := $(HARNESS_PY) -m lab
else
# No serve lock for a hardware (rocm): vLLM comes from its official image there (RUNTIME=docker).
SETUP_STAMPS := $(VENV)/train/.done $(if $(wildcard requirements/lock/serve-$(PINS).txt),$(VENV)/serve/.done)
LAB      := $(TRAIN_PY) -m lab
endif
# Every value a user gives reaches the lab through the environment as LAB_ARG_<NAME>, verbatim:
# no shell parses it and make expands nothing in it ($(value ...)), so Q='$(touch x)', `...`, $,
# quotes and spaces arrive as typed (lab/cli.py reads them as its arguments' defaults).
ARG_NAMES := RECIPE HW SET RUN MODEL PORT Q BASE_URL RESUME ADAPTER ADAPTERS SHAPE STEPS PROFILE GPUS DIST A B RUNTIME WHEELS CA_BUNDLE LOCK \
             CONCURRENCY REQUESTS TIME_LIMIT NODES NODE_RANK MAIN TARGET CLUSTER IMAGE HEAD RAY_ARGS STOP
$(foreach n,$(ARG_NAMES),$(eval export LAB_ARG_$(n) = $$(value $(n))))

help:  ## list targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: $(SETUP_STAMPS)  ## create the pinned environments (idempotent; RUNTIME=docker: the small host one)

# Each environment installs its lock exactly (requirements/install.sh, as the images do).
INSTALL := GPU_ARCH=$(GPU_ARCH) TORCH_INDEX_URL=$(if $(filter cpu,$(PINS)),$(LAB_CPU_TORCH_INDEX_URL)) sh requirements/install.sh

$(VENV)/harness/.done: requirements/lock/harness.txt
	$(PYTHON) -m venv $(VENV)/harness
	$(INSTALL) $(HARNESS_PY) harness ""
	touch $@

# The dev tools (dev.txt: pinned, not hashed) at the lock's versions, the lock's hashes left out:
# hashes in a constraints file turn on pip's hash-checking, which refuses dev.txt's unhashed pins.
$(VENV)/train/.done: requirements/lock/train-$(PINS).txt requirements/dev.txt $(wildcard requirements/torch-$(PINS).txt)
	$(PYTHON) -m venv $(VENV)/train
	$(INSTALL) $(TRAIN_PY) train $(PINS)
	sed -e '/^ *--hash=/d' -e 's/ *\\$$//' requirements/lock/train-$(PINS).txt > $(VENV)/train/constraints.txt
	$(TRAIN_PY) -m pip install -q -c $(VENV)/train/constraints.txt -r requirements/dev.txt
	touch $@

$(VENV)/serve/.done: requirements/lock/serve-$(PINS).txt $(wildcard requirements/torch-$(PINS).txt)
	$(PYTHON) -m venv $(VENV)/serve
	$(INSTALL) $(SERVE_PY) serve $(PINS)
	touch $@

# Ray Train's environment (CLUSTER=): the training pins plus Ray; made only when a cluster is used.
$(VENV)/ray/.done: requirements/lock/ray-$(PINS).txt $(wildcard requirements/torch-$(PINS).txt)
	$(PYTHON) -m venv $(VENV)/ray
	$(INSTALL) $(RAY_PY) ray $(PINS)
	touch $@

setup-ray: $(VENV)/ray/.done  ## Ray's environment, .venv/ray: start every node of the cluster from it (.venv/ray/bin/ray start)

requirements/lock/%.txt:
	@echo "make: no lock $@ (requirements/locks.yaml lists them; ROCm serves from the vLLM ROCm image: RUNTIME=docker)" >&2; exit 2

lock: $(VENV)/train/.done  ## re-resolve requirements/lock/*.txt after editing the pins (uv; LOCK="train-cpu ..." for some)
	$(TRAIN_PY) -m lab lock

images: $(VENV)/harness/.done  ## build the training, serving and Ray worker images: make images HW=cpu [WHEELS=dir CA_BUNDLE=pem]
	$(HARNESS_PY) -m lab images

ray-node: $(VENV)/harness/.done  ## a Ray node in the lab-ray image (host network): the head, or HEAD=host:6379 to join; STOP=1 removes them
	$(HARNESS_PY) -m lab node

bench: setup  ## TRL defaults vs hand-tuned TRL vs the lab's speed plan: make bench [SHAPE=qwen3-0.6b STEPS=40 PROFILE=1]
	$(LAB) bench

doctor: setup  ## what the lab sees here: backend, devices, attention, kernels, the defaults HW= picks
	$(LAB) doctor

fixture: setup  ## build the embedded tiny model (cached by content hash)
	$(LAB) fixture

train: setup $(if $(CLUSTER)$(RAY_ADDRESS),$(if $(filter docker,$(RUNTIME)),,$(VENV)/ray/.done))  ## fine-tune: make train HW=cpu RECIPE=identity-lora SET="identity.name=Orion" [GPUS=4 DIST=fsdp2]
	$(LAB) train

merge: setup  ## merge the latest run's adapter into runs/<id>/merged
	$(LAB) merge

serve: setup  ## serve runs/latest/merged (or MODEL=dir|hub-id|base; ADAPTER=1: base + LoRA, no merge; ADAPTERS="RUN_A RUN_B": several LoRA runs, one base; GPUS=N: tensor parallel; CLUSTER= NODES=M: over M machines of a Ray cluster, GPUs only) on 127.0.0.1:8000
	$(LAB) serve

ask: setup  ## make ask Q="你是谁？"
	$(LAB) ask

probe: setup  ## identity + control questions against the running server (or BASE_URL=...)
	$(LAB) probe

load: setup  ## burst of chat requests at the server: make load [CONCURRENCY=32 REQUESTS=256 TIME_LIMIT=300]
	$(LAB) load

stop: setup  ## stop the server (PORT=: only that one)
	$(LAB) stop

job: setup  ## make job TARGET=slurm|k8s NODES=2 GPUS=8 HW=cuda [RECIPE= SET= IMAGE=]: an sbatch script or a Kubeflow TrainJob (runs/jobs/)
	$(LAB) job

adapter: setup  ## load RUN's LoRA adapter into the running ADAPTERS= server (SET=serve.adapter_loading=true at serve)
	$(LAB) adapter

key: setup  ## the API key of the lab's server, for curl: -H "Authorization: Bearer $$(make -s key)"
	@$(LAB) key

e2e: setup  ## the whole loop on the embedded default; exits non-zero unless the identity changed
	$(LAB) e2e

report: setup  ## rewrite the report of RUN (default: latest)
	$(LAB) report

dashboard: setup  ## trackio's dashboard (runs trained with SET=train.report_to=trackio) on 127.0.0.1:7860 (PORT=)
	$(LAB) dashboard

runs: setup  ## runs/index.html: every run on one page (file://, no server); rebuilt after each run command too
	$(LAB) runs

reproduce: setup  ## make reproduce RUN=runs/<id>: rerun from its manifest (inputs checked), then compare
	$(LAB) reproduce

compare: setup  ## make compare A=runs/<id> B=runs/<id>: loss, weights, answers; non-zero past tolerances
	$(LAB) compare

lint: $(VENV)/train/.done  ## ruff over lab/, tests/ and serve/ (rules in pyproject.toml; ruff is pinned in requirements/dev.txt)
	$(TRAIN_PY) -m ruff check lab tests serve

test: $(VENV)/train/.done $(VENV)/serve/.done $(VENV)/ray/.done  ## every test, the slow end-to-end ones included (what CI runs)
	$(TRAIN_PY) -m pytest -ra --durations=25 tests

test-fast: $(VENV)/train/.done  ## unit tests only
	$(TRAIN_PY) -m pytest -ra -m "not slow" tests

clean:  ## remove runs and environments (the embedded model cache in ~/.cache/lab stays)
	rm -rf runs $(VENV) .pytest_cache
