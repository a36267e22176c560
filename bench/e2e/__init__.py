"""A benchmark scenario (run its scripts directly; see each one's docstring)."""
