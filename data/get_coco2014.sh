#!/bin/bash
# COCO 2014 for data/coco2014.data, the split Darknet and the original trained on: trainvalno5k (train2014 + val2014
# less 5,000 images) and 5k (those 5,000 val2014 images). Images from the COCO website (cocodataset.org); YOLO-format
# labels and the split lists from the Darknet site (pjreddie.com), as Darknet's scripts/get_coco_dataset.sh.
# Usage, from the repository root:  bash data/get_coco2014.sh [DEST]      (DEST defaults to .., giving ../coco)
# Needs about 20 GB of free disk, curl, unzip and tar.
# Result: DEST/coco/{trainvalno5k.txt, 5k.txt, images/{train2014,val2014}, labels/{train2014,val2014}, annotations}
set -euo pipefail

dest=${1:-..}
mkdir -p "$dest/coco/images"
cd "$dest/coco"

get() {  # download URL to the current folder, resuming a partial file
  echo "Downloading $1 ..."
  curl -fL --retry 3 -C - -O "$1"
}

# images (train2014: 82,783 images, 13 GB; val2014: 40,504 images, 6 GB)
for f in train2014 val2014; do
  get "http://images.cocodataset.org/zips/$f.zip"
  unzip -q -o "$f.zip" -d images
  rm -f "$f.zip"
done

# COCO annotations (annotations/instances_val2014.json, used by test.py --save-json for pycocotools scoring)
get http://images.cocodataset.org/annotations/annotations_trainval2014.zip
unzip -q -o annotations_trainval2014.zip
rm -f annotations_trainval2014.zip

# labels: labels/train2014/*.txt and labels/val2014/*.txt, one "class x y w h" row per box, normalised
get https://pjreddie.com/media/files/coco/labels.tgz
tar -xzf labels.tgz
rm -f labels.tgz

# split lists: entries like /images/val2014/x.jpg, made relative to this folder (./images/val2014/x.jpg)
for f in 5k trainvalno5k; do
  get "https://pjreddie.com/media/files/coco/$f.part"
  sed 's|^/|./|' "$f.part" > "$f.txt"
  rm -f "$f.part"
done
echo "COCO 2014 ready in $(pwd)"
