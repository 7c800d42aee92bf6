"""Airflow's local settings for the stack's scheduler (``sumctl up`` puts this folder on its PYTHONPATH only).

Airflow imports ``airflow_local_settings`` once when a component starts. The LocalExecutor's workers are
forked from the scheduler, and every task process is forked from a worker (a bare ``os.fork`` on Linux), so
the modules imported here are already loaded in every task process: a task no longer spends seconds importing
the DAG's task module, torch, Feast, Great Expectations and Ray anew.

Imports only, never a computation: importing starts no threads in these libraries, but a torch op run here
would start its OpenMP pool, and a task forked after that hangs at its first parallel op.
"""

import great_expectations  # noqa: F401
import feast  # noqa: F401
import ray  # noqa: F401
import ray.serve  # noqa: F401
import torch  # noqa: F401

import sum_pipeline.tasks  # noqa: F401  (what dags/sum_daily.py imports)

# What the tasks import inside their functions (measured in a task forked after the lines above):
import torch._dynamo  # noqa: F401,E402  torch.optim's first param group imports it: ~1 s (sympy, networkx)
import dvc.repo  # noqa: F401,E402  version_data, promote
import gto.api  # noqa: F401,E402  promote
import sum_models.snapshot  # noqa: F401,E402  train, evaluate, gate, materialize_embeddings
import sum_models.train  # noqa: F401,E402
import sum_platform.offline_store  # noqa: F401,E402  Feast's DuckDB store (ibis, sqlglot): ~0.5 s per task that reads it
import torch.export._trace  # noqa: F401,E402  the snapshot's export (torch.export: functorch, inductor, networkx)
import feast.repo_operations  # noqa: F401,E402  FeatureStore(...) of every task that opens the store
import ibis.backends.duckdb  # noqa: F401,E402  the offline store's reads and materialization
import great_expectations.render.renderer  # noqa: F401,E402  validate_data's Data Docs
