# make demo: create .venv if missing, install, run the default toy pipeline headless (runs/toy),
#            stages 01-06, then write runs/toy/report.html.
# make test: install what the tests need and run them (unit tests + nbval on notebooks 00b, 01-07).
# make lab:  open JupyterLab on notebooks/ with the project's environment (jupytext pairs each
#            .ipynb with its notebooks/NN_*.py source; the kernel is registered as `python3`, the
#            kernelspec the notebooks store, so opening one does not rewrite it).
# make notebooks: sync the pairs and re-execute the stored notebooks with their default parameters.
# make lint: ruff on the package, the tests, tools, benchmarks and the notebook sources.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# passive OpenMP waits keep parallel jobs from spinning; one thread per process (the runner runs
# the stages' work as single-thread jobs on two worker processes, `--jobs auto`, and the outputs
# are those of a one-process, one-thread run: see the README)
export OMP_WAIT_POLICY ?= PASSIVE
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export PYTHONHASHSEED := 0
# pip installs without byte-compiling (it spent 125 of the install's 160 s compiling every file);
# each module's .pyc is written at its first import instead (so PYTHONDONTWRITEBYTECODE, which some
# shells set, is unset here), and `make test` first imports what the suite uses in one process, so
# that its parallel processes do not each compile the same modules
unexport PYTHONDONTWRITEBYTECODE
PIP := $(BIN)/python -m pip install -q --no-compile

INSTALLED      := $(VENV)/.installed-runtime
TEST_INSTALLED := $(VENV)/.installed-test
LAB_INSTALLED  := $(VENV)/.installed-lab
NBVAL := notebooks/00b_diffusion_primer.ipynb $(sort $(wildcard notebooks/0[1-9]_*.ipynb))

.PHONY: demo test lab lint notebooks benchmark clean install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

$(INSTALLED): requirements.txt pyproject.toml | $(BIN)/python
	$(PIP) -r requirements.txt
	$(PIP) --no-deps --no-build-isolation -e .
	touch $@

$(TEST_INSTALLED): requirements-test.txt $(INSTALLED)
	$(PIP) -r requirements-test.txt
# only for its CLIP BPE file (tests/fixtures/real_clip.py); --no-deps: no torchvision, no CUDA torch
	$(PIP) --no-deps open-clip-torch==3.3.0
	touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/python -m fgbg_utils run params/toy.yaml --out runs/toy
	$(BIN)/python -m fgbg_utils report runs/toy

# TEST_WORKERS pytest-xdist processes (one torch thread each); --dist loadfile keeps each test file,
# and each notebook's nbval cells (one kernel), on one worker; TEST_WORKERS=0 runs in this process
TEST_WORKERS ?= 2
test: $(TEST_INSTALLED)
	$(BIN)/python tools/warm_imports.py
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests $(NBVAL) --nbval-lax --nbval-current-env

$(LAB_INSTALLED): requirements-lab.txt $(INSTALLED)
	$(PIP) -r requirements-lab.txt
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (ipykernel)"
	touch $@

# notebooks/jupytext.toml pairs each notebook with its .py on save (Lab's root is notebooks/);
# tools/lab_overrides.json makes Lab save widget state, so saved explorers still show their figures.
lab: $(LAB_INSTALLED)
	mkdir -p $(VENV)/share/jupyter/lab/settings
	cp tools/lab_overrides.json $(VENV)/share/jupyter/lab/settings/overrides.json
	cd notebooks && ../$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root,)

lint: $(TEST_INSTALLED)
	$(BIN)/python -m ruff check fgbg_utils tests tools benchmarks notebooks/

# The .py sources and the .ipynb are synced (the newer side wins), then 00-06 are re-executed in
# place with their parameters cells' defaults (params/toy.yaml into runs/toy) and small outputs.
notebooks: $(TEST_INSTALLED)
	$(BIN)/jupytext --sync notebooks/0*_*.ipynb
	$(BIN)/python tools/execute_notebooks.py $(sort $(wildcard notebooks/0*_*.ipynb))

benchmark: $(INSTALLED)
	$(BIN)/python benchmarks/extraction.py
	$(BIN)/python benchmarks/finetune.py
	$(BIN)/python benchmarks/runner.py

clean:
	rm -rf runs .cache
