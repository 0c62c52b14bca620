"""Flower ClientApp: one SuperNode is one factory site."""
