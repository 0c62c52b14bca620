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

import hashlib
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cl_fed.adapters import adapter_shapes, attach_lora
from cl_fed.config import RunConfig
from cl_fed.continual import lora_spec, on_device, prepare_data, state_checksum, with_model_options
from cl_fed.data.stream import StageStream
from cl_fed.io import atomic_save_tensors, atomic_write_text, load_tensors, read_tensors_meta
from cl_fed.models.base import SpeechModel
from cl_fed.models.registry import build_model
from cl_fed.paths import cache_root
from cl_fed.schedule import LORA_STRATEGIES
from cl_fed.state import ContinualState

STATE_FILE = "state.safetensors"


class StaleBase(RuntimeError):
    """The site's weights are not the ones the server's message assumes. Its message says so in
    the words of cl_fed.protocol.STALE_BASE, by which the server tells this error from others (the
    error's class name does not reach it from a simulation's Ray workers) and sends the site every
    weight, in the same round."""


@dataclass
class Site:
    """One site's data and model, and its persisted ContinualState: for a site with a model of its
    own (`local`, fedsa: RunConfig.site_models) its own run (base, weights, adapter, pool); otherwise
    just the weights the server synced (base = weights)."""

    name: str
    cfg: RunConfig
    stream: StageStream
    speech: SpeechModel  # LoRA-wrapped for the LoRA strategies
    state_dir: Path
    state: ContinualState | None = None  # None until the server's first full sync
    checksum: str = ""  # of state.weights
    version: str = ""  # of the state file this object reflects
    position: int = 0  # the last server round whose Train step this state includes (0: none)
    pending: bool = False  # fedsa: that round's Aggregate and Merge steps wait for the shared A

    @property
    def lora(self) -> bool:
        return self.cfg.strategy in LORA_STRATEGIES

    @property
    def scale(self) -> float:
        return lora_spec(self.cfg, self.speech).scale if self.lora else 1.0

    def shapes(self) -> dict[str, tuple]:
        return adapter_shapes(self.speech.model) if self.lora else {}

    def set_state(self, state: ContinualState, position: int | None = None, pending: bool = False) -> None:
        """Replace and persist the state (atomically: a crash leaves the old state file whole)."""
        self.state, self.checksum, self.version = state, state_checksum(state.weights), uuid.uuid4().hex
        self.position = self.position if position is None else position
        self.pending = pending
        meta = {
            "checksum": self.checksum,
            "version": self.version,
            "has_adapter": state.adapter is not None,
            "position": self.position,
            "pending": pending,
        }
        atomic_save_tensors(self.state_dir / STATE_FILE, state.to_tensors(), meta)

    def reload_if_changed(self) -> None:
        """Another worker or process may have advanced this site since this object was cached."""
        path = self.state_dir / STATE_FILE
        if not path.is_file():
            self.state, self.checksum, self.version, self.position, self.pending = None, "", "", 0, False
            return
        if read_tensors_meta(path).get("version") == self.version:
            return
        tensors, meta = load_tensors(path)
        self.state = ContinualState.from_tensors(tensors, has_adapter=bool(meta.get("has_adapter")))
        self.checksum, self.version = str(meta["checksum"]), str(meta["version"])
        self.position = int(meta.get("position", 0))
        self.pending = bool(meta.get("pending", False))


_CACHE: dict[tuple, Site] = {}  # one built site per worker; its state is re-read when the file changed


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


def state_dir(run_dir: Path | str, site: str) -> Path:
    """Where a site keeps its state for the run that writes to `run_dir`: one folder per run
    directory, so that two runs of one config side by side (in other output directories: a sweep
    beside a benchmark, parallel test workers) never share or wipe each other's state, while a
    resumed run finds its own again."""
    run = Path(run_dir)
    tag = hashlib.sha256(str(run).encode()).hexdigest()[:8]
    return cache_root() / "sites" / f"{run.name}-{tag}" / site


def load_site(cfg: RunConfig, node_config: dict, run_dir: Path | str, run_id: int) -> Site:
    """The site for this node: its data and model (built once per worker), with the state it last
    persisted. What a site keeps on disk belongs to one run: a new run into the same directory
    starts clean, unless it resumes (`resume=true`)."""
    key = (str(run_dir), run_id, tuple(sorted((k, str(v)) for k, v in node_config.items())))
    if key in _CACHE:
        site = _CACHE[key]
        site.reload_if_changed()
        return site
    cfg = node_data(cfg, node_config)
    try:
        _, stream = prepare_data(cfg, progress=False)
    except (OSError, ValueError) as error:
        if "data" not in node_config:
            raise
        raise ValueError(f"node-config data={node_config['data']!r}: {error}") from error
    name = site_name(node_config, stream)
    # the architecture only: the weights come from the server (full sync) or from disk
    speech = with_model_options(cfg, build_model(cfg.model, allow_download=cfg.allow_download, seed=cfg.seed))
    if cfg.strategy in LORA_STRATEGIES:
        speech.model = attach_lora(speech.model, lora_spec(cfg, speech), seed=cfg.seed)
    on_device(cfg, speech, training=True)  # the GPU Ray assigned to this ClientApp, if any
    kept = state_dir(run_dir, name)
    owner = kept / "run-id"
    if not cfg.resume and owner.is_file() and owner.read_text().strip() != str(run_id):
        shutil.rmtree(kept, ignore_errors=True)
    kept.mkdir(parents=True, exist_ok=True)
    atomic_write_text(owner, str(run_id))
    site = Site(name, cfg, stream, speech, state_dir=kept)
    site.reload_if_changed()
    _CACHE.clear()  # one site per worker at a time: bounded memory
    _CACHE[key] = site
    return site


def evaluation_model(site: Site, weights: dict[str, torch.Tensor]) -> SpeechModel:
    """The site's model holding exactly `weights` (a LoRA model's adapter set to B = 0)."""
    from cl_fed.adapters import fresh_factors, load_adapter_state, load_base_state

    if site.lora:
        load_base_state(site.speech.model, weights)
        load_adapter_state(site.speech.model, fresh_factors(site.shapes(), 0))
    else:
        site.speech.model.load_state_dict(weights)
    return site.speech
