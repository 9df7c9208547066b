"""The training engine: the loop (trainer), checkpoints, launch, optimizer groups, schedules, the
EMA teacher helper, collectives (distributed), precision, health monitors, the run directory and
trackers. It knows objectives only through the hooks declared on ``vitpipe.ssl.objective.Objective``."""
