"""rank1_cl metrics, loss and configuration: hand-computed values and clear errors."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")

from _tolerance import assert_close_by_rule
from rank1_cl import metrics
from rank1_cl.config import CLConfig, apply_overrides, load_config, parse_assignments
from rank1_cl.losses import label_aware_contrastive_loss

# a[i][j]: after task i, on task j.
MATRIX = [
    [0.5, 0.2, 0.1],
    [0.6, 0.7, 0.5],
    [0.4, 0.5, 0.9],
]


def test_metrics_match_hand_computation():
    # Transfer: column 2 -> mean(a[0][1]) = 0.2; column 3 -> mean(a[0][2], a[1][2]) = 0.3; mean = 0.25.
    assert metrics.transfer(MATRIX) == pytest.approx(0.25, abs=1e-12)
    assert metrics.average(MATRIX) == pytest.approx(4.4 / 9, abs=1e-12)
    assert metrics.last(MATRIX) == pytest.approx(1.8 / 3, abs=1e-12)


def test_transfer_ignores_diagonal_and_below():
    changed = [row[:] for row in MATRIX]
    changed[1][1] = changed[2][1] = changed[2][2] = changed[1][0] = 0.0  # diagonal and lower triangle
    assert metrics.transfer(changed) == pytest.approx(0.25, abs=1e-12)
    changed[0][2] = 0.3  # column 3 mean (0.3 + 0.5) / 2 = 0.4 -> transfer (0.2 + 0.4) / 2
    assert metrics.transfer(changed) == pytest.approx(0.3, abs=1e-12)


def test_partial_matrix_and_single_task():
    partial = MATRIX[:2]
    # column 2: a[0][1] = 0.2; column 3: rows 0 and 1 exist -> 0.3
    assert metrics.transfer(partial) == pytest.approx(0.25, abs=1e-12)
    assert metrics.summarize(partial)["complete"] is False
    assert metrics.transfer([[0.7]]) is None
    assert metrics.last([[0.7]]) == pytest.approx(0.7)


@pytest.mark.parametrize(
    "bad, message",
    [([], "empty"), ([[0.1, 0.2], [0.3]], "different lengths"), ([[0.1], [0.2]], "rows <= columns")],
)
def test_bad_matrices_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        metrics.average(bad)


def test_write_results_files(tmp_path):
    results = {"method": "pool", "tasks": ["a", "b", "c"], "matrices": {"mtil": MATRIX, "xtail": MATRIX[:2]}}
    paths = metrics.write_results(str(tmp_path), results)
    names = sorted(os.path.basename(path) for path in paths)
    assert names == sorted(["results.json", "accuracy_mtil.csv", "accuracy_mtil.png", "accuracy_xtail.csv",
                            "accuracy_xtail.png"])  # fmt: skip
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["metrics"]["mtil"]["transfer"] == pytest.approx(0.25)
    lines = (tmp_path / "accuracy_mtil.csv").read_text().splitlines()
    assert lines[0] == "after_task,a,b,c" and lines[2] == "b,0.6000,0.7000,0.5000"
    assert (tmp_path / "accuracy_mtil.png").read_bytes()[:4] == b"\x89PNG"


def _clip_loss(image, text, logit_scale):
    logits = logit_scale * image @ text.t()
    target = torch.arange(image.shape[0])
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def test_loss_with_distinct_labels_is_the_clip_loss():
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(6, 5, generator=generator, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(6, 5, generator=generator, dtype=torch.float64), dim=1)
    labels = torch.tensor([3, 0, 1, 5, 2, 4])
    actual = label_aware_contrastive_loss(image.float(), text.float(), labels, 10.0)
    assert_close_by_rule(actual, _clip_loss(image.float(), text.float(), 10.0), _clip_loss(image, text, 10.0), "loss")


def test_loss_shares_targets_within_a_class():
    # Two images of one class and one of another, 1-D features along two axes: worked by hand.
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    text = image.clone()
    labels = torch.tensor([0, 0, 1])
    scale = 2.0
    # Rows 0 and 1: logits (2, 2, 0), targets (1/2, 1/2, 0). Row 2: logits (0, 0, 2), target (0, 0, 1).
    log_z01 = torch.log(torch.tensor(2 * torch.e**2 + 1, dtype=torch.float64))
    log_z2 = torch.log(torch.tensor(2 + torch.e**2, dtype=torch.float64))
    row01 = -(2.0 - log_z01)  # both positives have logit 2
    row2 = -(2.0 - log_z2)
    expected = (2 * row01 + row2) / 3  # the logit matrix is symmetric: both directions agree
    actual = label_aware_contrastive_loss(image, text, labels, scale)
    assert float(actual) == pytest.approx(float(expected), rel=1e-12)


def test_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="must both be"):
        label_aware_contrastive_loss(torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="one per image"):
        label_aware_contrastive_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), 1.0)


def test_config_defaults_are_the_papers():
    config = CLConfig()
    assert (config.pool.r, config.pool.k, config.pool.alpha, config.pool.dropout) == (12, 8, 1.0, 0.2)
    assert (config.train.batch_size, config.train.lr, config.train.weight_decay) == (32, 2e-3, 1e-2)
    assert (config.train.ago_weight, config.train.shots, config.pool.merge_top_m) == (0.1, 5, 4)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\niterations = 7\nmethod = "lora"\n[data]\nbenchmark = "synthetic"\n')
    config = load_config(path, parse_assignments(["pool.k=4", "train.shots=none", "data.tasks=shapes,digits"]))
    assert (config.train.iterations, config.train.method, config.pool.k) == (7, "lora", 4)
    assert config.train.shots is None and config.data.tasks == ["shapes", "digits"]
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps({"data": {"benchmark": "synthetic"}, "train": {"lr": 1e-3}}))
    assert load_config(json_path).train.lr == 1e-3


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.iteratons": 3}, "unknown setting 'train.iteratons' \\(did you mean 'iterations'"),
        ({"optim.lr": 3}, "unknown setting 'optim'"),
        ({"train.iterations": "many"}, "wrong type; expected int"),
        ({"train.method": "adapter"}, "train.method='adapter' is not supported"),
        ({"pool.k": 13}, "pool.k=13 must be in \\[1, pool.r=12\\]"),
        ({"pool.dropout": 1.0}, "pool.dropout"),
        ({"train.lr": -1.0}, "lr > 0"),
        ({"data.benchmark": "mtil"}, "needs data.data_root"),
        ({"pool.text_routing": "cls"}, "pool.text_routing='cls' is not supported"),
        ({"pool.alpha": 0.0}, "pool.alpha=0.0 must be > 0"),
        ({"model.precision": "fp16"}, "AdamW's eps \\(1e-8\\) rounds to 0"),
        ({"data.tasks": ["shapes", "digits", "shapes"]}, "data.tasks names \\['shapes'\\] more than once"),
        ({"data.benchmark": "xtail"}, "'xtail' needs data.data_root"),
        ({"eval.xtail_template": "a photo."}, "must hold one '\\{\\}' for the class name"),
        ({"data.benchmark": "xtail", "data.data_root": "/d", "data.tasks": ["DTD", "CIFAR100"]},
         "CIFAR100, which X-TAIL's 10 domains leave out"),
        ({"train.seed": -1}, "train.seed=-1 must be in \\[0, 2\\*\\*32\\)"),
        ({"train.seed": 2**32}, "train.seed=4294967296 must be in"),
        ({"train.ago_weight": -1.0}, "train.ago_weight=-1.0 must be >= 0"),
        ({"train.shots": "all"}, "train.shots='all' has the wrong type; expected int or none"),
    ],
)
def test_bad_configs_name_the_problem(overrides, message):
    config = CLConfig()
    if "data.benchmark" not in overrides:
        overrides = {"data.benchmark": "synthetic", **overrides}
    with pytest.raises(ValueError, match=message):
        apply_overrides(config, overrides).validate()


def test_bad_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "run.yaml").write_text("x: 1")
    with pytest.raises(ValueError, match="expected a .json or .toml"):
        load_config(tmp_path / "run.yaml")
    with pytest.raises(ValueError, match="SECTION.KEY=VALUE"):
        parse_assignments(["iterations"])
    # Each names the file: a syntax error, a top level that is not a table of sections, a directory.
    (tmp_path / "broken.toml").write_text("[train\niterations = 3")
    with pytest.raises(ValueError, match="broken.toml' is not valid TOML"):
        load_config(tmp_path / "broken.toml")
    (tmp_path / "broken.json").write_text('{"train": {"iterations": 3}')
    with pytest.raises(ValueError, match="broken.json' is not valid JSON"):
        load_config(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json' holds a list; expected an object of sections"):
        load_config(tmp_path / "list.json")
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        load_config(tmp_path / "folder.json")
