"""SOAP serving (paper §4): Ray Serve application, online-store I/O, metrics and snapshot rollout.

Modules:
    store_io     pooled write / direct read of SUM embeddings in the Feast online store (shared with the
                 daily batch), users' current features for compute
    app          ComputeCenter + SoapIngress deployments (async / realtime / offline / frozen), build_app()
    metrics      Prometheus metrics (ray.serve.metrics) and exposition helpers
    ray_cluster  ensure_ray() / shutdown()
    rollout      deploy(), rollout(), reconfigure(), served_snapshot_id(), RolloutError
"""
