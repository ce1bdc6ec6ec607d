# calm-rt: the two commands a user needs are `make demo` and `make test`.
# Everything else here is what those two stand on.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.calm-rt-installed
# The CPU build of torch lies on the dev/CI machines' disk; on a GPU box keep
# your own CUDA torch (it is left alone when already importable).
TORCH_SPEC ?= torch==2.13.0
# Kernel tests run under the Triton interpreter unless a CUDA GPU is present.
TRITON_INTERPRET ?= $(shell $(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)" 2>/dev/null || echo 1)
export TRITON_INTERPRET

.PHONY: install demo test test-fast bench gpu-check lint format clean checkpoint

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install_system_deps.sh
	bash scripts/install_system_deps.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[all]"
	touch $(STAMP)

# The main job on the embedded defaults: a simulated 512x512 microscope at
# 30 Hz, the shipped checkpoint, a rig listener, all on loopback, for 20 s.
demo: install
	$(VENV)/bin/calm-rt demo --seconds 20 --json demo-out/demo.json

test: install lint
	QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1600x1000x24" \
		$(PY) -m pytest -q --durations=15

# Everything except the tests marked slow or gui, for a quick edit-test loop.
test-fast: install
	$(PY) -m pytest -q -m "not slow and not gui" -x

bench: install
	$(PY) -m bench --out bench-out

# On a CUDA machine: compiled kernel tests, exactness on the GPU, the quick bench
# and an end-to-end run at 1,024 neurons, into one JSON (docs/gpu.md). Without a
# GPU it says so in one line and fails.
gpu-check: install
	$(PY) scripts/gpu_check.py --json gpu-check.json

lint: install
	$(VENV)/bin/ruff check calm_rt kernels napari_plugin bench scripts tests
	$(VENV)/bin/ruff format --check calm_rt kernels napari_plugin bench scripts tests

format: install
	$(VENV)/bin/ruff check --fix calm_rt kernels napari_plugin bench scripts tests
	$(VENV)/bin/ruff format calm_rt kernels napari_plugin bench scripts tests

# Rebuild the shipped default checkpoint (24 min on the 2-core dev machine; see
# README): simulated animals as the rig records them (30 Hz), animals of varied rates,
# sizes, indicators and dynamics, and the training blocks of the three real recordings.
checkpoint: install
	$(VENV)/bin/calm-rt simulate --out runs/corpus --animals 6 --sessions 3 \
		--neurons 128 --frames 10000 --seed 1
	$(VENV)/bin/calm-rt simulate --out runs/corpus_varied --animals 16 --sessions 2 \
		--neurons 1000 --frames 6000 --seed 11 --varied
	$(VENV)/bin/calm-rt pretrain --data runs/corpus runs/corpus_varied --out runs/ckpt_default \
		--holdout-sessions 1 --tokenizer-steps 1500 --dat-steps 4500 --seed 0 \
		--subset-neurons 16 512 --sequence-budget 512 --no-resume \
		--recording ../shared/data/zebrafish_hindbrain 5.8 300 \
		--recording ../shared/data/suite2p_hippocampus 30 1000 \
		--recording ../shared/data/zebrafish_legare 1 150
	mkdir -p calm_rt/checkpoints/default
	cp runs/ckpt_default/model.safetensors runs/ckpt_default/config.json calm_rt/checkpoints/default/

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache demo-out bench-out
