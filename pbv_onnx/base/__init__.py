"""Foundations every layer uses: the error model, atomic outputs, NetCDF reading."""
