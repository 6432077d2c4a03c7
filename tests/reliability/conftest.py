"""The reliability suite's shared world (per test worker): tiny data, VAE, latent cache and one
uninterrupted reference training run that every fault-injection run is compared against bit for bit."""

import pytest

from rel_kit import make_world


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("reliability"))
