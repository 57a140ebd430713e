#!/usr/bin/env bash
# Build Darknet (CPU, as a shared library) and yolo_harness and net_harness against it.
#   bash tools/darknet_harness/build.sh DARKNET_CHECKOUT [OUT_BINARY]
# OUT_BINARY names yolo_harness (default DARKNET_CHECKOUT/yolo_harness); net_harness goes beside it.
# DARKNET_CHECKOUT: a clone of https://github.com/AlexeyAB/darknet (the fixture was made at the commit in README.md).
set -euo pipefail
dn=$(cd "${1:?usage: build.sh DARKNET_CHECKOUT [OUT_BINARY]}" && pwd)
out=${2:-$dn/yolo_harness}
here=$(cd "$(dirname "$0")" && pwd)
[ -f "$dn/src/yolo_layer.c" ] || { echo "build.sh: $dn: not a Darknet checkout (no src/yolo_layer.c)" >&2; exit 2; }
# Darknet's own Makefile and flags (-Ofast); only the switches are set: no CUDA, no OpenCV, no OpenMP
make -C "$dn" GPU=0 CUDNN=0 OPENCV=0 OPENMP=0 AVX=0 LIBSO=1 -j"$(nproc)" >/dev/null
# the harness uses Darknet's internal headers (src/), compiled with the same defines (no GPU, so the same layer struct)
gcc -O2 -std=gnu99 -Wall -I"$dn/include" -I"$dn/src" "$here/yolo_harness.c" -o "$out" \
    -L"$dn" -l:libdarknet.so -Wl,-rpath,"$dn" -lm -lpthread
gcc -O2 -std=gnu99 -Wall -I"$dn/include" -I"$dn/src" "$here/net_harness.c" -o "$(dirname "$out")/net_harness" \
    -L"$dn" -l:libdarknet.so -Wl,-rpath,"$dn" -lm -lpthread
echo "$out"
echo "$(dirname "$out")/net_harness"
