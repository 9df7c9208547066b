"""sbatch scripts for vitpipe commands: requeue on preemption, resume from the last checkpoint.

The batch shell receives the preemption/time-limit signal (``--signal=B:USR1@SECONDS``; a plain
``--signal=USR1@N`` only reaches job steps), forwards it to the srun step, and the trainer
checkpoints at the next step boundary, asks SLURM to requeue the job (``scontrol requeue``:
exiting non-zero alone marks the job FAILED) and exits 75. The requeued job reruns the same
script, and ``--resume auto`` continues from the checkpoint.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from vitpipe.config import ConfigError

EXIT_PREEMPTED = 75  # same code as the trainer's


@dataclass
class JobSpec:
    nodes: int = 1
    """Nodes (one srun task each)."""
    gpus_per_node: int = 0
    """GPUs per node; 0 = CPU job (processes_per_node CPU processes)."""
    processes_per_node: int = 1
    """Training processes per node when gpus_per_node is 0."""
    cpus_per_task: int = 2
    """CPUs for the task on each node."""
    time: str = "01:00:00"
    """Wall-clock limit (HH:MM:SS or D-HH:MM:SS)."""
    partition: str | None = None
    account: str | None = None
    job_name: str = "vitpipe"
    signal_seconds: int = 90
    """Send USR1 to the batch shell this long before the time limit."""
    output: str | None = None
    """stdout/stderr file (%j = job id, %A/%a = array job/task); default: slurm-%j.out in the cwd."""
    port: int = 29500
    """Rendezvous port on the first node."""
    extra: list[str] = field(default_factory=list)
    """More #SBATCH lines, e.g. ["--mem=16G"]."""

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0 or self.cpus_per_task < 1 or self.processes_per_node < 1:
            raise ConfigError("--nodes, --cpus-per-task and --processes-per-node must be >= 1, --gpus-per-node >= 0")
        if self.signal_seconds < 1:
            raise ConfigError("--signal-seconds must be >= 1")


def vitpipe_command(command: list[str]) -> list[str]:
    """The vitpipe command line to run, with ``--resume auto`` added to pretraining."""
    if not command:
        raise ConfigError("give the vitpipe command to run after --, e.g. -- pretrain mae --data S --out R")
    if command[0] == "vitpipe":
        command = command[1:]
    if command[0] == "pretrain" and "--resume" not in command:
        command = [*command[:2], "--resume", "auto", *command[2:]]
    return command


def _quote(part: str) -> str:
    """Shell-quote, but let ``%a`` (as in sbatch's --output) become the array task id at run time."""
    return '"${SLURM_ARRAY_TASK_ID:-0}"'.join(shlex.quote(piece) if piece else "" for piece in part.split("%a"))


def launcher(spec: JobSpec, command: list[str]) -> str:
    """The per-node launch line (run by srun on every node)."""
    args = " ".join(_quote(part) for part in command)
    per_node = spec.gpus_per_node or spec.processes_per_node
    if spec.nodes == 1 and per_node == 1:
        return f"{shlex.quote(sys.executable)} -m vitpipe {args}"
    if spec.gpus_per_node:
        return ("accelerate launch --multi_gpu --num_machines \"$SLURM_NNODES\" --machine_rank \"$SLURM_NODEID\" "
                f"--num_processes $(( SLURM_NNODES * {per_node} )) --main_process_ip \"$MASTER_ADDR\" "
                f"--main_process_port \"$MASTER_PORT\" --rdzv_backend c10d -m vitpipe {args}")
    return (f"{shlex.quote(sys.executable)} -m torch.distributed.run --nnodes \"$SLURM_NNODES\" "
            f"--nproc_per_node {per_node} --node_rank \"$SLURM_NODEID\" --rdzv_backend c10d "
            f"--rdzv_endpoint \"$MASTER_ADDR:$MASTER_PORT\" --rdzv_id \"$SLURM_JOB_ID\" -m vitpipe {args}")


def _header(spec: JobSpec, array: list[list[str]] | None = None) -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={spec.job_name}", f"#SBATCH --nodes={spec.nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --cpus-per-task={spec.cpus_per_task}",
             f"#SBATCH --time={spec.time}"]
    if spec.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
    if spec.partition:
        lines.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        lines.append(f"#SBATCH --account={spec.account}")
    if array:
        lines.append(f"#SBATCH --array=0-{len(array) - 1}")
    lines += [
        "#SBATCH --requeue                        # preempted or requeued jobs run again ...",
        "#SBATCH --open-mode=append               # ... appending to the same log",
        f"#SBATCH --signal=B:USR1@{spec.signal_seconds}             # to the batch shell, before the time limit",
        f"#SBATCH --output={spec.output or ('slurm-%A_%a.out' if array else 'slurm-%j.out')}",
        *[f"#SBATCH {line}" for line in spec.extra],
        "",
        "set -uo pipefail",
        'echo "vitpipe: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, restart ${SLURM_RESTART_COUNT:-0}"',
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_PORT={spec.port}",
        "export PYTHONUNBUFFERED=1",
    ]
    return lines


def render(spec: JobSpec, command: list[str], array: list[list[str]] | None = None) -> str:
    """A readable sbatch script. With ``array``, task i appends ``array[i]`` (key=value overrides)."""
    command = vitpipe_command(command)
    if command[0] == "ingest" and "distributor=pyspark" in command:
        if array:
            raise ConfigError("--sweep does not apply to a Spark ingest")
        return render_spark_ingest(spec, command)
    lines = _header(spec, array)
    launch = launcher(spec, command)
    forwarded = "USR1" if launch.startswith(shlex.quote(sys.executable) + " -m vitpipe") else "TERM"
    if array:
        cases = "\n".join(f"  {i}) OVERRIDES=({' '.join(shlex.quote(o) for o in overrides)}) ;;"
                          for i, overrides in enumerate(array))
        lines += ["case \"$SLURM_ARRAY_TASK_ID\" in", cases, "esac"]
        launch += ' "$@"'  # bash arrays do not cross into the step: pass them as arguments
    lines += [
        "",
        "# the trainer checkpoints on USR1/TERM, requeues the job with scontrol and exits 75;",
        "# launchers (torchrun, accelerate) pass TERM on to their workers, so they get TERM",
        f"forward() {{ echo \"vitpipe: got $1, sending {forwarded} to the job step\"; kill -{forwarded} \"$STEP\" 2>/dev/null; }}",
        "trap 'forward USR1' USR1",
        "trap 'forward TERM' TERM",
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(launch)}" + (' vitpipe "${OVERRIDES[@]}"' if array else "")
        + " &",
        "STEP=$!",
        "while true; do",
        '  wait "$STEP"; CODE=$?',
        '  kill -0 "$STEP" 2>/dev/null || break   # wait returns early when a trapped signal arrives',
        "done",
        'echo "vitpipe: step exited with $CODE"',
        f'if [ "$CODE" = {EXIT_PREEMPTED} ]; then exit 0; fi  # requeued by the trainer; not a failure',
        'exit "$CODE"',
        "",
    ]
    return "\n".join(lines)


def sbatch(script: str, dependency: str | None = None, kill_on_invalid_dep: bool = True) -> str:
    """Submit ``script``; return the job id."""
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch not found: run this on a SLURM login node (or render the script and copy it)")
    args = ["sbatch", "--parsable"]
    if dependency:
        args += [f"--dependency={dependency}", f"--kill-on-invalid-dep={'yes' if kill_on_invalid_dep else 'no'}"]
    result = subprocess.run(args, input=script, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def split_pipeline(command: list[str]) -> list[list[str]]:
    """``a ... :: b ... :: c ...`` -> [[a ...], [b ...], [c ...]] (stages of a dependent chain)."""
    stages, current = [], []
    for part in command:
        if part == "::":
            stages.append(current)
            current = []
        else:
            current.append(part)
    stages.append(current)
    if any(not stage for stage in stages):
        raise ConfigError("empty stage in the pipeline (stages are separated by ::)")
    return stages


def requeue_if_slurm() -> dict[str, bool]:
    """Under SLURM, ask it to requeue this job (exiting non-zero alone marks it FAILED); the
    trainer calls this after its signal checkpoint and logs the answer."""
    import os

    if "SLURM_JOB_ID" not in os.environ:
        return {}
    job = os.environ["SLURM_JOB_ID"]
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if shutil.which("scontrol") is None:
        return {"slurm_requeued": False}
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"vitpipe: scontrol requeue {job} failed: {result.stderr.strip()}", file=sys.stderr)
    return {"slurm_requeued": result.returncode == 0}


def render_spark_ingest(spec: JobSpec, command: list[str]) -> str:
    """A standalone Spark cluster inside the allocation (master on the first node, one worker per
    node with the task's CPUs), the ingest's driver in the batch shell, the cluster stopped after.
    A requeued or rerun job resumes the ingest (downloaded and written shards are kept)."""
    python = shlex.quote(sys.executable)
    ingest = " ".join(_quote(part) for part in command)
    worker = ('"$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.worker.Worker --cores "$SLURM_CPUS_PER_TASK" '
              '--webui-port 0 --work-dir "${TMPDIR:-/tmp}/vitpipe-spark-$SLURM_JOB_ID" "$SPARK_MASTER"')
    lines = _header(spec)
    lines = [line for line in lines if "--signal=" not in line]  # nothing to checkpoint: reruns resume
    lines += [
        f"export SPARK_HOME=$({python} -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')",
        f'export SPARK_MASTER="spark://$MASTER_ADDR:{spec.port}"',
        "",
        "# a standalone Spark master on this node, a worker on every node of the allocation",
        f'"$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.master.Master --host "$MASTER_ADDR" --port {spec.port} '
        "--webui-port 0 &",
        "MASTER_PID=$!",
        f'for _ in $(seq 120); do (exec 3<>"/dev/tcp/$MASTER_ADDR/{spec.port}") 2>/dev/null && break; sleep 1; done',
        f"srun --kill-on-bad-exit=0 bash -c {shlex.quote(worker)} &",
        "WORKERS=$!",
        "trap 'kill \"$WORKERS\" \"$MASTER_PID\" 2>/dev/null' EXIT",
        "",
        f'{python} -m vitpipe {ingest} spark_master="$SPARK_MASTER"',
        "CODE=$?",
        'echo "vitpipe: ingest exited with $CODE"',
        'exit "$CODE"',
        "",
    ]
    return "\n".join(lines)
