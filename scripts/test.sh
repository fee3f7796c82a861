#!/usr/bin/env bash
# The README's test command: installs what is missing, then builds and runs
# the whole suite twice, normal build and AddressSanitizer+UBSan build.
# Slow end-to-end tests carry the ctest label "e2e"; they run too.
# Then the fuzzers run for FUZZ_SECONDS each (scripts/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build-test-guest.sh   # kernel + initramfs of the e2e test guest (tests/guest)
for preset in default asan; do
  echo "== build ($preset)"
  ./scripts/build.sh "$preset"
  echo "== test ($preset)"
  ctest --preset "$preset"
done
# libFuzzer targets (clang): built and run briefly on their seed corpus.
./scripts/fuzz.sh
