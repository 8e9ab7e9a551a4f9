# Thin wrapper: every target bootstraps .venv from uv.lock through scripts/dev.sh.
.PHONY: install repro test test-cpu-paths lint bench
install: ; bash scripts/dev.sh install
repro: ; bash scripts/dev.sh repro
test: ; bash scripts/dev.sh test
test-cpu-paths: ; bash scripts/dev.sh cpu-paths
lint: ; bash scripts/dev.sh lint
bench: ; bash scripts/dev.sh bench
