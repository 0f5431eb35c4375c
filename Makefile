# inferd: `make run` serves the demo model, `make test` runs the whole suite. Both set up what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP_RUN  := $(VENV)/.stamp-run
STAMP_DEV  := $(VENV)/.stamp-dev
# constraints.txt pins what the tests ran with, on the Python it was made with (3.11); another Python resolves freely
# (with a note), since a pin such as numpy's may have no wheel for it.
PINNED_PY  := 3.11
CONSTRAIN   = $$($(PY) -c 'import sys; print("-c constraints.txt" if "%d.%d" % sys.version_info[:2] == "$(PINNED_PY)" else "")')

.PHONY: run test fuzz lint typecheck bench deps-system constraints clean deb deps-deb wheel

# Debian and Ubuntu ship venv/ensurepip separately (python3-venv): install it when creating the venv fails.
$(PY):
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); }
	$(PIP) install --quiet --upgrade pip

$(STAMP_RUN): pyproject.toml constraints.txt | $(PY)
	@$(PY) -c 'import sys; v="%d.%d" % sys.version_info[:2]; v == "$(PINNED_PY)" or print(f"note: Python {v}, not $(PINNED_PY): installing without constraints.txt")'
	$(PIP) install --quiet $(CONSTRAIN) -e '.[demo]'
	touch $@

$(STAMP_DEV): pyproject.toml constraints.txt | $(PY)
	@$(PY) -c 'import sys; v="%d.%d" % sys.version_info[:2]; v == "$(PINNED_PY)" or print(f"note: Python {v}, not $(PINNED_PY): installing without constraints.txt")'
	$(PIP) install --quiet $(CONSTRAIN) -e '.[dev]'
	touch $@ $(STAMP_RUN)

run: $(STAMP_RUN)
	$(PY) -m daemon.demo config.example.yaml
	@echo
	@echo "Try it (in another terminal):"
	@echo "  curl -s -X POST http://127.0.0.1:8080/v2/models/demo/infer -H 'Content-Type: application/json' \\"
	@echo "    -d '{\"inputs\":[{\"name\":\"input\",\"shape\":[1,4],\"datatype\":\"FP32\",\"data\":[5.1,3.5,1.4,0.2]}]}'"
	@echo
	$(VENV)/bin/inferd serve --config config.example.yaml

# The broker the MQTT tests start, curl for the README's example and Java for pyspark (tests/test_spark.py); installed
# from Debian's packages when missing.
deps-system:
	@{ command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; } && command -v mosquitto_rr >/dev/null 2>&1 || { \
	  echo "installing mosquitto"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; }
	@{ command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx; } || { echo "installing nginx (tests/test_registry_*.py serve a registry with it)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends nginx >/dev/null; }
	@command -v curl >/dev/null 2>&1 || { echo "installing curl (the README's example request is tested)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq curl >/dev/null; }
	@command -v systemd-analyze >/dev/null 2>&1 || { echo "installing systemd (systemd-analyze and -sysusers test the unit)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends systemd >/dev/null; }
	@command -v java >/dev/null 2>&1 || { echo "installing Java (pyspark's JVM, for tests/test_spark.py)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq default-jre-headless >/dev/null; }

lint: $(STAMP_DEV)
	$(VENV)/bin/ruff check daemon adapters tests $(wildcard bench)
	$(VENV)/bin/mypy

test: $(STAMP_DEV) deps-system lint
	$(PY) -m pytest -q

# A long fuzz pass against a real daemon (tests/test_fuzz.py; make test runs a short one): prints the cases tried.
FUZZ_EXAMPLES ?= 2000
fuzz: $(STAMP_DEV)
	INFERD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s -p no:cacheprovider tests/test_fuzz.py tests/test_fuzz_auth.py

# Every bench script runs (each exits 1 when it misses a target); the status says whether any did.
BENCHES ?= run mqtt_bench grpc_bench batch_bench spark_bench security_bench overload_bench hotswap_bench
bench: $(STAMP_DEV) deps-system
	@status=0; for b in $(BENCHES); do echo "== bench/$$b.py"; $(PY) bench/$$b.py || status=1; done; exit $$status

# The wheel, into dist/ (packaging/build-wheel.sh).
wheel: | $(PY)
	PYTHON=$(PY) packaging/build-wheel.sh

# dist/inferd_<version>_<arch>.deb (packaging/build-deb.sh): a venv in /opt/inferd from constraints.txt on Debian's
# python3.11, the unit, the config as a conffile, docs and a man page. EXTRAS picks the bundled runtimes.
EXTRAS ?= onnxruntime
deb: deps-deb
	EXTRAS=$(EXTRAS) PINNED_PY=$(PINNED_PY) packaging/build-deb.sh

# What building and checking the .deb needs from Debian (tests/test_deb.py runs it too): the system Python's venv
# module, lintian and shellcheck.
deps-deb:
	@{ command -v lintian && command -v shellcheck && /usr/bin/python3 -c 'import ensurepip'; } >/dev/null 2>&1 || { \
	  echo "installing lintian, shellcheck and python3-venv"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends lintian shellcheck python3-venv >/dev/null; }

# Re-pin after a dependency change: resolve pyproject.toml afresh in the venv, and its exact versions become the
# constraints every install uses.
constraints: | $(PY)
	$(PIP) install --quiet -e '.[dev,demo]'
	{ head -n 2 constraints.txt; $(PIP) freeze --exclude-editable | grep -v '^-e'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	touch $(STAMP_DEV) $(STAMP_RUN)

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache .mypy_cache .ruff_cache
