"""`dtj-cluster`: the local cluster for tests and demos.

dtj-cluster up [--no-fake-nodes]   start it; prints `export KUBECONFIG=...`
dtj-cluster down                   stop every process (pods included), remove its state
dtj-cluster build                  build the pinned binaries (cached) and print where
dtj-cluster demo [FILE]            the whole story on executing nodes: cluster, CRD,
                                   operator, `kubectl apply`, progress, result, clean-up
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import controlplane, demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dtj-cluster", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "build", "demo"])
    parser.add_argument("file", nargs="?", default=str(demo.QUICKSTART), help="demo: manifest")
    parser.add_argument(
        "--dir", help="state directory (default ~/.local/state/dtj/cluster/default)"
    )
    parser.add_argument(
        "--no-fake-nodes", action="store_true", help="up: only executing nodes, no kwok GPU pools"
    )
    args = parser.parse_args(argv)
    directory = Path(args.dir) if args.dir else None
    if args.action == "up":
        cluster = controlplane.up(directory, fake_nodes=not args.no_fake_nodes)
        print(f"export KUBECONFIG={cluster.kubeconfig}")
        print(f"export PATH={cluster.bin}:$PATH  # kubectl {cluster.bin / 'kubectl'}")
    elif args.action == "down":
        controlplane.down(directory)
        print("local cluster stopped", file=sys.stderr)
    elif args.action == "build":
        print(controlplane.build())
    else:
        return demo.run(Path(args.file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
