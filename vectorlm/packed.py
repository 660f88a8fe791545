"""The packed rows: the artifact pack writes and training reads, a ``datasets`` DatasetDict (train and eval splits)
beside its ``stats.json``. What both sides must agree on lives here, so that neither stage's code is part of the
other's digest (vectorlm/pipeline/fingerprint.py follows imports)."""

# The label of a position that carries no loss: a document's first token, prompts, padding (PyTorch's default
# ignore_index of cross-entropy, and transformers').
IGNORE_INDEX = -100
# The columns of a packed row: token ids, their next-token labels and positions that restart at 0 with each document.
COLUMNS = ("input_ids", "labels", "position_ids")
# The packing's statistics: counts, warnings, the content fingerprint a checkpoint is resumed against, "packing".
STATS_FILE = "stats.json"
