"""The method's numerics: similarity, ridge readouts, attribution, statistics."""
