"""``ray start`` for the deployed stack's Ray nodes, keeping the loopback node IP it is given.

Run as ``python -m serving.ray_node start <the arguments of ray start>``: Ray's own command, after
:func:`serving.ray_cluster.keep_loopback`, so ``--node-ip-address=127.0.0.1`` (and a worker node's loopback
``--address``) stays 127.0.0.1 instead of becoming the host's network address, and the node's servers (GCS, raylet,
agents, Ray Client server, metrics exporters, workers) listen on loopback only.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from ray.scripts.scripts import main

    from serving.ray_cluster import keep_loopback

    keep_loopback()
    sys.argv[0] = "ray"
    sys.exit(main())
