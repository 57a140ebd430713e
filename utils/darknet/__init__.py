"""Darknet: cfg parsing, layers, .weights I/O and downloads, input sizes, detector post-processing, JPEG decode."""
