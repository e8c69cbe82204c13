# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
# Test processes (pytest-xdist; each file runs whole in one of them, each process with its own embedded Postgres,
# Redis, server and worker); 0 runs the suite in this one process.
PYTEST_WORKERS ?= 2

.PHONY: run test install install-test system-deps bench clean clean-data

# Runs a shell command holding an exclusive lock on $(VENV).lock: two makes at once on a fresh clone (`make run` in
# two terminals, `make run` beside `make test`) made and filled one .venv together, one removing what the other was
# installing into. Each step looks again, under the lock, whether the other make has done it meanwhile.
LOCKED = $(PYTHON) -c 'import fcntl, os, sys; f = open(sys.argv[1], "a"); fcntl.flock(f, fcntl.LOCK_EX); \
  os.set_inheritable(f.fileno(), True); os.execvp("sh", ["sh", "-c", sys.argv[2]])' $(VENV).lock

# A venv left half-made (no venv module, no network for pip) is removed, so the next run starts over; another
# Python than 3.11 is refused before a venv is made (an existing .venv of another Python: make clean).
$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { \
	  echo "studyhall needs Python 3.11; $(PYTHON) is $$($(PYTHON) --version 2>&1). Install python3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	@$(LOCKED) '[ -x $(BIN)/python ] && [ -e $(VENV)/.made ] || { echo "making $(VENV)"; rm -rf $(VENV); \
	  $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install --quiet --upgrade pip && touch $(VENV)/.made || \
	  { rm -rf $(VENV); exit 1; }; }'

# Reinstall whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@$(LOCKED) '[ $@ -nt pyproject.toml ] || { echo "pip install -e ."; $(BIN)/pip install --quiet -e . && touch $@; }'

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	@$(LOCKED) '[ $@ -nt pyproject.toml ] || { echo "pip install -e .[test]"; \
	  $(BIN)/pip install --quiet -e ".[test]" && touch $@ $(VENV)/.installed; }'

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# System programs the tests use (espeak-ng synthesizes speech for the transcription test). Where it cannot be
# installed (no apt-get, no passwordless sudo) the suite still runs; the tests that need it fail saying so.
system-deps:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  echo "installing espeak-ng (test speech synthesis)"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq espeak-ng >/dev/null; } || \
	  echo "WARNING: could not install espeak-ng (needs apt-get and root or passwordless sudo); the speech tests will fail"; }

run: install
	$(BIN)/studyhall up

# pytest exits 5 when it collected no tests; that is a failure here, never a pass.
test: install-test system-deps
	@$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: install-test
	$(BIN)/python -m bench

# Only the venv: the data (embedded Postgres and Redis, uploads) goes with `make clean-data CONFIRM=yes`.
clean:
	rm -rf $(VENV)

clean-data:
	@[ "$(CONFIRM)" = "yes" ] || { echo "clean-data deletes $(CURDIR)/.studyhall: the embedded database (messages, grades, XP, payments), Redis and uploads. Stop studyhall, then run: make clean-data CONFIRM=yes"; exit 1; }
	rm -rf .studyhall
