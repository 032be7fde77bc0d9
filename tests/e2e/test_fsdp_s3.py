"""trainer.strategy=fsdp staged to S3: every rank writes its shards to the staging folder and uploads
them itself; rank 0 publishes the payload and, last, the manifest. Two gloo ranks against the real
moto S3 server of test_remote (reached through the standard environment variables only).

A resume on a fresh node (the staging folder gone) reads every shard from S3 and must end where an
uninterrupted local fsdp run ends, tensor by tensor; a shard missing from the bucket makes every
rank skip that checkpoint together (the negative control: no garbage is loaded).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_tensors_equal, kill_tree, launch_cmd, metrics, signal_running, wait_for, worker_pids
from harness.checkpoint.layout import step_dir_name
from test_fsdp import FSDP, FSDP_STEPS, _assert_same_training, fsdp_reference  # noqa: F401  (a fixture)
from test_remote import BUCKET, _keys, moto_server, s3_url  # noqa: F401  (fixtures; skip without moto)

SHARD_FILES = {"shards/.metadata", "shards/__0_0.distcp", "shards/__1_0.distcp"}
# moto's request log: one line per request, e.g. "PUT /harness-test/<prefix>/step_000000008/manifest.json?..."
# (werkzeug colours some lines: the method may follow escape codes rather than the quote)
REQUEST = re.compile(r'(PUT|POST) /' + BUCKET + r'/([^ ?]+)')


def _command(s3_url: str, run: Path, stage: Path, *extra: str) -> list[str]:
    return launch_cmd(s3_url, *FSDP, f"checkpoint.staging_dir={stage}",  # type: ignore[arg-type]
                      f"trainer.metrics_file={run / 'metrics.jsonl'}", *extra)


def _resume(s3_url: str, run: Path, stage: Path, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(s3_url, run, stage, *extra), cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _remote_steps(moto_server, s3_url: str) -> list[int]:
    return sorted(int(key.split("/")[0].split("_")[1]) for key in _keys(moto_server, s3_url)
                  if key.endswith("/manifest.json"))


def _download(moto_server, s3_url: str, target: Path) -> None:
    """Every object under ``s3_url`` into ``target`` (the layout of a local checkpoint folder)."""
    client = moto_server.client()
    prefix = s3_url.removeprefix(f"s3://{BUCKET}/")
    for key in _keys(moto_server, s3_url):
        path = target / key
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, f"{prefix}/{key}", str(path))


def _assert_every_manifest_published_last(moto_server, s3_url: str) -> None:
    """In the server's own request order, each step's manifest upload came after the upload of every
    file its manifest lists (each rank's shards and rank 0's payload)."""
    prefix = s3_url.removeprefix(f"s3://{BUCKET}/") + "/"
    last_write: dict[str, int] = {}
    for index, line in enumerate(moto_server.requests()):
        match = REQUEST.search(line)
        if match and match.group(2).startswith(prefix):
            last_write[match.group(2).removeprefix(prefix)] = index
    client = moto_server.client()
    for step in _remote_steps(moto_server, s3_url):
        name = step_dir_name(step)
        body = client.get_object(Bucket=BUCKET, Key=f"{prefix}{name}/manifest.json")["Body"].read()
        listed = set(json.loads(body)["files"])
        assert SHARD_FILES <= listed, listed
        assert all(last_write[f"{name}/{rel}"] < last_write[f"{name}/manifest.json"] for rel in listed), name


@pytest.mark.parametrize("fresh_node", [True, False], ids=["staging-deleted", "staging-kept"])
def test_sigterm_under_fsdp_staged_to_s3_resumes_bit_exact(moto_server, s3_url, tmp_path, fsdp_reference,
                                                           fresh_node):
    """staging-deleted: a fresh node, every rank's shards come from S3; staging-kept: the node
    survived, every rank reads the copy staged complete on it. The fresh node also keeps only the
    last 2 checkpoints: pruned ones leave the bucket whole (shards included)."""
    run, stage = tmp_path / "run", tmp_path / "stage"
    run.mkdir()
    retention = ("checkpoint.keep_last=2",) if fresh_node else ()
    launcher = subprocess.Popen(_command(s3_url, run, stage, *retention), cwd=REPO, stdout=open(tmp_path / "job.log", "w"),
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    code = signal_running(launcher, run, lambda _, pids: os.kill(pids[1], signal.SIGTERM), after_step=12)
    output = (tmp_path / "job.log").read_text()
    assert code == 75, output
    stopped = _remote_steps(moto_server, s3_url)[-1]
    assert 12 <= stopped < FSDP_STEPS, output
    _assert_every_manifest_published_last(moto_server, s3_url)
    if fresh_node:
        shutil.rmtree(stage)
    before = len(moto_server.requests())
    result = _resume(s3_url, run, stage, *retention)
    assert f"resumed from {s3_url}/{step_dir_name(stopped)} at step {stopped}" in result.stdout
    shard_reads = [line for line in moto_server.requests()[before:]
                   if f"GET /{BUCKET}/" in line and f"{step_dir_name(stopped)}/shards/" in line]
    assert bool(shard_reads) == fresh_node, shard_reads
    _assert_every_manifest_published_last(moto_server, s3_url)
    if fresh_node:
        kept = {step_dir_name(step) for step in (FSDP_STEPS - 8, FSDP_STEPS)}
        assert {key.split("/")[0] for key in _keys(moto_server, s3_url)} == kept
    _download(moto_server, s3_url, run)
    _assert_same_training(run, fsdp_reference)
    if fresh_node:  # the tools read the sharded checkpoint on the bucket as they read its local copy
        exports = {}
        for source in (s3_url, str(run)):
            exports[source] = tmp_path / f"model-{len(exports)}.pt"
            tool = subprocess.run([sys.executable, "-m", "harness.ckpt", "export", source, str(exports[source])],
                                  cwd=REPO, capture_output=True, text=True, timeout=120)
            assert tool.returncode == 0, tool.stderr
        assert_tensors_equal(torch.load(exports[s3_url]), torch.load(exports[str(run)]))


def test_a_shard_missing_from_s3_makes_every_rank_fall_back_and_the_step_is_redone_exactly(
        moto_server, s3_url, tmp_path, fsdp_reference):
    """Negative control: rank 1's shard of the newest checkpoint deleted from the bucket. Rank 1 finds
    it missing, every rank skips that checkpoint together, resumes from the one before, trains the
    last steps again and publishes the same step anew (its shards uploaded again before its manifest);
    the end equals the uninterrupted run."""
    run, stage = tmp_path / "run", tmp_path / "stage"
    _resume(s3_url, run, stage)
    steps = _remote_steps(moto_server, s3_url)
    assert steps[-1] == FSDP_STEPS and len(steps) >= 2
    newest, previous = step_dir_name(steps[-1]), step_dir_name(steps[-2])
    moto_server.client().delete_object(Bucket=BUCKET,
                                       Key=f"{s3_url.removeprefix(f's3://{BUCKET}/')}/{newest}/shards/__1_0.distcp")
    shutil.rmtree(stage)
    before = len(moto_server.requests())
    result = _resume(s3_url, run, stage)
    relaunch = moto_server.requests()[before:]
    # The skipped copy of the step loses its manifest before the ranks upload the new shards.
    first = {method: next((index for index, line in enumerate(relaunch)
                           if f"{method} /{BUCKET}/" in line and f"{newest}/{rel}" in line), None)
             for method, rel in (("DELETE", "manifest.json"), ("POST", "shards/"))}
    assert None not in first.values() and first["DELETE"] < first["POST"], first
    assert f"skipping corrupt checkpoint {s3_url}/{newest}: rank 1: {newest}/shards/__1_0.distcp: missing" \
        in result.stdout + result.stderr
    assert f"resumed from {s3_url}/{previous} at step {steps[-2]}" in result.stdout
    assert _remote_steps(moto_server, s3_url)[-1] == FSDP_STEPS
    _assert_every_manifest_published_last(moto_server, s3_url)
    _download(moto_server, s3_url, run)
    _assert_same_training(run, fsdp_reference)


def test_sigkill_at_random_instants_while_staging_to_s3_leaves_a_loadable_remote(moto_server, s3_url, tmp_path,
                                                                                fsdp_reference):
    """SIGKILL of the whole job twice at random instants with a save every 3 steps (kills land inside
    saves and uploads too), each time on a fresh node (the staging folder gone): every manifest on
    the remote was published after its files, and the relaunch resumes from the remote and ends bit
    for bit where an uninterrupted run ends."""
    run, stage = tmp_path / "run", tmp_path / "stage"
    run.mkdir()
    rng = random.Random(22)
    for _ in range(2):
        with open(tmp_path / "job.log", "a") as log:
            launcher = subprocess.Popen(_command(s3_url, run, stage, "checkpoint.every_steps=3"), cwd=REPO,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            worker_pids(launcher, 2)
            done_before = max(metrics(run), default=0)
            wait_for(lambda: max(metrics(run), default=0) > done_before + 3, 120, "progress")
            time.sleep(rng.uniform(0.0, 0.25))
        finally:
            kill_tree(launcher)
        shutil.rmtree(stage, ignore_errors=True)
    _assert_every_manifest_published_last(moto_server, s3_url)
    newest = _remote_steps(moto_server, s3_url)[-1]
    result = _resume(s3_url, run, stage, "checkpoint.every_steps=3")
    assert f"resumed from {s3_url}/{step_dir_name(newest)} at step {newest}" in result.stdout, result.stdout
    _assert_every_manifest_published_last(moto_server, s3_url)
    _download(moto_server, s3_url, run)
    _assert_same_training(run, fsdp_reference)
