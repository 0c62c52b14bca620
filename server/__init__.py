"""Flower ServerApp: the continual loop (stages x rounds) and the centralization strategies."""
