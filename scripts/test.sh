#!/usr/bin/env bash
# Install everything the tests need on a bare machine, then run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
python3 -m pip install --quiet --disable-pip-version-check ".[test]"
python3 -m pytest -q -p no:cacheprovider --timeout 900 tests
