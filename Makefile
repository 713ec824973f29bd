# The README's two commands: `make demo` and `make test`. Both bootstrap .venv when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit test-slow bench dvc-yaml dvc-plots-offline dagster clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

# Wall time and peak memory come from GNU time when the machine has it (Debian: `time`).
TIMED := $(if $(wildcard /usr/bin/time),/usr/bin/time -v -o demo-time.log,)

demo: $(STAMP)
	$(TIMED) $(BIN)/tokenline run all --profile cpu
	@test ! -f demo-time.log || grep -E "Elapsed|Maximum resident" demo-time.log
	@echo "Outputs: data/<dataset>/  Reports: data/reports/<dataset>/  Samples: data/reports/<dataset>/<stage>.png"
	@echo "MLflow:  $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns.db"
	@echo "Dagster: make dagster (the demo's runs are recorded there)   DVC: $(BIN)/dvc status (up to date) && $(BIN)/dvc metrics show"
	@echo "Nightly: $(BIN)/tokenline nightly   (re-evaluates each production model: data/reports/nightly/<date>/)"
	@echo "Report:  $(CURDIR)/data/reports/report.html"
	@echo "Try it:  $(BIN)/tokenline generate --model models:/tokenline-openmoji@production --prompt 'a red heart' --n 4 --out out/"
	@echo "         $(BIN)/tokenline generate --model models:/tokenline-openmoji-student@production --prompt 'a red heart' --n 4 --out out-student/   (the one-step student)"
	@echo "Serve:   PATH=$(CURDIR)/$(BIN):\$$PATH MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/mlruns.db mlflow models serve -m models:/tokenline-openmoji@production --env-manager local -h 127.0.0.1 -p 5000"
	@echo "         curl -s -X POST http://127.0.0.1:5000/invocations -H 'Content-Type: application/json' -d '{\"inputs\": [\"a red heart\"]}'"

# One single-threaded worker per core (files stay whole on one worker, so module fixtures are built
# once): on 2 cores two workers of one thread each beat one worker of two threads.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n auto --dist loadfile

# The fast unit run: no stage runs, no training (integration tests excluded).
test-unit: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not integration" -n auto --dist loadfile

# `make bench` lists the benchmarks; `make bench NAME=generation_sweeps ARGS="--samples 100"` runs one.
bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks $(NAME) $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

dvc-yaml: $(STAMP)
	$(BIN)/tokenline dvc-yaml > dvc.yaml

# `dvc plots show`'s page loads Vega from a CDN and is blank offline. This fetches the three scripts
# DVC names (from the npm registry, once), inlines them into a template under .dvc/tmp/ and points
# this checkout's DVC at it (`.dvc/config.local`), so the page renders without a network.
VEGA := vega@5.20.2:build/vega.min.js vega-lite@5.2.0:build/vega-lite.min.js vega-embed@6.18.2:build/vega-embed.min.js
PLOTS_TEMPLATE := .dvc/tmp/plots-offline.html

dvc-plots-offline: $(STAMP)
	rm -rf .dvc/tmp/vega && mkdir -p .dvc/tmp/vega
	cd .dvc/tmp/vega && for entry in $(VEGA); do \
	  package=$${entry%%:*}; mkdir -p $$package && npm pack --silent $$package | xargs -I{} tar xzf {} -C $$package; done
	{ echo '<!DOCTYPE html><html><head><meta charset="utf-8"><title>DVC Plot</title>'; \
	  for entry in $(VEGA); do echo '<script>'; cat .dvc/tmp/vega/$${entry%%:*}/package/$${entry#*:}; echo '</script>'; done; \
	  echo '<style>table { border-spacing: 15px; }</style></head><body>{plot_divs}</body></html>'; } > $(PLOTS_TEMPLATE)
	$(BIN)/dvc config --local plots.html_template $(CURDIR)/$(PLOTS_TEMPLATE)
	@echo "dvc plots show now renders offline (template: $(PLOTS_TEMPLATE))"

# The project's own Dagster home (gitignored): runs by `tokenline run` and `dvc repro` are reported
# there as materializations, so the UI shows what the demo built; schedules and sensors persist.
dagster: $(STAMP)
	mkdir -p .dagster_home
	DAGSTER_HOME=$(CURDIR)/.dagster_home PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dagster dev -m orchestration.definitions

clean:
	rm -rf data/*/ models/*/ mlruns.db mlartifacts demo-time.log .dagster_home
