"""SOAP serving (paper §4): Ray Serve application, online-store I/O, metrics and snapshot rollout.

Modules:
    app          build_app(): binds SoapIngress -> ComputeCenter with pinned code versions
    api          the HTTP contract: request/response models, json_response / json_bytes
    client       SoapClient: the one read path (modes, store reads, coalesced compute calls); in process for
                 Python downstream models (SoapClient.connect), or behind the HTTP API
    http_app     build_http_app(): the five routes over a SoapClient; FastUserReads, the hot route without FastAPI
    http_server  HttpServer: uvicorn on the running loop, SO_REUSEPORT listener, draining on replacement
    ingress      SoapIngress deployment: its replica is the HTTP server of the read path (no Serve proxy)
    dispatch     ComputeLauncher, ComputeCoalescer: fire-and-forget compute calls (pure asyncio, no Ray)
    compute      ComputeCenter deployment: production + frozen user towers, batched compute, pooled write-back
    cpu          CPU priority and pinning of the compute worker threads (stdlib only)
    settings     app_settings(), compute_user_config(), ingress_user_config() (+ validation), code_version(),
                 store_location(), snapshot_fingerprint(), open_store(), MODES (no Ray, FastAPI or torch)
    store_io     pooled write / direct read of SUM embeddings in the Feast online store (shared with the
                 daily batch), users' current features for compute
    metrics      Prometheus metrics (ray.serve.metrics) and exposition helpers
    ray_cluster  ensure_ray() / shutdown()
    rollout      deploy(), rollout(), reconfigure(), served_snapshot_id(), RolloutError
"""
