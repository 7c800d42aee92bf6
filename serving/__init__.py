"""SOAP serving (paper §4): Ray Serve application, online-store I/O, metrics and snapshot rollout.

Modules:
    app          build_app(): binds SoapIngress -> ComputeCenter with pinned code versions
    api          the HTTP contract: request/response models, the FastAPI object, json_response
    ingress      SoapIngress deployment: reads in async / realtime / offline / frozen mode, five routes
    dispatch     ComputeLauncher, ComputeCoalescer: fire-and-forget compute calls (pure asyncio, no Ray)
    compute      ComputeCenter deployment: production + frozen user towers, batched compute, pooled write-back
    cpu          CPU priority and pinning of the compute worker threads (stdlib only)
    settings     app_settings(), compute_user_config(), ingress_user_config() (+ validation), code_version(),
                 snapshot_fingerprint(), open_store(), MODES (no Ray, FastAPI or torch)
    store_io     pooled write / direct read of SUM embeddings in the Feast online store (shared with the
                 daily batch), users' current features for compute
    metrics      Prometheus metrics (ray.serve.metrics) and exposition helpers
    ray_cluster  ensure_ray() / shutdown()
    rollout      deploy(), rollout(), reconfigure(), served_snapshot_id(), RolloutError
"""
