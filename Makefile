# Two commands: `make run` sets up and starts the console, `make test` sets up and runs every check.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint messages setup clean-venv browser directory network node bundle

# python-ldap (directory sign-in) is built from source against OpenLDAP's client library.
LDAP_HEADERS := /usr/include/ldap.h /usr/include/sasl/sasl.h
$(STAMP): requirements.txt
	@for header in $(LDAP_HEADERS); do test -e $$header || { apt-get update && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y libldap2-dev libsasl2-dev; break; }; done
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

setup: $(STAMP)
	@if command -v msgfmt >/dev/null; then $(PY) manage.py compilemessages --ignore=.venv -v0; fi

run: setup
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput -v0
	$(PY) manage.py ensure_admin
	$(PY) manage.py ensure_redis
	@echo "Console: http://$${CONSOLE_HOST:-127.0.0.1}:$${CONSOLE_PORT:-8000}/  (Ctrl-C stops web, worker, beat and relay)"
	exec $(VENV)/bin/honcho -f Procfile start

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) manage.py check --fail-level WARNING
	$(PY) manage.py makemigrations --check --dry-run

# The browser tests drive Debian's Chromium (never one downloaded by `playwright install`); the font
# draws the Chinese pages in their screenshots.
CJK_FONT := /usr/share/fonts/truetype/wqy/wqy-microhei.ttc
browser:
	@test -x /usr/bin/chromium -a -e $(CJK_FONT) || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium fonts-wqy-microhei)

# Another box joins a console: `make node CONSOLE=https://console TOKEN=join_… NODE_NAME=box2 NODE_ADDRESS=10.0.0.2`
# (the token from the console's Nodes page) joins once and writes var/node.env; later `make node` starts
# this box's worker and its engine relay (Procfile.node) with those settings.
node: setup
	@if [ -n "$(TOKEN)" ]; then $(PY) manage.py join --console "$(CONSOLE)" --token "$(TOKEN)"; fi
	@test -f var/node.env || (echo "var/node.env is missing: run make node CONSOLE=… TOKEN=… first"; exit 1)
	set -a; . var/node.env; set +a; $(PY) manage.py migrate --check >/dev/null && \
		exec $(VENV)/bin/honcho -f Procfile.node start

# One archive to install a box with no registry (ops/bundle.py; BUNDLE_ENGINES=vllm-cpu,vllm or "" for none):
# var/bundle/appliance-<version>.tar; on the box: tar -xf it, then sh appliance-<version>/install.sh /opt/appliance
bundle: setup
	$(PY) ops/bundle.py

# The directory sign-in tests start their own OpenLDAP server (Debian's slapd).
directory:
	@test -x /usr/sbin/slapd -a -x /usr/bin/ldapadd || (apt-get update && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y slapd ldap-utils)

# The several-boxes tests make network namespaces (iproute2) and forward the database and Redis onto
# their bridge (socat).
network:
	@test -x /usr/bin/socat -a -x /bin/ip || (apt-get update && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y socat iproute2)

test: lint browser directory network
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Regenerate the translation catalogs after changing strings (then translate and commit them).
messages: setup
	$(PY) manage.py makemessages -l zh_Hans --ignore=.venv --ignore=var --ignore=tests -v0
	$(PY) manage.py compilemessages --ignore=.venv -v0
