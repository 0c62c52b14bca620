"""What `make demo` prints at the end, and progress output that stays readable in Flower's log stream."""

from __future__ import annotations

import re
import types

import torch

from cl_fed import progress
from cl_fed.data.utterance import Utterance
from cl_fed.train import TrainConfig, train_local
from simulations.demo import result_table

RESULTS = {  # the keys of a results.json that the table reads; WERs made up
    "stages": ["en-welding", "de-codeswitch"],
    "schedule": {"centralize_every": 1},
    "wer_matrix": [[41.3, 90.0], [45.0, 30.2]],
    "initial_wer": [86.0, 96.1],
    "other_test_sets": {
        "foundation": {"initial_wer": 8.0, "initial_cer": 2.0, "wer": [9.0, 12.5], "cer": [3.0, 4.0]}
    },
    "metrics": {"awer": 37.6, "bwt": -3.7},
}


def test_result_table_has_one_aligned_row_per_test_set():
    lines = result_table(RESULTS).splitlines()
    assert lines == [
        "WER (%); in brackets the change relative to the initial base",
        "test set                  initial base  after its stage          at the end",
        "en-welding                        86.0             41.3  (-52%)        45.0  (-48%)",
        "de-codeswitch                     96.1             30.2  (-69%)        30.2  (-69%)",
        "foundation (base domain)           8.0                -                12.5  (+56%)",
        "AWER 37.6, BWT -3.7 (negative = forgetting)",
    ]


def test_result_table_says_n_a_for_what_the_run_did_not_measure():
    incomplete = {
        **RESULTS,
        "wer_matrix": [[41.3, float("nan")]],
        "metrics": None,
        "other_test_sets": {"foundation": {"wer": [9.0, 12.5], "cer": [3.0, 4.0]}},  # no initial_wer
    }
    lines = result_table(incomplete).splitlines()
    assert re.fullmatch(r"de-codeswitch +96\.1 +n/a +n/a", lines[3])
    assert re.fullmatch(r"foundation \(base domain\) +n/a +- +12\.5", lines[4])
    assert lines[-1] == "AWER n/a, BWT n/a (negative = forgetting)"


class _Speech:
    """Just what train_local uses of a SpeechModel: a linear model fitting constant targets."""

    vocab = None
    device = torch.device("cpu")

    def __init__(self):
        self.model = torch.nn.Linear(2, 1)

    def collate(self, features, texts, augment=False, generator=None, languages=None):
        return torch.stack(features)

    def loss(self, batch):
        return ((self.model(batch) - 1.0) ** 2).mean()


class _Cache:
    """Features without audio files: train_local asks its cache for (features, seconds)."""

    def get(self, speech, utterance):
        return torch.ones(2), 1.0


def _train(label, epochs=2):
    utterances = [Utterance(id=f"u{i}", audio=f"u{i}.flac", text="a") for i in range(5)]
    config = TrainConfig(epochs=epochs, batch_size=2, spec_augment=False, progress=label)
    return train_local(_Speech(), utterances, config, cache=_Cache())


def test_training_in_a_log_prints_one_line_per_epoch(capsys):
    result = _train("[factory-a] stage 1 round 1")
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert out.out == "" and len(lines) == 2  # no bar redraws: 2 epochs of 3 steps, one line each
    pattern = r"\[factory-a\] stage 1 round 1: epoch {}/2, 3 steps, loss \d+\.\d{{3}}, \d+\.\d s"
    assert re.fullmatch(pattern.format(1), lines[0]) and re.fullmatch(pattern.format(2), lines[1])
    first = sum(result.step_losses[:3]) / 3
    assert f"loss {first:.3f}," in lines[0]  # the epoch's mean loss


def test_training_in_a_terminal_draws_a_bar_and_no_lines(capsys, monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: True)
    _train(True)
    err = capsys.readouterr().err
    assert "epoch" not in err and "train" in err  # tqdm's bar (captured here, drawn in a terminal)


def test_progress_off_prints_nothing(capsys):
    _train(False)
    assert capsys.readouterr() == ("", "")


def test_a_phase_in_a_log_is_one_line_when_it_ends(capsys):
    bar = progress.Progress(3, "synthesising", "utt")
    assert list(bar.track(iter("abc"))) == ["a", "b", "c"]
    bar.close()
    bar.line("[cl-fed] synthesised 3 utterances")
    assert capsys.readouterr().err == "[cl-fed] synthesised 3 utterances\n"


def test_interactive_follows_stderr(monkeypatch):
    monkeypatch.setattr("sys.stderr", types.SimpleNamespace(isatty=lambda: False))
    assert not progress.interactive()
    monkeypatch.setattr("sys.stderr", types.SimpleNamespace(isatty=lambda: True))
    assert progress.interactive()
