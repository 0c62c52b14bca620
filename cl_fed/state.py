"""The state a continual run carries between steps, at the server (or at a `local` site).

    base      the committed base: what merges have consolidated so far
    weights   the frozen weights the sites train on: the base plus this stage's folded residuals
              (exact aggregation, cl_fed/aggregation.py); equal to `base` after every Merge
    adapter   the factors the sites continue from (None: the next Train starts a fresh adapter)
    pool      chunks waiting to be merged (centralize-every = K stages): each chunk is one stage's
              (or round's) whole update, the dense ``delta`` of every adapted layer (merge=product,
              exact) or its aggregated ``factors`` (merge=factors, averaged factor-wise across chunks
              as FedIT does and the paper's centralize.py)

`evaluated()` is the model every evaluation scores and `model/` saves: the base, plus the pool's
average "as if merged now", plus a live adapter (fedavg-lora). Plain tensors, no peft, no Flower.

Every change to `weights` is made by replayable operations (cl_fed/updates.py), appended to `log`,
so the server can send sites exactly what it applied: a low-rank factorisation of the round's
residual, the merged adapter's s * B_bar and A_bar, or dense tensors where those are not smaller.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cl_fed.aggregation import fold, split
from cl_fed.centralize import base_key, factors_delta, lora_pairs, product_delta
from cl_fed.updates import apply_ops, fold_ops

MODES = ("product", "factors")


def adapter_update(adapter: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """{base weight key: s * B A} (float64) of one adapter."""
    return {base_key(p): product_delta([a], [b], [1.0], scale) for p, (a, b) in lora_pairs(adapter).items()}


@dataclass
class ContinualState:
    base: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    adapter: dict[str, torch.Tensor] | None = None
    pool: list[dict[str, torch.Tensor]] = field(default_factory=list)
    log: list[dict[str, tuple]] = field(default_factory=list)  # operations applied to `weights` (not saved)

    def _change_weights(self, ops: dict[str, tuple]) -> None:
        if ops:
            self.weights = apply_ops(self.weights, ops)
            self.log.append(ops)

    def _reset_weights_to_base(self) -> None:
        changed = {k: ("set", self.base[k]) for k, v in self.weights.items() if v is not self.base[k]}
        self._change_weights(changed)
        self.weights = dict(self.base)  # share the base's tensors again

    @classmethod
    def start(cls, base: dict[str, torch.Tensor]) -> ContinualState:
        return cls(base=dict(base), weights=dict(base))

    # ---- steps ------------------------------------------------------------------------------
    def apply(self, rule: str, aggregated: dict[str, torch.Tensor]) -> None:
        """An Aggregate step: fold the residuals, continue from the mean factors; or (rule
        "weights") the averaged full model becomes base and weights."""
        if rule == "weights":
            changed = {k: ("set", v) for k, v in aggregated.items() if not torch.equal(v, self.weights[k])}
            self._change_weights(changed)
            self.base = dict(self.weights)
            return
        factors, residual = split(aggregated)
        self._change_weights(fold_ops(self.weights, residual))
        self.adapter = {k: v.detach().to(torch.float32).clone() for k, v in factors.items()}  # as trained

    def merge(
        self, scale: float, mode: str, commit: bool, weight: float = 1.0, residual_to_base: bool = False
    ) -> None:
        """A Merge step: the current update becomes a chunk of the pool; `commit` merges the pool,
        at `weight` x its average (a merge gate's shrunk retry; 1 = as scheduled). With
        `residual_to_base` (fedex) the residuals folded into `weights` become the base first, bit for
        bit, and only the adapter's s * B A is pooled (and weighted)."""
        if mode not in MODES:
            raise ValueError(f"merge mode {mode!r}; choose one of {', '.join(MODES)}")
        if self.adapter is None:
            raise ValueError("merge: no adapter to merge (no round was aggregated since the last merge)")
        if not commit and weight != 1.0:
            raise ValueError("merge: only a committing merge takes a weight")
        if (
            commit and not self.pool and weight == 1.0
        ):  # the adapter into the weights it was trained on: rank r
            ops = {}
            for path, (a, b) in lora_pairs(self.adapter).items():
                weight = self.weights[base_key(path)]
                ops[base_key(path)] = (
                    "lowrank",
                    (scale * b.to(torch.float64)).to(weight.dtype),
                    a.to(weight.dtype),
                )
            self._change_weights(ops)
            self.base, self.adapter = dict(self.weights), None
            return
        if residual_to_base:
            self.base = dict(self.weights)  # update() is now the adapter's alone
        if mode == "product":
            chunk = {f"delta/{k}": v for k, v in self.update(scale).items()}
        else:
            chunk = {f"factors/{k}": v.clone() for k, v in self.adapter.items()}
        self.pool.append(chunk)
        if commit:
            update = self.pool_update(scale)
            self.base = fold(
                self.base, {k: v.mul_(weight) for k, v in update.items()} if weight != 1 else update
            )
            self.pool = []
        self._reset_weights_to_base()
        self.adapter = None

    def roll_back(self, base: dict[str, torch.Tensor]) -> None:
        """The base and weights become `base` (a merge history's earlier base), by operations the
        sites replay: for each changed weight the low-rank factors of the difference where they land
        on `base` bit for bit and are smaller, else the weight itself (cl_fed/updates.py)."""
        if self.adapter is not None or self.pool:
            raise ValueError("roll_back: an adapter or pool is pending; discard() it first")
        ops = {}
        for key, op in fold_ops(
            self.weights,
            {
                k: base[k].to(torch.float64) - v.to(torch.float64)
                for k, v in self.weights.items()
                if v.is_floating_point() and not torch.equal(v, base[k])
            },
        ).items():
            exact = op[0] == "lowrank" and torch.equal(
                apply_ops({key: self.weights[key]}, {key: op})[key], base[key]
            )
            ops[key] = op if exact else ("set", base[key])
        ops.update(
            {
                k: ("set", base[k])
                for k, v in self.weights.items()
                if not v.is_floating_point() and not torch.equal(v, base[k])
            }
        )
        self._change_weights(ops)
        self.base = dict(self.weights)

    def discard(self) -> None:
        """Drop what a committing merge would have merged (a merge gate's refusal): the pool and the
        current adapter; the sites train on the committed base again."""
        self.pool, self.adapter = [], None
        self._reset_weights_to_base()

    def copy(self) -> ContinualState:
        """An independent state (operations never modify tensors in place, so they are shared)."""
        adapter = dict(self.adapter) if self.adapter is not None else None
        return ContinualState(dict(self.base), dict(self.weights), adapter, [dict(c) for c in self.pool])

    def candidate(
        self, scale: float, mode: str, weight: float = 1.0, residual_to_base: bool = False
    ) -> dict[str, torch.Tensor]:
        """The base a committing merge at `weight` would make, this state left as it is."""
        trial = self.copy()
        trial.merge(scale, mode, commit=True, weight=weight, residual_to_base=residual_to_base)
        return trial.base

    # ---- derived ------------------------------------------------------------------------------
    def update(self, scale: float) -> dict[str, torch.Tensor]:
        """This stage's whole update so far, dense per adapted layer (float64): the residuals
        folded into `weights` plus s * B_bar A_bar of the current adapter."""
        out = adapter_update(self.adapter, scale) if self.adapter is not None else {}
        for key, tensor in self.weights.items():
            if tensor is not self.base[key] and tensor.is_floating_point():
                diff = tensor.to(torch.float64) - self.base[key].to(torch.float64)
                out[key] = out[key].add_(diff) if key in out else diff
        return out

    def pool_update(self, scale: float) -> dict[str, torch.Tensor]:
        """The pool's average as one dense update per adapted layer: the mean of the chunks' deltas
        (each chunk weighs 1/len(pool)), or s * mean(B) mean(A) over the chunks' factors."""
        if not self.pool:
            return {}
        if all(k.startswith("factors/") for chunk in self.pool for k in chunk):
            adapters = [{k[len("factors/") :]: v for k, v in chunk.items()} for chunk in self.pool]
            weights = [1.0 / len(adapters)] * len(adapters)
            out = {}
            for path in lora_pairs(adapters[0]):
                pairs = [lora_pairs(a)[path] for a in adapters]
                out[base_key(path)] = factors_delta(
                    [p[0] for p in pairs], [p[1] for p in pairs], weights, scale
                )
            return out
        out: dict[str, torch.Tensor] = {}
        for chunk in self.pool:
            for key, delta in chunk.items():
                name = key[len("delta/") :]
                out[name] = out[name].add_(delta) if name in out else delta.to(torch.float64).clone()
        return {k: v.div_(len(self.pool)) for k, v in out.items()}

    def evaluated(self, scale: float) -> dict[str, torch.Tensor]:
        """The model an evaluation scores (and `model/` saves)."""
        pending = self.pool_update(scale)
        for key, delta in self.update(scale).items():
            pending[key] = pending[key].add_(delta) if key in pending else delta
        return fold(self.base, pending) if pending else dict(self.base)

    # ---- persistence (safetensors: plain tensors, no pickle) -----------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"base/{k}": v for k, v in self.base.items()}
        out.update({f"weights/{k}": v for k, v in self.weights.items() if v is not self.base[k]})
        out.update({f"adapter/{k}": v for k, v in (self.adapter or {}).items()})
        for i, chunk in enumerate(self.pool):
            out.update({f"pool/{i}/{k}": v for k, v in chunk.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], has_adapter: bool) -> ContinualState:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        base = part("base/")
        weights = {**base, **part("weights/")}
        chunks = part("pool/")
        pool = [
            {k.split("/", 1)[1]: v for k, v in chunks.items() if k.split("/", 1)[0] == str(i)}
            for i in range(len({k.split("/", 1)[0] for k in chunks}))
        ]
        return cls(base=base, weights=weights, adapter=part("adapter/") if has_adapter else None, pool=pool)
