"""The local cluster for dtj's tests and demos: a real control plane, kwok's fake
GPU nodes and executing nodes that run pods as local processes.

Development only: it is its own distribution (devcluster/pyproject.toml) and
never part of the operator or trainer images.
"""
