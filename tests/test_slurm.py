"""SLURM jobs against a real single-node cluster: preemption + requeue + resume, dependent chains,
array sweeps; plus shards streamed over loopback HTTP and the run-directory lock."""

import functools
import http.server
import json
import os
import threading
import time

import pytest

from slurm_cluster import SlurmCluster, ensure_installed
from test_loader import write_shards
from test_trainer import RUN_ARGS, losses
from vitpipe.cli import main
from vitpipe.cluster.slurm import JobSpec, render


def test_render_has_the_preemption_essentials():
    script = render(JobSpec(nodes=2, gpus_per_node=4, time="02:00:00", partition="gpu", account="ml"),
                    ["pretrain", "mae", "--data", "/d", "--out", "/r"])
    for line in ("#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@90",
                 "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --account=ml", "scontrol show hostnames",
                 "accelerate launch --multi_gpu --num_machines", "--resume auto", "trap 'forward USR1' USR1"):
        assert line in script, line
    cpu = render(JobSpec(nodes=2, processes_per_node=2), ["pretrain", "mae", "--data", "/d", "--out", "/r"])
    assert "torch.distributed.run --nnodes" in cpu and "--rdzv_endpoint" in cpu


def test_slurm_cli_errors(capsys):
    assert main(["slurm", "render", "--nodes", "0", "--", "pretrain", "mae"]) == 2
    assert main(["slurm", "render"]) == 2
    assert "error:" in capsys.readouterr().err


def test_run_lock_refuses_a_second_writer(tmp_path, tiny_shards):
    from vitpipe.config import ConfigError
    from vitpipe.ssl.engine.launch import RunLock

    first = RunLock(tmp_path / "run")
    first.acquire()
    try:
        with pytest.raises(ConfigError, match="one job per run directory"):
            RunLock(tmp_path / "run").acquire()
    finally:
        first.release()
    RunLock(tmp_path / "run").acquire()


def test_http_shards_train_like_local_shards(tmp_path):
    shards = write_shards(tmp_path / "shards", sizes=[8] * 5)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{{00000..00004}}.tar"
        args = [*RUN_ARGS, "data.image_size=8", "model.patch_size=2", "train.max_steps=6"]
        assert main(["pretrain", "mae", "--data", str(shards), "--out", str(tmp_path / "local"), *args]) == 0
        assert main(["pretrain", "mae", "--data", url, "--out", str(tmp_path / "http"), *args]) == 0
    finally:
        server.shutdown()
    assert losses(tmp_path / "local") == losses(tmp_path / "http")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if not ensure_installed():
        pytest.skip("slurm-wlm and munge are not installed and cannot be installed here")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)  # for sbatch run by `vitpipe slurm submit` in-process
    yield cluster
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    cluster.stop()


def submit(capsys, args: list[str]) -> list[str]:
    capsys.readouterr()
    assert main(["slurm", "submit", *args]) == 0
    return capsys.readouterr().out.split()


def test_preempted_job_requeues_and_resumes_with_identical_losses(slurm, tmp_path, capsys):
    shards = write_shards(tmp_path / "shards", sizes=[8] * 5)
    args = [*RUN_ARGS, "data.image_size=8", "model.patch_size=2", "train.max_steps=600", "train.ckpt_every_steps=50",
            "train.seed=5"]
    assert main(["pretrain", "mae", "--data", str(shards), "--out", str(tmp_path / "reference"), *args]) == 0
    expected = {step: values[0] for step, values in losses(tmp_path / "reference").items()}

    run = tmp_path / "run"
    (job,) = submit(capsys, ["--output", str(tmp_path / "job-%j.out"), "--time", "00:10:00", "--cpus-per-task", "2",
                             "--", "pretrain", "mae", "--data", str(shards), "--out", str(run), *args])
    deadline = time.monotonic() + 180
    while not ((run / "metrics.jsonl").exists() and len(losses(run)) >= 20):
        assert time.monotonic() < deadline, slurm.job_state(job)
        time.sleep(0.02)
    slurm.run(["scancel", "--batch", "--signal=USR1", job])  # what the time limit or preemption sends
    assert slurm.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED"), timeout=300) == "COMPLETED", \
        (tmp_path / f"job-{job}.out").read_text()
    log = (tmp_path / f"job-{job}.out").read_text()
    assert "restart 1" in log and "got USR1" in log
    events = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    preempted = [e for e in events if e.get("event") == "preempted"]
    assert preempted and preempted[0]["slurm_requeued"] is True and preempted[0]["step"] < 600
    got = losses(run)
    assert sorted(got) == list(range(1, 601))
    for step, values in got.items():
        assert all(value == pytest.approx(expected[step], abs=1e-6) for value in values), step
    sessions = json.loads((run / "run.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[1]["slurm_restart_count"] == "1"


def test_dependent_chain_and_failing_parent(slurm, tmp_path, capsys):
    from conftest import write_image_folder

    folder = write_image_folder(tmp_path / "images", per_class=12, classes=("a", "b"))
    shards, run = tmp_path / "shards", tmp_path / "run"
    jobs = submit(capsys, [
        "--pipeline", "--output", str(tmp_path / "chain-%j.out"), "--",
        "ingest", str(folder), "--out", str(shards), "--image-size", "8", "::",
        "pretrain", "mae", "--data", str(shards), "--out", str(run), *RUN_ARGS, "data.image_size=8",
        "model.patch_size=2", "train.max_steps=3", "::",
        "eval", "knn", str(run), "--train", str(shards), "--test", str(shards), "--workers", "0",
        "--max-contamination", "1"])
    assert len(jobs) == 3
    assert slurm.wait_for(jobs[-1], ("COMPLETED", "FAILED", "CANCELLED"), timeout=300) == "COMPLETED"
    assert json.loads((run / "eval" / "knn.json").read_text())["top1"] >= 0

    failing = submit(capsys, ["--pipeline", "--output", str(tmp_path / "bad-%j.out"), "--",
                              "ingest", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "x"), "::",
                              "shards", "verify", str(tmp_path / "x")])
    assert slurm.wait_for(failing[0], ("COMPLETED", "FAILED", "CANCELLED"), timeout=120) == "FAILED"
    assert slurm.wait_for(failing[1], ("CANCELLED", "COMPLETED", "FAILED"), timeout=120) == "CANCELLED"


def test_array_sweep_writes_one_result_per_task(slurm, tmp_path, capsys):
    shards = write_shards(tmp_path / "shards", sizes=[8] * 4)
    (job,) = submit(capsys, ["--output", str(tmp_path / "array-%A_%a.out"), "--sweep", "train.seed=1",
                             "--sweep", "train.seed=2 train.max_steps=3", "--",
                             "pretrain", "mae", "--data", str(shards), "--out", str(tmp_path / "sweep_%a"), *RUN_ARGS,
                             "data.image_size=8", "model.patch_size=2", "train.max_steps=2"])
    for task in (0, 1):
        assert slurm.wait_for(f"{job}_{task}", ("COMPLETED", "FAILED", "CANCELLED"), timeout=300) == "COMPLETED"
    assert sorted(losses(tmp_path / "sweep_0")) == [1, 2]
    assert sorted(losses(tmp_path / "sweep_1")) == [1, 2, 3]
    assert "seed: 2" in (tmp_path / "sweep_1" / "config.yaml").read_text()


def test_spark_ingest_on_a_standalone_cluster_in_a_slurm_job(slurm, tmp_path, capsys, url_list):
    """`slurm submit -- ingest ... distributor=pyspark`: a Spark master and worker started inside
    the allocation, executors downloading from the loopback server; the same shards as local mode."""
    pytest.importorskip("pyspark", reason="pip install 'vitpipe[spark]'")
    from test_ingest import web_config
    from vitpipe.pipeline.ingest import ingest

    settings = ["caption_col=caption", "timeout=1.5", "max_pixels=1000000", "max_download_bytes=1000000",
                "image_size=16", "shard_size=6", "threads=8", "allow_networks=127.0.0.1/32"]
    local = ingest(str(url_list), tmp_path / "local", web_config(), progress=False)
    (job,) = submit(capsys, ["--output", str(tmp_path / "spark-%j.out"), "--cpus-per-task", "2", "--",
                             "ingest", str(url_list), "--out", str(tmp_path / "spark"), "distributor=pyspark",
                             *settings])
    state = slurm.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED"), timeout=300)
    log = (tmp_path / f"spark-{job}.out").read_text()
    assert state == "COMPLETED", log
    manifest = json.loads((tmp_path / "spark" / "manifest.json").read_text())
    assert manifest["settings"]["spark_master"].startswith("spark://")
    for key in ("rows", "written", "failures", "filtered", "duplicates"):
        assert manifest[key] == local[key], key
    tars = {p.name: p.read_bytes() for p in (tmp_path / "spark").glob("*.tar")}
    assert tars == {p.name: p.read_bytes() for p in (tmp_path / "local").glob("*.tar")} and tars


def test_run_lock_dies_with_its_process_even_if_a_forked_child_lives_on(tmp_path):
    """kill -9 of a trainer whose DataLoader workers (forked children) are still alive: the rerun
    must not be refused while they wind down."""
    import signal
    import subprocess
    import sys

    from vitpipe.ssl.engine.launch import RunLock

    code = ("import os, sys, time; from pathlib import Path; from vitpipe.ssl.engine.launch import RunLock; "
            "lock = RunLock(Path(sys.argv[1])); lock.acquire(); child = os.fork(); "
            "time.sleep(60) if child == 0 else (print(child, flush=True), time.sleep(60))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        lock = RunLock(tmp_path / "run")
        lock.acquire()  # refused before: the sleeping child held the flock
        lock.release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_lock_still_held_for_a_dead_trainer_is_waited_out_not_refused(tmp_path):
    """Under load, a killed trainer's forked child may not yet have closed its copy of the lock:
    the file names a dead process of this machine, so the rerun waits for the copy to go."""
    import os
    import subprocess
    import sys

    from vitpipe.ssl.engine.launch import RunLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run").mkdir()
    code = ("import fcntl, sys, time; handle = open(sys.argv[1], 'a+'); fcntl.flock(handle, fcntl.LOCK_EX); "
            f"handle.write('pid {dead.pid} on {os.uname().nodename}'); handle.flush(); print('held', flush=True); "
            "time.sleep(1.5)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run" / ".lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = RunLock(tmp_path / "run")
        lock.acquire()  # refused at once before
        lock.release()
    finally:
        holder.kill()
        holder.wait()


def test_curate_renders_as_a_slurm_job_on_several_processes():
    script = render(JobSpec(nodes=2, processes_per_node=2), ["curate", "/d", "--out", "/o", "semantic_dedup.encoder=/r"])
    assert "torch.distributed.run --nnodes" in script and "-m vitpipe curate /d --out /o semantic_dedup.encoder=/r" in script
    assert "--resume auto" not in script  # curate resumes by itself (kept fingerprints, cached embeddings)
