"""ALGORITHMS.md's correctness properties, on the in-process simulator."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch
from dtj_trainer import algorithms, ksearch, loop, simulator
from dtj_trainer.algorithms import gosgd
from dtj_trainer.config import TrainerConfig
from dtj_trainer.data import Sampler
from dtj_trainer.emulation import Emulation

ALL = ["allreduce", "dpsgd", "gosgd", "dasgd", "teleportation"]


def config(name: str, n: int, **extra) -> TrainerConfig:
    algorithm = {"name": name, "activeNodes": 1 if name == "teleportation" else "auto"}
    algorithm.update(extra.pop("algorithm", {}))
    return TrainerConfig.model_validate(
        {
            "job": "sim",
            "replicas": n,
            "algorithm": algorithm,
            "optimizer": {"lr": 0.05},
            "training": {"steps": 20, "evalEvery": 10, "model": "logreg", **extra},
        }
    )


def test_gosgd_weights_sum_to_one_across_gossip():
    cfg = config("gosgd", 6, algorithm={"gossipProbability": 0.7})
    _results, workers = simulator.simulate(cfg)
    weights = [w.algo.a for w in workers]  # type: ignore[union-attr]
    assert sum(weights) == pytest.approx(1.0, abs=1e-6)  # weights travel as float32
    assert len(set(weights)) > 1, "gossip happened"


def test_gosgd_merge_is_the_weighted_average():
    x, a = gosgd.merge(torch.tensor([0.0, 0.0]), 0.25, [(1, torch.tensor([4.0, 8.0, 0.75]))])
    assert a == pytest.approx(1.0)
    assert x.tolist() == pytest.approx([3.0, 6.0])


@pytest.mark.parametrize("topology", ["ring", "torus", "exponential", "one-peer-exponential"])
def test_gossip_alone_preserves_the_mean_and_shrinks_consensus_distance(topology):
    cfg = config("dpsgd", 8, algorithm={"topology": topology})

    async def body(workers):
        torch.manual_seed(1)
        for w in workers:
            w.local.set_params(torch.randn_like(w.local.params()))
        xs = torch.stack([w.local.params() for w in workers])
        before = ((xs - xs.mean(0)) ** 2).sum(1).mean()

        async def mix_only(w, step):
            from dtj_trainer import topology as topo

            weights = topo.mixing_weights(topology, 8, w.transport.rank, step)
            x = w.local.params()
            got = await w.transport.exchange(x, [p for p in weights if p != w.transport.rank])
            w.local.set_params(algorithms.dpsgd.mix(w.transport.rank, x, got, weights))

        import asyncio

        for step in range(5):
            await asyncio.gather(*(mix_only(w, step) for w in workers))
        ys = torch.stack([w.local.params() for w in workers])
        after = ((ys - ys.mean(0)) ** 2).sum(1).mean()
        return xs.mean(0), ys.mean(0), before, after

    mean_before, mean_after, before, after = simulator.run_rounds(cfg, body)
    assert torch.allclose(mean_before, mean_after, atol=1e-5)
    assert after < before


def test_consensus_distance_is_exported_and_zero_for_allreduce():
    results, _ = simulator.simulate(config("allreduce", 4))
    assert all(r.consensus_distance < 1e-10 for r in results)
    results, _ = simulator.simulate(config("dpsgd", 4))
    assert all(r.consensus_distance > 0 for r in results)


def test_weighted_batch_average_is_the_full_batch_gradient():
    """allreduce with unequal local batches applies exactly the full-batch gradient."""
    cfg = config("allreduce", 3)
    sizes = [2, 5, 9]

    async def body(workers):
        import asyncio

        torch.manual_seed(0)
        xs = [torch.randn(b, 64) for b in sizes]
        ys = [torch.randint(0, 10, (b,)) for b in sizes]
        for w, x, y, b in zip(workers, xs, ys, sizes, strict=False):
            w.local.sampler = Sampler(x, y, seed=0)
            w.local.batch = b
            for group in w.local.optimizer.param_groups:
                group["lr"], group["momentum"] = 1.0, 0.0
        x0 = workers[0].local.params()
        model = workers[0].local.model
        full_loss = torch.nn.functional.cross_entropy(model(torch.cat(xs)), torch.cat(ys))
        full = torch.autograd.grad(full_loss, list(model.parameters()))
        full_flat = torch.cat([g.reshape(-1) for g in full])
        algos = [algorithms.AllReduce(w.transport) for w in workers]
        await asyncio.gather(*(a.round(w.local, 0) for a, w in zip(algos, workers, strict=False)))
        return x0, workers[0].local.params(), full_flat

    x0, x1, full = simulator.run_rounds(cfg, body)
    assert torch.allclose(x0 - x1, full, atol=1e-6)


def test_a_time_bounded_round_weighs_each_worker_by_the_samples_it_computed():
    """algorithm.roundSeconds: a slow worker computes one mini-batch, fast ones several,
    the last one cut to the time left, and the step is the sample-weighted mean over all
    of them (each worker's data is one sample of its own, repeated, so its mini-batches
    share one gradient whatever their size)."""
    cfg = config("allreduce", 3)
    per_batch = [0.15, 0.01, 0.01]  # modelled seconds of compute per mini-batch
    b = 4

    async def body(workers):
        import asyncio

        torch.manual_seed(0)
        xs = [torch.randn(1, 64).repeat(b, 1) for _ in workers]
        ys = [torch.randint(0, 10, (1,)).repeat(b) for _ in workers]
        for w, x, y, t in zip(workers, xs, ys, per_batch, strict=True):
            w.local.sampler = Sampler(x, y, seed=0)
            w.local.batch = b
            w.local.emulation = Emulation(sample_seconds=t / b)
            for group in w.local.optimizer.param_groups:
                group["lr"], group["momentum"] = 1.0, 0.0
        x0 = workers[0].local.params()
        model = workers[0].local.model
        grads = []
        for x, y in zip(xs, ys, strict=True):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            grads.append(
                torch.cat(
                    [g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]
                )
            )
        algos = [algorithms.AllReduce(w.transport, round_seconds=0.12) for w in workers]
        stats = await asyncio.gather(
            *(a.round(w.local, 0) for a, w in zip(algos, workers, strict=True))
        )
        return x0, workers[0].local.params(), grads, [s.samples for s in stats]

    x0, x1, grads, samples = simulator.run_rounds(cfg, body)
    # By time, not by batch: the fast ones computed more than one mini-batch (how many
    # more depends on the machine's load; a batch-bounded round computes exactly b).
    assert samples[0] == b and min(samples[1:]) > b, samples
    expected = sum(g * n for g, n in zip(grads, samples, strict=True)) / sum(samples)
    assert torch.allclose(x0 - x1, expected, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_with_one_worker_every_algorithm_is_plain_sgd(name):
    cfg = config(name, 1)
    _results, workers = simulator.simulate(cfg)
    got = workers[0].local.params()

    # Plain SGD with the same model, data and seed, written out by hand.
    ref = loop.Worker.build(cfg, simulator.SimWorld.__new__(simulator.SimWorld) and _single())
    for _ in range(cfg.training.steps):
        asyncio.run(ref.local.grad())
        ref.local.step()
    assert torch.allclose(got, ref.local.params(), atol=1e-6)


def _single():
    class One:
        rank, size, virtual_time = 0, 1, False

    return One()


def test_teleportation_active_sets_are_shared_and_sized():
    from dtj_trainer.algorithms.teleportation import active_set

    a = active_set(16, 4, seed=3, t=7)
    assert a == active_set(16, 4, seed=3, t=7)
    assert len(set(a)) == 4 and all(0 <= r < 16 for r in a)
    assert active_set(16, 4, seed=3, t=8) != a


def test_teleportation_auto_search_picks_a_k_within_n():
    cfg = config("teleportation", 8, algorithm={"activeNodes": "auto"})
    results, _ = simulator.simulate(cfg)
    assert results[0].active_nodes in {1, 2, 4, 8}
    assert len({r.active_nodes for r in results}) == 1, "every worker found the same k"


@pytest.mark.parametrize(("m", "budget"), [(2, 10), (4, 300), (5, 300), (7, 300), (9, 1000)])
def test_successive_halving_doubles_the_rounds_and_stays_within_the_budget(m, budget):
    rungs = ksearch.halving_rungs(m, budget)
    alive, cost = m, 0
    for rounds in rungs:
        cost += alive * rounds
        alive = (alive + 1) // 2
    assert alive == 1 and cost <= budget
    assert all(b == 2 * a for a, b in itertools.pairwise(rungs))
    assert cost > budget // 2, "the budget is mostly used"
    assert ksearch.halving_rungs(1, budget) == []


def test_the_k_search_scores_the_slot_models_themselves_within_its_budget():
    cfg = config("teleportation", 8, algorithm={"activeNodes": "auto"})
    _results, workers = simulator.simulate(cfg)
    log = workers[0].search_log
    assert [e["k"] for e in log[:4]] == [1, 2, 4, 8]  # every candidate in rung 0
    assert sum(e["rounds"] for e in log) <= cfg.training.rounds  # 20 rounds in all
    # rung 1 keeps the better half of rung 0, with twice the rounds
    first = {e["k"]: e["val_loss"] for e in log[:4]}
    kept = sorted(first, key=first.get)[:2]
    assert sorted(e["k"] for e in log[4:6]) == sorted(kept)
    assert {e["rounds"] for e in log[4:6]} == {2 * log[0]["rounds"]}
    assert workers[0].search_log == workers[5].search_log, "every worker agrees"


def test_teleportation_refuses_momentum():
    with pytest.raises(ValueError, match=r"optimizer\.name sgd with momentum 0"):
        TrainerConfig.model_validate(
            {
                "job": "x",
                "replicas": 4,
                "algorithm": {"name": "teleportation"},
                "optimizer": {"momentum": 0.9},
            }
        )


def test_dasgd_drops_gradients_beyond_the_staleness_bound():
    from dtj_trainer.config import AlgorithmSpec

    class Three:
        rank, size, virtual_time = 0, 3, False

    # 1 round of the 2 others' updates = 2 updates tolerated.
    algo = algorithms.DASGD(Three(), AlgorithmSpec(name="dasgd", stalenessBound=1), seed=0)  # type: ignore[arg-type]
    algo.seen = torch.tensor([5.0, 5.0, 5.0])
    fresh = torch.tensor([1.0, 1.0, 5.0, 5.0, 5.0])  # g = (1, 1), sender saw everything
    late = torch.tensor([2.0, 2.0, 3.0, 5.0, 5.0])  # missed 2 of worker 0's: kept
    stale = torch.tensor([1.0, 1.0, 1.0, 5.0, 5.0])  # missed 4 of worker 0's: dropped
    total, staleness = algo._fresh([(1, fresh), (2, late), (2, stale)])
    assert staleness == [0, 2, 4]  # each message's staleness, dropped ones included
    assert algo.dropped == 1
    assert total is not None and total.tolist() == [3.0, 3.0]
    assert algo.seen.tolist() == [5.0, 6.0, 7.0]  # processed, the dropped one too


def test_dasgd_drops_do_not_cascade_with_a_much_slower_worker():
    """Staleness measures delay. When dropped gradients did not count as processed, a 5x
    slower worker's gradients were dropped by the others, then everything they sent
    looked staler and staler to it (max 251 updates here) and it dropped 268 of 450."""
    cfg = config("dasgd", 4, steps=150, model="mlp")
    cfg = cfg.model_copy(update={"optimizer": cfg.optimizer.model_copy(update={"lr": 0.025})})
    results, _ = simulator.simulate(cfg, slowdowns={0: 5.0})
    slow, fast = results[0], results[1:]
    assert slow.updates_dropped == 0 and slow.staleness_max is not None
    assert slow.staleness_max <= 12, "the slow worker's view is current"
    for r in fast:  # the slow worker's gradients (~15-19 updates late) exceed the bound
        assert r.staleness_max is not None and r.staleness_max < 30
        assert 0 < r.updates_dropped < 0.2 * r.updates_received


def test_dasgd_puts_a_peers_gradient_through_the_same_momentum_as_its_own():
    """Received gradients used to be plain SGD steps beside a momentum step for one's
    own (a ~10x weight for one's own at momentum 0.9)."""
    from dtj_trainer.algorithms.base import Local
    from dtj_trainer.config import AlgorithmSpec
    from torch import nn

    class Two:
        rank, size, virtual_time = 0, 2, False

        def __init__(self, inbox):
            self._inbox, self.sent = inbox, []

        def inbox(self):
            out, self._inbox = self._inbox, []
            return out

        def post(self, payload, peer):
            self.sent.append((peer, payload))

    class ZeroGrad:  # own gradient 0: every move comes from the peer's gradient
        def next(self, batch):
            return torch.zeros(1, 1), torch.zeros(1, 1)

    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    local = Local(model, opt, ZeroGrad(), 1, 0.1, nn.MSELoss())  # type: ignore[arg-type]
    peer_grad = torch.tensor([1.0, 0.0, 0.0])  # g = 1, version (0, 0)
    t = Two([(1, peer_grad)])
    spec = AlgorithmSpec(name="dasgd", scaleGradients=False)
    algo = algorithms.DASGD(t, spec, seed=0)  # type: ignore[arg-type]
    asyncio.run(algo.round(local, 0))
    asyncio.run(algo.round(local, 1))  # nothing new: momentum carries the peer's gradient on
    # Round 0 applies the peer's g (buffer 1), then its own 0 (buffer 0.9); round 1 its
    # own 0 again (buffer 0.81). Plain SGD would stop at -0.1.
    assert model.weight.item() == pytest.approx(-0.1 - 0.1 * 0.9 - 0.1 * 0.81)
    assert [p for p, _ in t.sent] == [1, 1]


def test_async_methods_train_in_the_simulator_with_a_slow_worker():
    for name in ("gosgd", "dasgd"):
        cfg = config(name, 4, steps=150)
        results, _workers = simulator.simulate(cfg, slowdowns={0: 3.0})
        assert results[0].averaged_accuracy > 0.5, name


def test_under_a_budget_a_slow_asynchronous_worker_does_a_third_of_the_rounds():
    """Virtual time: worker 0 takes 3 ticks a round. The job ends when all together
    have trained on the budget, so the fast workers do most of it."""
    cfg = config("gosgd", 4, steps=None, budget={"samples": 32 * 4 * 60})
    results, workers = simulator.simulate(cfg, slowdowns={0: 3.0})
    rounds = [w.current_step for w in workers]
    assert all(r >= 2.5 * rounds[0] for r in rounds[1:]), rounds
    done = sum(rounds) * 32
    assert 32 * 4 * 60 <= done <= 32 * 4 * 60 + 4 * 10 * 32, (done, rounds)
    assert results[0].averaged_accuracy > 0.5


def test_under_a_budget_synchronous_workers_stop_together_at_the_budget():
    cfg = config("dpsgd", 4, steps=None, budget={"samples": 32 * 4 * 45})
    _results, workers = simulator.simulate(cfg)
    assert [w.current_step for w in workers] == [45] * 4


def test_a_users_backward_starts_from_zero_whatever_the_method_left_in_grad():
    """dasgd applies the peers' gradients through .grad before asking for this worker's;
    a user's loop zeroes after its step, so without zeroing first its backward added its
    gradient to theirs (the user-loop path of dasgd diverged on real processes)."""

    model = torch.nn.Linear(3, 1)
    x = torch.ones(4, 3)

    class Backward:  # a user's loop: forward and backward only
        async def compute(self, local: algorithms.Local) -> float:
            loss = model(x).sum()
            loss.backward()
            return float(loss)

        async def round_over(self) -> None: ...

        def reported(self) -> dict[str, float]:
            return {}

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    idx = torch.arange(4)
    local = algorithms.Local(
        model, opt, Sampler(idx, idx, seed=0), 4, 0.1, lambda o, y: o, driver=Backward()
    )
    local.set_flat_grad(torch.full((4,), 100.0))  # the peers' gradients, applied
    asyncio.run(local.grad())
    assert local.flat_grad().tolist() == [4.0, 4.0, 4.0, 4.0]  # d(sum of 4 rows)/d(w, b)
