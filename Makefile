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

.PHONY: install demo test test-fast bench lint format clean checkpoint

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install_system_deps.sh
	bash scripts/install_system_deps.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[all]"
	touch $(STAMP)

# Until the live loop lands (`calm-rt demo`), the demo shows the data layer:
# a simulated two-animal corpus and its summary.
demo: install
	$(VENV)/bin/calm-rt simulate --out demo-out/sim --animals 2 --sessions 1 --neurons 64 --frames 900
	$(VENV)/bin/calm-rt info demo-out/sim

test: install lint
	QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1600x1000x24" \
		$(PY) -m pytest -q --durations=15

# Everything except the tests marked slow or gui, for a quick edit-test loop.
test-fast: install
	$(PY) -m pytest -q -m "not slow and not gui" -x

bench: install
	$(PY) -m bench --out bench-out

lint: install
	$(VENV)/bin/ruff check calm_rt kernels napari_plugin bench tests
	$(VENV)/bin/ruff format --check calm_rt kernels napari_plugin bench tests

format: install
	$(VENV)/bin/ruff check --fix calm_rt kernels napari_plugin bench tests
	$(VENV)/bin/ruff format calm_rt kernels napari_plugin bench tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache demo-out bench-out
