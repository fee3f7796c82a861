#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, -DVMREPLICA_FUZZ=ON) and runs each
# for a short time (FUZZ_SECONDS, default 20) from its seed corpus in
# fuzz/corpus/<target>/ when there is one. Any crash fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-20}
root=$PWD
targets=$(sed -n 's/^vmreplica_fuzzer(\([a-z0-9_]*\).*/\1/p' fuzz/*.cmake 2>/dev/null | sort -u)
if [[ -z "$targets" ]]; then
  echo "== fuzz: no fuzz targets"
  exit 0
fi
CC=clang CXX=clang++ cmake -S . -B build/fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DVMREPLICA_FUZZ=ON -DVMREPLICA_WERROR=OFF >/dev/null
# shellcheck disable=SC2086
cmake --build build/fuzz --target $targets -- -j"$(nproc)"
for t in $targets; do
  work=$(mktemp -d)
  [[ -d "fuzz/corpus/$t" ]] && cp -r "fuzz/corpus/$t/." "$work/"
  echo "== fuzz: $t for ${seconds}s"
  (cd "$work" && "$root/build/fuzz/fuzz/$t" -max_total_time="$seconds" -print_final_stats=1 "$work" 2>&1 | tail -n 12)
  rm -rf "$work"
done
echo "== fuzz: no crash"
