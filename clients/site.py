"""What a site keeps between rounds: its private data stream, its copy of the base, its model.

Simulation workers are reused between rounds but not pinned to sites, and the Deployment Engine
starts a fresh process per message, so the in-process cache is only a shortcut: the base a site
holds is also kept on disk (atomically) under the site's own cache directory.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from cl_fed.adapters import attach_lora, base_state, load_base_state
from cl_fed.centralize import centralize
from cl_fed.config import RunConfig
from cl_fed.continual import lora_spec, prepare_data, state_checksum
from cl_fed.data.stream import StageStream
from cl_fed.io import atomic_torch_save, atomic_write_text
from cl_fed.models.base import SpeechModel
from cl_fed.models.registry import build_model
from cl_fed.paths import cache_root
from cl_fed.schedule import LORA_STRATEGIES


class StaleBase(RuntimeError):
    """The site's base is not the one the server's message assumes."""


@dataclass
class Site:
    name: str
    cfg: RunConfig
    stream: StageStream
    speech: SpeechModel  # LoRA-wrapped for the LoRA strategies
    checksum: str  # of the base the site holds
    state_dir: Path
    pool_state: dict | None = None  # `local` strategy: adapters waiting for the site's own merge

    @property
    def lora(self) -> bool:
        return self.cfg.strategy in LORA_STRATEGIES

    def base(self) -> dict[str, torch.Tensor]:
        return base_state(self.speech.model) if self.lora else dict(self.speech.model.state_dict())

    def set_base(self, state: dict[str, torch.Tensor], persist: bool = True) -> None:
        """Load base weights; `persist=False` for a temporary evaluation state (not recorded)."""
        if self.lora:
            load_base_state(self.speech.model, state)
        else:
            self.speech.model.load_state_dict(state)
        if persist:
            self.checksum = state_checksum(self.base())
            atomic_torch_save(self.state_dir / "base.pt", {"checksum": self.checksum, "state": self.base()})

    def apply_merge(self, adapters, weights, scale: float, mode: str) -> None:
        """The server's merge instruction, computed with the very same function the server used."""
        self.set_base(centralize(self.base(), adapters, weights, scale, mode))


_SITES: dict[tuple, Site] = {}


def site_name(node_config: dict, stream: StageStream) -> str:
    """`site` from the node config (deployment), else the partition id's site (simulation)."""
    if "site" in node_config:
        name = str(node_config["site"])
        if name not in stream.sites:
            raise ValueError(f"node-config site={name!r} is not in the data; sites: {', '.join(stream.sites)}")
        return name
    if "partition-id" not in node_config:
        raise ValueError("node config needs 'site' (deployment) or 'partition-id' (simulation)")
    index = int(node_config["partition-id"])
    if not 0 <= index < len(stream.sites):
        raise ValueError(f"partition-id={index} but the data has {len(stream.sites)} sites")
    return stream.sites[index]


def load_site(cfg: RunConfig, node_config: dict, run_key: str, run_id: int) -> Site:
    """The site for this node, from the worker's cache, else rebuilt (base from disk if kept).

    What a site keeps on disk belongs to one run: a new run under the same name starts clean,
    unless it resumes (`resume=true`)."""
    key = (run_key, run_id, tuple(sorted((k, str(v)) for k, v in node_config.items())))
    if key in _SITES:
        return _SITES[key]
    _, stream = prepare_data(cfg, progress=False)
    name = site_name(node_config, stream)
    # the architecture only: the weights come from the server (full base) or from disk
    speech = build_model(cfg.model, allow_download=cfg.allow_download, seed=cfg.seed)
    if cfg.strategy in LORA_STRATEGIES:
        speech.model = attach_lora(speech.model, lora_spec(cfg, speech), seed=cfg.seed)
    state_dir = cache_root() / "sites" / run_key / name
    owner = state_dir / "run-id"
    if not cfg.resume and owner.is_file() and owner.read_text().strip() != str(run_id):
        shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(owner, str(run_id))
    site = Site(name, cfg, stream, speech, checksum="", state_dir=state_dir)
    saved = state_dir / "base.pt"
    if saved.is_file():
        kept = torch.load(saved, weights_only=True)
        site.set_base(kept["state"])
    if (state_dir / "pool.pt").is_file():  # `local` strategy: the site's own adapter pool
        site.pool_state = torch.load(state_dir / "pool.pt", weights_only=False)
    _SITES.clear()  # one site per worker at a time: bounded memory
    _SITES[key] = site
    return site
