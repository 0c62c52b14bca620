"""Hydra configs of simulations.sweep (a package so hydra finds them as pkg://simulations.conf)."""
