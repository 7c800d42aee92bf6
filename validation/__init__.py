"""Gates of the daily pipeline: data checks (GX), the snapshot gate and the snapshot registry."""
