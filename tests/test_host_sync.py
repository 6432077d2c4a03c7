"""The loop's host→device path (train/host_sync.py): pinned, non-blocking copies and the next micro-batch made
while the device runs the current one. CUDA is absent here, so the pinning step is injected (`pin_fn`): the
same code runs as on CUDA, with a recording copy standing in for `Tensor.pin_memory`."""

import torch
from safetensors.torch import load_file

from latentforge.train import host_sync, loop
from latentforge.train.host_sync import Prefetcher, Transfer, next_key
from latentforge.train.step import Batch, Draws
from test_train_loop import run


class RecordingPin:
    """Stands in for pin_memory: a copy, with the shapes of what went through."""

    def __init__(self):
        self.shapes = []

    def __call__(self, t):
        self.shapes.append(tuple(t.shape))
        return t.clone()


def test_transfer_pins_every_host_tensor_and_copies_to_the_device():
    pin = RecordingPin()
    move = Transfer(torch.device("meta"), pin_fn=pin)  # meta: a device other than the host, no memory
    batch = Batch(torch.zeros(2, 4, 8, 8), torch.zeros(2, 6, 32), ids=["a", "b"])
    draws = Draws(torch.tensor([3, 5]), torch.zeros(2, 4, 8, 8), torch.tensor([True, False]))
    b, d = batch.moved(move), draws.moved(move)
    assert (b.latent.device.type, b.context.device.type, d.t.device.type, d.noise.device.type) == ("meta",) * 4
    assert b.mask is None and b.ids == ["a", "b"]  # absent parts and non-tensors pass through
    assert d.drop.device.type == "cpu"  # the dropout coins stay on the host, which decides with them
    assert pin.shapes == [(2, 4, 8, 8), (2, 6, 32), (2,), (2, 4, 8, 8)]
    assert Transfer(torch.device("cpu")).pin_fn is None  # on CPU nothing is pinned: the copy is the identity
    x = torch.zeros(3)
    assert Transfer(torch.device("cpu"))(x) is x


def test_prefetcher_serves_the_prefetched_item_and_makes_each_key_once():
    made = []
    feed = Prefetcher(lambda k: made.append(k) or k, lambda item: ("moved", item))
    keys = [(0, 0), (0, 1), (1, 0), (1, 1)]
    out = []
    for key in keys:
        out.append(feed.get(key))
        feed.prefetch(next_key(*key, accum=2, max_steps=2))
    assert out == [("moved", k) for k in keys] and made == keys and feed.hits == 3
    assert next_key(1, 1, accum=2, max_steps=2) is None  # nothing is made past the last step
    feed.prefetch((5, 0))
    assert feed.get((2, 0)) == ("moved", (2, 0)) and feed.hits == 3  # a stale prefetch is not served


def test_training_through_the_pinned_path_is_bitwise_the_plain_run(tmp_path, monkeypatch):
    """grad_accum=2 with caption dropout: the pinned + prefetched path gives the same weights, bit for bit, as
    the plain one (the draws are made on the host from (seed, position) either way), every micro-batch after
    the first comes from a prefetch, and each tensor of each micro-batch went through the pinning step."""
    overrides = ["max_steps=3", "grad_accum=2", "checkpoint_every=3"]
    run(tmp_path / "plain", overrides)
    pin, feeds = RecordingPin(), []
    real_feed = loop._feed

    def recording_feed(*args, **kw):
        feeds.append(real_feed(*args, transfer=Transfer(torch.device("cpu"), pin_fn=pin), **kw))
        return feeds[-1]

    monkeypatch.setattr(loop, "_feed", recording_feed)
    run(tmp_path / "pinned", overrides)
    for name in ("model", "ema"):
        a = load_file(str(tmp_path / "plain" / "checkpoints" / "step-3" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "pinned" / "checkpoints" / "step-3" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    micro_batches = 3 * 2
    assert feeds[0].hits == micro_batches - 1
    per_micro = [(4, 4, 8, 8), (4, 6, 32), (4, 6), (4,), (4, 4, 8, 8)]  # latent, context, mask, t, noise
    assert pin.shapes == per_micro * micro_batches


def test_sync_debug_is_off_without_the_variable_and_on_cpu(monkeypatch):
    monkeypatch.delenv(host_sync.SYNC_DEBUG_ENV, raising=False)
    with host_sync.no_host_sync(torch.device("cpu")):
        pass
    monkeypatch.setenv(host_sync.SYNC_DEBUG_ENV, "error")
    calls = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: calls.append(mode))
    with host_sync.no_host_sync(torch.device("cpu")):
        pass
    assert calls == []  # CPU: nothing to check
    with host_sync.no_host_sync(torch.device("cuda")):
        assert calls == ["error"]
    assert calls == ["error", 0]  # off again for the log step that follows
