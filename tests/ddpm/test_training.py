"""Optimizers, lr schedules, EMA, the training step and epoch, seeding, devices."""

import copy
import io
import math

import pytest
import torch
from tiny_run import Calls, train_on
from torch import nn

from ddpm.batches import EpochLoader
from ddpm.config import OptimConfig
from ddpm.datasets import TensorImageDataset
from ddpm.diffusion import DiffusionModel
from ddpm.trainer import train_step
from ddpm.training import (
    EMA,
    TrainingState,
    build_lr_scheduler,
    build_optimizer,
    lr_factor,
    resolve_device,
    run_warmup_steps,
    seed_everything,
)
from ddpm.unet import UNet

SGD_1 = OptimConfig(name="sgd", lr=1.0, momentum=0.0)


def tiny_model(seed: int = 0) -> DiffusionModel:
    torch.manual_seed(seed)
    return DiffusionModel(UNet(3, 3, hidden_size=8), num_timesteps=50)


@pytest.mark.parametrize(
    ("name", "cls"),
    [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)],
)
def test_optimizer_factory(name: str, cls: type) -> None:
    """Each name builds its optimizer with lr, weight decay and momentum (Adam's beta1)."""
    optim = OptimConfig(name=name, lr=0.1, momentum=0.8, weight_decay=0.01)  # type: ignore[arg-type]
    opt = build_optimizer(nn.Linear(2, 2).parameters(), optim)
    group = opt.param_groups[0]
    assert type(opt) is cls and group["lr"] == 0.1 and group["weight_decay"] == 0.01
    momentum = group["momentum"] if name == "sgd" else group["betas"][0]
    assert momentum == 0.8


def test_unknown_optimizer_fails_clearly() -> None:
    """An unknown optimizer name says which names exist."""
    with pytest.raises(ValueError, match="expected adam, adamw or sgd"):
        build_optimizer(nn.Linear(2, 2).parameters(), OptimConfig(name="lion"))  # type: ignore[arg-type]


def test_lr_warmup_then_constant_or_cosine() -> None:
    """Linear warm-up to the peak, then flat (constant) or a half cosine to 0 (cosine)."""
    assert [lr_factor(s, 4, 20, "constant") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(4, 4, 20, "cosine") == 1.0
    assert lr_factor(12, 4, 20, "cosine") == pytest.approx(0.5)
    assert lr_factor(20, 4, 20, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0, 0, 10, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_factor(5, 0, 10, "step")  # type: ignore[arg-type]


def test_warmup_is_at_most_a_tenth_of_the_run() -> None:
    """The paper's 5,000 warm-up steps are kept for long runs and cut to a tenth of a short
    one (a 900-step run warms up for 90), so no run ends still warming up."""
    assert run_warmup_steps(5000, 800_000) == 5000
    assert run_warmup_steps(5000, 900) == 90
    assert run_warmup_steps(0, 900) == 0
    assert run_warmup_steps(5000, 5) == 0


def test_scheduler_state_keeps_the_schedule_a_run_started_with() -> None:
    """The schedule's settings travel in the scheduler's state dict (through a weights_only
    load): a run resumed with more epochs keeps the warm-up it started with."""
    opt = build_optimizer(nn.Linear(2, 2).parameters(), SGD_1)
    started = build_lr_scheduler(opt, warmup_steps=90, total_steps=900, schedule="constant")
    for _ in range(10):
        opt.step()
        started.step()
    buffer = io.BytesIO()
    torch.save(started.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    opt2 = build_optimizer(nn.Linear(2, 2).parameters(), SGD_1)
    resumed = build_lr_scheduler(opt2, warmup_steps=180, total_steps=1800, schedule="constant")
    resumed.load_state_dict(saved)
    assert resumed.lr_lambdas[0].warmup_steps == 90
    lrs = []
    for _ in range(3):
        opt2.step()
        resumed.step()
        lrs.append(opt2.param_groups[0]["lr"])
    assert lrs == pytest.approx([12 / 90, 13 / 90, 14 / 90])


def test_scheduler_drives_the_optimizer_lr() -> None:
    """The LambdaLR built from the settings moves the optimizer's lr step by step."""
    opt = build_optimizer(nn.Linear(2, 2).parameters(), SGD_1)
    sched = build_lr_scheduler(opt, warmup_steps=2, total_steps=4, schedule="cosine")
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.5])


def test_ema_is_torch_swa_utils_average_with_decay_warmup() -> None:
    """The EMA is torch's AveragedModel: the first update copies, then
    ema = d_n ema + (1 - d_n) w with d_n = min(decay, (1 + n) / (10 + n)) after n updates."""
    net = nn.Linear(1, 1, bias=False)
    ema = EMA(net, decay=0.9)
    assert isinstance(ema, torch.optim.swa_utils.AveragedModel)
    expected = None
    for n, value in enumerate([1.0, 3.0, -2.0, 5.0] + [4.0] * 80):
        with torch.no_grad():
            net.weight.fill_(value)
            ema.update_parameters(net)
        d = min(0.9, (1 + n) / (10 + n))
        expected = value if n == 0 else d * expected + (1 - d) * value
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
    assert ema.current_decay().item() == pytest.approx(0.9)  # warmed up from n = 80 on


def test_ema_follows_training_after_a_few_hundred_steps() -> None:
    """With the DDPM paper's decay 0.9999, 300 training steps leave the EMA near the trained
    weights: within a fifth of the distance they travelled (measured 0.12), where torch's
    EMA without warm-up is still most of the way back at the initial weights (0.95)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = tiny_model()
    initial = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = build_optimizer(model.parameters(), OptimConfig(name="adam", lr=1e-3))
    ema = EMA(model, decay=0.9999)
    plain = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9999), use_buffers=True)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    for _ in range(300):
        train_step(TrainingState(model, opt, ema=ema), x)
        plain.update_parameters(model)
    trained = torch.cat([p.detach().flatten() for p in model.parameters()])
    travelled = (trained - initial).norm()

    def lag(average: AveragedModel) -> float:
        flat = torch.cat([p.detach().flatten() for p in average.module.parameters()])
        return ((flat - trained).norm() / travelled).item()

    assert lag(ema) < 0.2
    assert lag(plain) > 0.9


def test_gradient_clipping_bounds_the_update() -> None:
    """With SGD (lr 1, no momentum) and grad_clip c, a step moves the weights by exactly c."""
    model = tiny_model()
    opt = build_optimizer(model.parameters(), SGD_1)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    train_step(TrainingState(model, opt, grad_clip=1e-3), torch.rand(2, 3, 32, 32) * 2 - 1)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_trainer_epoch_reports_metrics_and_steps_everything() -> None:
    """Trainer.epoch steps the optimizer, scheduler and EMA per batch, counts the state's steps,
    and reports typed numbers."""
    model = tiny_model()
    opt = build_optimizer(model.parameters(), OptimConfig(name="adam", lr=1e-3))
    sched = build_lr_scheduler(opt, warmup_steps=10, total_steps=100, schedule="constant")
    ema = EMA(model, decay=0.5)
    state = TrainingState(model, opt, sched, ema, grad_clip=1.0, epoch=4, global_step=40)
    dataset = TensorImageDataset(torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8))
    seen = []
    batches = EpochLoader(dataset, 4, seed=0).epoch(0)
    result = train_on(state, batches, Calls(on_step=lambda i, m: seen.append((i, m))))
    assert (result.epoch, result.global_step, result.steps, result.images) == (5, 43, 3, 10)
    assert (state.global_step, state.epoch_step, state.epoch) == (43, 0, 5)
    assert result.lr == pytest.approx(1e-3 * 3 / 10)  # three warm-up steps taken
    assert result.images_per_s > 0 and result.seconds > 0
    assert result.loss == pytest.approx(sum(m.loss for _, m in seen) / 3)
    assert [i for i, _ in seen] == [41, 42, 43]
    assert [m.skipped for _, m in seen] == [False] * 3 and result.bad_steps == 0
    assert ema.n_averaged.item() == 3


def test_seed_everything_makes_training_repeatable() -> None:
    """Same seed, same data -> bit-identical weights after a few steps."""

    def run() -> torch.Tensor:
        seed_everything(123, deterministic=False)
        model = DiffusionModel(UNet(3, 3, hidden_size=8), num_timesteps=50)
        opt = build_optimizer(model.parameters(), OptimConfig(name="adam", lr=1e-3))
        for _ in range(3):
            train_step(TrainingState(model, opt), torch.rand(2, 3, 32, 32) * 2 - 1)
        return torch.cat([p.flatten() for p in model.parameters()])

    assert torch.equal(run(), run())


def test_resolve_device() -> None:
    """auto picks cuda only when present; asking for cuda without it is a clear error."""
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_train_step_returns_the_step_on_the_device() -> None:
    """train_step reads nothing on the host: its loss, gradient norm and outcome are device
    tensors (finite here, the step taken), for the loop to read in batches."""
    model = tiny_model()
    state = TrainingState(model, torch.optim.Adam(model.parameters()))
    step = train_step(state, torch.zeros(2, 3, 32, 32))
    assert all(isinstance(v, torch.Tensor) for v in (step.loss, step.grad_norm, step.taken))
    assert math.isfinite(step.loss.item()) and step.taken.item() and not step.bad.item()


@pytest.mark.parametrize("parts", [2, 3, 4, 10])
def test_accumulated_micro_batches_give_the_whole_batchs_step(parts: int) -> None:
    """train.accumulate: a batch of 10 in 2, 3, 4 or 10 micro-batches (uneven, as torch.chunk
    cuts them; t and eps drawn once for the batch) takes the whole batch's SGD step.

    In float32 the two steps differ by rounding that this small network amplifies, by an
    amount that depends on the CPU and the micro-batch sizes (3e-7 for 2 and 3 parts, 2.0e-3
    for 4 and 10, whose pieces of one image take other kernels; a fixed bound failed on one
    machine and not another). So the test tells rounding from a wrong weighting by how each
    scales with precision: the same steps in float64 must agree to the float32 disagreement
    times float64's unit roundoff over float32's (2**-53 / 2**-24), times 10 (or to 64 ulps
    of the weights where float32 agreed exactly). A wrong weighting (summing the micro-batches'
    mean losses) is no smaller in float64: off by about the step itself (~0.1). In float32 the
    disagreement must also stay well under that (a tenth of the step)."""
    torch.manual_seed(0)
    model = DiffusionModel(UNet(3, 3, hidden_size=8), num_timesteps=50)
    x0 = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).double()

    def step(k: int, dtype: torch.dtype) -> tuple[float, torch.Tensor]:
        net = copy.deepcopy(model).to(dtype)
        opt = build_optimizer(net.parameters(), SGD_1)
        torch.manual_seed(4)  # the same t and eps for every k (of one dtype)
        result = train_step(TrainingState(net, opt), x0.to(dtype), parts=k)
        weights = torch.cat([p.detach().flatten() for p in net.parameters()]).double()
        return result.loss.item(), weights

    (whole_loss, whole32), (split_loss, split32) = (
        step(1, torch.float32),
        step(parts, torch.float32),
    )
    whole, split = step(1, torch.float64)[1], step(parts, torch.float64)[1]
    update = (whole - before).abs().max().item()
    assert update > 1e-2  # the step moved the weights (by 0.15 here)
    # The reported loss is summed in float32 (a few additions: within a few float32 ulps).
    assert split_loss == pytest.approx(whole_loss, rel=1e-6)
    rounding32 = (split32 - whole32).abs().max().item()
    assert rounding32 <= 0.1 * update
    bound = max(10 * rounding32 * 2.0**-53 / 2.0**-24, 64 * 2.0**-53 * whole.abs().max().item())
    assert (split - whole).abs().max().item() <= bound, (rounding32, bound)
