"""The scale of the EWC penalty on a scenario, from training data only: how `ewc-lambda` was chosen.

    python -m benchmarks.ewc_scale runs/quality/default/<a centralization run of the default scenario>

Takes the run's first merged update (its merge history's step 1: the stage-1 update delta of every
adapted layer), estimates the diagonal Fisher of base + delta on `ewc-samples` utterances of the first
site's stage-1 training rows (as a site does at the stage's end), and prints sum F delta^2: the
penalty, per unit of lambda/2, of an update as large as stage 1's in the directions stage 1 used. The
default `ewc-lambda` makes that penalty about half the data loss a new stage starts at (about 1.2
on the default scenario's stage 2, first epoch, in the quality runs' logs). No test set is read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cl_fed.clmethods import ewc
from cl_fed.config import make_config
from cl_fed.continual import prepare_data, starting_model
from cl_fed.io import load_tensors
from cl_fed.train import FEATURE_CACHE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ewc_scale", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run", help="a finished centralization run directory (with history/step-001)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    step = Path(args.run) / "history" / "step-001.safetensors"
    if not step.is_file():
        parser.exit(2, f"{parser.prog}: error: {step} not found: give a finished run with a merge history\n")
    cfg = make_config({})
    scenario, stream = prepare_data(cfg, progress=False)
    speech = starting_model(cfg, scenario, progress=False)
    tensors, _ = load_tensors(step)
    delta = {k[len("delta/") :]: v for k, v in tensors.items() if k.startswith("delta/")}
    state = speech.model.state_dict()
    speech.model.load_state_dict(
        {k: (v.double() + delta[k]).to(v.dtype) if k in delta else v for k, v in state.items()}
    )
    sample = ewc.fisher_sample(stream.site(stream.sites[0]).enter(0), cfg.ewc_samples, cfg.seed)
    named = dict(speech.model.named_parameters())

    def loss_of(u):
        features, _ = FEATURE_CACHE.get(speech, u)
        return speech.loss(speech.collate([features], [u.text], augment=False, languages=[u.language]))

    fisher = ewc.diagonal_fisher(speech.model, {k: named[k] for k in delta}, loss_of, sample)
    scale = sum(float((fisher[k] * delta[k].float() ** 2).sum()) for k in delta)
    print(f"adapted weights: {len(delta)}, utterances: {len(sample)} of {stream.sites[0]}, stage 1")
    print(f"mean Fisher: {sum(float(f.mean()) for f in fisher.values()) / len(fisher):.3g}")
    print(f"sum F delta^2 of the stage-1 update: {scale:.4g}")
    print(f"penalty of such an update at ewc-lambda={cfg.ewc_lambda:g}: {cfg.ewc_lambda / 2 * scale:.3g}")


if __name__ == "__main__":
    main()
