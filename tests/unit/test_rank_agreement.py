"""Several processes keep the promises of one (issue 23, item 3), without starting any: a Stop given at a save-time
event is shared before the next step, and rank 0's own held-out caching sees one process in accelerate's states."""

import types

import pytest
import torch

from spyke_lora._engine._probe import Probe, StopRun
from spyke_lora._engine._ranks import RankSync, alone_on_this_rank


class CountingRanks(RankSync):
    """A RankSync whose collective is local: each agree() is counted, and the sum is this rank's own answer."""

    def __init__(self) -> None:
        super().__init__(world_size=2, rank=0)
        self.agreements = 0

    def _sum(self, values):
        self.agreements += 1
        return list(values)


def _probe(ranks):
    probe = Probe(lambda event: None, ranks.stop_requested, 0.0, lambda: None, ranks=ranks)
    probe.total_steps, probe.started = 10, True
    return probe


def _step(probe, step, micro_batches=1):
    accelerator = types.SimpleNamespace(_optimizers=[])
    for _ in range(micro_batches):
        probe.before_micro_batch(accelerator)
        probe.after_micro_batch(torch.tensor(0.5))
    probe.step_ends(step)


def test_a_stop_given_at_a_save_time_event_ends_the_run_before_the_next_step():
    ranks = CountingRanks()
    probe = _probe(ranks)
    _step(probe, 1)
    _step(probe, 2)
    # sd-scripts saves after step 2's agreement; rank 0 delivers CheckpointSaved and the caller answers Stop
    ranks.answer(stop=True, abort=False)
    with pytest.raises(StopRun):
        probe.before_micro_batch(types.SimpleNamespace(_optimizers=[]))  # step 3 never starts: the final file is 2
    assert probe.steps_done == 2


def test_ranks_agree_once_at_each_step_start_and_once_at_its_end_whatever_the_accumulation():
    ranks = CountingRanks()
    probe = _probe(ranks)
    _step(probe, 1, micro_batches=3)
    _step(probe, 2, micro_batches=3)
    assert (
        ranks.agreements == 2 * 3
    )  # per step, on every rank alike: the loss's mean, an agreement at its start and end


def test_one_process_makes_no_collective_call():
    probe = Probe(lambda event: None, lambda: False, 0.0, lambda: None)
    probe.total_steps, probe.started = 10, True
    _step(probe, 1)
    assert probe.steps_done == 1


def test_rank_zero_alone_sees_one_process_in_both_of_accelerates_states():
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    partial, accelerator = PartialState._shared_state, AcceleratorState._shared_state
    saved = (dict(partial), dict(accelerator))
    try:
        partial.update(num_processes=2, process_index=0, distributed_type=DistributedType.MULTI_CPU)
        accelerator.update(num_processes=2, process_index=0, distributed_type=DistributedType.MULTI_CPU)
        with alone_on_this_rank():
            # what sd-scripts' latent caching reads (accelerator.num_processes is AcceleratorState's own copy)
            assert accelerator["num_processes"] == 1 and partial["num_processes"] == 1
            assert partial["distributed_type"] == DistributedType.NO
        assert accelerator["num_processes"] == 2 and partial["num_processes"] == 2
        assert partial["distributed_type"] == DistributedType.MULTI_CPU
    finally:
        partial.clear()
        partial.update(saved[0])
        accelerator.clear()
        accelerator.update(saved[1])
