"""The embedded demo: real photographs, synthetic body-selective channels with a known answer, validation."""
