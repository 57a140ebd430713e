#!/bin/bash
# COCO 2017 for data/coco2017.data: images from the COCO website (cocodataset.org), YOLO-format labels and the
# train2017.txt / val2017.txt image lists from the public ultralytics release (converted from the COCO annotations).
# Usage, from the repository root:  bash data/get_coco2017.sh [DEST]      (DEST defaults to .., giving ../coco)
# Needs about 20 GB of free disk (19 GB of zips, deleted after unpacking each one), curl and unzip.
# Result: DEST/coco/{train2017.txt, val2017.txt, images/{train2017,val2017}, labels/{train2017,val2017}}
set -euo pipefail

dest=${1:-..}
mkdir -p "$dest"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/coco2017.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

fetch() {  # fetch URL and unzip it into DIR, then delete the zip
  local url=$1 dir=$2 zip
  zip="$tmp/$(basename "$url")"
  echo "Downloading $url ..."
  curl -fL --retry 3 -C - -o "$zip" "$url"
  unzip -q -o "$zip" -d "$dir"
  rm -f "$zip"
}

# labels (coco/labels/*, coco/train2017.txt, coco/val2017.txt with ./images/... entries, relative to coco/)
fetch https://github.com/ultralytics/yolov5/releases/download/v1.0/coco2017labels.zip "$dest"

# images (coco/images/train2017: 118,287 images, 18 GB; coco/images/val2017: 5,000 images, 1 GB)
mkdir -p "$dest/coco/images"
fetch http://images.cocodataset.org/zips/val2017.zip "$dest/coco/images"
fetch http://images.cocodataset.org/zips/train2017.zip "$dest/coco/images"
echo "COCO 2017 ready in $dest/coco"
