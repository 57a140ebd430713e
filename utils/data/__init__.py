"""Data: datasets and loaders, augmentation, samplers, detect.py sources, label conversion, COCO JSON, data configs."""
