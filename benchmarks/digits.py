"""Sample quality at a fixed budget on real images: scikit-learn's 1,797 handwritten digits.

    python benchmarks/digits.py train --out runs/digits/NAME [--set diffusion.prediction=eps ...]
    python benchmarks/digits.py sample --out runs/digits/NAME --sample dpmpp_2m:20 --seeds 4
    python benchmarks/digits.py diagnose --out runs/digits/NAME --sample ddim:100:1
    python benchmarks/digits.py diffusers --out runs/digits/diffusers
    python benchmarks/digits.py table runs/digits/*
    python benchmarks/digits.py figure --out grid.png runs/digits/NAME/samples-*.npz

The digits (8x8, 0-16) are upscaled to 32x32 RGB with PIL's bilinear filter and written as PNG
files, then trained as an image folder (`data.dataset=folder`) through the project's own
training path (build_training -> Trainer.epoch, what train_flow's tasks call) at issue 25's budget:
the assignment network at hidden 32, batch 64, lr 5e-4, 40 epochs = 1,160 steps, every other
setting at its default unless --set changes it. 200 images are then drawn from the EMA weights
as sample_flow draws them (image i from noise seeded by (seed, i)).

The scores (`score`):
- fd: the Fréchet distance between Gaussians fitted to 8x8 grey pixels (0-16 scale) of the
  samples and of all 1,797 training images, both downscaled from 32x32 by area averaging
  (PIL's box filter). For scale: two halves of the data 6.9, 200 training images 16.0,
  uniform noise about 2,000.
- confidence, coverage: a logistic-regression digit classifier fitted to the training images'
  8x8 features; confidence is its mean top probability on the samples, coverage the entropy of
  the classes it assigns them over log(10) (1 = all ten digits equally often).
- median, corners: the median grey pixel of the samples, and the mean of their four 3x3 corner
  patches, on a 0-1 scale (data: 0.173 and 0.001): how dark the background is.

`diffusers` trains the same budget with diffusers' own pieces (UNet2DModel of our network's
size, DDPMScheduler, AdamW, EMAModel with its warm-up, DDIMScheduler eta 1 with clipping, 100
steps), as diffusers' examples/unconditional_image_generation/train_unconditional.py does, on
the same batches (the project's loader: order, flips and normalisation).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent

BUDGET = {  # issue 25's budget; every other setting at its default
    "data.dataset": "folder",
    "data.image_size": 32,
    "model.hidden_size": 32,
    "train.batch_size": 64,
    "optim.lr": 5e-4,
    "train.epochs": 40,
    "train.device": "cpu",
    "sample.every": 0,
}
NUM_SAMPLES = 200
SAMPLE_SEED = 0


# ---------------------------------------------------------------------------------------------
# The data and the measures


def digits() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 32, 32) uint8 grey images (bilinear upscale of the 8x8 digits) and their labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    images = [
        np.asarray(
            Image.fromarray((im * 255 / 16).round().astype(np.uint8)).resize(
                (32, 32), Image.BILINEAR
            )
        )
        for im in data.images
    ]
    return np.stack(images), data.target


NUM_PHOTO_CROPS = 2000


def photos() -> tuple[np.ndarray, np.ndarray]:
    """(2000, 32, 32, 3) uint8 colour images and which photograph each comes from (0, 1):
    seeded crops of scikit-learn's two sample photographs (china.jpg, flower.jpg, 427x640),
    48 to 128 pixels square, box-filtered down to 32x32, alternating between the two."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    sources = load_sample_images().images
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(NUM_PHOTO_CROPS):
        photo = sources[i % 2]
        size = int(rng.integers(48, 129))
        top = int(rng.integers(0, photo.shape[0] - size + 1))
        left = int(rng.integers(0, photo.shape[1] - size + 1))
        crop = Image.fromarray(photo[top : top + size, left : left + size])
        images.append(np.asarray(crop.resize((32, 32), Image.BOX)))
        labels.append(i % 2)
    return np.stack(images), np.asarray(labels)


DATASETS = {"digits": digits, "photos": photos}


def write_folder(folder: Path, dataset: str = "digits") -> Path:
    """The data set's images as 32x32 RGB PNG files under folder (written once)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images, _ = DATASETS[dataset]()
    if len(list(folder.glob("*.png"))) != len(images):
        for i, im in enumerate(images):
            Image.fromarray(im).convert("RGB").save(folder / f"{i:04d}.png")
    return folder


def data_folder(dataset: str) -> Path:
    return write_folder(ROOT / "runs" / f"{dataset}-data", dataset)


def grey(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, C, 32, 32) or (N, 32, 32) uint8 -> (N, 32, 32) float grey in [0, 1] (ITU-R 601,
    PIL's 'L' weights)."""
    x = torch.as_tensor(np.ascontiguousarray(images)).double() / 255
    if x.ndim == 4:
        x = x[:, 0] if x.shape[1] == 1 else 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return x.numpy()


def features(grey_images: np.ndarray) -> np.ndarray:
    """(N, 32, 32) grey in [0, 1] -> (N, 64): 8x8 area averages on the digits' 0-16 scale."""
    x = torch.from_numpy(grey_images)[:, None]
    return (F.avg_pool2d(x, 4).flatten(1) * 16).numpy()


def channels_first(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, 3, 32, 32) or (N, 32, 32, 3) uint8 -> (N, 3, 32, 32) float in [0, 1]."""
    x = np.asarray(images).astype(np.float64) / 255
    return x if x.shape[1] == 3 else x.transpose(0, 3, 1, 2)


def colour_features(images: np.ndarray) -> np.ndarray:
    """(N, 3, 32, 32) float in [0, 1] -> (N, 48): 4x4 area averages of R, G and B, 0-16."""
    return (F.avg_pool2d(torch.from_numpy(images), 8).flatten(1) * 16).numpy()


def colourfulness(images: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) float in [0, 1] -> (N,): Hasler & Suesstrunk's colourfulness (2003),
    sigma_rgyb + 0.3 mu_rgyb of the opponent channels rg = R - G, yb = (R + G) / 2 - B, 0-255."""
    r, g, b = (images[:, c].reshape(len(images), -1) * 255 for c in range(3))
    rg, yb = r - g, (r + g) / 2 - b
    spread = np.sqrt(rg.std(1) ** 2 + yb.std(1) ** 2)
    centre = np.sqrt(rg.mean(1) ** 2 + yb.mean(1) ** 2)
    return spread + 0.3 * centre


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (as FID)."""
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(w.clip(0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ s_b @ root_a).clip(0)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b) - 2 * cross)


def class_scores(classifier: Any, f: np.ndarray, classes: int) -> dict[str, float]:
    """confidence (mean top probability) and coverage (entropy of the assigned classes over
    log(classes): 1 = every class equally often) of a classifier on (N, D) features."""
    proba = classifier.predict_proba(f)
    counts = np.bincount(proba.argmax(1), minlength=classes) / len(f)
    entropy = -(counts[counts > 0] * np.log(counts[counts > 0])).sum()
    return {
        "confidence": float(proba.max(1).mean()),
        "coverage": float(entropy / math.log(classes)),
    }


ASYMMETRIC_DIGITS = (2, 3, 4, 5, 6, 7, 9)  # a mirror image of these is not a digit


class Judge:
    """The training digits' features and classifiers fitted to them; scores sample sets.

    The digit classifier gives confidence and coverage; a second one, fitted to the digits and
    to mirror images of the asymmetric ones (ASYMMETRIC_DIGITS, 17 classes), gives `mirrored`:
    the share of samples it calls a mirrored digit (the data: 0.000; the same images mirrored:
    see reference_scores).
    """

    def __init__(self) -> None:
        from sklearn.linear_model import LogisticRegression

        images, labels = digits()
        self.real = features(grey(images))
        self.classifier = LogisticRegression(max_iter=5000).fit(self.real, labels)
        asymmetric = np.isin(labels, ASYMMETRIC_DIGITS)
        mirrored = features(grey(images[asymmetric][:, :, ::-1].copy()))
        self.mirror_classifier = LogisticRegression(max_iter=5000).fit(
            np.concatenate([self.real, mirrored]),
            np.concatenate([labels, labels[asymmetric] + 10]),
        )

    @staticmethod
    def features(samples: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N, C, 32, 32) uint8 -> (N, 64): the measure's features (8x8 grey averages)."""
        return features(grey(samples))

    def score(self, samples: torch.Tensor | np.ndarray) -> dict[str, float]:
        """samples: (N, C, 32, 32) uint8 -> fd, confidence, coverage, mirrored, median,
        corners."""
        g = grey(samples)
        f = features(g)
        corners = np.concatenate(
            [g[:, :3, :3], g[:, :3, -3:], g[:, -3:, :3], g[:, -3:, -3:]], axis=1
        )
        return {
            "fd": frechet_distance(self.real, f),
            **class_scores(self.classifier, f, 10),
            "mirrored": float((self.mirror_classifier.predict(f) >= 10).mean()),
            "median": float(np.median(g)),
            "corners": float(corners.mean()),
        }


class PhotoJudge:
    """The colour measure: the photograph crops' colour features and a classifier telling the
    two photographs apart.

    fd: the Fréchet distance between Gaussians fitted to 4x4 RGB area averages (0-16 scale) of
    the samples and of all 2,000 crops; confidence and coverage of the photograph classifier
    (coverage 1 = both photographs equally often, as in the data); colourfulness: the samples'
    mean (Hasler & Suesstrunk), beside the data's.
    """

    def __init__(self) -> None:
        from sklearn.linear_model import LogisticRegression

        images, labels = photos()
        x = channels_first(images)
        self.real = colour_features(x)
        self.classifier = LogisticRegression(max_iter=5000).fit(self.real, labels)
        self.data_colourfulness = float(colourfulness(x).mean())

    @staticmethod
    def features(samples: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N, 3, 32, 32) or (N, 32, 32, 3) uint8 -> (N, 48): the measure's features."""
        return colour_features(channels_first(samples))

    def score(self, samples: torch.Tensor | np.ndarray) -> dict[str, float]:
        """samples: (N, 3, 32, 32) uint8 -> fd, confidence, coverage, colourfulness."""
        x = channels_first(samples)
        f = colour_features(x)
        return {
            "fd": frechet_distance(self.real, f),
            **class_scores(self.classifier, f, 2),
            "colourfulness": float(colourfulness(x).mean()),
            "data_colourfulness": self.data_colourfulness,
        }


JUDGES = {"digits": Judge, "photos": PhotoJudge}


# ---------------------------------------------------------------------------------------------
# The project's training and sampling


def project_config(data_folder: Path, overrides: dict[str, Any]):
    """The Config a user's `--data.folder DIR ...` flags give, resolved as train_flow does."""
    from settings import core_config, load_settings

    settings = load_settings(
        {**BUDGET, "data.folder": str(data_folder), **overrides}, env_file=None
    )
    return settings, core_config(settings)


def train(out: Path, overrides: dict[str, Any], dataset: str = "digits") -> dict[str, Any]:
    """Train at the budget with the project's path (an edm run measures sigma_data as
    train_flow does; train.ema_snapshots go to out/ema); save the final state as the run
    folder's epoch checkpoint, the losses and the time taken."""
    from ddpm.batches import TrainingData
    from ddpm.build import build_training, with_sigma_data
    from ddpm.datasets import load_dataset
    from ddpm.run_dir import RunDir, save_epoch_checkpoint
    from ddpm.trainer import Trainer

    torch.set_num_threads(1)
    folder = data_folder(dataset)
    settings, config = project_config(folder, overrides)
    images = load_dataset(config, folder)
    config = with_sigma_data(config, images)
    data = TrainingData(images, config)
    state = build_training(config, data.steps_per_epoch * config.train.epochs)
    run = RunDir(out)
    run.path.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    losses = []
    trainer = Trainer(state, data, config.train, run=run)
    while state.epoch < config.train.epochs:
        losses.append(trainer.epoch().loss)
    seconds = time.perf_counter() - start
    snapshot = state.snapshot()
    snapshot["settings"] = settings.model_dump(mode="json")
    save_epoch_checkpoint(snapshot, run, keep=1)
    record = {
        "data": dataset,
        "overrides": overrides,
        "sigma_data": config.diffusion.sigma_data,
        "steps": state.global_step,
        "train_seconds": seconds,
        "epoch_loss": losses,
    }
    (out / "train.json").write_text(json.dumps(record, indent=2))
    return record


def trained_state(out: Path, ema: float | None = None) -> Path:
    """The checkpoint to sample: out/state.pt (runs before the run folder) or the run folder;
    with ema, the post-hoc EMA of that sigma_rel, rebuilt from out/ema's snapshots once."""
    if ema is None:
        return out / "state.pt" if (out / "state.pt").is_file() else out
    from ddpm.posthoc import posthoc_checkpoint, posthoc_ema
    from ddpm.run_dir import RunDir

    path = posthoc_checkpoint(RunDir(out), ema)
    return path if path.is_file() else posthoc_ema(RunDir(out), [ema])[0]


def dataset_of(out: Path) -> str:
    trained = out / "train.json"
    return json.loads(trained.read_text()).get("data", "digits") if trained.is_file() else "digits"


def sample(
    out: Path,
    options: dict[str, Any],
    seed: int = SAMPLE_SEED,
    num: int = NUM_SAMPLES,
    ema: float | None = None,
) -> dict[str, Any]:
    """Draw num images from the trained EMA weights (or the post-hoc EMA of sigma_rel ema) as
    sample_flow does (image i from noise seeded by (seed, i)); score them with the run's data
    set's judge. Scores already in `out` for these options are kept."""
    from ddpm.config import SampleConfig
    from ddpm.generate import load_trained_model, sample_set

    tag = "-".join(f"{k}={v}" for k, v in sorted(options.items()))
    tag += f"-ema={ema}" if ema is not None else ""
    tag += f"-seed={seed}" if seed != SAMPLE_SEED else ""
    if (out / f"scores-{tag}.json").is_file():
        return json.loads((out / f"scores-{tag}.json").read_text())
    torch.set_num_threads(1)
    trained = load_trained_model(trained_state(out, ema))
    config = SampleConfig(**options)
    start = time.perf_counter()
    images = sample_set(trained.diffusion, num, trained.image_shape, config, seed, batch_size=num)
    seconds = time.perf_counter() - start
    np.savez_compressed(out / f"samples-{tag}.npz", images=images.numpy())
    scores = {
        **JUDGES[dataset_of(out)]().score(images),
        "sample_seconds": seconds,
        "sampler": {**options, **({"ema": ema} if ema is not None else {})},
        "seed": seed,
    }
    (out / f"scores-{tag}.json").write_text(json.dumps(scores, indent=2))
    return scores


def network_calls(options: dict[str, Any]) -> int:
    """Network evaluations per image of a sampler spec (heun: 2 per step but the last)."""
    if options["sampler"] == "ddpm":
        return 1000
    return 2 * options["steps"] - 1 if options["sampler"] == "heun" else options["steps"]


SCORE_COLUMNS = ("confidence", "coverage", "mirrored", "median", "corners", "colourfulness")


def table(folders: list[Path]) -> str:
    """A markdown table of every score under the given run folders: the mean over seeds (and
    each seed's FD), the network calls per image, and the training and sampling time."""
    rows = []
    for folder in folders:
        trained = folder / "train.json"
        record = json.loads(trained.read_text()) if trained.is_file() else {}
        by_sampler: dict[str, list[dict[str, Any]]] = {}
        for path in sorted(folder.glob("scores-*.json")):
            scores = json.loads(path.read_text())
            spec = scores.get("sampler")
            key = json.dumps(spec, sort_keys=True) if spec else path.stem
            by_sampler.setdefault(key, []).append(scores)
        for key, runs in by_sampler.items():
            runs.sort(key=lambda r: r.get("seed", SAMPLE_SEED))
            spec = runs[0].get("sampler")
            calls = network_calls(spec) if spec else "-"
            fds = ", ".join(f"{r['fd']:.0f}" for r in runs)
            cells = [
                f"{np.mean([r[c] for r in runs]):.3f}" if c in runs[0] else "-"
                for c in SCORE_COLUMNS
            ]
            seconds = record.get("train_seconds", runs[0].get("train_seconds", 0))
            rows.append(
                f"| {folder.name} | {key} | {calls} | {np.mean([r['fd'] for r in runs]):.1f} "
                f"({fds}) | {' | '.join(cells)} | {seconds:.0f} "
                f"| {np.mean([r['sample_seconds'] for r in runs]):.0f} |"
            )
    columns = " | ".join(SCORE_COLUMNS)
    head = (
        f"| run | sampler | calls | FD (per seed) | {columns} | train s | sample s |\n"
        + "| --- " * (len(SCORE_COLUMNS) + 6)
        + "|"
    )
    return "\n".join([head, *rows])


@torch.no_grad()
def diagnose(out: Path, sampler: str = "ddim", steps: int = 100, eta: float = 1.0) -> dict:
    """Where the samples' backgrounds go grey: the trained EMA network's errors per timestep
    on the training images, and the background along a sampling trajectory.

    Per timestep t (512 training images, fixed noise): the bias (mean) and RMS error of the
    network's eps and x0 estimates (unclipped), over background pixels (black in the data,
    <= -0.95 on the [-1, 1] scale) and over the rest. Along the trajectory of the sampler
    (200 images, as `sample` draws them): the mean of x_t / sqrt(abar_t) and of the clipped x0
    estimate over the 3x3 corner patches (background in 99.9 % of the data) at every step.
    """
    from ddpm.batches import normalize
    from ddpm.datasets import load_dataset
    from ddpm.generate import image_seed, load_trained_model
    from ddpm.noise import draw_noise, step_generator
    from ddpm.samplers import make_sampler
    from ddpm.schedules import split_prediction

    torch.set_num_threads(1)
    trained = load_trained_model(out / "state.pt")
    model = trained.diffusion
    folder = data_folder("digits")
    _, config = project_config(folder, {})
    dataset = load_dataset(config, folder)
    x0 = normalize(torch.stack([dataset[i] for i in range(512)]))
    background = x0 <= -0.95
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(x0.shape, generator=g)
    abar = model.alphas_cumprod_f64
    per_t = []
    for t in (0, 10, 25, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 950, 999):
        a, s = abar[t].sqrt().item(), (1 - abar[t]).sqrt().item()
        x_t = a * x0 + s * eps
        output = model.network()(x_t, torch.full((len(x0),), t))
        x0_hat, eps_hat = split_prediction(model.prediction, output, x_t, a, s)
        row = {"t": t}
        for name, estimate, truth in (("eps", eps_hat, eps), ("x0", x0_hat, x0)):
            err = estimate - truth
            for part, mask in (("bg", background), ("fg", ~background)):
                row[f"{name}_bias_{part}"] = err[mask].mean().item()
                row[f"{name}_rmse_{part}"] = err[mask].square().mean().sqrt().item()
        per_t.append(row)

    method = make_sampler(sampler, abar, model.prediction, True, steps, eta)
    generators = [torch.Generator().manual_seed(image_seed(SAMPLE_SEED, i)) for i in range(200)]
    device = model.betas.device
    x = draw_noise((200, *trained.image_shape), generators, device)
    step_gen = step_generator(generators, device)
    corners = torch.zeros(32, 32, dtype=torch.bool)
    for rows in (slice(0, 3), slice(-3, None)):
        for cols in (slice(0, 3), slice(-3, None)):
            corners[rows, cols] = True
    trajectory = []
    for i, t in enumerate(method.timesteps):
        output = model.network()(x, torch.full((200,), t))
        a, s = abar[t].sqrt().item(), (1 - abar[t]).sqrt().item()
        x0_hat, _ = split_prediction(model.prediction, output, x, a, s, clip=True)
        trajectory.append(
            {
                "t": t,
                "x_t_over_sqrt_abar_corners": (x[..., corners] / a).mean().item(),
                "x0_hat_corners": x0_hat[..., corners].mean().item(),
                "x0_hat_median": x0_hat.median().item(),
            }
        )
        last = i == len(method.timesteps) - 1
        noise = None if last or not method.stochastic else draw_noise(x.shape, step_gen, device)
        x = method.step(i, output, x, noise)
    final = x.clamp(-1, 1)
    report = {
        "per_timestep": per_t,
        "trajectory": trajectory,
        "final_corners": final[..., corners].mean().item(),
        "final_median": final.median().item(),
    }
    (out / f"diagnose-{sampler}-{steps}-{eta}.json").write_text(json.dumps(report, indent=2))
    return report


# ---------------------------------------------------------------------------------------------
# diffusers' trainer on the same budget


DIFFUSERS_VARIANTS = {
    # diffusers' train_unconditional.py as it ships: eps on the linear schedule, then DDIM
    # (eta 1, clipped) in 100 steps, on the project's batches (with its default flips).
    "eps-ddim100": {"beta_schedule": "linear", "prediction_type": "epsilon", "flip": True},
    # The same levers as the project's v defaults, without flips: v on squaredcos_cap_v2,
    # DPMSolverMultistepScheduler (DPM-Solver++(2M)) in 20 steps.
    "v-dpmsolver20": {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction",
                      "flip": False},
}  # fmt: skip


def diffusers_unet() -> Any:
    """UNet2DModel of our network's size: 0.67 M parameters, 0.35 GFLOP per image (ours 0.72 M,
    0.34)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 48, 48),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3,
        norm_num_groups=8,
    )


@torch.no_grad()
def diffusers_samples(model: Any, noise_scheduler: Any, variant: str) -> torch.Tensor:
    """NUM_SAMPLES uint8 images from the variant's diffusers sampler, image i from noise seeded
    as the project seeds it."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from ddpm.generate import image_seed, to_uint8

    if variant == "eps-ddim100":
        scheduler, steps, kwargs = DDIMScheduler.from_config(noise_scheduler.config), 100, {
            "eta": 1.0, "use_clipped_model_output": True}  # fmt: skip
    else:
        scheduler, steps = DPMSolverMultistepScheduler.from_config(noise_scheduler.config), 20
        kwargs = {}
    scheduler.set_timesteps(steps)
    generators = [
        torch.Generator().manual_seed(image_seed(SAMPLE_SEED, i)) for i in range(NUM_SAMPLES)
    ]
    x = torch.stack([torch.randn(3, 32, 32, generator=g) for g in generators])
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t).sample, t, x, **kwargs).prev_sample
    return to_uint8(x.clamp(-1, 1))


def train_diffusers(out: Path, variant: str = "eps-ddim100") -> dict[str, Any]:
    """diffusers' train_unconditional.py loop at the project's budget with the variant's
    schedule, target and sampler (DIFFUSERS_VARIANTS)."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from ddpm.batches import TrainingData
    from ddpm.datasets import load_dataset
    from ddpm.training import run_warmup_steps

    torch.set_num_threads(1)
    spec = DIFFUSERS_VARIANTS[variant]
    folder = data_folder("digits")
    _, config = project_config(folder, {"data.random_flip": spec["flip"]})
    data = TrainingData(load_dataset(config, folder), config)
    total = data.steps_per_epoch * config.train.epochs
    torch.manual_seed(config.train.seed)
    model = diffusers_unet()
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=spec["beta_schedule"],
        prediction_type=spec["prediction_type"],
    )
    # train_unconditional.py's AdamW (betas 0.95/0.999, weight decay 1e-6, eps 1e-8) at our lr,
    # our warm-up (cut to a tenth of the run) and constant lr after it, our clipping (1.0).
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.optim.lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8
    )
    warmup = run_warmup_steps(config.optim.warmup_steps, total)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup)
    ema = EMAModel(
        model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4
    )
    start, step = time.perf_counter(), 0
    for epoch in range(1, config.train.epochs + 1):
        for x0 in data.epoch(epoch):
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (x0.shape[0],))
            x_t = noise_scheduler.add_noise(x0, noise, t)
            target = (
                noise
                if spec["prediction_type"] == "epsilon"
                else noise_scheduler.get_velocity(x0, noise, t)
            )
            loss = F.mse_loss(model(x_t, t).sample.float(), target.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            ema.step(model.parameters())
            step += 1
    train_seconds = time.perf_counter() - start
    ema.copy_to(model.parameters())
    model.eval()
    start = time.perf_counter()
    images = diffusers_samples(model, noise_scheduler, variant)
    sample_seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / f"samples-diffusers-{variant}.npz", images=images.numpy())
    scores = {
        **Judge().score(images),
        "variant": variant,
        "steps": step,
        "train_seconds": train_seconds,
        "sample_seconds": sample_seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out / f"scores-diffusers-{variant}.json").write_text(json.dumps(scores, indent=2))
    return scores


def reference_scores() -> dict[str, dict[str, float]]:
    """The measures' scales: halves of the data, 200 training images (as they are, and each
    mirrored with probability 1/2, as the default flips feed them to the network), uniform
    noise; the same for the photographs' crops."""
    out = {}
    for name, judge in (("digits", Judge()), ("photos", PhotoJudge())):
        images = DATASETS[name]()[0]
        images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        rng = np.random.default_rng(0)
        order = rng.permutation(len(images))
        some = images[order[:NUM_SAMPLES]].copy()
        flip = rng.random(NUM_SAMPLES) < 0.5
        some_flipped = some.copy()
        some_flipped[flip] = some[flip][..., ::-1]
        noise = rng.integers(0, 256, (NUM_SAMPLES, 3, 32, 32), dtype=np.uint8)
        halves = [images[order[: len(order) // 2]], images[order[len(order) // 2 :]]]
        out[name] = {
            f"{NUM_SAMPLES} training images": judge.score(some),
            f"{NUM_SAMPLES} training images, half mirrored": judge.score(some_flipped),
            "uniform noise": judge.score(noise),
            "halves": {"fd": frechet_distance(*(judge.features(h) for h in halves))},
        }
    return out


def rescore(folders: list[Path]) -> int:
    """Score every samples-*.npz under the run folders again with today's judges, keeping
    each scores file's other fields (sampler, seed, times); returns how many."""
    done = 0
    for folder in folders:
        judge = JUDGES[dataset_of(folder)]()
        for path in sorted(folder.glob("scores-*.json")):
            images = folder / f"samples-{path.stem.removeprefix('scores-')}.npz"
            if not images.is_file():
                continue
            scores = json.loads(path.read_text())
            scores.update(judge.score(np.load(images)["images"]))
            path.write_text(json.dumps(scores, indent=2))
            done += 1
    return done


def figure(
    path: Path, sample_files: list[Path], dataset: str = "digits", per_row: int = 16
) -> Path:
    """One grid: a row of training images, then a row of each samples-*.npz file's first
    per_row images (uint8 (N, 3, 32, 32), as `sample` writes them)."""
    from ddpm.images import save_grid

    real = DATASETS[dataset]()[0][:per_row]
    data = torch.from_numpy(channels_first(real) * 255 if real.ndim == 4 else real[:, None] / 1.0)
    data = data.expand(-1, 3, -1, -1) if data.shape[1] == 1 else data
    rows = [data] + [
        torch.from_numpy(np.load(f)["images"][:per_row]).double() for f in sample_files
    ]
    grid = torch.cat(rows).float() / 127.5 - 1
    return save_grid(grid, path, nrow=per_row)


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sampler(spec: str) -> dict[str, Any]:
    """'ddim:100:1' -> {'sampler': 'ddim', 'steps': 100, 'eta': 1.0}; 'dpmpp_2m:20'; 'ddpm';
    further SampleConfig fields as NAME=VALUE: 'heun:18:s_churn=40', 'dpmpp_3m_karras:10:rho=5'."""
    name, *rest = spec.split(":")
    extra = {k: parse_value(v) for k, v in (part.split("=", 1) for part in rest if "=" in part)}
    rest = [part for part in rest if "=" not in part]
    return {
        "sampler": name,
        "steps": int(rest[0]) if rest else 1000,
        "eta": float(rest[1]) if len(rest) > 1 else (1.0 if name == "ddim" else 0.0),
        **extra,
    }


# What each trained variant is scored with by default: stochastic DDIM at 100 calls (the default
# before issue 25), DPM-Solver++(2M) at 20 (the default now), and the 1,000-step ancestral
# sampler.
DEFAULT_SAMPLERS = ("ddim:100:1", "dpmpp_2m:20", "ddpm")


def print_rows(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        print(
            " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train at the budget, then sample and score")
    p_train.add_argument("--set", action="append", default=[], help="dotted setting=value")
    p_train.add_argument("--data", choices=sorted(DATASETS), default="digits")
    p_sample = sub.add_parser("sample", help="sample and score a trained state")
    p_diag = sub.add_parser("diagnose", help="per-timestep errors and the grey background")
    p_diff = sub.add_parser("diffusers", help="diffusers' trainer at the same budget")
    p_diff.add_argument("--variant", choices=sorted(DIFFUSERS_VARIANTS), default="eps-ddim100")
    for p in (p_train, p_sample, p_diag, p_diff):
        p.add_argument("--out", type=Path, required=True)
    for p in (p_train, p_sample):
        p.add_argument(
            "--sample", action="append", default=None,
            help=f"SAMPLER[:STEPS[:ETA]][:NAME=VALUE...] (default: {' '.join(DEFAULT_SAMPLERS)})",
        )  # fmt: skip
        p.add_argument("--seeds", type=int, default=1, help="draw with seeds 0 .. N-1")
        p.add_argument(
            "--ema", type=float, action="append", default=None,
            help="also draw from the post-hoc EMA of this sigma_rel (runs with "
                 "train.ema_snapshots); repeat for several",
        )  # fmt: skip
    p_diag.add_argument("--sample", default="ddim:100:1")
    sub.add_parser("reference", help="the measure's scale")
    p_fig = sub.add_parser("figure", help="training images above rows of samples, as a PNG")
    p_fig.add_argument("--out", type=Path, required=True)
    p_fig.add_argument("--data", choices=sorted(DATASETS), default="digits")
    p_fig.add_argument("samples", type=Path, nargs="+", help="samples-*.npz files, one a row")
    p_table = sub.add_parser("table", help="a markdown table of the scores of run folders")
    p_table.add_argument("folders", type=Path, nargs="+")
    p_rescore = sub.add_parser("rescore", help="score run folders' samples again")
    p_rescore.add_argument("folders", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.command == "reference":
        print(json.dumps(reference_scores(), indent=2))
    elif args.command == "figure":
        print(figure(args.out, args.samples, args.data))
    elif args.command == "table":
        print(table([f for f in args.folders if f.is_dir()]))
    elif args.command == "rescore":
        print(rescore([f for f in args.folders if f.is_dir()]), "sample sets scored again")
    elif args.command == "diffusers":
        print(json.dumps(train_diffusers(args.out, args.variant), indent=2))
    elif args.command == "diagnose":
        options = parse_sampler(args.sample)
        report = diagnose(args.out, options["sampler"], options["steps"], options["eta"])
        print_rows(report["per_timestep"])
        print_rows(report["trajectory"][:: max(1, len(report["trajectory"]) // 20)])
        print("final corners", report["final_corners"], "median", report["final_median"])
    else:
        if args.command == "train":
            overrides = dict(item.split("=", 1) for item in args.set)
            overrides = {k: parse_value(v) for k, v in overrides.items()}
            record = train(args.out, overrides, args.data)
            print(json.dumps({k: v for k, v in record.items() if k != "epoch_loss"}))
        for spec in args.sample or DEFAULT_SAMPLERS:
            for ema in [None, *(args.ema or [])]:
                for seed in range(args.seeds):
                    print(json.dumps(sample(args.out, parse_sampler(spec), seed, ema=ema)))


if __name__ == "__main__":
    main()
