"""What a site keeps between rounds: its private data stream, its copy of the base, its model.

Simulation workers are reused between rounds but not pinned to sites, and the Deployment Engine
starts a fresh process per message, so the in-process cache is only a shortcut: the base a site
holds is also kept on disk (atomically) under the site's own cache directory.

Which data a node trains on: the run config's `scenario`, unless the node config has `data` (a
Deployment-Engine SuperNode pointing at its own local data: an absolute manifest path, a scenario
YAML path or a packaged scenario name), which overrides it for that node only. The server still
evaluates on the test sets of the run config's scenario (server evaluation).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
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


def node_data(cfg: RunConfig, node_config: dict) -> RunConfig:
    """The run config with node config `data` (this SuperNode's own data), if any, as its scenario.

    A path must be absolute: the ClientApp runs from Flower's app directory, not the SuperNode's."""
    if "data" not in node_config:
        return cfg
    data = str(node_config["data"]).strip()
    if "/" in data or Path(data).suffix:
        path = Path(data).expanduser()
        if not path.is_absolute():
            raise ValueError(
                f"node-config data={data!r}: give an absolute path (the ClientApp does not run "
                "in the SuperNode's working directory)"
            )
        if not path.is_file():
            raise FileNotFoundError(f"node-config data={data!r}: no such file")
        data = str(path)
    return replace(cfg, scenario=data)


def site_name(node_config: dict, stream: StageStream) -> str:
    """`site` from the node config (deployment), else the partition id's site (simulation), else the
    data's only site (a SuperNode whose own data holds one site)."""
    if "site" in node_config:
        name = str(node_config["site"])
        if name not in stream.sites:
            raise ValueError(
                f"node-config site={name!r} is not in the data ({stream.source}); "
                f"sites: {', '.join(stream.sites)}"
            )
        return name
    if "partition-id" not in node_config:
        if len(stream.sites) == 1:
            return stream.sites[0]
        raise ValueError(
            f"node config needs 'site' (deployment) or 'partition-id' (simulation): "
            f"the data ({stream.source}) has {len(stream.sites)} sites: {', '.join(stream.sites)}"
        )
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
    cfg = node_data(cfg, node_config)
    try:
        _, stream = prepare_data(cfg, progress=False)
    except (OSError, ValueError) as error:
        if "data" not in node_config:
            raise
        raise ValueError(f"node-config data={node_config['data']!r}: {error}") from error
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
