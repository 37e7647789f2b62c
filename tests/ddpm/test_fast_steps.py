"""Fast-step options keep training correct: mixed precision, the fp16 scaler, fused
optimizers, and torch.compile."""

from __future__ import annotations

import statistics

import pytest
import torch
from tiny_run import Calls, smooth_batch, train_on
from torch import nn
from torch.overrides import TorchFunctionMode

from ddpm.batches import TrainingData
from ddpm.build import build_training
from ddpm.config import OptimConfig
from ddpm.datasets import TensorImageDataset
from ddpm.diffusion import DiffusionModel
from ddpm.trainer import Trainer, train_step
from ddpm.training import EMA, TrainingState, build_optimizer, resolve_precision
from ddpm.unet import UNet


def random_data(config, n: int = 8) -> TrainingData:
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    return TrainingData(TensorImageDataset(images), config)


@pytest.mark.slow(seconds=70)
def test_bf16_training_on_cpu_still_converges() -> None:
    """The assignment's one-batch test under bf16 autocast: 50 Adam steps bring the loss
    (evaluated in fp32, mean of 16) under 0.5."""
    torch.manual_seed(0)
    model = DiffusionModel(UNet(3, 3, hidden_size=32), num_timesteps=1000)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    x = smooth_batch(0)
    for _ in range(50):
        train_step(TrainingState(model, optimizer, precision="bf16"), x)
    with torch.no_grad():
        assert statistics.mean(model(x).item() for _ in range(16)) < 0.5


def test_precision_auto_is_bf16_on_cuda_only() -> None:
    """auto resolves to bf16 on CUDA and fp32 on a CPU; names are checked."""
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp8", torch.device("cpu"))


def test_fp16_overflow_is_skipped_by_the_scaler_not_counted_as_divergence() -> None:
    """With a far too large initial loss scale (2^24), fp16 steps overflow: the scaler skips
    them and halves its scale until they fit, training goes on, and none counts towards
    max_bad_steps (7 overflows, then steps are taken, measured on this model)."""
    torch.manual_seed(0)
    model = DiffusionModel(UNet(3, 3, hidden_size=8), num_timesteps=20)
    optimizer = build_optimizer(model.parameters(), OptimConfig(name="adam", lr=1e-3))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    before = [p.detach().clone() for p in model.parameters()]
    seen = []
    result = train_on(
        TrainingState(model, optimizer, precision="fp16", scaler=scaler),
        [smooth_batch(i) for i in range(12)],
        Calls(on_step=lambda i, m: seen.append(m.skipped)),
        max_bad_steps=0,
    )
    assert result.bad_steps == 0 and seen[0] and not seen[-1]
    assert scaler.get_scale() < 2.0**24
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_fp16_scaler_state_is_checkpointed(tiny_config) -> None:
    """An fp16 run's snapshot carries its scaler, and restoring puts the scale back."""
    config = tiny_config({"train.precision": "fp16", "data.random_flip": False})
    state = build_training(config, 10)
    Trainer(state, random_data(config), config.train).epoch()
    state.scaler.update(new_scale=123.0)  # as if overflows had lowered it
    snapshot = state.snapshot()
    assert snapshot["scaler"]["scale"] == 123.0
    other = build_training(config, 10)
    assert other.scaler.get_scale() != 123.0
    other.restore(snapshot)
    assert other.scaler.get_scale() == 123.0


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_fused_optimizer_matches_the_unfused_one(name: str) -> None:
    """The fused kernel computes the same updates as the default one over 5 steps of
    well-scaled random gradients (Adam's first steps move each weight by about lr * sign(g),
    so a network's near-zero gradients would compare rounding, not the optimizer)."""

    def run(fused: bool) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        param = nn.Parameter(torch.randn(1000, generator=generator))
        optimizer = build_optimizer(
            [param], OptimConfig(name=name, lr=1e-2, weight_decay=0.01), fused=fused
        )
        for _ in range(5):
            param.grad = torch.randn(1000, generator=generator)
            optimizer.step()
        return param.detach()

    torch.testing.assert_close(run(True), run(False), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_compiled_and_eager_steps_agree() -> None:
    """A training step with the network torch.compile'd (in place, state dict unchanged) has
    the same loss as eager execution and an SGD update within 2 % of the eager one's size
    (measured: 0.4 %; the backends reduce in different orders, and hidden 8 puts one channel
    in each GroupNorm group, which amplifies that at some timesteps). ~40-80 s on 2 CPUs,
    mostly compiling."""

    def step(compiled: bool) -> tuple[float, torch.Tensor, torch.Tensor, list[str]]:
        torch.manual_seed(0)
        model = DiffusionModel(UNet(3, 3, hidden_size=8), num_timesteps=20)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        if compiled:
            model.eps_model.compile()
        optimizer = build_optimizer(
            model.parameters(), OptimConfig(name="sgd", lr=0.1, momentum=0.0)
        )
        x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        loss = train_step(TrainingState(model, optimizer), x).loss.item()
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        return loss, before, after, list(model.state_dict())

    eager, compiled = step(False), step(True)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    assert torch.equal(compiled[1], eager[1])
    update = eager[2] - eager[1]
    assert (compiled[2] - eager[2]).norm() / update.norm() < 0.02
    assert compiled[3] == eager[3]  # checkpoints stay loadable either way


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_run_resumed_from_a_cpu_checkpoint_trains_on_cuda(tiny_config) -> None:
    """A fused-Adam state restored on the CPU (as build-model does) and moved to CUDA carries
    all its optimizer state there, step counts included, and trains on."""
    config = tiny_config({"train.precision": "bf16", "train.fused": True, "train.device": "cuda"})
    data = random_data(config)
    first = build_training(config, 10)
    Trainer(first, data, config.train).epoch()
    resumed = build_training(config, 10)
    resumed.restore(first.snapshot())
    Trainer(resumed, data, config.train).epoch()
    assert all(
        t.device.type == "cuda" for s in resumed.optimizer.state.values() for t in s.values()
    )


class HostReads(TorchFunctionMode):
    """Records every Python-level read of a tensor's value (each one waits for a GPU)."""

    READS = frozenset(
        {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}
    )

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_training_steps_read_nothing_from_the_device_between_reads(tiny_config) -> None:
    """The project's step path (fused Adam, device-resident data, lr schedule, clipping, EMA)
    reads no tensor value on the host: 10 steps with read_every=4 make exactly 3 reads (after
    steps 4, 8 and 10), and on_step sees every step, in order, at those reads."""
    config = tiny_config(
        {
            "train.fused": True,
            "optim.warmup_steps": 3,
            "data.loader": "device",
            "train.log_every": 4,
        }
    )
    state = build_training(config, 10)
    data = random_data(config, 40)
    calls = []
    reads = HostReads()
    with reads:
        hooks = Calls(on_step=lambda step, m: calls.append((step, state.global_step)))
        Trainer(state, data, config.train, hooks=hooks).epoch()
    assert reads.seen == ["tolist"] * 3
    assert [step for step, _ in calls] == list(range(1, 11))
    assert [at for _, at in calls] == [4] * 4 + [8] * 4 + [10] * 2


def test_ema_matches_torch_averaged_model() -> None:
    """The device-side EMA update equals torch's AveragedModel given the warm-up EMA as its
    averaging function (first update copies, then ema = d_n ema + (1 - d_n) w with
    d_n = min(0.9, (1 + n) / (10 + n))) over 100 updates, and has the same state dict keys."""
    from torch.optim.swa_utils import AveragedModel

    def warmup_ema(averaged, current, n):
        decay = min(0.9, (1 + n.item()) / (10 + n.item()))
        return decay * averaged + (1 - decay) * current

    net = UNet(3, 3, 8)
    ours = EMA(net, decay=0.9)
    reference = AveragedModel(net, avg_fn=warmup_ema, use_buffers=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=generator))
        ours.update_parameters(net)
        reference.update_parameters(net)
    assert list(ours.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("saved_fused", "built_fused"), [(False, True), (True, False)])
def test_restore_keeps_this_machines_optimizer_kernels(
    tiny_config, saved_fused, built_fused
) -> None:
    """A checkpoint from an unfused optimizer restored into a fused build (a CPU run resumed
    on a GPU), or the reverse, steps with the kernels of the build, and trains on."""
    saved_config = tiny_config({"train.fused": saved_fused, "data.random_flip": False})
    built_config = tiny_config({"train.fused": built_fused, "data.random_flip": False})
    data = random_data(saved_config)
    saved = build_training(saved_config, 10)
    Trainer(saved, data, saved_config.train).epoch()
    resumed = build_training(built_config, 10)
    resumed.restore(saved.snapshot())
    assert all(bool(g["fused"]) == built_fused for g in resumed.optimizer.param_groups)
    before = torch.cat([p.detach().flatten().clone() for p in resumed.diffusion.parameters()])
    result = Trainer(resumed, data, built_config.train).epoch()
    assert result.bad_steps == 0 and resumed.global_step == 4
    assert not torch.equal(before, torch.cat([p.flatten() for p in resumed.diffusion.parameters()]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_steps_synchronise_only_at_reads(tiny_config) -> None:
    """On CUDA, with bf16, fused Adam, clipping and the EMA, 8 steps with read_every=4
    synchronise with the host exactly twice (torch's sync debug mode counts each one)."""
    import warnings

    config = tiny_config({"train.fused": True, "train.precision": "bf16", "train.device": "cuda"})
    state = build_training(config, 10)
    state.to("cuda")
    batches = [smooth_batch(i).cuda() for i in range(8)]

    def epoch() -> None:
        train_on(state, batches, log_every=4, fused=True, precision="bf16")

    epoch()  # warm-up: optimizer state, kernels chosen
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            epoch()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 2, [str(w.message) for w in syncs]
