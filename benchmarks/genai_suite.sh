#!/usr/bin/env bash
# google-genai's own tests, once without and once with llmshim installed in every process (issue 16,
# item 5). Usage: benchmarks/genai_suite.sh [PYTHON-GENAI CHECKOUT] [VENV]
#
# The checkout is github.com/googleapis/python-genai (its tests live in google/genai/tests). Its
# replay tests need recordings that are not in the repository (Google keeps them elsewhere), so in
# --mode replay with an empty replay directory those fail for want of a file, identically in both
# runs; everything else (unit tests over mocked transports, types, converters, AFC, errors...) runs
# offline. The two runs' per-test outcomes (JUnit XML) are compared, not only the counts.
set -euo pipefail
CHECKOUT=${1:-/tmp/python-genai}
VENV=${2:-/tmp/genai-venv}
HERE=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/genai-suite}
mkdir -p "$OUT/replays" "$OUT/xdg"
if [ ! -x "$VENV/bin/python" ]; then
  python -m venv "$VENV"
  "$VENV/bin/pip" install -q -e "$CHECKOUT[aiohttp]" pytest pytest-asyncio pillow absl-py 'mcp>=1.14,<2' pyopenssl \
    httpx2 -e "$HERE"
fi
export GOOGLE_GENAI_REPLAYS_DIRECTORY="$OUT/replays" GOOGLE_API_KEY=dummy-api-key GOOGLE_CLOUD_PROJECT=project-id \
  GOOGLE_CLOUD_LOCATION=location GOOGLE_APPLICATION_CREDENTIALS="$CHECKOUT/google/genai/tests/credentials.json" \
  XDG_CACHE_HOME="$OUT/xdg"
ARGS=(google/genai/tests --mode replay -q -p no:cacheprovider --ignore=google/genai/tests/local_tokenizer)
cd "$CHECKOUT"
"$VENV/bin/python" -m pytest "${ARGS[@]}" --junitxml="$OUT/without.xml" > "$OUT/without.log" 2>&1 || true
"$VENV/bin/llmshim" run -- "$VENV/bin/python" -m pytest "${ARGS[@]}" --junitxml="$OUT/with.xml" \
  > "$OUT/with.log" 2>&1 || true
"$VENV/bin/python" - "$OUT/without.xml" "$OUT/with.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET


def outcomes(path):
    found = {}
    for case in ET.parse(path).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        found[case.get("classname") + "::" + case.get("name")] = kinds[0] if kinds else "passed"
    return found


without, with_shim = outcomes(sys.argv[1]), outcomes(sys.argv[2])
for name, runs in (("without llmshim", without), ("with llmshim", with_shim)):
    counts = {kind: sum(1 for v in runs.values() if v == kind) for kind in ("passed", "failure", "error", "skipped")}
    print(f"{name:16} {len(runs)} tests: {counts}")
differ = sorted(k for k in without.keys() | with_shim.keys() if without.get(k) != with_shim.get(k))
print(f"tests whose outcome differs: {len(differ)}")
for name in differ[:50]:
    print(f"  {name}: {without.get(name)} -> {with_shim.get(name)}")
PY
