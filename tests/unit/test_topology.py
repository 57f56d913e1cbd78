"""Mixing matrices: symmetric, doubly stochastic, average-preserving."""

from __future__ import annotations

import numpy as np
import pytest
from dtj_trainer import topology

TOPOLOGIES = ["ring", "torus", "exponential", "one-peer-exponential", "complete"]


@pytest.mark.parametrize("name", TOPOLOGIES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 8, 9, 16])
@pytest.mark.parametrize("step", [0, 1, 2, 5])
def test_mixing_matrix_is_symmetric_doubly_stochastic(name, n, step):
    w = np.array(topology.mixing_matrix(name, n, step))
    assert np.allclose(w.sum(axis=1), 1.0)
    assert np.allclose(w.sum(axis=0), 1.0)
    assert np.allclose(w, w.T)
    assert (w >= 0).all()


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_mixing_preserves_the_mean_and_shrinks_consensus_distance(name):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5))
    mean = x.mean(axis=0)
    before = ((x - mean) ** 2).sum(axis=1).mean()
    for step in range(6):
        x = np.array(topology.mixing_matrix(name, 8, step)) @ x
    assert np.allclose(x.mean(axis=0), mean)
    assert ((x - mean) ** 2).sum(axis=1).mean() < before


def test_ring_and_torus_degrees():
    assert topology.neighbours("ring", 8, 0) == [1, 7]
    assert topology.neighbours("torus", 16, 5) == [1, 4, 6, 9]
    assert topology.neighbours("complete", 4, 2) == [0, 1, 3]


def test_one_peer_exponential_is_a_matching_with_one_peer():
    for n in (4, 6, 8):
        for step in range(4):
            peers = [topology.neighbours("one-peer-exponential", n, i, step) for i in range(n)]
            for i, p in enumerate(peers):
                assert len(p) <= 1
                if p:
                    assert topology.neighbours("one-peer-exponential", n, p[0], step) == [i]


def test_rank_outside_world_is_an_error():
    with pytest.raises(ValueError, match="rank 4 outside"):
        topology.neighbours("ring", 4, 4)
