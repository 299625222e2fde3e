"""A three-node cluster on one machine (ray.cluster_utils.Cluster, each node its own raylet and object
store) loses a worker node mid-sweep: every trial still ends complete or pruned, the Optuna study agrees,
each node holds one copy of the features that all its trials read, and the trial on the lost node
continues from its checkpoint on another node. Runs in a child process (tests/_multinode_driver.py):
the test session's own Ray is another cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import trial_results

DRIVER = Path(__file__).with_name("_multinode_driver.py")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_sweep_survives_losing_a_worker_node(cache_home, digits, tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from selmix_ray.results import load_run

    storage, out_path = tmp_path / "shared", tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(DRIVER), str(storage), str(out_path)], capture_output=True,
                          text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(out_path.read_text())
    removed = out["removed"]
    assert removed is not None and removed["node"] in out["workers"], out
    print(f"sweep {out['sweep_s']:.1f} s; removed node {removed['node'][:8]} while trial {removed['trial']} had "
          f"{removed['checkpoints_seen']} checkpoints")

    # Every trial ends complete or pruned; the study has the same trials with the same states.
    experiment = storage / "multinode"
    df = load_run(experiment, intervals=False).df
    study = optuna.load_study(study_name="multinode",
                              storage=JournalStorage(JournalFileBackend(str(experiment / "optuna_journal.log"))))
    states = {t.user_attrs.get("tune_trial_id"): t.state.name for t in study.trials}
    evidence = (f"{df[['trial_id', 'status', 'steps_reached', 'num_failures']]}\nstudy: {states}\n"
                f"folders: {sorted(p.name for p in experiment.iterdir())}\n{out}\n{done.stdout[-1500:]}")
    assert len(df) == 6 and set(df["status"]) <= {"complete", "pruned"}, evidence
    assert states == {row.trial_id: row.status.upper() for row in df.itertuples()}, evidence

    # Features: per node, every trial read them from one shared-memory mapping (the node's object store):
    # one copy per node, so at most one fetch per node, and no trial holds a private copy.
    fetches = [json.loads(line) for line in (storage / "fetch.log").read_text().splitlines()]
    mappings = defaultdict(set)
    for record in fetches:
        mappings[record["node"]].add(record["mapping"])
    assert "private" not in set().union(*mappings.values())
    assert all(len(found) == 1 for found in mappings.values()), dict(mappings)
    assert len(set().union(*mappings.values())) == len(mappings)  # the nodes' stores are distinct
    assert set(mappings) <= {out["head"], *out["workers"]} and len(mappings) >= 2
    print("trial starts per node:", {node[:8]: sum(r["node"] == node for r in fetches) for node in mappings})

    # The trial on the lost node failed once, moved to another node and continued from its checkpoint:
    # step 0 was reported once (it did not start over), and it ended at its last step.
    victim = df.set_index("trial_id").loc[removed["trial"]]
    assert victim["num_failures"] >= 1
    assert [r["node"] for r in fetches if r["trial"] == removed["trial"]][-1] != removed["node"]
    steps = [record["step"] for record in trial_results(next(experiment.glob(f"run_trial_{removed['trial']}_*")))]
    assert steps.count(0) == 1 and steps[-1] == victim["steps_reached"]
    # Its own history (from the checkpoint it continued from) holds every report once, with no gap. Tune's
    # result.json may lack the reports between the last one it recorded and the node's death: the trial
    # went on past them on the dying node, checkpointed, and continued from that later checkpoint.
    eval_every = json.loads((experiment / "selmix_run.json").read_text())["eval_every"]
    history_steps = load_run(experiment, intervals=False).history(removed["trial"]).steps
    assert history_steps == list(range(0, int(steps[-1]) + eval_every, eval_every))
    restarts = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    print(f"victim's steps around the restart: {steps[max(0, restarts[0] - 3):restarts[0] + 2] if restarts else steps[:8]}")
