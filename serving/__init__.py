"""SOAP serving (paper §4): Ray Serve application, online-store I/O and snapshot rollout.

Modules:
    store_io     write/read of SUM embeddings in the Feast online store (shared with the daily batch)
    app          ComputeCenter + SoapIngress deployments, build_app()
    ray_cluster  ensure_ray() / shutdown()
    rollout      deploy(), rollout(), served_snapshot_id(), RolloutError
"""
