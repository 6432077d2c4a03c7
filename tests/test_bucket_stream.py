"""train.data.BucketStream: one bucket per batch, each image once per (bucket) epoch, leftovers carried
without repeats or dropped and reported, small buckets left out, order a pure function of (seed, position)
(random access = resume), DDP ranks share each batch's bucket."""

from collections import Counter

import pytest
import torch

from latentforge.errors import UserError
from latentforge.train.data import BucketStream, InMemoryLatents, Stream, make_stream

SHAPES = {(4, 6): 7, (6, 4): 10, (5, 5): 5, (2, 8): 2}  # latent (h, w) -> images; batch 4: 2x8 is too small
B = 4


def dataset(shapes=SHAPES):
    latents, ids = [], []
    for (h, w), n in shapes.items():
        for i in range(n):
            latents.append(torch.full((4, h, w), float(len(latents))))
            ids.append(f"{h}x{w}-{i}")
    return InMemoryLatents(latents, ids=ids)


def batches(stream, n_batches):
    return [[stream.index(g * B + j) for j in range(B)] for g in range(n_batches)]


def test_every_batch_is_one_bucket_and_every_image_once_per_bucket_epoch():
    ds = dataset()
    s = make_stream(ds, seed=3, batch_size=B)
    assert isinstance(s, BucketStream) and s.excluded == {"2x8": 2}
    per_epoch = s.batches_before(1)
    assert per_epoch == 7 // 4 + 10 // 4 + 5 // 4  # = 4 batches end in epoch 0
    seen = {b: {} for b in s.groups}  # bucket -> {k: its k-th batch}
    for g, batch in enumerate(batches(s, s.batches_before(6))):
        names = {ds.buckets[i] for i in batch}
        assert len(names) == 1 and len(set(batch)) == B  # one bucket, never an image twice
        bucket, k = s.batch_at(g)
        assert names == {bucket} and k not in seen[bucket]
        seen[bucket][k] = batch
    seen = {b: [i for k in sorted(got) for i in got[k]] for b, got in seen.items()}  # each bucket's own stream
    for b, ix in s.groups.items():
        n = len(ix)
        chunks = [seen[b][k:k + n] for k in range(0, len(seen[b]) - n + 1, n)]
        assert len(chunks) >= 5 and all(sorted(c) == ix for c in chunks), b  # each bucket epoch: a permutation
    counts = Counter(i for b in seen.values() for i in b)
    assert max(counts.values()) - min(counts.values()) <= 1  # carried leftovers: nobody is shown twice as often
    assert not set(counts) & set(s._all("2x8"))  # the too-small bucket is not trained, and said so
    assert "2x8: 2" in s.summary() and "leftovers carry" in s.summary()


def test_drop_leaves_out_the_rest_and_reports_it():
    ds = dataset()
    s = BucketStream(ds, seed=3, batch_size=B, leftovers="drop")
    per_epoch = s.batches_before(1)
    assert per_epoch == 1 + 2 + 1 and s.batches_before(3) == 3 * per_epoch
    for e in range(3):
        shown = [i for batch in batches(s, s.batches_before(e + 1))[s.batches_before(e):] for i in batch]
        ids = [ds.ids[i] for i in shown]
        assert len(ids) == len(set(ids))  # nothing twice
        dropped = s.dropped(e)
        assert sorted(ids + dropped) == sorted(ds.ids)  # everything else is reported as dropped
        assert Counter(d.split("-")[0] for d in dropped) == {"4x6": 3, "6x4": 2, "5x5": 1, "2x8": 2}
    assert "6 images dropped per epoch" in s.summary()  # 7 mod 4 + 10 mod 4 + 5 mod 4


def test_order_is_a_function_of_seed_and_position():
    ds = dataset()
    a, b = BucketStream(ds, 3, B), BucketStream(ds, 3, B)
    late = list(range(40 * B, 44 * B))  # a fresh stream asked for a late position (resume) ...
    fresh = [b.index(p) for p in late]
    [a.index(p) for p in range(44 * B)]  # ... equals one that walked there from the start
    assert [a.index(p) for p in late] == fresh
    assert fresh != [BucketStream(ds, 4, B).index(p) for p in late]  # the seed matters
    first = [a.index(p) for p in range(B * a.batches_before(1))]
    second = [a.index(p) for p in range(B * a.batches_before(1), B * a.batches_before(2))]
    assert first != second  # reshuffled per epoch
    # DDP: rank shares of one global batch are the single-process batch, so the ranks share a bucket
    for step in range(6):
        ranks = [a.positions(step, 1, 2, B, r, 2) for r in range(2)]
        assert ranks[0] + ranks[1] == a.positions(step, 1, 2, B, 0, 1)
        assert len({ds.buckets[a.index(p)] for p in ranks[0] + ranks[1]}) == 1


def test_square_datasets_keep_the_plain_stream_and_bad_settings_are_one_line():
    assert type(make_stream(InMemoryLatents(torch.zeros(8, 4, 4, 4)), 0, B)) is Stream
    assert InMemoryLatents([torch.zeros(4, 4, 4)] * 3).buckets is None  # one shape: not bucketed
    with pytest.raises(UserError, match="batch_size=16: no bucket has that many images"):
        BucketStream(dataset(), 0, 16)
    with pytest.raises(UserError, match="bucket_leftovers='keep'"):
        BucketStream(dataset(), 0, B, leftovers="keep")
