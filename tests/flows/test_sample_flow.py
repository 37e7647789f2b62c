"""sample_flow and evaluation in train_flow, on a tiny trained run under the Prefect test harness:
files that resume and repeat byte for byte, the command line, a stop, FID/KID and best.pt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_run import REPO, Cli, signal_group
from run_records import flow_artifacts, history
from tiny_run import tiny_overrides

from ddpm.checkpoint import load_checkpoint
from ddpm.images import ImageFiles
from ddpm.run_dir import RunDir
from flows.sample_flow import sample_flow
from flows.train_flow import train_flow
from settings.sampling import GenerateOptions

# One worker builds the module's shared fixtures once (pytest-xdist).
pytestmark = pytest.mark.xdist_group("sample-flow")

SCRIPT = str(REPO / "flows" / "sample_flow.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, weights: Path) -> dict[str, Any]:
    """A tiny run trained for 2 epochs with an evaluation after each (8 samples), and its
    overrides; the FID/KID statistics cache under tmp. Trained once for the module, in a
    folder of its own and without the developer's DDPM_* variables."""
    folder = tmp_path_factory.mktemp("trained")
    tiny = tiny_overrides(folder)
    overrides = {
        **tiny,
        "eval.every": 1,
        "eval.num_samples": 8,
        "eval.batch_size": 4,
        "eval.weights": str(weights),
        "eval.cache_dir": str(Path(tiny["run.dir"]).parent / "fid-stats"),
        "wandb.mode": "offline",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.upper().startswith("DDPM_")]:
            patch.delenv(name)
        patch.chdir(folder)
        state = train_flow(overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    return {
        "overrides": overrides,
        "run_dir": Path(state.result()["run_dir"]),
        "flow_run_id": state.state_details.flow_run_id,
    }


def sample_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """`python flows/sample_flow.py *args`, run to its end."""
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_options_are_one_typed_parameter(trained, tmp_path: Path) -> None:
    """sample_flow takes its options as one GenerateOptions: a deployment run's JSON object
    (a dict here) is validated into one; a bad value fails the run naming the option."""
    out = tmp_path / "from-json"
    given = {"run": str(trained["run_dir"]), "num": 2, "out": str(out), "batch_size": 2}
    state = sample_flow(options=given, return_state=True)
    assert state.is_completed(), state.message
    assert len(pngs(out)) == 2
    bad = sample_flow(options={**given, "num": 0}, return_state=True)
    assert bad.is_failed() and "num" in bad.message, bad.message


def test_training_evaluates_and_keeps_the_best_checkpoint(
    trained, task_runs, wandb_records
) -> None:
    """eval.every=1 runs an evaluate task after each epoch's checkpoint; FID and KID go to W&B
    and to the epoch-metrics table; best.pt is the epoch checkpoint of the lowest FID."""
    runs = task_runs(trained["flow_run_id"])
    assert [r.state.type.value for r in runs["evaluate"]] == ["COMPLETED"] * 2
    rows = [r for r in history(wandb_records(trained["run_dir"])) if "eval/fid" in r]
    assert [r["global_step"] for r in rows] == [2, 4]
    assert all(np.isfinite(r["eval/kid"]) and r["eval/kid_std"] >= 0 for r in rows)
    table = json.loads(flow_artifacts(trained["flow_run_id"])["epoch-metrics"][-1].data)
    assert [row["fid"] for row in table] == [round(r["eval/fid"], 6) for r in rows]
    run = RunDir(trained["run_dir"])
    record = json.loads(run.best_record.read_text())
    fids = {r["global_step"] // 2: r["eval/fid"] for r in rows}
    assert set(record) == {"fid", "kid", "kid_std", "epoch", "checkpoint"}
    assert {k: record[k] for k in ("fid", "epoch", "checkpoint")} == {
        "fid": min(fids.values()),
        "epoch": min(fids, key=fids.get),
        "checkpoint": f"epoch_{min(fids, key=fids.get):03d}.pt",
    }
    assert load_checkpoint(run.best_checkpoint)["epoch"] == record["epoch"]
    cache = Path(trained["overrides"]["eval.cache_dir"])
    assert len([p for p in cache.rglob("*") if p.is_file()]) >= 1


def test_generate_resume_and_repeat(trained, tmp_path: Path, task_runs) -> None:
    """5 images from the run's newest checkpoint; a re-run draws none; 4 images (the full
    batch the 5 share) are the first 4 files of the 5, byte for byte; 3 (a batch of 3 drawn)
    are the first 3 up to a grey level of rounding; a changed seed is refused."""
    out = tmp_path / "out"
    args = {"run": str(trained["run_dir"]), "out": str(out), "batch_size": 4}
    state = sample_flow(GenerateOptions(num=5, **args), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["written"] == 5 and summary["images"] == 5
    assert summary["checkpoint"].endswith("epoch_002.pt")
    runs = task_runs(state.state_details.flow_run_id)
    assert set(runs) == {"load-model", "generate-images"}
    first = pngs(out)
    assert list(first) == [f"{i:06d}.png" for i in range(5)]
    again = sample_flow(GenerateOptions(num=5, **args))
    assert again["written"] == 0 and pngs(out) == first
    four, three = tmp_path / "four", tmp_path / "three"
    sample_flow(GenerateOptions(num=4, **{**args, "out": str(four)}))
    assert pngs(four) == {k: first[k] for k in list(first)[:4]}
    summary = sample_flow(GenerateOptions(num=3, **{**args, "out": str(three)}))
    assert summary["written"] == 3 and list(pngs(three)) == list(first)[:3]
    for index in range(3):
        drawn, whole = ImageFiles(three, 3)[index], ImageFiles(out, 5)[index]
        assert (drawn.int() - whole.int()).abs().max() <= 1
    refused = sample_flow(GenerateOptions(num=5, seed=1, **args), return_state=True)
    assert refused.is_failed() and "seed: 0 -> 1" in refused.message


def test_command_line_matches_the_flow_and_evaluates(
    trained, tmp_path: Path, cli_env, weights: Path
) -> None:
    """`python flows/sample_flow.py ... --npz --evaluate` in a child process writes the same
    bytes as the in-process flow, the .npz, and metrics.json with finite FID and KID."""
    flow_out, cli_out = tmp_path / "flow", tmp_path / "cli"
    sample_flow(GenerateOptions(run=trained["run_dir"], num=6, out=flow_out, batch_size=4))
    args = [
        "--run", str(trained["run_dir"]), "--num", "6", "--out", str(cli_out),
        "--batch-size", "4", "--npz", "--evaluate", "--eval.weights", str(weights),
        "--eval.cache_dir", trained["overrides"]["eval.cache_dir"],
    ]  # fmt: skip
    result = sample_cli(args, cli_env({}), tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert pngs(cli_out) == pngs(flow_out)
    assert np.load(cli_out / "samples_6x32x32x3.npz")["arr_0"].shape == (6, 32, 32, 3)
    metrics = json.loads((cli_out / "metrics.json").read_text())
    assert metrics["num"] == 6 and all(np.isfinite(metrics[k]) for k in ("fid", "kid"))


def test_command_line_errors_are_one_line(tmp_path: Path, cli_env) -> None:
    """A bad option, a settings flag that is not sample_flow's, and a missing run each exit 2
    with one `error:` message naming it, no traceback."""
    cases = [
        (["--run", "x", "--num", "0", "--out", "o"], "--num"),
        (["--run", "x", "--num", "1", "--out", "o", "--train.epochs", "3"], "train.epochs"),
        (["--run", str(tmp_path / "nowhere"), "--num", "1", "--out", "o"], "nowhere"),
    ]
    for args, named in cases:
        result = sample_cli(args, cli_env({}), tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and named in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.slow(seconds=60)  # with the module's trained run
def test_sigterm_stops_generation_and_a_rerun_completes_it(
    trained, tmp_path: Path, cli_env
) -> None:
    """SIGTERM to the command's group mid-generation exits 143 with `re-run to resume`; the
    re-run writes only the missing images, and the folder equals an uninterrupted one."""
    out, whole = tmp_path / "out", tmp_path / "whole"
    args = ["--run", str(trained["run_dir"]), "--num", "200", "--batch-size", "4"]
    cli = Cli(cli_env({}), tmp_path, *args, "--out", str(out), script=SCRIPT)
    cli.wait_for(lambda line: "8/200 images" in line)
    signal_group(cli, signal.SIGTERM)
    assert cli.finish() == 143, cli.output[-3000:]
    assert "re-run to resume" in cli.output.strip().splitlines()[-1]
    done = len(pngs(out))
    assert 8 <= done < 200
    run = trained["run_dir"]
    sample_flow(GenerateOptions(run=run, num=200, out=whole, batch_size=4))
    resumed = sample_flow(GenerateOptions(run=run, num=200, out=out, batch_size=4))
    assert resumed["written"] == 200 - done
    assert pngs(out) == pngs(whole)


def test_sample_flow_help_imports_no_torch() -> None:
    """--help answers before torch and prefect are imported, listing the options."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", SCRIPT, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--batch-size" in result.stdout and "--no-ema" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()}
    assert {"torch", "prefect"}.isdisjoint(imported)


def test_missing_inception_weights_fail_before_training(
    tiny: dict[str, Any], tmp_path: Path, cli_env
) -> None:
    """With eval.every set, no eval.weights and no network, the run exits 2 before training
    with one line saying where to put the weights, and leaves no run folder."""
    env = {**cli_env({**tiny, "eval.every": 1}), "TORCH_HOME": str(tmp_path / "torch")}
    # The download goes through a proxy that refuses, so it fails at once, network or not;
    # the Prefect API on the loopback address bypasses it.
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    env["https_proxy"] = env["HTTPS_PROXY"] = "http://127.0.0.1:9"
    result = subprocess.run(
        [sys.executable, str(REPO / "flows" / "train_flow.py")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the Inception weights could not be downloaded"), last
    assert "eval.weights (DDPM_EVAL__WEIGHTS)" in last and "Traceback" not in result.stderr
    assert not Path(tiny["run.dir"]).exists()


def test_an_evaluated_checkpoint_exports_with_its_scores(trained, tmp_path: Path) -> None:
    """The best checkpoint of an evaluated run, exported: its model card gives the FID and
    KID best.json recorded for it; a checkpoint the run did not evaluate says so."""
    from ddpm.export import export

    run = RunDir(trained["run_dir"])
    best = json.loads(run.best_record.read_text())
    export(run.best_checkpoint, tmp_path / "best")
    card = (tmp_path / "best" / "README.md").read_text()
    assert f"FID {best['fid']:.4g}, KID {best['kid']:.4g}" in card, card
    assert f"epoch {best['epoch']}" in card
