"""The PK identity sampler: P identities x K images per batch, an epoch a pure function of (seed, epoch), and
its statistics (python data.py sampler-stats)."""
from dataclasses import replace

import numpy as np

from support.utils import DataError

SAMPLERS = ("random_identity", "balanced")


def describe_batch(num_ids, num_instances, world_size=1):
    """'P identities × K images = B images per device' (and the total over devices)."""
    text = f"{num_ids} identities × {num_instances} images = {num_ids * num_instances} images per device"
    if world_size > 1:
        text += f" ({world_size} devices: {num_ids * num_instances * world_size} images per step)"
    return text


def identity_chunks(counts, num_instances):
    """Chunks of K images per identity in an epoch (numpy [I]), by the original's leftover rule: a single
    leftover image (n mod K = 1) is dropped, a longer remainder makes a last chunk that is filled up to K."""
    usable = counts - (counts % num_instances == 1)
    return -(-usable // num_instances)


def random_identity_steps(chunks, per_step, rng):
    """The original's draw: each step takes per_step identities uniformly at random, in random order, among the
    identities with chunks left; the epoch ends when fewer than per_step have chunks left.
    chunks: numpy [I] -> identity indices, numpy [steps, per_step].

    Why a sweep over the steps rather than one sort of random keys: per-identity keys (an exponential race, the
    k-th key of an identity a Gamma(k) time) reproduce the draw of one identity at a time, but with per_step > 1
    the original never takes an identity twice in a step, i.e. an identity drawn in a step waits until the
    step's end, the time of its per_step-th draw, which depends on every identity's keys. Already with 3
    identities (2, 1, 1 chunks, 2 per step) independent keys cannot give both that rule and uniform steps, and
    the fixed-point forms of the coupling (on step end times, or on the step each identity runs out) settle only
    ~18 steps per pass. This sweep is exact and does O(identities) numpy work per step: a Market-1501 epoch
    plans in ~10 ms, an MSMT17-sized one (4,101 identities, 2,000 steps) in ~0.1 s."""
    left = chunks.copy()
    available = np.flatnonzero(left)
    steps = []
    while len(available) >= per_step:
        picked = available[rng.choice(len(available), per_step, replace=False)]
        steps.append(picked)
        left[picked] -= 1
        if not left[picked].all():
            available = available[left[available] > 0]
    return np.array(steps, dtype=np.int64).reshape(-1, per_step)


def balanced_steps(chunks, per_step, steps, rng):
    """The column layout (sampler 'balanced'): the chunks of identities in random order, one identity after
    the other, dealt column by column into `steps` steps, so that an identity's chunks (never more than steps)
    land in distinct, consecutive steps; the steps are then shuffled. -> identity indices, numpy [steps, per_step]."""
    identity_order = rng.permutation(len(chunks))  # [I]
    ids = np.repeat(identity_order, chunks[identity_order])[: steps * per_step]
    grid = ids.reshape(per_step, steps).T  # [steps, per_step]
    return grid[rng.permutation(steps)]


def occurrence_index(ids):
    """For each entry of ids (numpy [T]), how many earlier entries hold the same value (its chunk number)."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    run_start = np.ones(len(ids), dtype=bool)
    run_start[1:] = sorted_ids[1:] != sorted_ids[:-1]
    positions = np.arange(len(ids))
    first = np.maximum.accumulate(np.where(run_start, positions, 0))
    index = np.empty_like(ids)
    index[order] = positions - first
    return index


class PKSampler:
    """Batch sampler of a BatchSpec (P, K, the sampler, use_resampling, drop_last, the seed) on rank `rank` of
    world_size: each batch is P distinct identities x K images, identity-major (K consecutive indices
    per identity). An epoch is a pure function of (seed, epoch): each identity's images are shuffled and cut
    into chunks of K (identity_chunks: a single leftover image is dropped), and the chunks are drawn into steps
    of W*P distinct identities; rank r of W takes columns r*P..r*P+P-1 of every step, so ranks are disjoint at
    every step and run the same number of steps.

    batch.sampler: 'random_identity' (the original's DATALOADER.SAMPLER, default): each step draws its identities
    uniformly among those with chunks left (random_identity_steps), so neighbours change from step to step;
    the chunks of the last < W*P identities are left out. 'balanced': the column layout of balanced_steps,
    which leaves out fewer than W*P chunks but keeps an identity beside the same neighbours.
    batch.use_resampling (DATALOADER.USE_RESAMPLING): a short last chunk of r < K images is filled with K - r draws
    from its own r images, with replacement, as the original fills it (True), or with mock images (False): index
    len(pids) + i stands for a mock of image i (an all-zero image with its pid, see ImageDataset), to be masked
    out of the losses with is_real.
    batch.drop_last (DATALOADER.DROP_LAST): the original hands it to its DataLoader, whose batches of P identities
    are always whole with its sampler, so it changes nothing there; True is that. False adds one last,
    smaller step: one chunk of each identity that still has chunks (split over the ranks; left out when there
    are fewer such identities than ranks)."""

    def __init__(self, pids, batch, rank=0, world_size=1):
        if batch.num_instances < 2:
            raise DataError(f"DATALOADER.NUM_INSTANCE (K) = {batch.num_instances}: need K >= 2 images per identity")
        if batch.num_ids < 1 or not 0 <= rank < world_size:
            raise DataError(f"bad sampler settings: P = {batch.num_ids}, rank {rank} of world size {world_size}")
        if batch.sampler not in SAMPLERS:
            raise DataError(f'unknown sampler {batch.sampler!r} (DATALOADER.SAMPLER): use one of '
                            f'{", ".join(SAMPLERS)}')
        self.batch, self.rank, self.world_size, self.epoch, self.start_step = batch, rank, world_size, 0, 0
        # planning is numpy (single-threaded): multi-threaded CPU tensor ops stall on a busy host
        self.pids = np.asarray(pids, dtype=np.int64).reshape(-1)
        _, self.identity, self.counts = np.unique(self.pids, return_inverse=True, return_counts=True)
        self.identity = self.identity.reshape(-1)
        self.chunks, self.steps = self._chunks_and_steps()
        self._cached = None  # ((seed, epoch), full steps [S, W*P, K], last smaller step [n, K] or None)

    def _chunks_and_steps(self):
        """Chunks per identity; for 'balanced' also the steps, so that no identity has more chunks than steps."""
        P, K = self.batch.num_ids, self.batch.num_instances
        per_step = P * self.world_size
        chunks = identity_chunks(self.counts, K)  # [I]
        if int((chunks > 0).sum()) < per_step:
            possible = int((chunks > 0).sum()) // self.world_size
            raise DataError(
                f'{describe_batch(P, K, self.world_size)} needs {per_step} identities '
                f'per step, but the training set has {int((chunks > 0).sum())} identities with 2 images or more '
                f'({len(self.pids)} images): use --SOLVER.IMS_PER_BATCH <= {possible}'
                f'{f" with {self.world_size} devices" if self.world_size > 1 else ""}')
        steps = int(chunks.sum()) // per_step
        while self.batch.sampler == "balanced" and int(chunks.max()) > steps:  # cap a very large identity (few rounds)
            chunks = np.minimum(chunks, steps)
            steps = int(chunks.sum()) // per_step
        return chunks, steps

    def set_epoch(self, epoch, start_step=0):
        """Select the epoch (call before iterating, as with DistributedSampler); a resumed run starts
        at start_step of it without loading the batches it already trained on."""
        self.epoch, self.start_step = int(epoch), int(start_step)

    def state_dict(self):
        """What a resumed run needs to continue the same sequence of epochs."""
        return {"seed": self.batch.seed, "epoch": self.epoch}

    def load_state_dict(self, state):
        """Restore seed and epoch from state_dict()."""
        self.batch, self.epoch = replace(self.batch, seed=int(state["seed"])), int(state["epoch"])

    def __len__(self):
        full, last = self._plan()
        return len(full) + (last is not None)

    def _identity_steps(self, rng):
        """This epoch's identity indices [steps, W*P] and the identities that still have chunks after them."""
        per_step = self.batch.num_ids * self.world_size
        if self.batch.sampler == "balanced":
            steps = balanced_steps(self.chunks, per_step, self.steps, rng)
        else:
            steps = random_identity_steps(self.chunks, per_step, rng)
        used = np.bincount(steps.reshape(-1), minlength=len(self.chunks))
        return steps, rng.permutation(np.flatnonzero(self.chunks > used))

    def _plan(self):
        """This epoch's dataset indices for all ranks: full steps [S, W*P, K], last smaller step [n, K] or None."""
        key = (self.batch.seed, self.epoch)
        if self._cached is None or self._cached[0] != key:
            rng = np.random.default_rng(np.random.SeedSequence([self.batch.seed, self.epoch]))
            steps, unfinished = self._identity_steps(rng)
            ids = np.concatenate([steps.reshape(-1), unfinished])  # [T]: one entry per chunk, in the order drawn
            chunks = self._chunk_images(rng, ids, occurrence_index(ids))  # [T, K]
            full = chunks[: steps.size].reshape(*steps.shape, self.batch.num_instances)
            last = chunks[steps.size:]
            keep_last = not self.batch.drop_last and len(last) >= self.world_size
            self._cached = (key, full, last if keep_last else None)
        return self._cached[1:]

    def _chunk_images(self, rng, ids, chunk_index):
        """Dataset indices [T, K] of chunk chunk_index[t] of identity ids[t], in this epoch's image order. A short
        last chunk (r < K images) is filled as the original fills it (datasets/bases.py): use_resampling, with
        K - r draws from its own r images, with replacement; else with mocks."""
        K, num_images = self.batch.num_instances, len(self.pids)
        # dataset indices grouped by identity, in random order within each identity
        order = rng.permutation(num_images)
        order = order[np.argsort(self.identity[order], kind="stable")]  # [N]
        starts = np.cumsum(self.counts) - self.counts  # [I]
        first = chunk_index[:, None] * K  # [T, 1]: the chunk's first position in its identity's order
        positions = first + np.arange(K)  # [T, K]
        counts = self.counts[ids][:, None]
        if self.batch.use_resampling:
            own = np.minimum(counts - first, K)  # [T, 1]: r, the chunk's own images (>= 2: see identity_chunks)
            drawn = first + rng.integers(0, own, size=positions.shape)  # [T, K]: one draw per slot, used past r
            return order[starts[ids][:, None] + np.where(positions < counts, positions, drawn)]
        images = order[starts[ids][:, None] + positions % counts]
        return np.where(positions < counts, images, images + num_images)  # past the end: mocks of its first images

    def epoch_batches(self):
        """This rank's batches of the current epoch: a list of lists of dataset indices (P*K each; the last
        smaller step of drop_last=False may hold fewer identities)."""
        full, last = self._plan()
        P, K = self.batch.num_ids, self.batch.num_instances
        batches = full[:, self.rank * P:(self.rank + 1) * P].reshape(len(full), P * K).tolist()
        if last is not None:
            batches.append(np.array_split(last, self.world_size)[self.rank].reshape(-1).tolist())
        return batches

    def __iter__(self):
        yield from self.epoch_batches()[self.start_step:]


AUGMENTATION_STREAM = 0xA06  # keeps the augmentation's seed sequences apart from the sampler's (seed, epoch) ones


def augmentation_seeds(seed, rank, epoch, step, count):
    """The augmentation seeds of a step's images on a rank: numpy uint32 [count], a pure function of (seed, rank,
    epoch, step). Ranks draw apart, and a resumed run (at any number of loader workers) draws what an
    uninterrupted one draws: the position in the schedule, which last.pth holds, is the whole random state."""
    return np.random.SeedSequence([AUGMENTATION_STREAM, seed, rank, epoch, step]).generate_state(count)


class SeededBatches:
    """A PKSampler's batches for a training loader: [(dataset index, augmentation seed)] per batch (see
    augmentation_seeds), from the sampler's current epoch and start step."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        pk = self.sampler
        for step, batch in enumerate(pk.epoch_batches()[pk.start_step:], start=pk.start_step):
            yield list(zip(batch, augmentation_seeds(pk.batch.seed, pk.rank, pk.epoch, step, len(batch)).tolist()))


def train_sampler(items, batch, rank, world_size, with_is_real):
    """The PKSampler of a train loader (a BatchSpec on rank of world_size); refuses mock images that no is_real
    would mask."""
    if not batch.use_resampling and not with_is_real:
        raise DataError("use_resampling=False (DATALOADER.USE_RESAMPLING False) pads short identities with mock "
                        "images that the losses must mask: build the loader with with_is_real=True and pass "
                        "is_real to the model and to compute_losses")
    return PKSampler([pid for _, pid, _ in items], batch, rank, world_size)



SIMULATED = {"market": (751, 12936), "msmt17": (4101, 126441)}


def simulated_pids(name, seed=0):
    """A label list the size of a data set, for sampler statistics without the images: 'market' = Market-1501's
    train split (751 identities, 12,936 images), 'msmt17' = all of MSMT17 (4,101 identities, 126,441 images);
    images per identity >= 2, the rest spread with lognormal weights (sigma 0.6)."""
    num_ids, num_images = SIMULATED[name]
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0, 0.6, num_ids)
    counts = 2 + rng.multinomial(num_images - 2 * num_ids, weights / weights.sum())
    return np.repeat(np.arange(num_ids), counts).tolist()


def co_batched_identities(batch_identities, num_identities):
    """Distinct other identities each identity shares a batch with: numpy [num_identities] (0 if unused).
    batch_identities: numpy [batches, P], -1 for an empty place."""
    a, b = batch_identities[:, :, None], batch_identities[:, None, :]
    pairs = (a >= 0) & (b >= 0) & (a != b)  # [batches, P, P]
    codes = np.unique(np.broadcast_to(a * num_identities + b, pairs.shape)[pairs])
    return np.bincount(codes // num_identities, minlength=num_identities)


def sampler_statistics(pids, batch, epoch, world_size=1):
    """One epoch of a BatchSpec's sampler over all ranks: {'steps', 'images' (distinct images used), 'identities'
    (used), 'co_batched' (mean over used identities of co_batched_identities)}."""
    ranks = [PKSampler(pids, batch, rank, world_size) for rank in range(world_size)]
    batches = []
    for rank_sampler in ranks:
        rank_sampler.set_epoch(epoch)
        batches += rank_sampler.epoch_batches()
    num_images, num_identities = len(ranks[0].pids), len(ranks[0].counts)
    width = max(len(batch) for batch in batches)
    padded = np.array([batch + [-1] * (width - len(batch)) for batch in batches])  # [batches, P*K]
    firsts = padded[:, ::batch.num_instances]  # [batches, P]: each chunk's first image (a mock: + N)
    places = np.where(firsts >= 0, ranks[0].identity[np.maximum(firsts, 0) % num_images], -1)
    images = padded[(padded >= 0) & (padded < num_images)]
    used = np.zeros(num_identities, dtype=bool)
    used[places[places >= 0]] = True
    co_batched = co_batched_identities(places, num_identities)
    return {"steps": len(ranks[0]), "images": len(np.unique(images)), "identities": int(used.sum()),
            "co_batched": float(co_batched[used].mean())}



def print_sampler_statistics(pids, batch, samplers=SAMPLERS, epochs=3, world_size=1):
    """Print sampler_statistics per sampler and epoch (a BatchSpec, its sampler replaced by each of samplers)."""
    num_images, num_identities = len(pids), len(set(pids))
    print(f"{num_identities} identities, {num_images} images; "
          f"{describe_batch(batch.num_ids, batch.num_instances, world_size)}")
    for sampler in samplers:
        for epoch in range(epochs):
            stats = sampler_statistics(pids, replace(batch, sampler=sampler), epoch, world_size)
            print(f'{sampler:<16} epoch {epoch}: {stats["steps"]} steps, {stats["images"]} images used '
                  f'({100 * stats["images"] / num_images:.1f}%), {stats["identities"]} identities used '
                  f'({100 * stats["identities"] / num_identities:.1f}%), '
                  f'{stats["co_batched"]:.1f} distinct co-batched identities per identity')


