"""Runs you can trust: each test here is one way a long run used to lose, corrupt or fork
its work (issue 11's items), driven as a user would meet it.

In-process runs use the debug model at 64px (tests/test_pretrain.py's helpers); the
command-line checks run `python -m sparse_mae.cli` in a subprocess.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_mae.apps.finetune import compose_config as finetune_config
from sparse_mae.apps.finetune import run_finetune
from sparse_mae.apps.pretrain import NonFiniteLossError
from sparse_mae.models.fcmae import FCMAE
from sparse_mae.train.checkpoint import list_checkpoints, load_checkpoint
from sparse_mae.errors import RunDirectoryInUse
from tests.test_finetune import ft_overrides
from tests.test_pretrain import assert_states_equal, cli, debug_overrides, one_thread, read_metrics, run  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 1. a run directory belongs to one run -------------------------------------------------

def test_reusing_an_output_dir_without_resume_is_refused_and_changes_nothing(tmp_path):
    run(tmp_path, epochs=4)  # 16 steps, checkpoints 12, 14, 16 kept
    before = files_of(tmp_path / "checkpoints") | {"metrics.jsonl": (tmp_path / "metrics.jsonl").read_bytes()}
    with pytest.raises(ValueError, match=r"already holds 3 checkpoint\(s\) .*step-00000016.pt.*resume=auto.*new "
                                         r"output_dir"):
        run(tmp_path, epochs=2)
    after = files_of(tmp_path / "checkpoints") | {"metrics.jsonl": (tmp_path / "metrics.jsonl").read_bytes()}
    assert after == before


def test_reusing_an_output_dir_on_the_command_line_exits_2_with_the_fix_and_changes_nothing(tmp_path):
    first = cli(debug_overrides(tmp_path / "run", max_steps=2), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = files_of(tmp_path / "run")
    proc = cli(debug_overrides(tmp_path / "run", max_steps=4, seed=5), tmp_path)
    assert proc.returncode == 2
    assert "resume=auto" in proc.stderr and "Traceback" not in proc.stderr
    after = files_of(tmp_path / "run")
    assert after.pop("run.lock") != before.pop("run.lock")  # it held the directory to look, then let go
    assert after == before  # Hydra's own files included


def test_a_second_live_writer_is_refused_naming_the_holder_and_a_dead_one_is_not(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from sparse_mae.train.rundir import RunDirectory; "
        f"held = RunDirectory({str(tmp_path)!r}); held.lock(); print('locked', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryInUse, match=rf"in use by pid {holder.pid} on host \S+"):
            run(tmp_path, max_steps=1)
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert run(tmp_path, max_steps=1).steps == 1  # the kernel released the dead holder's lock


def test_a_fresh_start_sets_aside_metrics_of_a_run_that_wrote_no_checkpoint(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    result = run(tmp_path, max_steps=2)
    assert [r["step"] for r in read_metrics(result.metrics)] == [1, 2]
    (aside,) = tmp_path.glob("metrics.before-*.jsonl")
    assert aside.read_text() == '{"step": 1, "loss": 9.0}\n'


# -- 2. resume survives a damaged checkpoint ----------------------------------------------

def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one_and_ends_identical(tmp_path, capsys):
    straight = run(tmp_path / "straight", **{"checkpoint.keep_last": 0})
    run(tmp_path / "split", max_steps=6)
    newest = tmp_path / "split" / "checkpoints" / "step-00000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a disk that filled up, a copy cut short
    resumed = run(tmp_path / "split", resume="auto")
    out = capsys.readouterr()
    assert re.search(r"warning: skipping checkpoint step-00000006.pt: .*bytes", out.out + out.err)
    assert resumed.steps == 8 and resumed.losses == straight.losses[4:]
    assert_states_equal(load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint))


# -- 3. non-finite gradients never reach a "good" checkpoint -------------------------------

class NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison_gradients_at(monkeypatch, forwards: set[int]) -> None:
    real_loss = FCMAE.forward_loss
    calls = {"n": 0}

    def loss(self, imgs, pred, mask):
        calls["n"] += 1
        value = real_loss(self, imgs, pred, mask)
        return NanGradient.apply(value) if calls["n"] in forwards else value

    monkeypatch.setattr(FCMAE, "forward_loss", loss)


def assert_finite_checkpoints(folder: Path) -> None:
    for info in list_checkpoints(folder):
        state = load_checkpoint(info.path)
        assert all(torch.isfinite(t).all() for t in state["model"].values()), info.path
        assert all(torch.isfinite(t).all() for s in state["optimizer"]["state"].values()
                   for t in s.values() if t.is_floating_point()), info.path


def test_non_finite_gradients_with_a_finite_loss_skip_the_step(tmp_path, monkeypatch):
    poison_gradients_at(monkeypatch, {3})
    result = run(tmp_path, **{"recon.num_images": 0})
    assert result.steps == 8 and result.nonfinite_steps == 1 and result.losses[2] is None
    assert_finite_checkpoints(tmp_path / "checkpoints")
    assert read_metrics(result.metrics)[-1]["nonfinite_steps"] == 1


def test_non_finite_gradients_in_a_row_stop_the_run(tmp_path, monkeypatch):
    poison_gradients_at(monkeypatch, {5, 6, 7})
    with pytest.raises(NonFiniteLossError, match=r"step 6: gradient norm is nan .*3 non-finite steps in a row"):
        run(tmp_path, **{"recon.num_images": 0})
    assert_finite_checkpoints(tmp_path / "checkpoints")


def test_gradients_poisoned_inside_the_optimizer_step_stop_the_run_before_any_save(tmp_path):
    """The fault this catches sits after every check of the gradients: an optimizer
    pre-step hook (standing for a fault inside the optimizer) turns them into NaN."""
    calls = {"n": 0}

    def poison(optimizer, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad.fill_(float("nan"))

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(poison)
    try:
        with pytest.raises(NonFiniteLossError, match=r"step 2: the weights are not finite after the optimizer step.*"
                                                     r"last good checkpoint: .*step-00000002.pt"):
            run(tmp_path, **{"recon.num_images": 0})
    finally:
        handle.remove()
    assert [c.step for c in list_checkpoints(tmp_path / "checkpoints")] == [2]
    assert_finite_checkpoints(tmp_path / "checkpoints")


# -- 4. fine-tuning and evaluation read data under the same bad-file policy ----------------

def write_labelled_tree(root: Path, per_class: int = 8) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for c, color in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (80, 72), tuple(max(0, v - 9 * i) for v in color)).save(d / f"{i}.png")
    good = (root / "train" / "red" / "0.png").read_bytes()
    (root / "train" / "red" / "cut.png").write_bytes(good[: len(good) // 3])  # OSError: truncated
    (root / "val" / "blue" / "cut.png").write_bytes(good[: len(good) // 3])
    (root / "val" / "blue" / "empty.png").write_bytes(b"")


def test_finetune_and_eval_skip_an_unreadable_image_and_count_it(tmp_path):
    from sparse_mae.apps.evaluate import compose_eval_config, run_eval

    write_labelled_tree(tmp_path / "data")
    builtin_only = ("data.draw_size", "data.num_train", "data.num_val")
    overrides = [o for o in ft_overrides(tmp_path / "run", batch_size=17, epochs=2) if not o.startswith(builtin_only)]
    with pytest.warns(UserWarning, match="skipping unreadable image .*cut.png"):
        result = run_finetune(finetune_config(overrides + ["finetune/data@data=imagefolder",
                                                           f"data.root={tmp_path / 'data'}"]))
    assert result.steps == 2 and result.skipped_files == 1  # met in both epochs: one damaged file, counted once
    assert all(e["top1"] >= 0 for e in result.evals)
    with pytest.warns(UserWarning, match="skipping unreadable image .*val/blue/cut.png"):
        summary = run_eval(compose_eval_config([f"ckpt={result.checkpoint}", "finetune/data@data=imagefolder",
                                                f"data.root={tmp_path / 'data'}", "data.size=64",
                                                "data.num_workers=0", f"out={tmp_path / 'ev'}"]))
    assert summary["count"] == 16 and summary["skipped"] == 1  # 17 val files, the cut one left out


# -- 7. wandb runs are named ------------------------------------------------------------------

class FakeWandbRun:
    def __init__(self):
        self.summary = {}

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def test_wandb_run_name_and_id_come_from_the_run(tmp_path, monkeypatch):
    import wandb

    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or FakeWandbRun())
    run(tmp_path / "named", max_steps=2, logger="wandb", **{"logger.run_name": "atto-mask60"})
    run(tmp_path / "unnamed", max_steps=2, logger="wandb")
    run(tmp_path / "unnamed", max_steps=4, logger="wandb", resume="auto")
    assert [c["name"] for c in calls] == ["atto-mask60", "unnamed", "unnamed"]
    assert calls[1]["id"] == calls[2]["id"] != calls[0]["id"] and calls[2]["resume"] == "allow"


# -- 8. fine-tuning's drop path is model.drop_path_rate -------------------------------------

def test_finetune_model_drop_path_rate_reaches_the_model(tmp_path, monkeypatch):
    import sparse_mae.apps.finetune as finetune_app

    built = []
    real = finetune_app.create_model
    monkeypatch.setattr(finetune_app, "create_model", lambda name, **kw: built.append(kw) or real(name, **kw))
    run_finetune(finetune_config(ft_overrides(tmp_path, max_steps=1, **{"model.drop_path_rate": 0.2})))
    assert built[0]["drop_path_rate"] == 0.2
    assert finetune_config(["model=tiny"]).model.drop_path_rate == 0.1  # the recipe's default, in the schema


# -- 10. a new run from imported weights -----------------------------------------------------

@pytest.fixture
def imported_fcmae(tmp_path) -> tuple[Path, dict]:
    """An official-layout FCMAE checkpoint brought in with `sparse-mae import`."""
    import sparse_mae
    from sparse_mae.apps.app import compose
    from sparse_mae.apps.import_ckpt import run_import
    from sparse_mae.convert import export_state_dict

    torch.manual_seed(7)
    ours = sparse_mae.create_model("fcmae_convnextv2_debug").state_dict()
    official, _ = export_state_dict(ours, "official_fcmae")
    torch.save({"model": official}, tmp_path / "official.pt")
    out, _ = run_import(compose("import", [f"ckpt={tmp_path / 'official.pt'}", "format=official_fcmae",
                                           f"out={tmp_path / 'imported.pt'}"]))
    return out, ours


def test_resuming_from_weights_only_names_init(tmp_path, imported_fcmae):
    path, _ = imported_fcmae
    with pytest.raises(ValueError, match=rf"holds weights only .* init={re.escape(str(path))}"):
        run(tmp_path / "run", resume=str(path), max_steps=1)


def test_init_starts_a_fresh_run_from_imported_weights(tmp_path, imported_fcmae):
    path, ours = imported_fcmae
    result = run(tmp_path / "run", init=str(path), max_steps=1, **{"optim.lr": 1e-12, "optim.weight_decay": 0.0})
    state = load_checkpoint(result.checkpoint)
    assert state["step"] == 1
    for key, value in ours.items():  # one step at lr 1e-12 leaves the imported weights in place
        torch.testing.assert_close(state["model"][key], value, rtol=0, atol=1e-9, msg=key)
    # a killed init= run resumes from its own checkpoint, with the same command line
    resumed = run(tmp_path / "run", init=str(path), max_steps=2, resume="auto",
                  **{"optim.lr": 1e-12, "optim.weight_decay": 0.0})
    assert resumed.steps == 2 and len(resumed.losses) == 1


def test_init_from_a_classifier_loads_the_encoder_and_names_a_wrong_variant(tmp_path):
    import sparse_mae
    from sparse_mae.convert import export_state_dict

    clf = sparse_mae.create_model("convnextv2_debug", num_classes=5).state_dict()
    timm, _ = export_state_dict(clf, "timm")
    torch.save(timm, tmp_path / "timm.pt")
    result = run(tmp_path / "run", init=str(tmp_path / "timm.pt"), max_steps=1,
                 **{"optim.lr": 1e-12, "optim.weight_decay": 0.0})
    state = load_checkpoint(result.checkpoint)["model"]
    torch.testing.assert_close(state["encoder.stem.0.weight"], clf["stem.0.weight"], rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="convnextv2_debug checkpoint but model=atto; pass model=debug"):
        run(tmp_path / "atto", model="atto", init=str(tmp_path / "timm.pt"), max_steps=1)


# -- 11. the dependency floor -----------------------------------------------------------------

def test_torch_floor_excludes_versions_with_the_weights_only_bypass():
    """torch.load(weights_only=True) could be made to run code before torch 2.6 (CVE-2025-32434);
    every checkpoint we read relies on it."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_dep,) = [d for d in deps if re.match(r"torch\b", d)]
    floor = re.search(r">=\s*([\d.]+)", torch_dep)
    assert floor, f"torch has no lower bound: {torch_dep}"
    assert tuple(int(x) for x in floor.group(1).split(".")[:2]) >= (2, 6), torch_dep


# -- the README's commands still compose as written ---------------------------------------

def readme_commands() -> list[tuple[str, list[str]]]:
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():  # continued lines are one command
            line = line.split("  #")[0].strip()
            m = re.search(r"(?:\$S|sparse-mae|sparse_mae\.cli|train\.sbatch) (pretrain|finetune|eval|export|import|bench)"
                          r"\b(.*)", line)
            if m:
                commands.append((m[1], m[2].split()))
    return commands


@pytest.mark.parametrize("app, args", readme_commands(), ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_readme_command_composes(app, args):
    from sparse_mae.apps.app import compose

    args = [a for a in args if a not in ("-m", "--help")]
    cfg = compose(app, [a.split(",")[0] if a.startswith(("backend=", "mask_ratio=")) else a for a in args])
    assert cfg is not None


def test_readme_shows_the_multi_node_command():
    text = (REPO / "README.md").read_text()
    assert re.search(r"torchrun --nnodes=2 .*--rdzv_backend=c10d", text)
