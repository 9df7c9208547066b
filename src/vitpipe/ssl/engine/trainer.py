"""The training loop: the only module that drives Accelerate (with its helpers beside it in
ssl/engine/: checkpoints, launch, optim, rundir, artifacts, data, warmstart).

It takes any objective from the registry and the shard loader, and calls only the hooks the
``Objective`` base class declares (``forward``, ``accumulate``, ``after_backward``,
``on_step_end``, ``views``, ``batch_hook``, ``trainable_module``). Of a batch it reads only the
loader's bookkeeping (``skipped``, ``shard_errors``, ``key`` for the audit) and the first view of
``image`` for the health monitors. Schedules are in optimizer steps.

Exit codes of a run: 0 done, 1 failure (e.g. NaN loss), 75 (EX_TEMPFAIL) stopped by SIGTERM or
SIGUSR1 after a complete checkpoint; rerun the same command with ``--resume auto``.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from vitpipe.runlayout import RunLayout
from vitpipe.config import PretrainConfig, to_dict
from vitpipe.pipeline.census import require_needs
from vitpipe.pipeline.loader import ShardDataset, make_loader
from vitpipe.pipeline.shardset import resolve_shards
from vitpipe.ssl import registry
from vitpipe.ssl.engine import artifacts, checkpoints, compiling, optim, rundir, sharding, trackers, warmstart
from vitpipe.ssl.engine.distributed import average_late_gradients, sum_gradients
from vitpipe.ssl.engine.health import session_health
from vitpipe.ssl.engine.launch import RunLock, make_accelerator
from vitpipe.ssl.objective import Objective
from vitpipe.ssl.engine.precision import for_run as choose_precision
from vitpipe.ssl.engine.data import training_spec
from vitpipe.ssl.engine.rundir import JsonLines
from vitpipe.ssl.engine.state import RunSummary, Session, TrainState
from vitpipe.ssl.vit import set_grad_checkpointing

EXIT_PREEMPTED = 75


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, ...); nothing bad was checkpointed."""


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was written. Exit with EXIT_PREEMPTED."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"stopped by signal at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class Trainer:
    def __init__(self, config: PretrainConfig, run_dir: Path,
                 build_objective: Callable[[PretrainConfig, dict[str, bytes]], Objective] | None = None,
                 resume: str | None = None, progress: bool | None = None,
                 on_preempt: Callable[[], dict[str, Any]] | None = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.build_objective = build_objective or registry.build_objective
        self.resume = resume
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.progress_lines = progress is None and not self.progress
        """No terminal (a SLURM log, a pipe): a plain line per logged step on stdout instead of a bar."""
        self.on_preempt = on_preempt
        """Called on the main process after a signal checkpoint (e.g. SLURM requeue); its dict is logged."""

    def run(self) -> RunSummary:
        self._preflight()
        precision = choose_precision(self.config, self.build_objective, self.run_dir)
        accelerator = make_accelerator(self.config.train, self.run_dir, precision[0])
        if self.config.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        lock = RunLock(self.run_dir)
        if accelerator.is_main_process:
            lock.acquire()
        try:
            session = self._setup(accelerator, precision)
            try:
                self._loop(session)
                return self._finish(session)  # before _close: its end_training ends the process group
            finally:
                self._close(session)
        finally:
            lock.release()

    # -- setup -----------------------------------------------------------------------------

    def _preflight(self) -> None:
        """Refusals made before anything of the run exists: the objective's own, then the shards
        lacking a field it needs."""
        config, spec = self.config, registry.OBJECTIVES.get(self.config.objective)
        if spec is not None and spec.preflight is not None:
            spec.preflight(config)
        warmstart.check(spec, config)
        if spec is not None:
            require_needs(resolve_shards(config.data.shards), config.data.shards, spec.needs, f"pretrain {config.objective}")

    def _setup(self, accelerator, precision: tuple[str, str]) -> Session:
        from accelerate.utils import set_seed

        config, train = self.config, self.config.train
        is_main = accelerator.is_main_process
        start = rundir.start_checkpoint(self.run_dir, config, self.resume, is_main)
        fitted = self._artifacts(accelerator, refit=start is None)
        objective, whole = self._build(accelerator, fitted)  # before the optimizer: sharding replaces parameters
        sharded = whole is not None
        dataset, loader = self._loader(objective, accelerator.process_index, accelerator.num_processes)
        global_batch = train.batch_size * train.grad_accum * accelerator.num_processes
        optimizer, scheduler, lr, warmup = optim.build(objective, config, global_batch)
        synced = {id(p) for p in objective.trainable_module().parameters()  # the rest are averaged by hand
                  if (id(p) not in whole if sharded else p.requires_grad)}
        done = json.loads((start / "state.json").read_text())["step"] if start is not None else 0
        remaining = max(train.max_steps - done, 0)
        compiled = compiling.initial(train.compile, remaining)
        model, wrapped, optimizer = self._wrap(accelerator, objective, optimizer, compiled[0], sharded)
        set_seed(train.seed + accelerator.process_index)  # masks differ across ranks
        state = TrainState()
        if start is not None:
            saved = checkpoints.load(start, accelerator, objective, optimizer, scheduler)
            state = TrainState(**{k: saved[k] for k in TrainState.__dataclass_fields__})
        session = Session(accelerator, model, wrapped, synced, objective, optimizer, scheduler, dataset, loader, state, global_batch,
                           state.step if start is not None else None, last_log=(time.monotonic(), state.samples_seen),
                           wall_before=state.wall_seconds, sharded=sharded)
        session.auto_compile = compiling.AutoCompile.for_session(session, remaining) if compiled[2] else None
        if is_main:
            rundir.keep_metrics_up_to(self.run_dir, state.step)
            rundir.record_session(self.run_dir, config, {
                "world_size": accelerator.num_processes, "device": str(accelerator.device), "precision": precision[0],
                "precision_reason": precision[1], "compile": compiled[0], "compile_reason": compiled[1], "fsdp": sharded,
                "global_batch": global_batch, "peak_lr": lr, "warmup_steps": warmup}, session.resumed_from)
            # a resumed run's trackers hold its first session's settings (MLflow refuses changed ones)
            flat = rundir.flat(to_dict(config)) if session.resumed_from is None else None
            accelerator.init_trackers("pretrain", config=flat, init_kwargs=trackers.init_kwargs(
                self.run_dir, train, rundir.read_run_info(self.run_dir), state.step))
            rundir.update_run_info(self.run_dir, {"trackers": trackers.run_ids(accelerator)})
            session.metrics = JsonLines(RunLayout(self.run_dir).metrics)
            if self.progress:
                from tqdm import tqdm

                session.bar = tqdm(total=train.max_steps, initial=state.step, desc=f"pretrain {config.objective}",
                                   dynamic_ncols=True)
        if train.record_keys:
            session.audit = JsonLines(RunLayout(self.run_dir).audit / f"rank{accelerator.process_index}.jsonl")
        session.stop.install()
        return session

    def _build(self, accelerator, fitted: dict[str, bytes]) -> tuple[Objective, set[int] | None]:
        """The objective, seeded (the same initial parameters on every rank), FSDP2-sharded when
        ``train.fsdp`` and more than one process (sharding.build_sharded: only the first builds it
        whole): (objective, ids of the parameters sharding leaves whole, or None when not sharding)."""
        from accelerate.utils import set_seed

        config, sharded = self.config, self.config.train.fsdp and accelerator.num_processes > 1

        def build() -> Objective:
            set_seed(config.train.seed)
            objective = self.build_objective(config, fitted)
            set_grad_checkpointing(objective, config.train.grad_checkpointing)
            if sharded:
                sharding.refuse_unsupported(objective, config)
            return objective

        if not sharded:
            return build(), None
        return sharding.build_sharded(build, accelerator.is_main_process, accelerator.device)

    def _wrap(self, accelerator, objective: Objective, optimizer, compile_: bool, sharded: bool):
        """Compile and DDP-wrap the objective's trainable module alone (a teacher stays out; FSDP
        sharded it already) and bind the wrapper to the objective: (what the step calls, the wrapper,
        the prepared optimizer)."""
        trainable = objective.trainable_module()
        objective.to(accelerator.device)  # the teacher too: prepare moves only what it wraps
        wrapped = torch.compile(trainable) if compile_ else trainable
        if sharded:
            optimizer = accelerator.prepare(optimizer)
        else:
            wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
        if trainable is objective:
            return wrapped, wrapped, optimizer
        objective.bind_trainable(wrapped)
        return objective, wrapped, optimizer

    def _artifacts(self, accelerator, refit: bool) -> dict[str, bytes]:
        """Fit the objective's artefacts once (main process) for a fresh run; load them otherwise."""
        spec = registry.OBJECTIVES.get(self.config.objective)
        if spec is None or (spec.fit_artifacts is None and not warmstart.source_of(spec, self.config)):
            return {}
        if refit or not artifacts.recorded(self.run_dir):
            if accelerator.is_main_process:
                read = functools.partial(artifacts.read_samples, self.config.data)
                files = spec.fit_artifacts(self.config, read) if spec.fit_artifacts is not None else {}
                files.update(warmstart.weights(spec, self.config))
                rundir.update_run_info(self.run_dir, {"artifacts": artifacts.save(self.run_dir, files)})
            accelerator.wait_for_everyone()
        return artifacts.load(self.run_dir)

    def _loader(self, objective: Objective, rank: int, world: int) -> tuple[ShardDataset, Any]:
        return make_loader(training_spec(self.config, objective, rank, world), self.config.data.num_workers)

    # -- the loop --------------------------------------------------------------------------

    def _loop(self, s: Session) -> None:
        max_steps, accum = self.config.train.max_steps, self.config.train.grad_accum
        grouped = accum > 1 and s.objective.accumulates_step
        while s.state.step < max_steps:
            s.dataset.set_position(s.state.epoch, s.state.batches_in_epoch)
            group: list[dict[str, Any]] = []
            for batch in s.loader:
                if grouped:  # a contrastive step needs all its micro-batches before any backward
                    group.append(batch)
                    if len(group) < accum:
                        continue
                    output, flags, group = *self._group_step(s, group), []
                else:
                    output, flags = self._micro_step(s, batch)
                if output is None or not s.accelerator.sync_gradients:
                    continue
                self._end_of_step(s, output, flags)
                if s.state.step >= max_steps:
                    break
            else:
                s.state.epoch += 1
                s.state.batches_in_epoch = 0
        s.last_checkpoint = self._save(s)

    def _prepare(self, s: Session, batch: dict[str, Any]) -> dict[str, Any]:
        """Count the loader's skipped samples, audit the keys, move the batch to the device."""
        from accelerate.utils import send_to_device

        s.count_losses(batch)
        if s.audit is not None:
            keys = batch["key"] if "key" in s.objective.batch_fields else batch.pop("key")
            s.audit.write({"step": s.state.step + 1, "keys": keys})
        batch = send_to_device(batch, s.accelerator.device)
        images = batch.get("image")
        s.images = images[0] if isinstance(images, list) else images  # views: the first
        return batch

    def _micro_step(self, s: Session, batch: dict[str, Any]):
        """Forward/backward of one micro-batch: (output, [non-finite, signalled, checkpoint due]),
        or (None, flags) for a skipped non-finite loss."""
        accelerator, optimizer_config = s.accelerator, self.config.optim
        batch = self._prepare(s, batch)
        with accelerator.accumulate(s.wrapped):
            with accelerator.autocast():  # a teacher outside the wrapper runs at the run's precision too
                output = s.model(batch)
            flags = self._flags(s, output.loss)
            if flags[0] == 0:
                accelerator.backward(output.loss)
                if accelerator.sync_gradients:
                    average_late_gradients(s.objective.trainable_module(), s.synced)
                    s.objective.after_backward(s.state.step + 1, self.config.train.max_steps)
                if accelerator.sync_gradients and optimizer_config.clip_grad > 0:
                    accelerator.clip_grad_norm_(s.wrapped.parameters(), optimizer_config.clip_grad)
                s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
        s.state.batches_in_epoch += 1
        if flags[0] == 0:
            s.skipped_in_a_row = 0
            return output, flags
        self._skip_nonfinite(s)
        return None, flags

    def _flags(self, s: Session, loss: torch.Tensor) -> list[float]:
        """One all-reduce per micro-batch: [non-finite loss, stop signal, checkpoint due], summed
        over processes so every rank takes the same branch."""
        flags = torch.tensor([0.0 if torch.isfinite(loss.detach()) else 1.0, 1.0 if s.stop.signal else 0.0,
                              1.0 if self._checkpoint_due(s.state.step + 1, s.last_checkpoint_time) else 0.0],
                             device=s.accelerator.device)
        return s.accelerator.reduce(flags, reduction="sum").tolist()

    def _group_step(self, s: Session, group: list[dict[str, Any]]):
        """One optimizer step from ``grad_accum`` micro-batches through the objective's own
        ``accumulate``, on the unwrapped model (DDP's mean is not this loss's gradient):
        each process's gradients are its samples' share of the global loss, summed here."""
        batches = [self._prepare(s, batch) for batch in group]
        scale = len(batches)  # accelerator.backward divides by grad_accum; the objective's losses must not be
        output = s.objective.accumulate(batches, lambda loss: s.accelerator.backward(loss * scale))
        sum_gradients(s.objective.parameters())
        s.objective.after_backward(s.state.step + 1, self.config.train.max_steps)
        flags = self._flags(s, output.loss)
        if flags[0] == 0:
            if self.config.optim.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(s.objective.parameters(), self.config.optim.clip_grad)
            s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        s.state.batches_in_epoch += len(batches)
        if flags[0] == 0:
            s.skipped_in_a_row = 0
            return output, flags
        self._skip_nonfinite(s)
        return None, flags

    def _skip_nonfinite(self, s: Session) -> None:
        step = s.state.step + 1
        if self.config.train.nan_policy == "error":
            raise TrainingError(f"non-finite loss at step {step}; the last checkpoint is still good "
                                "(lower optim.base_lr or set optim.clip_grad)")
        s.skipped_in_a_row += 1
        if s.skipped_in_a_row >= 10:
            raise TrainingError(f"10 non-finite losses in a row at step {step}")
        if s.metrics is not None:
            s.metrics.write({"step": step, "event": "skipped_nonfinite_loss"})

    def _end_of_step(self, s: Session, output, flags: list[float]) -> None:
        train, state = self.config.train, s.state
        s.scheduler.step()
        state.step += 1
        state.samples_seen += s.global_batch
        s.weight_decay = optim.update_weight_decay(s.optimizer, self.config, state.step)
        s.objective.on_step_end(state.step, train.max_steps)
        if s.auto_compile is not None and (decided := s.auto_compile.after_step()) is not None:
            s.auto_compile = None
            compiling.record(self.run_dir, s, *decided)
        if state.step % train.log_every == 0 or state.step in (1, train.max_steps):  # step 1: health early
            self._log(s, output)
        if s.bar is not None:
            s.bar.update(1)
        state.wall_seconds = s.wall_before + time.monotonic() - s.session_start
        signalled = flags[1] > 0
        if (flags[2] > 0 or signalled) and state.step < train.max_steps:
            s.last_checkpoint = self._save(s)
            s.last_checkpoint_time = time.monotonic()
        if signalled and state.step < train.max_steps:
            if s.accelerator.is_main_process:
                extra = self.on_preempt() if self.on_preempt is not None else {}
                s.metrics.write({"step": state.step, "event": "preempted", **extra})
            raise Preempted(state.step, s.last_checkpoint)

    def _log(self, s: Session, output) -> None:
        state = s.state
        loss = s.accelerator.reduce(output.loss.detach().float(), reduction="mean").item()
        s.last_loss = loss
        health = session_health(s, self.config.train)
        if not s.accelerator.is_main_process:
            return
        now = time.monotonic()
        then, samples_then = s.last_log
        record = {
            "step": state.step, "loss": loss, "lr": s.scheduler.get_last_lr()[0],
            "samples": state.samples_seen, "epoch": state.epoch,
            "img_per_s": round((state.samples_seen - samples_then) / max(now - then, 1e-9), 1),
            "decode_errors": s.decode_errors,
            **({"weight_decay": s.weight_decay} if s.weight_decay is not None else {}),
            **{k: float(v) for k, v in output.metrics.items()},
            **health,
        }
        s.last_log = (now, state.samples_seen)
        s.metrics.write(record)
        s.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
        if s.bar is not None:
            s.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", img_s=record["img_per_s"])
        elif self.progress_lines:
            print(rundir.progress_line(record, self.config.train.max_steps, self.config.train.batch_size
                                * self.config.train.grad_accum * s.accelerator.num_processes), flush=True)

    def _checkpoint_due(self, step: int, last_checkpoint_time: float) -> bool:
        train = self.config.train
        return bool((train.ckpt_every_steps and step % train.ckpt_every_steps == 0) or (
            train.ckpt_every_minutes and time.monotonic() - last_checkpoint_time > 60 * train.ckpt_every_minutes))

    def _save(self, s: Session) -> Path:
        return checkpoints.save(s.accelerator, s.objective, s.optimizer, s.scheduler, dict(s.state.__dict__),
                                self.run_dir, self.config.train.keep_checkpoints)

    # -- after the loop --------------------------------------------------------------------

    def _close(self, s: Session) -> None:
        s.stop.restore()
        if s.bar is not None:
            s.bar.close()
        for handle in (s.metrics, s.audit):
            if handle is not None:
                handle.close()
        s.accelerator.end_training()

    def _finish(self, s: Session) -> RunSummary:
        seconds = time.monotonic() - s.session_start
        session_samples = s.state.samples_seen - (s.resumed_from or 0) * s.global_batch
        if self.config.train.record_keys:
            whole = sharding.full_state_dict(s.objective)
            fingerprint = sum(whole[n].double().abs().sum().item() for n, _ in s.objective.named_parameters())
            (RunLayout(self.run_dir).audit / f"rank{s.accelerator.process_index}.final.json").write_text(
                json.dumps({"param_abs_sum": fingerprint, "global_batch": s.global_batch,
                            "world_size": s.accelerator.num_processes}))
        encoder = s.objective.encoder()
        weights = sharding.full_state_dict(encoder)  # every process: gathering shards is a collective
        if s.accelerator.is_main_process:
            rundir.export_encoder(self.run_dir, weights, encoder.depth)
        return RunSummary(self.run_dir, s.state.step, s.last_loss, seconds, session_samples / max(seconds, 1e-9),
                          s.last_checkpoint, s.resumed_from, {"decode_errors": s.decode_errors},
                          s.accelerator.is_main_process)
