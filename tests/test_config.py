import pytest

from vitpipe.cli import main
from vitpipe.config import ConfigError, IngestConfig, PretrainConfig, load_config, parse_overrides


def test_overrides_nest_and_parse_values():
    assert parse_overrides(["train.max_steps=10", "data.mean=[0.1,0.2,0.3]", "model.pool=gap"]) == {
        "train": {"max_steps": 10}, "data": {"mean": [0.1, 0.2, 0.3]}, "model": {"pool": "gap"}}


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 50\n  batch_size: 8\nmodel:\n  size: micro\n")
    cfg = load_config(PretrainConfig, path, ["train.max_steps=7"])
    assert cfg.train.max_steps == 7 and cfg.train.batch_size == 8
    assert cfg.model.embed_dim == 64  # filled from the preset


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key train\.max_step;.*train\.max_steps"):
        load_config(PretrainConfig, None, ["train.max_step=3"])


@pytest.mark.parametrize("override", ["train.max_steps=zero", "model.size=huge", "train.batch_size=0",
                                      "optim.betas=[0.9]", "train", "data=3",
                                      # the seed reached torch.manual_seed first: a ValueError at build
                                      "train.seed=-1", "train.seed=4294967296", "optim.warmup_fraction=2"])
def test_bad_values_are_config_errors(override):
    with pytest.raises(ConfigError):
        load_config(PretrainConfig, None, [override])


def test_int_for_float_is_accepted():
    assert load_config(IngestConfig, None, ["val_fraction=0"]).val_fraction == 0.0


def test_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 1e-3 as a string, in files and in overrides alike
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  base_lr: 2e-4\n")
    cfg = load_config(PretrainConfig, path, ["optim.lr=1e-3"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.base_lr == 2e-4
    with pytest.raises(ConfigError):
        load_config(PretrainConfig, None, ["optim.lr=1e-3x"])


def test_config_show_cli(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 5\n")
    assert main(["config", "show", str(path), "train.seed=3"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 5" in out and "seed: 3" in out


@pytest.mark.parametrize("content", ["train: [1, 2", "- a list\n", "train:\n  nope: 1\n"])
def test_malformed_config_exit_2(tmp_path, capsys, content):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    assert main(["config", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


COMMANDS = [["ingest", "DIR", "--out", "X"], ["shards", "verify", "DIR"], ["config", "show"], ["pretrain", "mae"],
            ["export", "RUN"], ["report", "RUN"], ["demo"], ["slurm", "render"], ["slurm", "submit"],
            ["eval", "linear-probe", "RUN"], ["eval", "knn", "RUN"], ["eval", "retrieval", "RUN"],
            ["eval", "finetune", "RUN"], ["eval", "zero-shot", "RUN"], ["eval", "bits-per-dim", "RUN"],
            ["sample", "RUN"], ["palette", "fit", "DIR"]]


@pytest.mark.parametrize("argv", [["nosuch"], ["eval", "nosuch"], *[[*c, "--bogus"] for c in COMMANDS]],
                         ids=lambda argv: " ".join(argv))
def test_usage_errors_exit_2_whichever_click_typer_brings(argv, capsys):
    """Newer typer releases raise their vendored click's exceptions: still usage errors, exit 2."""
    from vitpipe.cli import main

    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_version_and_bare_command(capsys):
    from vitpipe import __version__
    from vitpipe.cli import main

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"vitpipe {__version__}"
    assert main([]) == 2
    captured = capsys.readouterr()
    assert "Usage" in captured.out + captured.err


def test_list_overrides_are_typed():
    """`data.mean=0.3,0.4,0.5` on the command line is three floats (it was three strings, refused)."""
    from vitpipe.ssl import registry

    config = registry.pretrain_config("mae", None, ["data.mean=0.3,0.4,0.5", "optim.betas=0.9,0.95",
                                                    "data.std=1e-1,0.2,0.3"])
    assert config.data.mean == [0.3, 0.4, 0.5] and config.optim.betas == [0.9, 0.95]
    assert config.data.std == [0.1, 0.2, 0.3]


def test_ingest_help_lists_the_settings_with_defaults(capsys):
    import dataclasses

    from vitpipe.cli import main
    from vitpipe.config import IngestConfig

    assert main(["ingest", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # the help box wraps lines
    text = text.replace("│ ", "").replace(" │", "")
    for field in dataclasses.fields(IngestConfig):
        assert field.name in text, field.name
    assert "shard_size=10000" in text.replace(" ", "") and "(default 10000)" in text
