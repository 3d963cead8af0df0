"""rank1_cl data: the synthetic benchmark is deterministic and well formed; MTIL failures are clear errors."""

import pytest
import torch

pytest.importorskip("open_clip")

from rank1_cl.data import (
    MTIL_DATASETS,
    MTIL_ORDER_I,
    MTIL_ORDER_II,
    SYNTHETIC_DOMAINS,
    few_shot_indices,
    mtil_class_names,
    mtil_tasks,
    synthetic_tasks,
    xtail_order,
)


def test_synthetic_tasks_are_deterministic_by_seed():
    first = synthetic_tasks(["shapes", "digits"], train_per_class=3, test_per_class=2, seed=5)
    again = synthetic_tasks(["shapes", "digits"], train_per_class=3, test_per_class=2, seed=5)
    other = synthetic_tasks(["shapes", "digits"], train_per_class=3, test_per_class=2, seed=6)
    for a, b, c in zip(first, again, other):
        assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
        assert not torch.equal(a.train.images, c.train.images)
        shared = min(len(a.train), len(a.test))
        assert not torch.equal(a.train.images[:shared], a.test.images[:shared]), "train and test images coincide"
    assert [task.name for task in first] == ["shapes", "digits"]


def test_synthetic_tasks_keep_the_requested_order_and_shapes():
    tasks = synthetic_tasks(["satellite", "colors"], train_per_class=2, test_per_class=1, seed=0, image_size=24)
    assert [task.name for task in tasks] == ["satellite", "colors"]
    image, label = tasks[0].train[0]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and isinstance(label, int)
    assert len(tasks[1].train) == 2 * len(SYNTHETIC_DOMAINS["colors"].class_names)
    assert all("{}" in template for task in tasks for template in task.templates)


def test_synthetic_names_are_unique_across_domains():
    names = [name for domain in SYNTHETIC_DOMAINS.values() for name in domain.class_names]
    assert len(names) == len(set(names))


def test_unknown_synthetic_domain():
    with pytest.raises(ValueError, match="unknown synthetic domain"):
        synthetic_tasks(["shapes", "sketches"])


def test_few_shot_sampling():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    chosen = few_shot_indices(labels, 2, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[chosen]).tolist() == [2, 2, 2]
    assert torch.equal(chosen, few_shot_indices(labels, 2, torch.Generator().manual_seed(0)))
    assert torch.equal(few_shot_indices(labels, None, torch.Generator()), torch.arange(9))


def test_few_shot_sampling_says_when_a_class_has_fewer_images(caplog):
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 2])
    with caplog.at_level("WARNING", logger="rank1_cl"):
        chosen = few_shot_indices(labels, 3, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[chosen]).tolist() == [3, 1, 3]
    assert "1 class(es) have fewer than 3 training images (labels [1])" in caplog.text


def test_mtil_orders_cover_the_eleven_datasets():
    assert len(MTIL_ORDER_I) == 11 and sorted(MTIL_ORDER_I) == sorted(MTIL_ORDER_II) == sorted(MTIL_DATASETS)


def test_xtail_is_the_mtil_order_without_cifar100():
    for order, mtil in (("I", MTIL_ORDER_I), ("II", MTIL_ORDER_II)):
        assert xtail_order(order) == [name for name in mtil if name != "CIFAR100"] and len(xtail_order(order)) == 10


def test_xtail_benchmark_trains_on_the_xtail_order(tmp_path, monkeypatch):
    """--benchmark xtail asks the MTIL loader for the 10 X-TAIL domains, in order."""
    from rank1_cl import trainer
    from rank1_cl.config import CLConfig, apply_overrides

    asked = {}
    monkeypatch.setattr(trainer, "mtil_tasks", lambda root, names, order, *transforms: asked.setdefault("names", names))
    config = apply_overrides(CLConfig(), {"data.benchmark": "xtail", "data.data_root": str(tmp_path),
                                          "data.order": "II"}).validate()  # fmt: skip
    trainer.build_tasks(config, None, None, None)
    assert asked["names"] == xtail_order("II")


def test_missing_mtil_dataset_names_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="fgvc-aircraft-2013b"):
        mtil_tasks(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mtil_tasks(str(tmp_path / "nowhere"))
    # A folder that exists but holds no data is an error too, never a silent skip.
    (tmp_path / "dtd").mkdir()
    with pytest.raises(FileNotFoundError, match="DTD"):
        mtil_tasks(str(tmp_path), ["DTD"])
    # Loaders that fail on a missing file (not torchvision's RuntimeError) are named as well.
    for name, folder in (("Aircraft", "fgvc-aircraft-2013b"), ("SUN397", "SUN397")):
        (tmp_path / folder).mkdir()
        with pytest.raises(FileNotFoundError, match=f"MTIL dataset {name} at .* is incomplete or corrupted"):
            mtil_tasks(str(tmp_path), [name])


def test_unknown_mtil_names(tmp_path):
    with pytest.raises(ValueError, match="unknown MTIL dataset"):
        mtil_tasks(str(tmp_path), ["ImageNet"])
    with pytest.raises(ValueError, match="order"):
        mtil_tasks(str(tmp_path), order="III")


def _write_fake_mnist(root, n_train=20, n_test=10):
    """MNIST in torchvision's raw layout (<root>/MNIST/raw, idx files), with random pixels."""
    import struct

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for prefix, count in (("train", n_train), ("t10k", n_test)):
        pixels = torch.randint(0, 256, (count, 28, 28), generator=generator, dtype=torch.uint8)
        labels = torch.arange(count, dtype=torch.uint8) % 10
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, count, 28, 28) + pixels.numpy().tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, count) + labels.numpy().tobytes())


def test_mtil_loader_reads_a_torchvision_layout(tmp_path):
    from rank1_cl.config import CLConfig, apply_overrides
    from rank1_cl.model import create_clip
    from rank1_cl.trainer import run_continual

    _write_fake_mnist(tmp_path)

    config = apply_overrides(CLConfig(), {"model.name": "rank1-tiny-vit", "data.data_root": str(tmp_path)})
    _, _, preprocess_val, _ = create_clip(config.model)
    (task,) = mtil_tasks(str(tmp_path), ["MNIST"], transform_train=preprocess_val, transform_test=preprocess_val)
    assert task.class_names == [str(digit) for digit in range(10)]
    assert task.templates[0] == 'a photo of the number: "{}".'
    assert len(task.train) == 20 and len(task.test) == 10 and task.train_labels[:3].tolist() == [0, 1, 2]
    image, label = task.train[3]
    assert image.shape == (3, 32, 32) and label == 3
    # The whole protocol on the MTIL path (one task, a few steps).
    settings = {"data.tasks": ["MNIST"], "train.iterations": 2, "train.batch_size": 4, "train.shots": 1,
                "run.run_dir": str(tmp_path / "run")}  # fmt: skip
    output = run_continual(apply_overrides(config, settings).validate(), progress=False)
    assert len(output.results["matrices"]["mtil"]) == 1 and output.results["tasks"] == ["MNIST"]


def _write_fake_sun397(root):
    """SUN397 in torchvision's layout: ClassName.txt and sun_*.jpg files (never opened) under <root>/SUN397."""
    data = root / "SUN397"
    classes = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bathroom"]
    (data).mkdir(parents=True)
    (data / "ClassName.txt").write_text("".join(f"{name}\n" for name in classes))
    for index, name in enumerate(classes):
        folder = data / name.strip("/")
        folder.mkdir(parents=True)
        for image in range(5 + index):
            (folder / f"sun_{name[3:6]}{image:03d}.jpg").write_bytes(b"")


def test_sun397_split_does_not_follow_the_filesystem_order(tmp_path, monkeypatch):
    """torchvision lists SUN397's images in the order the filesystem walks them; the seeded split must pick the
    same test images whatever that order (another machine, a resume elsewhere)."""
    from pathlib import Path

    _write_fake_sun397(tmp_path)
    build = MTIL_DATASETS["SUN397"].build

    def chosen(train):
        subset = build(str(tmp_path), train, None)
        return sorted(str(subset.dataset._image_files[index]) for index in subset.indices)

    walked = {split: chosen(split) for split in (True, False)}
    real_rglob = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: reversed(list(real_rglob(self, pattern))))
    assert {split: chosen(split) for split in (True, False)} == walked
    assert not set(walked[True]) & set(walked[False]) and len(walked[True]) + len(walked[False]) == 18
    assert mtil_class_names("SUN397", build(str(tmp_path), False, None)) == [
        "abbey", "apartment building outdoor", "bathroom"]  # fmt: skip


def test_class_names_keep_their_slashes():
    """CLIP names Aircraft's "F/A-18" and Cars' "Ram C/V Cargo Van Minivan 2012" with the slash."""

    class Names:
        classes = ["F/A-18", "Boeing_737-200", "Ram C/V Cargo Van Minivan 2012"]

    assert mtil_class_names("Aircraft", Names) == ["F/A-18", "Boeing 737-200", "Ram C/V Cargo Van Minivan 2012"]
