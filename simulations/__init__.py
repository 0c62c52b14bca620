"""Experiments on top of the Flower apps: the demo, sweeps and reports."""
