"""Communication graphs and their mixing weights: the one place graph math lives.

Every function is pure: (topology name, n, rank, step) -> peers / weights. The
operator passes only names and sizes; the trainer and the simulator call these.
All graphs here are undirected and regular (or made so), so uniform weights
1/(degree+1) give a symmetric doubly-stochastic mixing matrix W.
"""

from __future__ import annotations

import math

from .config import TopologyName


def _torus_shape(n: int) -> tuple[int, int]:
    """The most square rows x cols factorisation of n (a 1 x n torus is a ring)."""
    rows = math.isqrt(n)
    while n % rows:
        rows -= 1
    return rows, n // rows


def neighbours(topology: TopologyName, n: int, rank: int, step: int = 0) -> list[int]:
    """Peers of `rank` at `step` (sorted, without `rank` itself)."""
    if not 0 <= rank < n:
        raise ValueError(f"rank {rank} outside 0..{n - 1}")
    if n == 1:
        return []
    peers: set[int]
    if topology == "ring":
        peers = {(rank - 1) % n, (rank + 1) % n}
    elif topology == "torus":
        rows, cols = _torus_shape(n)
        r, c = divmod(rank, cols)
        peers = {
            ((r - 1) % rows) * cols + c,
            ((r + 1) % rows) * cols + c,
            r * cols + (c - 1) % cols,
            r * cols + (c + 1) % cols,
        }
    elif topology == "exponential":
        # Static exponential graph, made undirected: i <-> i +/- 2^k.
        hops = [2**k for k in range(max(1, math.ceil(math.log2(n))))]
        peers = {(rank + h) % n for h in hops} | {(rank - h) % n for h in hops}
    elif topology == "one-peer-exponential":
        peers = {one_peer_exponential_peer(n, rank, step)}
    elif topology == "complete":
        peers = set(range(n))
    else:  # pragma: no cover - guarded by the Literal type and the CRD enum
        raise ValueError(f"unknown topology {topology!r}")
    peers.discard(rank)
    return sorted(peers)


def one_peer_exponential_peer(n: int, rank: int, step: int) -> int:
    """The single peer at `step`: rank XOR 2^(step mod log2 n).

    XOR pairs workers up (the relation is symmetric, so both ends agree with no
    message) when n is a power of two; otherwise the hop wraps modulo n and the
    pairing is made symmetric by `pairing`.
    """
    rounds = max(1, math.ceil(math.log2(n)))
    hop = 2 ** (step % rounds)
    peer = rank ^ hop
    if peer < n and n & (n - 1) == 0:
        return peer
    return pairing(n, hop)[rank]


def pairing(n: int, hop: int) -> list[int]:
    """A symmetric matching where i prefers i +/- hop; unmatched workers keep themselves."""
    partner = list(range(n))
    for i in range(n):
        if partner[i] != i:
            continue
        for j in ((i + hop) % n, (i - hop) % n):
            if j != i and partner[j] == j:
                partner[i], partner[j] = j, i
                break
    return partner


def mixing_weights(topology: TopologyName, n: int, rank: int, step: int = 0) -> dict[int, float]:
    """Row `rank` of W at `step`: {peer: weight}, including rank itself.

    Uniform weights over the closed neighbourhood. For the regular graphs here
    (ring, torus, exponential, complete, one-peer pairing) W is symmetric and
    doubly stochastic, so mixing preserves the average of the models.
    """
    peers = neighbours(topology, n, rank, step)
    w = 1.0 / (len(peers) + 1)
    return {rank: w, **{p: w for p in peers}}


def mixing_matrix(topology: TopologyName, n: int, step: int = 0) -> list[list[float]]:
    """The full n x n W (tests and the simulator; workers only need their row)."""
    rows = []
    for i in range(n):
        row = [0.0] * n
        for j, w in mixing_weights(topology, n, i, step).items():
            row[j] = w
        rows.append(row)
    return rows
