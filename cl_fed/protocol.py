"""Every message key between the ServerApp and the sites, and what each field means.

Imported by clients/ and server/; no module spells a key as a bare string. A site sends only what
it must: its update (LoRA factors, or all weights for fedavg), counts and losses, its name and the
checksum of the weights it holds. Never audio, features or transcripts.

TRAIN message, server -> site
    record CONFIG (ConfigRecord)
        STAGE, ROUND, SERVER_ROUND      where the run is (0-based stage and round; 1-based server round)
        SEED                            the round's seed (cl_fed.plan.Train.seed)
        START                           "fresh" (draw the adapter from SEED) | "continue" (from ADAPTER,
                                        or a `local` site's own) | "full" (fine-tune all weights)
        SPAN_INDEX, SPAN_ROUNDS         the round's place in its LR schedule span (lr-span)
        WEIGHTS_CHECKSUM                the weights the site must train on (cl_fed.continual.state_checksum)
        SYNC                            how to get there: SYNC_NONE (it holds them) | SYNC_CHANGED (record
                                        WEIGHTS holds the operations the server applied since SYNC_FROM,
                                        cl_fed.updates.to_tensors: low-rank factors of aggregates or dense
                                        tensors) | SYNC_FULL (record WEIGHTS holds every tensor)
        SYNC_FROM                       the checksum SYNC_CHANGED applies to
        NONCE                           a random token per message, echoed in the reply's SITE record:
                                        a reply from an earlier round (a replay) does not carry it
        (and Flower's clipping-norm key when dp-noise > 0; see clients.client_app.clip_adapter_update)
        PROXIMAL_MU                     FedProx's mu (proximal-mu > 0; written by Flower's FedProx): the
                                        site adds (mu/2) ||w - w_start||^2 to its training loss
    record WEIGHTS (ArrayRecord)        tensors of the weights, as SYNC says (absent for SYNC_NONE)
    record ADAPTER (ArrayRecord)        the adapter to continue from (START = "continue"; with DP always);
                                        lora-aggregation=fedsa: the mean A of server round ADAPTER_ROUND,
                                        in every message after the first round (the site pairs it with
                                        its own B, then merges on its own)
    CONFIG's ADAPTER_ROUND              fedsa: the server round whose sites' A the ADAPTER averages
    record FISHER (ArrayRecord)         cl-method=ewc, from the second stage on: the run's running diagonal
                                        Fisher {weight key: F} (cl_fed.clmethods.Carried)
    record SUBSPACES (ArrayRecord)      cl-method=olora, once a merge was committed: {adapted module path:
                                        orthonormal basis rows of the input directions merged so far}

TRAIN reply, site -> server
    record ARRAYS (ArrayRecord)         the trained LoRA factors (fp32), or all weights (fedavg);
                                        empty for `local` (its site keeps them)
    record METRICS (MetricRecord)       NUM_EXAMPLES, TRAIN_LOSS, AUDIO_SECONDS, TRAIN_SECONDS, LR_MEAN,
                                        ROWS_SKIPPED (manifest rows the site's data left out, bad-rows=skip)
    record SITE (ConfigRecord)          SITE_NAME (from the SuperNode's node config), WEIGHTS_CHECKSUM
                                        (of the weights it now holds), NONCE (the message's)
    record FISHER (ArrayRecord)         cl-method=ewc, a stage's last round: the site's diagonal Fisher of
                                        the model it ended the stage with (a statistic: no audio, no text)

EVALUATE message, server -> site: CONFIG with TEST_SETS, STAGE and the sync fields; WEIGHTS as in
TRAIN; EVALUATED (ArrayRecord): the tensors in which the evaluated model differs from the weights
(the pool's pending average, a live adapter). A site with a model of its own (`local`, fedsa)
evaluates that instead; a fedsa message carries the ADAPTER as in TRAIN.
EVALUATE reply: METRICS with "<test set>:" + WORD_ERRORS / WORDS / CHAR_ERRORS / CHARS, NUM_EXAMPLES;
SITE with SITE_NAME (the per-site WER in results.json "sites").

A TRAIN reply that is an error whose reason contains STALE_BASE (the site lacks the weights the
message assumes: its state was lost, or the run resumed from a copied or moved directory) gets the
same message again within the round, with SYNC_FULL.
"""

# records
CONFIG = "config"
WEIGHTS = "weights"
ADAPTER = "adapter"
EVALUATED = "evaluated"
ARRAYS = "arrays"  # Flower's FedAvg reads a reply's arrays under this key (arrayrecord_key)
METRICS = "metrics"
SITE = "site"
FISHER = "fisher"  # cl-method=ewc (cl_fed/clmethods/ewc.py)
SUBSPACES = "subspaces"  # cl-method=olora (cl_fed/clmethods/olora.py)

# train config fields
STAGE = "stage"
ROUND = "round"
SERVER_ROUND = "server-round"
SEED = "seed"
START = "start"
SPAN_INDEX = "span-index"
SPAN_ROUNDS = "span-rounds"
WEIGHTS_CHECKSUM = "weights-checksum"
SYNC = "sync"
SYNC_FROM = "sync-from"
SYNC_NONE, SYNC_CHANGED, SYNC_FULL = "none", "changed", "full"
NONCE = "nonce"
ADAPTER_ROUND = "adapter-round"
PROXIMAL_MU = "proximal-mu"  # the key flwr.serverapp.strategy.FedProx.configure_train writes (no constant)
TEST_SETS = "test-sets"

# metrics
NUM_EXAMPLES = "num-examples"  # Flower's FedAvg weights replies by this key (weighted_by_key)
TRAIN_LOSS = "train-loss"
AUDIO_SECONDS = "audio-seconds"
TRAIN_SECONDS = "train-seconds"
LR_MEAN = "lr-mean"
ROWS_SKIPPED = "rows-skipped"
WORD_ERRORS, WORDS, CHAR_ERRORS, CHARS = "word-errors", "words", "char-errors", "chars"

# site record
SITE_NAME = "site"

# errors
STALE_BASE = "lacks the weights the message assumes"  # in clients.site.StaleBase's message


def train_config(step) -> dict:
    """CONFIG fields of a cl_fed.plan.Train step."""
    return {
        STAGE: step.stage,
        ROUND: step.round,
        SERVER_ROUND: step.server_round,
        SEED: step.seed,
        START: step.start,
        SPAN_INDEX: step.span_index,
        SPAN_ROUNDS: step.span_rounds,
    }


def train_step(config) -> "object":
    """The cl_fed.plan.Train step a CONFIG record describes."""
    from cl_fed.plan import Train

    return Train(
        stage=int(config[STAGE]),
        round=int(config[ROUND]),
        server_round=int(config[SERVER_ROUND]),
        seed=int(config[SEED]),
        start=str(config[START]),
        span_index=int(config[SPAN_INDEX]),
        span_rounds=int(config[SPAN_ROUNDS]),
    )
