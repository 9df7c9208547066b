"""`vitpipe compare` end to end on two objectives: the table, the baselines, the costs, the page in a
real browser, a free rerun, and the refusals."""

import json

import pytest

from conftest import make_image, write_image_folder
from test_igpt import ARGS as IGPT_ARGS
from test_report_demo import CHROMIUM, check_in_browser
from test_trainer import RUN_ARGS
from vitpipe.cli import main
from vitpipe.config import IngestConfig
from vitpipe.pipeline.ingest import ingest

# fp32: precision auto measures each encoder, and on a loaded machine two equal random inits may
# measure differently, which (rightly) keeps them from sharing one baseline
FAST = ["--probe-epochs", "2", "--workers", "0", "--finetune-set", "train.max_steps=2",
        "--finetune-set", "train.batch_size=2", "--finetune-set", "data.num_workers=0", "--precision", "fp32"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    folder = write_image_folder(root / "imgs", per_class=40, classes=("a", "b", "c"))
    ingest(str(folder), root / "shards", IngestConfig(shard_size=30, val_fraction=0.3, image_size=16), progress=False)
    train = str(root / "shards" / "train")
    assert main(["pretrain", "mae", "--data", train, "--out", str(root / "mae"), *RUN_ARGS, "train.max_steps=3"]) == 0
    assert main(["pretrain", "igpt", "--data", train, "--out", str(root / "igpt"), *IGPT_ARGS, "train.max_steps=3"]) == 0
    return root


def test_compare_two_objectives_with_baselines_costs_and_page(two_runs, tmp_path, capsys, monkeypatch):
    root = two_runs
    args = ["compare", str(root / "mae"), str(root / "igpt"), "--train", str(root / "shards" / "train"),
            "--test", str(root / "shards" / "val"), "--out", str(tmp_path / "cmp"), *FAST]
    assert main(args) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    rows = {row["objective"]: row for row in result["runs"]}
    assert set(rows) == {"mae", "igpt"} and not result["warnings"]  # same pretraining data
    for row in rows.values():
        assert set(row["evals"]) == {"probe", "knn", "finetune"}
        assert set(row["evals"]["finetune"]) == {"trained", "random", "delta_vs_random"}  # no pixel fine-tune
        for task, scores in row["evals"].items():
            assert 0 <= scores["trained"]["top1"] <= 1 and scores["trained"]["test_samples"] == 26  # every val image
            assert scores["delta_vs_random"] == pytest.approx(scores["trained"]["top1"] - scores["random"]["top1"])
        cost = row["cost"]
        assert cost["steps"] == 3 and cost["samples_seen"] == 24 and cost["wall_seconds"] > 0
        assert cost["flops"] == pytest.approx(cost["flops_per_sample"] * 24) and cost["flops_per_sample"] > 1e5
    # iGPT's best layer is mid-stack: probed at every block; MAE at its output
    assert set(rows["igpt"]["evals"]["probe"]["trained"]["per_layer"]) == {"block0", "block1", "block2"}
    assert rows["mae"]["evals"]["probe"]["trained"]["per_layer"] == {"last": rows["mae"]["evals"]["probe"]["trained"]["top1"]}
    assert rows["mae"]["encoder"]["parameters"] > 0 and rows["mae"]["encoder"]["depth"] == 2
    probe = rows["mae"]["evals"]["probe"]["trained"]  # held-out train accuracy: what picks a best encoder
    assert 0 <= probe["val_top1"] <= 1 and probe["val_top1"] == json.loads(
        (root / "mae" / "eval" / "linear-probe.json").read_text())["val_top1"]
    assert (root / "mae" / "eval" / "finetune-labels0.1.json").is_file()
    page = (tmp_path / "cmp" / "index.html").read_text()
    assert "layers.png" in page and "probe.png" in page and "http" not in page

    # a rerun reads every finished eval back: no eval function may run
    import vitpipe.downstream.evaluate as evaluate
    import vitpipe.downstream.finetune as finetune

    def forbidden(*_, **__):
        raise AssertionError("an eval ran again")

    for module, name in ((evaluate, "eval_linear_probe"), (evaluate, "eval_knn"), (finetune, "finetune")):
        monkeypatch.setattr(module, name, forbidden)
    assert main([*args[:-len(FAST) - 2], "--out", str(tmp_path / "again"), *FAST]) == 0
    again = json.loads((tmp_path / "again" / "compare.json").read_text())
    assert [r["evals"] for r in again["runs"]] == [r["evals"] for r in result["runs"]]
    # the same shards and runs named by relative paths are the same data: still nothing reruns
    monkeypatch.chdir(root)
    assert main(["compare", "mae", "igpt", "--train", "shards/train", "--test", "shards/val",
                 "--out", str(tmp_path / "relative"), *FAST]) == 0
    relative = json.loads((tmp_path / "relative" / "compare.json").read_text())
    assert [r["evals"] for r in relative["runs"]] == [r["evals"] for r in result["runs"]]

    if CHROMIUM:
        check_in_browser(tmp_path / "cmp" / "index.html", tmp_path / "compare.png")


def test_compare_refuses_test_data_a_run_pretrained_on(two_runs, tmp_path, capsys):
    root = two_runs
    code = main(["compare", str(root / "mae"), "--train", str(root / "shards" / "train"),
                 "--test", str(root / "shards" / "train"), "--out", str(tmp_path / "x"), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "overlap" in err[0] and not (tmp_path / "x").exists()


def test_compare_refuses_an_untrainable_probe_before_evaluating(two_runs, tmp_path, capsys):
    root = two_runs
    code = main(["compare", str(root / "mae"), "--train", str(root / "shards" / "train"),
                 "--test", str(root / "shards" / "val"), "--out", str(tmp_path / "x"), *FAST, "--probe-epochs", "0"])
    assert code == 2 and "--probe-epochs must be >= 1" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_compare_warns_when_runs_saw_different_data(two_runs, tmp_path):
    from vitpipe.downstream.compare import check_data

    root = two_runs
    folder = tmp_path / "other"  # other images: write_image_folder's would repeat the run's (a leak)
    for offset, label in ((5000, "x"), (5100, "y")):
        (folder / label).mkdir(parents=True)
        for index in range(8):
            make_image(offset + index).save(folder / label / f"{index}.png")
    ingest(str(folder), tmp_path / "other_shards", IngestConfig(shard_size=8, image_size=16), progress=False)
    assert main(["pretrain", "mae", "--data", str(tmp_path / "other_shards"), "--out", str(tmp_path / "other_run"),
                 *RUN_ARGS, "train.max_steps=1"]) == 0
    warnings = check_data([root / "mae", tmp_path / "other_run"], str(root / "shards" / "val"))
    assert len(warnings) == 1 and "different data" in warnings[0]
    assert check_data([root / "mae", root / "igpt"], str(root / "shards" / "val")) == []


def test_compare_does_not_reuse_an_eval_made_with_other_layers(two_runs, tmp_path):
    """A `--layers 0,1` probe or a `--layer 0` k-NN left in RUN/eval/ is another measurement: compare
    runs the output-layer one instead of reporting the sweep's best block as the output."""
    root = two_runs
    train, test = str(root / "shards" / "train"), str(root / "shards" / "val")
    assert main(["eval", "linear-probe", str(root / "mae"), "--train", train, "--test", test, "--workers", "0",
                 "--epochs", "2", "--layers", "0,1"]) == 0
    assert main(["eval", "knn", str(root / "mae"), "--train", train, "--test", test, "--workers", "0", "--layer", "0"]) == 0
    assert main(["compare", str(root / "mae"), "--train", train, "--test", test, "--out", str(tmp_path / "c"),
                 "--suite", "probe,knn", *FAST]) == 0
    row = json.loads((tmp_path / "c" / "compare.json").read_text())["runs"][0]
    assert set(row["evals"]["probe"]["trained"]["per_layer"]) == {"last"}
    # a sweep with its concatenation is another measurement again; the summary names the winner
    assert main(["compare", str(root / "mae"), "--train", train, "--test", test, "--out", str(tmp_path / "c2"),
                 "--suite", "probe", "--layers", "all", "--concat", *FAST]) == 0
    probe = json.loads((tmp_path / "c2" / "compare.json").read_text())["runs"][0]["evals"]["probe"]["trained"]
    assert set(probe["per_layer"]) == {"block0", "block1"}
    assert "block0+block1" in json.loads((root / "mae" / "eval" / "linear-probe.json").read_text())["per_layer"]
    assert json.loads((root / "mae" / "eval" / "knn.json").read_text())["layer"] == "last"
    # --knn-layer probe: the k-NN runs on the single block the probe's held-out labels picked
    assert main(["compare", str(root / "mae"), "--train", train, "--test", test, "--out", str(tmp_path / "c3"),
                 "--suite", "knn,probe", "--layers", "all", "--concat", "--knn-layer", "probe", *FAST]) == 0
    per_layer = json.loads((root / "mae" / "eval" / "linear-probe.json").read_text())["per_layer"]
    picked = max(("block0", "block1"), key=lambda name: per_layer[name]["val_top1"])
    knn = json.loads((tmp_path / "c3" / "compare.json").read_text())["runs"][0]["evals"]["knn"]
    assert knn["trained"]["layer"] == picked and knn["pixels"]["layer"] == "pixels"
    assert json.loads((root / "mae" / "eval" / "knn.json").read_text())["layer"] == picked


def test_compare_reruns_a_finetune_made_without_probe_init(two_runs, tmp_path):
    """--finetune-probe-init is part of what a fine-tune measured: a finished plain fine-tune is not
    reused for it, nor the reverse."""
    root = two_runs
    args = ["compare", str(root / "mae"), "--train", str(root / "shards" / "train"), "--test", str(root / "shards" / "val"),
            "--suite", "finetune", *FAST]
    result_file = root / "mae" / "eval" / "finetune-labels0.1.json"
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert json.loads(result_file.read_text())["probe_init"] is None
    assert main([*args, "--out", str(tmp_path / "lpft"), "--finetune-probe-init"]) == 0
    assert json.loads(result_file.read_text())["probe_init"]["val_top1"] >= 0  # the head came from a probe
    assert main([*args, "--out", str(tmp_path / "plain2")]) == 0
    assert json.loads(result_file.read_text())["probe_init"] is None


def test_layer_label_names_a_concatenation_for_people():
    from vitpipe.downstream.features import layer_label

    assert layer_label("+".join(f"block{i}" for i in range(12))) == "blocks 0-11 concatenated"
    assert layer_label("block3+block5+block7") == "blocks 3, 5, 7 concatenated"
    assert layer_label("block9") == "block9" and layer_label("last") == "last"


def test_compare_measures_one_random_init_once(two_runs, tmp_path, monkeypatch):
    """Runs whose random encoders have the same weights, shape and eval transform (here the MAE
    recipe pretrained twice) share one random-init probe and k-NN, and the second row says whose
    it is; another patch size or another objective's encoder gets its own."""
    import vitpipe.downstream.evaluate as evaluate

    root = two_runs
    train, test = str(root / "shards" / "train"), str(root / "shards" / "val")
    for name, extra in (("mae_again", []), ("mae_patch8", ["model.patch_size=8"])):
        assert main(["pretrain", "mae", "--data", train, "--out", str(tmp_path / name), *RUN_ARGS,
                     "train.max_steps=1", *extra]) == 0
    ran = []
    for name in ("eval_linear_probe", "eval_knn"):
        def recording(source, *args, _real=getattr(evaluate, name), _name=name, **kwargs):
            ran.append((_name, source.kind, source.run.name))
            return _real(source, *args, **kwargs)
        monkeypatch.setattr(evaluate, name, recording)
    runs = [root / "mae", tmp_path / "mae_again", tmp_path / "mae_patch8", root / "igpt"]
    assert main(["compare", *map(str, runs), "--train", train, "--test", test, "--out", str(tmp_path / "c"),
                 "--suite", "probe,knn", *FAST]) == 0
    rows = {row["name"]: row for row in json.loads((tmp_path / "c" / "compare.json").read_text())["runs"]}
    for task in ("probe", "knn"):
        first, again = rows["mae"]["evals"][task]["random"], rows["mae_again"]["evals"][task]["random"]
        assert again == {**first, "same_as": "mae"} and "same_as" not in first
        assert "same_as" not in rows["mae_patch8"]["evals"][task]["random"]
        assert "same_as" not in rows["igpt"]["evals"][task]["random"]
        assert rows["mae_again"]["evals"][task]["trained"].get("same_as") is None  # trained encoders never shared
    assert not [call for call in ran if call[1:] == ("random", "mae_again")]
    assert ("eval_linear_probe", "random", "mae_patch8") in ran
    assert not (tmp_path / "mae_again" / "eval" / "linear-probe.random.json").exists()
    assert "the same weights as mae" in (tmp_path / "c" / "index.html").read_text()


@pytest.mark.parametrize("name,block,joined,label", [("last", None, False, "last"), ("pixels", None, False, "pixels"),
                                                      ("block3", 3, False, "block3"),
                                                      ("block0+block1+block2", None, True, "blocks 0-2 concatenated"),
                                                      ("block1+block5", None, True, "blocks 1, 5 concatenated")])
def test_layer_names_are_read_and_written_in_one_place(name, block, joined, label):
    from vitpipe.downstream.features import LayerKey

    key = LayerKey.parse(name)
    assert (str(key), key.block, key.joined, key.label()) == (name, block, joined, label)


def test_a_malformed_layer_name_is_not_read_as_a_block():
    from vitpipe.downstream.features import LayerKey

    for name in ("a+b", "block", "blockx", "block1+last"):
        with pytest.raises(ValueError):
            LayerKey.parse(name)
