"""Task sequences: the 11 MTIL datasets from a local folder, and a synthetic multi-domain benchmark.

A Task holds a train and a test dataset (items: (image tensor (3, S, S), label int)), the class names and the
prompt templates; templates[0] is the one training template of the task, all templates form the zero-shot
ensemble at evaluation.

MTIL datasets are read with torchvision from --data-root in torchvision's own layouts (the folders that
`torchvision.datasets.X(root=data_root, download=True)` creates). A missing dataset raises FileNotFoundError
naming the expected path; nothing is skipped silently and nothing is downloaded.

The synthetic benchmark draws five visually distinct domains (shapes, colors, textures, digits, satellite
scenes) with real class names, on the fly and deterministically from a seed: the demo needs no download.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch.utils.data import Dataset, Subset

logger = logging.getLogger("rank1_cl")

# OpenAI CLIP's normalisation (open_clip's default for its CLIP models and for the tiny model of this package).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass
class Task:
    name: str
    class_names: list
    templates: list
    train: Dataset
    test: Dataset
    train_labels: torch.Tensor  # (len(train),) int64
    test_labels: torch.Tensor  # (len(test),) int64

    @property
    def train_template(self) -> str:
        return self.templates[0]

    def __post_init__(self) -> None:
        if not self.templates or any("{}" not in template for template in self.templates):
            raise ValueError(f"task {self.name}: every template must contain '{{}}', got {self.templates}")
        for split, labels, dataset in (("train", self.train_labels, self.train), ("test", self.test_labels, self.test)):
            if len(labels) != len(dataset):
                raise ValueError(f"task {self.name}: {len(labels)} {split} labels for {len(dataset)} {split} items")
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(self.class_names)):
                raise ValueError(f"task {self.name}: {split} labels outside [0, {len(self.class_names)})")


# ---- synthetic benchmark -------------------------------------------------------------------------------------


class TensorImageDataset(Dataset):
    """Images stored as uint8 (N, 3, S, S); items are CLIP-normalised float32 tensors and int labels."""

    def __init__(self, images_uint8: torch.Tensor, labels: torch.Tensor):
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, S, S), got {images_uint8.dtype} {tuple(images_uint8.shape)}")
        self.images, self.labels = images_uint8, labels.to(torch.int64)
        self.mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return (self.images[index].float() / 255.0 - self.mean) / self.std, int(self.labels[index])


def _grid(n: int, size: int):
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    return yy.expand(n, size, size), xx.expand(n, size, size)


def _uniform(generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, 1, 1, generator=generator)


def _smooth_noise(generator, n: int, size: int, cells: int) -> torch.Tensor:
    """Low-frequency noise in [0, 1], (n, size, size): random cells, bilinearly upsampled."""
    coarse = torch.rand(n, 1, cells, cells, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def _compose(mask: torch.Tensor, foreground: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """mask (n, S, S) in [0, 1], colours (n, 3) -> images (n, 3, S, S)."""
    mask = mask.unsqueeze(1)
    return mask * foreground[:, :, None, None] + (1 - mask) * background[:, :, None, None]


def _draw_shapes(labels, generator, size):
    n = labels.shape[0]
    yy, xx = _grid(n, size)
    cx, cy = _uniform(generator, n, 0.35, 0.65), _uniform(generator, n, 0.35, 0.65)
    s = _uniform(generator, n, 0.2, 0.32)
    dx, dy = xx - cx, yy - cy
    radius = (dx.square() + dy.square()).sqrt()
    masks = [
        radius < s,  # circle
        torch.maximum(dx.abs(), dy.abs()) < 0.85 * s,  # square
        (dy < s) & (dy > -s) & (dx.abs() < (dy + s) / 2),  # triangle
        ((dx.abs() < 0.3 * s) & (dy.abs() < s)) | ((dy.abs() < 0.3 * s) & (dx.abs() < s)),  # cross
        (radius < s) & (radius > 0.6 * s),  # ring
        dx.abs() + dy.abs() < s,  # diamond
    ]
    mask = torch.stack(masks, 1)[torch.arange(n), labels].float()
    foreground = 0.6 + 0.4 * torch.rand(n, 3, generator=generator)
    background = 0.25 * torch.rand(n, 3, generator=generator)
    return _compose(mask, foreground, background)


_COLORS = {
    "red": (0.85, 0.1, 0.1), "green": (0.1, 0.7, 0.15), "blue": (0.1, 0.2, 0.85), "yellow": (0.95, 0.9, 0.1),
    "purple": (0.55, 0.1, 0.7), "orange": (0.95, 0.55, 0.05), "pink": (0.98, 0.6, 0.75), "brown": (0.45, 0.27, 0.1),
}  # fmt: skip


def _draw_colors(labels, generator, size):
    n = labels.shape[0]
    base = torch.tensor(list(_COLORS.values()))[labels]
    base = (base + 0.06 * torch.randn(n, 3, generator=generator)).clamp(0, 1)
    shade = 0.65 + 0.35 * _smooth_noise(generator, n, size, 4)
    return base[:, :, None, None] * shade.unsqueeze(1)


def _draw_textures(labels, generator, size):
    n = labels.shape[0]
    yy, xx = _grid(n, size)
    frequency = _uniform(generator, n, 3.0, 5.0)
    phase = _uniform(generator, n, 0.0, 1.0)
    angle = _uniform(generator, n, 0.0, math.pi)
    along = xx * torch.cos(angle) + yy * torch.sin(angle)
    fx, fy = torch.frac(xx * frequency + phase), torch.frac(yy * frequency + phase)
    masks = [
        torch.sin(2 * math.pi * frequency * along + phase * 6.28) > 0,  # striped
        ((torch.floor(xx * frequency + phase) + torch.floor(yy * frequency + phase)) % 2) == 0,  # checkered
        ((fx - 0.5).square() + (fy - 0.5).square()) < 0.08,  # dotted
        (fx < 0.18) | (fy < 0.18),  # grid
        torch.sin(2 * math.pi * frequency * (yy + 0.12 * (2 * (torch.frac(xx * 2 * frequency) - 0.5).abs())))
        > 0,  # zigzag
        _smooth_noise(generator, n, size, 5) > 0.5,  # blotchy
    ]
    mask = torch.stack(masks, 1)[torch.arange(n), labels].float()
    tint = 0.5 + 0.5 * torch.rand(n, 3, generator=generator)
    return _compose(mask, tint * 0.95, tint * 0.3)


# 3x5 bitmap digits, row by row.
_DIGIT_FONT = (
    "111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
    "111100111001111", "111100111101111", "111001010010010", "111101111101111", "111101111001111",
)  # fmt: skip
_DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _draw_digits(labels, generator, size):
    n = labels.shape[0]
    yy, xx = _grid(n, size)
    font = torch.tensor([[int(bit) for bit in glyph] for glyph in _DIGIT_FONT], dtype=torch.float32).view(10, 5, 3)
    height = _uniform(generator, n, 0.55, 0.75)
    width = height * 0.6
    top, left = _uniform(generator, n, 0.05, 0.95) * (1 - height), _uniform(generator, n, 0.05, 0.95) * (1 - width)
    row = ((yy - top) / height * 5).floor().long()
    col = ((xx - left) / width * 3).floor().long()
    inside = (row >= 0) & (row < 5) & (col >= 0) & (col < 3)
    glyphs = font[labels]  # (n, 5, 3)
    lookup = glyphs.view(n, 15).gather(1, (row.clamp(0, 4) * 3 + col.clamp(0, 2)).view(n, -1)).view(n, size, size)
    mask = lookup * inside.float()
    gray = torch.full((n, 3), 0.95)
    return _compose(mask, gray, torch.zeros(n, 3)) + 0.08 * torch.rand(n, 1, size, size, generator=generator)


def _draw_satellite(labels, generator, size):
    n = labels.shape[0]
    yy, xx = _grid(n, size)
    blotch = _smooth_noise(generator, n, size, 6)
    phase = _uniform(generator, n, 0.0, 6.28)
    waves = 0.5 + 0.5 * torch.sin(18 * yy + 4 * xx + phase)
    river_center = 0.5 + 0.2 * torch.sin(6 * yy + phase)
    river = ((xx - river_center).abs() < 0.09).float()
    fields = ((torch.floor(xx * 4 + phase) + torch.floor(yy * 3)) % 2).float()
    palettes = [
        (waves, (0.15, 0.35, 0.75), (0.05, 0.15, 0.45)),  # sea
        (blotch, (0.1, 0.4, 0.1), (0.02, 0.2, 0.05)),  # forest
        (waves * 0.6 + blotch * 0.4, (0.9, 0.78, 0.5), (0.75, 0.58, 0.32)),  # desert
        (blotch, (0.97, 0.97, 1.0), (0.78, 0.82, 0.9)),  # snow
        (fields, (0.55, 0.75, 0.2), (0.85, 0.75, 0.3)),  # farmland
        (river, (0.15, 0.3, 0.8), (0.25, 0.55, 0.2)),  # river
    ]
    images = torch.empty(n, 3, size, size)
    for class_index, (mask, foreground, background) in enumerate(palettes):
        chosen = labels == class_index
        if chosen.any():
            count = int(chosen.sum())
            images[chosen] = _compose(
                mask[chosen], torch.tensor(foreground).expand(count, 3), torch.tensor(background).expand(count, 3)
            )
    return images + 0.05 * torch.randn(n, 1, size, size, generator=generator)


@dataclasses.dataclass(frozen=True)
class SyntheticDomain:
    name: str
    class_names: tuple
    templates: tuple
    draw: Callable  # (labels (n,), generator, size) -> float images (n, 3, size, size), roughly in [0, 1]


SYNTHETIC_DOMAINS = {
    domain.name: domain
    for domain in (
        SyntheticDomain(
            "shapes", ("circle", "square", "triangle", "cross", "ring", "diamond"),
            ("a drawing of a {}.", "a {} shape.", "a picture of a {} shape."), _draw_shapes,
        ),
        SyntheticDomain(
            "colors", tuple(_COLORS), ("a patch of the color {}.", "something {}.", "a {} colored surface."), _draw_colors,
        ),
        SyntheticDomain(
            "textures", ("striped", "checkered", "dotted", "grid", "zigzagged", "blotchy"),
            ("a {} texture.", "a photo of a {} pattern.", "a close-up of a {} surface."), _draw_textures,
        ),
        SyntheticDomain(
            "digits", _DIGIT_NAMES, ('a photo of the number: "{}".', "the digit {}.", "a written {}."), _draw_digits,
        ),
        SyntheticDomain(
            "satellite", ("sea", "forest", "desert", "snow", "farmland", "river"),
            ("a satellite photo of {}.", "an aerial view of {}.", "a satellite image of {}."), _draw_satellite,
        ),
    )
}  # fmt: skip


def synthetic_images(domain: str, labels: torch.Tensor, seed: int, image_size: int = 32) -> torch.Tensor:
    """uint8 images (n, 3, image_size, image_size) of `labels` in `domain`, a pure function of (domain, labels, seed)."""
    if domain not in SYNTHETIC_DOMAINS:
        raise ValueError(f"unknown synthetic domain {domain!r}; expected one of {list(SYNTHETIC_DOMAINS)}")
    generator = torch.Generator().manual_seed(seed)
    images = SYNTHETIC_DOMAINS[domain].draw(labels, generator, image_size)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def synthetic_split(domain: str, per_class: int, seed: int, image_size: int = 32) -> TensorImageDataset:
    """A balanced dataset of `per_class` images for every class of `domain`."""
    n_classes = len(SYNTHETIC_DOMAINS[domain].class_names)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return TensorImageDataset(synthetic_images(domain, labels, seed, image_size), labels)


def synthetic_tasks(
    domains: Optional[Sequence[str]] = None,
    train_per_class: int = 40,
    test_per_class: int = 40,
    seed: int = 0,
    image_size: int = 32,
) -> list:
    """One Task per synthetic domain, in the given order (default: all five). Train and test images come from
    disjoint random streams derived from `seed`."""
    domains = list(domains) if domains is not None else list(SYNTHETIC_DOMAINS)
    unknown = [name for name in domains if name not in SYNTHETIC_DOMAINS]
    if unknown:
        raise ValueError(f"unknown synthetic domain(s) {unknown}; expected names from {list(SYNTHETIC_DOMAINS)}")
    tasks = []
    for position, name in enumerate(SYNTHETIC_DOMAINS):
        if name not in domains:
            continue
        domain = SYNTHETIC_DOMAINS[name]
        train = synthetic_split(name, train_per_class, seed * 1000 + 2 * position, image_size)
        test = synthetic_split(name, test_per_class, seed * 1000 + 2 * position + 1, image_size)
        tasks.append(
            Task(name, list(domain.class_names), list(domain.templates), train, test, train.labels, test.labels)
        )
    return sorted(tasks, key=lambda task: domains.index(task.name))


# ---- MTIL ------------------------------------------------------------------------------------------------------

MTIL_ORDER_I = (
    "Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet", "StanfordCars",
    "SUN397",
)  # fmt: skip
MTIL_ORDER_II = (
    "StanfordCars", "Food", "MNIST", "OxfordPet", "Flowers", "SUN397", "Aircraft", "Caltech101", "DTD", "EuroSAT",
    "CIFAR100",
)  # fmt: skip

# CLIP's zero-shot prompt templates for these datasets (openai/CLIP, data/prompts.md), abridged where long.
_TEMPLATES = {
    "Aircraft": ("a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."),
    "Caltech101": (
        "a photo of a {}.", "a painting of a {}.", "a plastic {}.", "a sculpture of a {}.", "a sketch of a {}.",
        "a tattoo of a {}.", "a toy {}.", "a rendition of a {}.", "a embroidered {}.", "a cartoon {}.",
        "a {} in a video game.", "a plushie {}.", "a origami {}.", "art of a {}.", "graffiti of a {}.",
        "a drawing of a {}.", "a doodle of a {}.", "a photo of the {}.", "a painting of the {}.",
    ),
    "CIFAR100": (
        "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
        "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
        "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
        "a blurry photo of the {}.", "a black and white photo of the {}.", "a low contrast photo of the {}.",
        "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
        "a photo of the small {}.", "a photo of the big {}.",
    ),
    "DTD": (
        "a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.", "a photo of a {} object.",
        "a photo of the {} texture.", "a photo of the {} pattern.", "a photo of the {} thing.",
        "a photo of the {} object.",
    ),
    "EuroSAT": (
        "a centered satellite photo of {}.", "a centered satellite photo of a {}.", "a centered satellite photo of the {}.",
    ),
    "Flowers": ("a photo of a {}, a type of flower.",),
    "Food": ("a photo of {}, a type of food.",),
    "MNIST": ('a photo of the number: "{}".',),
    "OxfordPet": ("a photo of a {}, a type of pet.",),
    "StanfordCars": (
        "a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!", "a photo of my dirty {}.",
        "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}.",
    ),
    "SUN397": ("a photo of a {}.", "a photo of the {}."),
}  # fmt: skip

_EUROSAT_NAMES = (
    "annual crop land", "forest", "brushland or shrubland", "highway or road",
    "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
    "residential buildings or homes or apartments", "river", "lake or sea",
)  # fmt: skip
_CALTECH_RENAMES = {
    "Faces": "off-center face", "Faces_easy": "centered face", "Leopards": "leopard", "Motorbikes": "motorbike",
    "airplanes": "airplane",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class MTILSpec:
    name: str
    folder: str  # what torchvision expects under the data root
    build: Callable  # (root, train: bool, transform) -> dataset


def _clean(name: str) -> str:
    """Underscores to spaces, as CLIP's class names have them. A "/" stays: it belongs to names such as Aircraft's
    "F/A-18" and Cars' "Ram C/V Cargo Van Minivan 2012" (SUN397's path-like names are handled apart)."""
    return name.replace("_", " ").strip()


def _torchvision():
    try:
        import torchvision.datasets as datasets
    except ImportError as error:
        raise ImportError("the MTIL loaders need torchvision: pip install 'rank1-kernels[clip]'") from error
    return datasets


def _held_out_split(dataset, labels: torch.Tensor, train: bool, test_fraction: float = 0.2, seed: int = 0):
    """Datasets without an official split: a fixed, seeded per-class split (test_fraction of each class)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = max(1, round(test_fraction * len(members)))
        chosen.append(members[n_test:] if train else members[:n_test])
    indices = torch.cat(chosen).sort().values
    subset = Subset(dataset, indices.tolist())
    subset.classes = getattr(dataset, "classes", None) or getattr(dataset, "categories", None)
    subset.targets = labels[indices].tolist()
    return subset


def _in_path_order(dataset) -> None:
    """Sort a dataset's images by path, in place. torchvision's SUN397 lists them in the order the filesystem
    walks its folders, which differs between machines; the held-out split draws positions in that list, so without
    this the same seed would give another test set on another machine (or after a resume elsewhere)."""
    files, labels = getattr(dataset, "_image_files", None), getattr(dataset, "_labels", None)
    if files is None or labels is None or len(files) != len(labels):
        raise TypeError(
            f"{type(dataset).__name__} no longer keeps _image_files/_labels; the seeded split needs its images in a "
            f"fixed order (update rank1_cl.data._in_path_order for this torchvision)"
        )
    order = sorted(range(len(files)), key=lambda index: str(files[index]))
    dataset._image_files = [files[index] for index in order]
    dataset._labels = [labels[index] for index in order]


def _build(kind: str, **fixed):
    def build(root, train, transform):
        datasets = _torchvision()
        constructor = getattr(datasets, kind)
        split = fixed.get("splits", ("train", "test"))
        arguments = {key: value for key, value in fixed.items() if key != "splits"}
        if kind in ("CIFAR100", "MNIST"):
            return constructor(root, train=train, transform=transform, download=False)
        if kind in ("Caltech101", "SUN397", "EuroSAT"):
            dataset = constructor(root, transform=transform, download=False, **arguments)
            if kind == "SUN397":
                _in_path_order(dataset)
            return _held_out_split(dataset, labels_of(dataset), train)
        return constructor(
            root, split=split[0] if train else split[1], transform=transform, download=False, **arguments
        )

    return build


MTIL_DATASETS = {
    spec.name: spec
    for spec in (
        MTILSpec("Aircraft", "fgvc-aircraft-2013b", _build("FGVCAircraft", splits=("trainval", "test"))),
        MTILSpec("Caltech101", "caltech101", _build("Caltech101", target_type="category")),
        MTILSpec("CIFAR100", "cifar-100-python", _build("CIFAR100")),
        MTILSpec("DTD", "dtd", _build("DTD")),
        MTILSpec("EuroSAT", "eurosat", _build("EuroSAT")),
        MTILSpec("Flowers", "flowers-102", _build("Flowers102")),
        MTILSpec("Food", "food-101", _build("Food101")),
        MTILSpec("MNIST", "MNIST", _build("MNIST")),
        MTILSpec("OxfordPet", "oxford-iiit-pet", _build("OxfordIIITPet", splits=("trainval", "test"))),
        MTILSpec("StanfordCars", "stanford_cars", _build("StanfordCars")),
        MTILSpec("SUN397", "SUN397", _build("SUN397")),
    )
}


def labels_of(dataset) -> torch.Tensor:
    """The integer labels of a torchvision classification dataset, without loading its images."""
    for attribute in ("targets", "_labels", "y", "labels"):
        values = getattr(dataset, attribute, None)
        if values is not None:
            return torch.as_tensor(list(values) if not torch.is_tensor(values) else values, dtype=torch.int64)
    samples = getattr(dataset, "_samples", None) or getattr(dataset, "samples", None)
    if samples is not None:
        return torch.tensor([label for _, label in samples], dtype=torch.int64)
    raise TypeError(f"cannot read the labels of {type(dataset).__name__}; expected a targets/_labels attribute")


def mtil_class_names(name: str, dataset) -> list:
    if name == "EuroSAT":
        return list(_EUROSAT_NAMES)
    if name == "MNIST":
        return [str(digit) for digit in range(10)]
    raw = getattr(dataset, "classes", None) or getattr(dataset, "categories", None)
    if raw is None:
        raise TypeError(f"{name}: the dataset exposes no class names (classes/categories)")
    if name == "Caltech101":
        return [_CALTECH_RENAMES.get(category, _clean(category)) for category in raw]
    if name == "SUN397":  # "apartment_building/outdoor" is CLIP's "apartment building outdoor"
        return [_clean(category.replace("/", " ")) for category in raw]
    return [_clean(category) for category in raw]


# X-TAIL's 10 domains are MTIL's without CIFAR100 (the protocol's definition, ../shared/DESIGN.md).
XTAIL_EXCLUDED = ("CIFAR100",)


def xtail_order(order: str = "I") -> list:
    """The X-TAIL training order: MTIL order I or II without CIFAR100."""
    if order not in ("I", "II"):
        raise ValueError(f"order={order!r}; expected 'I' or 'II'")
    return [name for name in (MTIL_ORDER_I if order == "I" else MTIL_ORDER_II) if name not in XTAIL_EXCLUDED]


def mtil_tasks(data_root: str, names: Optional[Sequence[str]] = None, order: str = "I", transform_train=None,
               transform_test=None) -> list:  # fmt: skip
    """One Task per MTIL dataset, in `names` order (default: order I or II). Every dataset must be present:
    a missing one raises FileNotFoundError naming the folder expected under data_root."""
    if order not in ("I", "II"):
        raise ValueError(f"order={order!r}; expected 'I' or 'II'")
    names = list(names) if names is not None else list(MTIL_ORDER_I if order == "I" else MTIL_ORDER_II)
    unknown = [name for name in names if name not in MTIL_DATASETS]
    if unknown:
        raise ValueError(f"unknown MTIL dataset(s) {unknown}; expected names from {list(MTIL_DATASETS)}")
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"data root {data_root!r} does not exist; expected a folder holding the MTIL datasets")
    tasks = []
    for name in names:
        spec = MTIL_DATASETS[name]
        expected = os.path.join(data_root, spec.folder)
        if not os.path.isdir(expected):
            raise FileNotFoundError(
                f"MTIL dataset {name}: expected its torchvision layout at {expected!r} (the folder that "
                f"torchvision.datasets creates under root={data_root!r}); it is missing"
            )
        try:
            train = spec.build(data_root, True, transform_train)
            test = spec.build(data_root, False, transform_test)
        except (RuntimeError, OSError) as error:  # torchvision: "Dataset not found or corrupted", or a missing file
            # torchvision's own words may suggest download=True, which this CLI does not offer: say what to do here.
            raise FileNotFoundError(
                f"MTIL dataset {name} at {expected!r} is incomplete or corrupted ({type(error).__name__}: {error}); "
                f"download it into that folder with torchvision.datasets (download=True) outside this tool, then "
                f"run again"
            ) from error
        class_names = mtil_class_names(name, train)
        tasks.append(Task(name, class_names, list(_TEMPLATES[name]), train, test, labels_of(train), labels_of(test)))
    return tasks


# ---- sampling ----------------------------------------------------------------------------------------------------


def few_shot_indices(labels: torch.Tensor, shots: Optional[int], generator: torch.Generator) -> torch.Tensor:
    """`shots` random indices per class (all of a class that has fewer, with a warning), sorted; None: every index."""
    if shots is None:
        return torch.arange(len(labels))
    chosen, short = [], []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        if len(members) < shots:
            short.append(label)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    if short:
        logger.warning("%d class(es) have fewer than %d training images (labels %s): all of theirs are used",
                       len(short), shots, short[:10])  # fmt: skip
    return torch.cat(chosen).sort().values


def random_subset(labels: torch.Tensor, limit: Optional[int], seed: int = 0) -> torch.Tensor:
    """A deterministic random subset of `limit` indices, sorted (None or limit >= len: all)."""
    if limit is None or limit >= len(labels):
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)[:limit]
    return order.sort().values
