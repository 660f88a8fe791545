import datasets
import numpy as np

from vectorlm.data.loader import GlobalBatchSampler, fetch, rank_slices
from vectorlm.data.prefetch import Prefetcher


def test_prefetched_batches_and_positions_are_those_of_the_step_trained(packed_dir):
    rows = datasets.load_from_disk(str(packed_dir))["train"]
    reference = GlobalBatchSampler(len(rows), global_batch_size=8, seed=1)
    sampler = GlobalBatchSampler(len(rows), global_batch_size=8, seed=1)
    steps_per_epoch = sampler.steps_per_epoch
    sampler.load_state_dict({"epoch": 0, "offset": 8 * (steps_per_epoch - 2)})  # resumed two steps before an epoch ends
    reference.load_state_dict(sampler.state_dict())
    prefetcher = Prefetcher(rows, sampler, rank=1, world_size=2, micro_batch_size=2, flatten=False, pin_memory=False)
    try:
        for _ in range(4):
            batches, position = prefetcher.next()
            indices = rank_slices(reference.next_batch(), rank=1, world_size=2, micro_batch_size=2)
            expected = [fetch(rows, i, flatten=False) for i in indices]
            assert position == reference.position  # what a checkpoint after this step must record
            assert len(batches) == len(expected) == 2
            for got, want in zip(batches, expected, strict=True):
                assert np.array_equal(got["input_ids"], want["input_ids"]) and got["num_tokens"] == want["num_tokens"]
        assert sampler.position != reference.position  # the sampler itself is a step ahead
    finally:
        prefetcher.close()
