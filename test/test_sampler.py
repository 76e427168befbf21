"""The PK identity sampler: the properties of both samplers, the random_identity draw against a plain loop port of
the original's RandomIdentitySampler, and the fill of a short chunk against a loop port of the original's loader."""
import collections
import random
import time

import numpy as np
import pytest

from support.sampler import (
    SAMPLERS,
    PKSampler,
    describe_batch,
    identity_chunks,
    random_identity_steps,
    sampler_statistics,
    simulated_pids,
)
from support.specs import BatchSpec
from support.utils import DataError


def make_pids(counts):
    """Dataset pids, identity i repeated counts[i] times, shuffled so indices are not grouped."""
    pids = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(0).permutation(pids).tolist()


def epoch(sampler, number, start_step=0):
    """The batches of one epoch as a list."""
    sampler.set_epoch(number, start_step)
    return list(sampler)


def step_identities(batches, pids, num_instances):
    """The identity of each chunk of each batch: list of lists."""
    num_images = len(pids)
    return [[pids[i % num_images] for i in batch[::num_instances]] for batch in batches]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_batches_are_p_distinct_identities_times_k_identity_major(sampler):
    pids = make_pids([1, 2, 3, 4, 5, 9, 17, 6, 6, 6, 4, 8])
    pk = PKSampler(pids, BatchSpec(3, 3, sampler, seed=5))
    batches = epoch(pk, 0)
    assert len(batches) == len(pk) > 0
    for batch in batches:
        batch_pids = np.array(pids)[batch].reshape(3, 3)  # [P, K]
        assert (batch_pids == batch_pids[:, :1]).all()  # K consecutive indices per identity
        assert len(set(batch_pids[:, 0])) == 3  # P distinct identities


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_epochs_are_a_pure_function_of_seed_and_epoch(sampler):
    pids = make_pids([5] * 20)
    a, b = PKSampler(pids, BatchSpec(4, 4, sampler, seed=1)), PKSampler(pids, BatchSpec(4, 4, sampler, seed=1))
    assert epoch(a, 3) == epoch(b, 3) == list(a)  # iterating twice gives the same epoch
    assert epoch(b, 4) != epoch(a, 3)
    assert epoch(PKSampler(pids, BatchSpec(4, 4, sampler, seed=2)), 3) != epoch(a, 3)
    restored = PKSampler(pids, BatchSpec(4, 4, sampler))
    restored.load_state_dict(a.state_dict())
    assert list(restored) == list(a)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_resumed_epoch_is_the_rest_of_the_uninterrupted_epoch(sampler):
    pids = simulated_pids("market")
    full = epoch(PKSampler(pids, BatchSpec(16, 4, sampler, seed=1)), 2)
    resumed = PKSampler(pids, BatchSpec(16, 4, sampler, seed=1))  # a new process: nothing cached
    resumed.load_state_dict({"seed": 1, "epoch": 2})
    resumed.set_epoch(2, start_step=37)
    assert list(resumed) == full[37:] and len(resumed) == len(full)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("world_size", [2, 8])
def test_ranks_are_disjoint_at_every_step_with_equal_steps(sampler, world_size):
    pids = simulated_pids("market")
    ranks = [PKSampler(pids, BatchSpec(16, 4, sampler, use_resampling=False, seed=3), r, world_size)
             for r in range(world_size)]
    steps = [epoch(s, 1) for s in ranks]
    assert len({len(s) for s in ranks} | {len(s) for s in steps}) == 1 and len(steps[0]) > 0
    for step in zip(*steps):
        identities = [i for batch in step_identities(step, pids, 4) for i in batch]
        assert len(identities) == len(set(identities)) == 16 * world_size
    real = [i for rank_steps in steps for batch in rank_steps for i in batch if i < len(pids)]
    assert len(real) == len(set(real))  # no image twice in an epoch, over all ranks


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_single_leftover_image_is_dropped_and_short_chunks_get_mocks(sampler):
    counts = [1, 5, 9, 6, 2, 3, 4, 8, 13, 7, 10, 11] * 2
    pids, num_images = make_pids(counts), sum(counts)
    pk = PKSampler(pids, BatchSpec(3, 4, sampler, use_resampling=False))
    chunks = identity_chunks(np.array(counts), 4)
    assert chunks.tolist()[:12] == [0, 1, 2, 2, 1, 1, 1, 2, 3, 2, 3, 3]
    left_out = collections.defaultdict(set)
    for number in range(6):
        used = collections.defaultdict(list)
        for batch in epoch(pk, number):
            for i in batch:
                used[pids[i % num_images]].append(i)
        assert 0 not in used and 12 not in used  # the identities with one image never appear
        for identity, indices in used.items():
            real = [i for i in indices if i < num_images]
            mocks = [i - num_images for i in indices if i >= num_images]
            assert len(real) == len(set(real)) and set(mocks) <= set(real)  # mocks of the identity's images
            if len(indices) == 4 * chunks[identity]:  # all its chunks were drawn this epoch
                usable = counts[identity] - (counts[identity] % 4 == 1)
                assert len(real) == usable and len(mocks) == 4 * chunks[identity] - usable
                if counts[identity] % 4 == 1:
                    own = {i for i, p in enumerate(pids) if p == identity}
                    left_out[identity] |= own - set(real)
    assert any(len(images) > 1 for images in left_out.values())  # the dropped image is a random one


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_short_identities_are_topped_up_with_their_own_images(sampler):
    pids = make_pids([1, 2, 3, 6, 7] + [4] * 8)
    pk = PKSampler(pids, BatchSpec(4, 4, sampler, seed=0))
    for number in range(5):
        for batch in epoch(pk, number):
            for group in np.array(batch).reshape(4, 4):
                own = [i for i, p in enumerate(pids) if p == pids[group[0]]]
                assert set(group) <= set(own)  # never another identity's image, never a mock
                real = len(set(group))  # the chunk's own images, then draws from them
                assert len(set(group[:real])) == real and set(group[real:]) <= set(group[:real])


def original_chunks(images, num_instances, rnd):
    """The chunks of one identity in one epoch as the original's loader makes them (datasets/bases.py
    BaseDatasetLabelledPerPid.__getitem__, one worker): its images shuffled and popped K at a time; a last chunk of
    r < K images gets K - r draws from those r, with replacement; its sampler never asks for the chunk of a single
    leftover image (n mod K = 1)."""
    pool = list(images)
    rnd.shuffle(pool)
    chunks = []
    for _ in range(int(identity_chunks(np.array([len(pool)]), num_instances)[0])):
        left = pool[:]  # its list_of_samples: the images not popped yet
        chunk = [pool.pop(0) for _ in range(min(num_instances, len(left)))]
        chunk += [left[rnd.randrange(len(left))] for _ in range(num_instances - len(chunk))]
        chunks.append(chunk)
    return chunks


def chunk_pattern(chunks):
    """An identity's chunks of one epoch with each image renamed by its first appearance (0, 1, ...): the shape of
    the fill without the identity's random image order."""
    names = {}
    return tuple(tuple(names.setdefault(image, len(names)) for image in chunk) for chunk in chunks)


def test_a_short_chunk_is_filled_from_its_own_images_with_replacement_as_the_original():
    counts, num_epochs = [2, 5, 6], 600  # n = 2: one short chunk; 5: one full, one image dropped; 6: full, then short
    pids = make_pids(counts)
    pk = PKSampler(pids, BatchSpec(1, 4, seed=0))  # one chunk a step, every chunk drawn each epoch
    rnd = random.Random(0)
    ours, original = collections.Counter(), collections.Counter()
    for number in range(num_epochs):
        chunks = collections.defaultdict(list)  # identity -> its chunks, in the order drawn
        for batch in epoch(pk, number):
            chunks[pids[batch[0]]].append(batch)
        for identity, n in enumerate(counts):
            ours[n, chunk_pattern(chunks[identity])] += 1 / num_epochs
            original[n, chunk_pattern(original_chunks(range(n), 4, rnd))] += 1 / num_epochs
    assert set(ours) == set(original)  # n = 2 and 6: [0 1 | x y] with x, y in {0, 1}: four fills; n = 5: none
    assert max(abs(ours[key] - original[key]) for key in original) < 0.1  # each fill about 1/4 in both
    assert len(original) == 4 + 1 + 4


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_drop_last_false_adds_one_smaller_step_of_the_identities_left(sampler):
    counts = [4, 8, 5, 3, 12, 4, 7, 9, 4, 4, 6, 2, 10, 4, 9, 13, 6, 8]  # 31 chunks
    pids, chunks = make_pids(counts), identity_chunks(np.array(counts), 4)
    kept = [PKSampler(pids, BatchSpec(2, 4, sampler, drop_last=False, seed=3), r, 2) for r in (0, 1)]
    dropped = PKSampler(pids, BatchSpec(2, 4, sampler, seed=3), 0, 2)
    extra_steps = 0
    for number in range(10):
        batches = [epoch(s, number) for s in kept]
        full = epoch(dropped, number)
        drawn = collections.Counter(i for rank in batches for batch in step_identities(rank[:len(full)], pids, 4)
                                    for i in batch)
        unfinished = {i for i, c in enumerate(chunks) if drawn[i] < c}
        assert batches[0][:len(full)] == full and len(batches[0]) == len(batches[1]) == len(kept[0])
        if len(unfinished) < 2:  # fewer identities left than ranks: no last step
            assert len(kept[0]) == len(full)
            continue
        extra_steps += 1
        assert len(kept[0]) == len(full) + 1
        last = step_identities([batches[0][-1], batches[1][-1]], pids, 4)
        assert 1 <= len(last[1]) <= len(last[0]) <= len(last[1]) + 1 and len(last[0]) + len(last[1]) < 4
        assert set(last[0]) | set(last[1]) == unfinished and not set(last[0]) & set(last[1])
    assert extra_steps > 0


def test_impossible_settings_say_what_is_possible():
    pids = make_pids([4] * 6 + [1])
    with pytest.raises(DataError, match=r"6 identities with 2 images or more.*IMS_PER_BATCH <= 6"):
        PKSampler(pids, BatchSpec(8, 4))
    with pytest.raises(DataError, match=r"IMS_PER_BATCH <= 3 with 2 devices"):
        PKSampler(pids, BatchSpec(4, 4), world_size=2)
    with pytest.raises(DataError, match="K >= 2"):
        PKSampler(pids, BatchSpec(2, 1))
    with pytest.raises(DataError, match="unknown sampler 'random'.*random_identity, balanced"):
        PKSampler(pids, BatchSpec(2, 4, "random"))
    assert describe_batch(16, 4) == "16 identities × 4 images = 64 images per device"


def original_loader_epoch(pids, num_ids, num_instances, workers, rng, rnd):
    """One epoch of the original's loader with USE_RESAMPLING False: its sampler's steps (the draw port below is
    ours, checked against its loop in test_random_identity_draws_as_the_originals_loop), batch i fetched by worker
    i mod W, each worker popping K of an identity's images from its own copy of the data set, made afresh every
    epoch, and padding with mocks when its copy has fewer left. -> (fraction of mock slots, distinct images)."""
    counts = np.bincount(pids)
    images_of = [list(np.flatnonzero(pids == p)) for p in range(len(counts))]
    steps = random_identity_steps(identity_chunks(counts, num_instances), num_ids, rng)
    copies, mocks, used = {}, 0, set()
    for number, step in enumerate(steps):
        copy = copies.setdefault(number % workers, [list(images) for images in images_of])
        for identity in step:
            rnd.shuffle(copy[identity])
            taken = [copy[identity].pop(0) for _ in range(min(num_instances, len(copy[identity])))]
            used.update(taken)
            mocks += num_instances - len(taken)
    return mocks / steps.size / num_instances, len(used)


def test_the_originals_worker_copies_rarely_pad_and_repeat_images_an_accident_we_do_not_copy():
    pids = np.array(simulated_pids("market"))
    rng, rnd = np.random.default_rng(0), random.Random(0)
    one_worker = original_loader_epoch(pids, 16, 4, 1, rng, rnd)
    eight_workers = original_loader_epoch(pids, 16, 4, 8, rng, rnd)  # its NUM_WORKERS = cpu_count // len(GPU_IDS)
    ours = PKSampler(pids.tolist(), BatchSpec(16, 4, use_resampling=False))
    batches = np.array(epoch(ours, 0))
    ours_stats = (batches >= len(pids)).mean(), len(np.unique(batches[batches < len(pids)]))
    # docs/training.md: about 0.2% mock slots and 9,200 distinct images with 8 workers, 4.4% and 12,600 here
    assert eight_workers[0] < 0.005 and 8_800 < eight_workers[1] < 9_600
    assert 0.04 < ours_stats[0] < 0.05 and 12_400 < ours_stats[1] < 12_800
    assert abs(one_worker[0] - ours_stats[0]) < 0.005  # with one worker the original pads as we do


# ------------------------------------------------------------------------------------------------
# random_identity against the original's loop


def original_epoch(counts, num_ids, num_instances, rnd):
    """The original RandomIdentitySampler.__iter__ at world size 1, as written there: the identity of each
    chunk, step after step (its data sets never hold an identity with one image)."""
    index = {}
    for pid, n in enumerate(counts):
        n -= n % num_instances == 1
        index[pid] = [pid] * -(-n // num_instances)
    available = list(index)
    steps = []
    while len(available) >= num_ids:
        selected = rnd.sample(available, num_ids)
        for pid in selected:
            index[pid].pop(0)
            if not index[pid]:
                available.remove(pid)
        steps.append(selected)
    return steps


def epoch_statistics(epochs, num_identities):
    """Per epoch: steps, chunks drawn per identity [I], gaps between an identity's consecutive steps (1..4, 5+)."""
    steps = np.array([len(e) for e in epochs])
    drawn = np.array([np.bincount([i for s in e for i in s], minlength=num_identities) for e in epochs])
    gaps = np.zeros((len(epochs), 5))
    for row, e in enumerate(epochs):
        last = {}
        for number, step in enumerate(e):
            for i in step:
                if i in last:
                    gaps[row, min(number - last[i], 5) - 1] += 1
                last[i] = number
    return np.column_stack([steps, drawn, gaps / gaps.sum(1, keepdims=True)])


def test_random_identity_draws_as_the_originals_loop():
    counts = [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16, 17, 21, 25]
    pids, num_epochs = make_pids(counts), 1500
    rnd = random.Random(0)
    original = epoch_statistics([original_epoch(counts, 4, 4, rnd) for _ in range(num_epochs)], len(counts))
    pk = PKSampler(pids, BatchSpec(4, 4))
    ours = epoch_statistics([step_identities(epoch(pk, e), pids, 4) for e in range(num_epochs)], len(counts))
    # every statistic's mean agrees within 4.5 standard errors (22 statistics, 1,500 epochs each)
    error = np.sqrt(original.var(0) / num_epochs + ours.var(0) / num_epochs) + 1e-9
    z = np.abs(original.mean(0) - ours.mean(0)) / error
    assert z.max() < 4.5, z.round(1)
    balanced = PKSampler(pids, BatchSpec(4, 4, "balanced"))
    other = epoch_statistics([step_identities(epoch(balanced, e), pids, 4) for e in range(300)], len(counts))
    assert (np.abs(original.mean(0) - other.mean(0)) / error).max() > 10  # the test tells samplers apart


def test_random_identity_meets_far_more_identities_than_balanced():
    pids = simulated_pids("market")
    co_batched = {s: sampler_statistics(pids, BatchSpec(16, 4, s), epoch=0)["co_batched"] for s in SAMPLERS}
    assert co_batched["random_identity"] >= 1.8 * co_batched["balanced"], co_batched


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_an_msmt17_sized_epoch_plans_well_under_a_second(sampler):
    pk = PKSampler(simulated_pids("msmt17"), BatchSpec(16, 4, sampler))
    start = time.perf_counter()
    batches = epoch(pk, 0)
    assert time.perf_counter() - start < 1.0 and len(batches) > 1900
