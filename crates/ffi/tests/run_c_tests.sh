#!/usr/bin/env bash
# Builds libkvroute and runs the C tests three ways: plain, under valgrind (no leaks, no
# invalid accesses), and with AddressSanitizer + UndefinedBehaviorSanitizer. Then builds
# examples/c with CMake and runs it. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../../.."
ROOT=$PWD
FFI=$ROOT/crates/ffi
OUT=$ROOT/target/c-tests
VECTORS=$ROOT/testdata/vllm/kv_events.json
mkdir -p "$OUT"

if ! command -v valgrind >/dev/null; then
  apt-get update && apt-get install -y valgrind
fi
for tool in cc python3 cmake; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required" >&2; exit 1; }
done

bash "$ROOT/scripts/release-build.sh" kvroute-ffi
LIB=$ROOT/target/release/libkvroute.a
# The system libraries a Rust staticlib needs (rustc --print native-static-libs).
SYSLIBS="-lpthread -lm -ldl -lrt -lutil"
CFLAGS="-std=c11 -Wall -Wextra -Werror -pedantic -g -I$FFI/include"

python3 "$FFI/tests/extract_vectors.py" "$VECTORS" "$OUT/vectors.txt"

# The header compiles on its own, also as C++.
echo '#include "kvroute.h"' > "$OUT/header_only.c"
cc $CFLAGS -c "$OUT/header_only.c" -o "$OUT/header_only.o"
if command -v c++ >/dev/null; then
  c++ -std=c++17 -Wall -Wextra -Werror -I"$FFI/include" -x c++ -c "$OUT/header_only.c" \
    -o "$OUT/header_only_cpp.o"
fi

status=0
for src in "$FFI"/tests/*.c; do
  name=$(basename "$src" .c)
  echo "--- $name (plain)"
  cc $CFLAGS -O1 "$src" "$LIB" $SYSLIBS -o "$OUT/$name"
  "$OUT/$name" "$OUT/vectors.txt" || status=1

  echo "--- $name (valgrind)"
  valgrind --quiet --leak-check=full --show-leak-kinds=definite,indirect,possible \
    --errors-for-leak-kinds=definite,indirect,possible --error-exitcode=1 \
    "$OUT/$name" "$OUT/vectors.txt" || status=1

  echo "--- $name (AddressSanitizer + UndefinedBehaviorSanitizer)"
  cc $CFLAGS -O1 -fsanitize=address,undefined -fno-omit-frame-pointer \
    -fno-sanitize-recover=undefined "$src" "$LIB" $SYSLIBS -o "$OUT/$name.asan"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
    "$OUT/$name.asan" "$OUT/vectors.txt" || status=1
done

echo "--- examples/c (CMake)"
cmake -S "$ROOT/examples/c" -B "$OUT/example-build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$OUT/example-build" >/dev/null
"$OUT/example-build/kvroute_example" || status=1

if [ "$status" -ne 0 ]; then
  echo "C tests FAILED" >&2
fi
exit "$status"
