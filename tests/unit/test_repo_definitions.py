"""The Feast repo applies from a clean checkout, and dvc.yaml describes the DAG's steps in its order."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sum_pipeline.tasks import STAGES

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_feast_apply_works_on_a_clean_copy_of_the_feature_repo(tmp_path):
    repo = tmp_path / "feature_repo"
    shutil.copytree(PROJECT_ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    env = os.environ | {"SUM_WORKSPACE": str(tmp_path / "ws")}
    out = subprocess.run([str(BIN / "feast"), "apply"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "user_features" in out.stdout and "sum_embeddings" in out.stdout
    listed = subprocess.run([str(BIN / "feast"), "feature-views", "list"], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=300)
    assert "sum_embeddings" in listed.stdout and "user_features" in listed.stdout


def test_dvc_pipeline_follows_the_dag_order():
    out = subprocess.run([str(BIN / "dvc"), "dag", "--md"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    stages = subprocess.run([str(BIN / "dvc"), "stage", "list", "--name-only"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=120).stdout.split()
    # The study (one stage per dataset) stands beside the daily loop, fed by no stage of it.
    study = [s for s in stages if s.startswith("study@")]
    assert study == ["study@simulated", "study@movielens"]
    stages = [s for s in stages if s not in study]
    # dvc.yaml covers the DAG's steps up to the gate, in the DAG's order (materializing the online store,
    # promotion and serving need the workspace's services and stay with Airflow and sumctl).
    through_gate = STAGES[:STAGES.index("shift_gate") + 1]
    assert stages == [s for s in through_gate if s != "materialize_user_features"]
    names = dict(re.findall(r'(node\d+)\["([\w@]+)"\]', out.stdout))
    edges = {(names[a], names[b]) for a, b in re.findall(r"(node\d+)-->(node\d+)", out.stdout)}
    assert edges == set(zip(stages, stages[1:]))
    assert set(names.values()) == set(stages) | set(study)


def test_every_dvc_stage_is_a_sumctl_step():
    dvc = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    for name, stage in dvc["stages"].items():
        if name == "study":
            assert stage["do"]["cmd"] == "sumctl study --dataset ${item} --out reports/study/${item}"
            assert "reports/study/${item}/metrics.json" in str(stage["do"]["metrics"])
            continue
        assert name in STAGES
        assert stage["cmd"].startswith(f"sumctl stage {name} ")


def test_feature_store_yaml_names_the_platforms_offline_store():
    from sum_platform.offline_store import STORE_TYPE

    config = yaml.safe_load((PROJECT_ROOT / "feature_repo" / "feature_store.yaml").read_text())
    assert config["offline_store"]["type"] == STORE_TYPE
