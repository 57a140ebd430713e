"""Training: the epoch engine, losses (the original's and Darknet's), resume, transfer, anchors, evolve, DDP."""
