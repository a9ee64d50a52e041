"""Whole jobs built from the layers below: explain, evaluate, checkpoints."""
