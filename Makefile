# larex — set-up, tests and the demo. `make install` then `make test` on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export YOLO_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install test test-all demo demo-detection bench study clean

install:
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's dataset-fashion-mnist (offline Fashion-MNIST)"; \
		apt-get update -qq || echo "apt-get update failed; carrying on"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist \
			|| echo "dataset-fashion-mnist not installed; Fashion-MNIST tests will be skipped"; \
	else echo "not root: skipping apt-get install dataset-fashion-mnist"; fi
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[test,sweep]"

test:
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-all:
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not gpu"

demo:
	$(BIN)/larex-run experiment=fmnist_demo $(ARGS)

demo-detection:
	YOLO_CONFIG_DIR=$${YOLO_CONFIG_DIR:-$$(mktemp -d)} $(BIN)/larex-run experiment=detection_demo $(ARGS)

bench:
	$(BIN)/python scripts/bench.py $(ARGS)

# The LaREx study (docs/larex-study.md): the sweep, then the report (run `make demo` first to rank the baselines)
study:
	@start=$$(date +%s); $(BIN)/larex-run experiment=larex_study $(ARGS) && \
	$(BIN)/python scripts/larex_study.py --minutes $$(( ($$(date +%s) - start + 30) / 60 )) \
		--conclusion docs/larex-study-conclusion.md

clean:
	rm -rf outputs .pytest_cache
