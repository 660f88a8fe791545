import numpy as np
import pytest
import torch

from vectorlm.data.loader import BatchShape, GlobalBatchSampler, collate, rank_slices
from vectorlm.packed import IGNORE_INDEX


def test_epochs_are_permutations_and_drop_the_tail():
    sampler = GlobalBatchSampler(10, global_batch_size=4, seed=0)
    epoch0 = np.concatenate([sampler.next_batch(), sampler.next_batch()])
    assert len(set(epoch0.tolist())) == 8
    assert sampler.next_batch().tolist() != epoch0[:4].tolist()  # epoch 1 is a new order
    assert sampler.state_dict() == {"epoch": 1, "offset": 4}


def test_order_is_each_epochs_seeded_permutation_across_epochs():
    """The per-epoch cache must not change the order resumable checkpoints were written with."""
    sampler = GlobalBatchSampler(30, global_batch_size=7, seed=4)
    drawn = [sampler.next_batch() for _ in range(12)]  # 4 steps per epoch, 3 epochs
    for epoch in range(3):
        expected = np.random.default_rng([4, epoch]).permutation(30)[:28]
        assert np.concatenate(drawn[4 * epoch : 4 * epoch + 4]).tolist() == expected.tolist()


def test_order_depends_on_seed_only():
    a, b, c = (GlobalBatchSampler(100, global_batch_size=8, seed=s) for s in (1, 1, 2))
    assert a.next_batch().tolist() == b.next_batch().tolist() != c.next_batch().tolist()


def test_resuming_from_state_continues_the_stream():
    full = GlobalBatchSampler(50, global_batch_size=8, seed=3)
    batches = [full.next_batch().tolist() for _ in range(9)]
    resumed = GlobalBatchSampler(50, global_batch_size=8, seed=3)
    for _ in range(4):
        resumed.next_batch()
    fresh = GlobalBatchSampler(50, global_batch_size=8, seed=3)
    fresh.load_state_dict(resumed.state_dict())
    assert [fresh.next_batch().tolist() for _ in range(5)] == batches[4:]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_split_the_global_batch_exactly(world_size):
    batch = np.arange(16)
    pieces = [rank_slices(batch, rank=r, world_size=world_size, micro_batch_size=2) for r in range(world_size)]
    assert all(len(p) == 8 // world_size for p in pieces)
    assert sorted(np.concatenate([np.concatenate(p) for p in pieces]).tolist()) == batch.tolist()


def test_too_few_rows_for_a_batch():
    with pytest.raises(ValueError, match=r"3 packed rows, fewer than train\.global_batch_size \(8\)"):
        GlobalBatchSampler(3, global_batch_size=8, seed=0)


ROWS = [
    {"input_ids": [5, 6, 7, 8], "labels": [-100, 6, -100, 8], "position_ids": [0, 1, 0, 1]},
    {"input_ids": [9, 10], "labels": [-100, 10], "position_ids": [0, 1]},
]


def test_padded_collate():
    batch = collate(ROWS, flatten=False)
    assert batch["input_ids"].shape == (2, 4) and batch["num_tokens"] == 6
    assert batch["labels"][1].tolist() == [-100, 10, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1]  # padding is its own isolated "document"


@pytest.mark.parametrize("flatten", [False, True])
def test_collate_counts_on_the_cpu_what_training_needs(flatten):
    batch = collate(ROWS, flatten=flatten)
    assert batch["num_tokens"] == 6
    assert batch["num_loss_tokens"] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == 3
    assert batch["sum_squared_lengths"] == 2**2 + 2**2 + 2**2  # three documents of 2 tokens; padding not counted


def test_flattened_collate_for_flash_attention():
    batch = collate(ROWS, flatten=True)
    assert batch["input_ids"].shape == (1, 6)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 0, 1]]
    assert batch["input_ids"].dtype == torch.long


@pytest.mark.parametrize("flatten", [False, True])
def test_every_batch_of_a_run_has_its_shape_and_padding_counts_nowhere(flatten):
    """A short batch (one row of two tokens) has the shape of a full one: ``rows`` rows of ``width`` tokens, or as
    many flattened, the padding one more document with no loss; the counts are the rows' own."""
    shape = BatchShape(rows=3, width=5)
    for rows in (ROWS, ROWS[1:]):
        batch, alone = collate(rows, flatten=flatten, shape=shape), collate(rows, flatten=flatten)
        assert batch["input_ids"].shape == ((1, 15) if flatten else (3, 5))
        assert {k: batch[k] for k in ("num_tokens", "num_loss_tokens", "sum_squared_lengths")} == {
            k: alone[k] for k in ("num_tokens", "num_loss_tokens", "sum_squared_lengths")
        }
        assert int((batch["labels"] != IGNORE_INDEX).sum()) == int((alone["labels"] != IGNORE_INDEX).sum())
    if flatten:  # the padding: documents of their own, none longer than flash-attn's bound, the row width
        assert batch["cu_seq_lens"].tolist() == [0, 2, 7, 12, 15] and batch["max_length"] == 5
        assert batch["position_ids"][0].tolist() == [0, 1, *range(5), *range(5), *range(3)]
    else:
        assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]


def test_a_row_longer_than_the_runs_batch_shape_is_an_error():
    with pytest.raises(ValueError, match=r"1 rows of up to 4 tokens does not fit the run's batch shape \(1 rows of 3"):
        collate(ROWS[:1], flatten=False, shape=BatchShape(rows=1, width=3))


def test_unpacked_rows_are_grouped_by_length_within_a_global_batch():
    lengths = np.random.default_rng(0).integers(1, 500, size=64)
    sampler = GlobalBatchSampler(64, global_batch_size=16, seed=0, lengths=lengths)
    plain = GlobalBatchSampler(64, global_batch_size=16, seed=0)
    for _ in range(4):
        batch, same_rows = sampler.next_batch(), plain.next_batch()
        assert sorted(batch.tolist()) == sorted(same_rows.tolist())  # the same rows, in another order
        assert (np.diff(lengths[batch]) <= 0).all()
    micro = [lengths[m] for m in rank_slices(batch, rank=0, world_size=2, micro_batch_size=2)]
    assert micro[0].min() >= micro[-1].max()  # each micro-batch pads to rows of similar length
