"""Shards partition the data; Dirichlet shards are label-skewed."""

from __future__ import annotations

import numpy as np
import pytest
from dtj_trainer import data
from dtj_trainer.config import DataSplitSpec


@pytest.mark.parametrize("spec", [DataSplitSpec(), DataSplitSpec(kind="dirichlet", alpha=0.1)])
def test_shards_partition_the_indices(spec):
    labels = np.repeat(np.arange(10), 50)
    shards = data.split(labels, 8, spec, seed=3)
    joined = np.sort(np.concatenate(shards))
    assert np.array_equal(joined, np.arange(len(labels)))
    assert all(len(s) > 0 for s in shards)
    assert [s.tolist() for s in shards] == [s.tolist() for s in data.split(labels, 8, spec, seed=3)]


def test_small_alpha_skews_labels():
    labels = np.repeat(np.arange(10), 100)

    def classes_per_worker(alpha):
        shards = data.split(labels, 10, DataSplitSpec(kind="dirichlet", alpha=alpha), seed=0)
        return np.mean([(np.bincount(labels[s], minlength=10) > 5).sum() for s in shards])

    assert classes_per_worker(0.1) < classes_per_worker(100.0)


def test_unknown_dataset_says_what_to_write():
    with pytest.raises(
        ValueError, match="use one of clusters, digits, synthetic or an importable factory"
    ):
        data.load("imagenet", seed=0)


def test_the_clusters_task_is_deterministic_balanced_and_standardised():
    a, b = data.load("clusters", seed=0), data.load("clusters", seed=0)
    assert a.x_train.shape == (40_000, 40) and a.x_test.shape == (4_000, 40)
    assert a.num_classes == 10 and a.num_features == 40
    assert bool((a.x_train == b.x_train).all())
    counts = np.bincount(a.y_train.numpy(), minlength=10)
    assert counts.min() > 0.9 * counts.max()
    assert abs(float(a.x_train.mean())) < 0.05 and abs(float(a.x_train.std()) - 1) < 0.05
