"""Experiments over many runs: declora reproduce, its report pages, declora compare."""
