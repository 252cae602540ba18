"""Does the encoder learn? Frozen-feature evaluation: features (features.py), kNN and the
linear probe on them (classify.py), and the kNN monitor of pretraining (monitor.py)."""
