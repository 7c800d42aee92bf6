"""Airflow's local settings for the stack's scheduler (``sumctl up`` puts this folder on its PYTHONPATH only).

Airflow imports ``airflow_local_settings`` once when a component starts. The LocalExecutor's workers are
forked from the scheduler, and every task process is forked from a worker (a bare ``os.fork`` on Linux), so
the modules imported here are already loaded in every task process: a task no longer spends seconds importing
the DAG's task module, torch, Feast, Great Expectations and Ray anew. Importing starts no threads in these
libraries (fork-safe); nothing here connects to anything.
"""

import great_expectations  # noqa: F401
import feast  # noqa: F401
import ray  # noqa: F401
import ray.serve  # noqa: F401
import torch  # noqa: F401

import sum_pipeline.tasks  # noqa: F401  (what dags/sum_daily.py imports)
