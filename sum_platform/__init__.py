"""Glue of the SUM platform: config, workspace layout, simulator, pipeline tasks and the `sumctl` CLI."""
