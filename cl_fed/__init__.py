"""cl-fed core library: data, models, LoRA factorization, centralization and continual metrics.

Nothing in this package imports Flower; `clients/` and `server/` wrap it.
"""

__version__ = "0.1.0"
