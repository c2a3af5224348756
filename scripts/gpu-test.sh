#!/usr/bin/env bash
# GPU tests in two steps, for a GPU machine that has no Rust toolchain.
#
#   scripts/gpu-test.sh build   (here)  builds every test binary and the CLI in release mode and
#                                       stages stripped copies in .gpu/ (git-ignored; another folder
#                                       with SDLORA_GPU_STAGE=.gpu-x), ready to carry.
#   scripts/gpu-test.sh run     (there) runs each staged test binary with --include-ignored from the
#                                       repository root and prints one summary line.
#
# Extra arguments to `run` are passed to every test binary (e.g. a test-name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${SDLORA_GPU_STAGE:-.gpu}

case "${1:-}" in
  build)
    rm -rf "$STAGE" && mkdir -p "$STAGE/tests"
    export SDLORA_REQUIRE_NVCC=1
    cargo build --release
    # Stripped copies: a fraction of the size to carry (kernel names stay in the embedded PTX).
    stage() { strip -o "$2" "$1" 2>/dev/null || cp "$1" "$2"; }
    stage target/release/sdlora "$STAGE/sdlora"
    cargo test --release --no-run --message-format=json 2>/dev/null \
      | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] != ["bin"] and m["profile"]["test"]:
        print(m["target"]["name"] + " " + m["executable"])
 ' | while read -r name exe; do stage "$exe" "$STAGE/tests/$name"; done
    ls -la "$STAGE" "$STAGE/tests"
    ;;
  run)
    shift
    export SDLORA_CHECK_LAUNCHES=1 SDLORA_BIN="$PWD/$STAGE/sdlora"
    # The full-size CLIP/VAE checks need reference files (tests/fixtures/make_fixtures.py --full-size DIR).
    skip=(); [ -n "${SDLORA_SD15_REFERENCE:-}" ] || skip=(--skip model::sd15_tests)
    passed=0; failed=0; ignored=0; status=0
    for t in "$STAGE"/tests/*; do
      echo "=== $(basename "$t")"
      out=$("$t" --include-ignored --test-threads="${SDLORA_TEST_THREADS:-1}" "${skip[@]}" "$@" 2>&1) || status=1
      echo "$out" | grep -Ev '^test .* \.\.\. ok$' || true
      line=$(echo "$out" | grep -E '^test result:' | tail -n 1)
      p=$(echo "$line" | sed -nE 's/.* ([0-9]+) passed.*/\1/p'); f=$(echo "$line" | sed -nE 's/.* ([0-9]+) failed.*/\1/p')
      i=$(echo "$line" | sed -nE 's/.* ([0-9]+) ignored.*/\1/p')
      passed=$((passed + ${p:-0})); failed=$((failed + ${f:-0})); ignored=$((ignored + ${i:-0}))
    done
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    echo "gpu-test: $passed passed, $failed failed, $ignored ignored"
    exit $status
    ;;
  *)
    echo "usage: scripts/gpu-test.sh build | run [test filter]" >&2; exit 2 ;;
esac
