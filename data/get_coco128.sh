#!/bin/bash
# COCO128: the first 128 images of COCO train2017 with YOLO labels, from the public ultralytics release (7 MB).
# Usage, from the repository root:  bash data/get_coco128.sh [DEST]      (DEST defaults to .., giving ../coco128)
# Result: DEST/coco128/images/train2017/*.jpg and DEST/coco128/labels/train2017/*.txt, as data/coco128.data expects.
set -euo pipefail

url=https://github.com/ultralytics/yolov5/releases/download/v1.0/coco128.zip
dest=${1:-..}
mkdir -p "$dest"
zip=$(mktemp "${TMPDIR:-/tmp}/coco128.XXXXXX.zip")
trap 'rm -f "$zip"' EXIT

echo "Downloading $url ..."
curl -fL --retry 3 -o "$zip" "$url"
unzip -q -o "$zip" -d "$dest"
echo "COCO128 ready in $dest/coco128"
