"""Frozen-feature evaluation: weighted kNN and the linear probe (known answers on toy
features), the feature head, and `sparse-mae probe` (config, bad input, checkpoints)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_mae.apps.probe import compose_config, run_probe
from sparse_mae.convert import write_state_dict
from sparse_mae import create_model
from sparse_mae.probe.classify import LinearProbe, knn_classify, linear_probe
from sparse_mae.probe.features import FeatureHead, evenly_spaced, load_encoder

from tests.test_pretrain import one_thread  # noqa: F401 (autouse fixture: one torch thread)

REPO = Path(__file__).resolve().parents[1]
SUBSET = REPO / "tests" / "data" / "fashion_mnist"


def clusters(per_class: int, num_classes: int, dim: int = 16, spread: float = 0.1, seed: int = 0):
    """Points around orthogonal unit directions, one per class: separable by angle and linearly."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = torch.eye(dim)[y] * 5.0 + spread * torch.randn(len(y), dim, generator=g)
    return x, y


# -- kNN -------------------------------------------------------------------------------------

def test_knn_on_separable_clusters_is_perfect():
    train_x, train_y = clusters(30, 6)
    test_x, test_y = clusters(10, 6, seed=1)
    assert knn_classify(train_x, train_y, test_x, test_y, 6) == {"top1": 100.0, "top5": 100.0}


def test_knn_weights_votes_by_exp_cosine_over_temperature():
    # the query equals one bank entry of class 0; three other entries of class 1 are less
    # similar (cosine 0.8). Unweighted, 3 votes beat 1; weighted at T=0.07, exp(1/0.07) =
    # 1.6e6 beats 3 * exp(0.8/0.07) = 2.8e5. At T=1: e = 2.7 < 3 * e^0.8 = 6.7.
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, 0.6], [0.8, 0.6]])
    labels = torch.tensor([0, 1, 1, 1])
    query, truth = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert knn_classify(bank, labels, query, truth, 2, k=4, temperature=0.07)["top1"] == 100.0
    assert knn_classify(bank, labels, query, truth, 2, k=4, temperature=1.0)["top1"] == 0.0
    # k=1 keeps only the nearest; the scale of a feature does not matter (cosine)
    assert knn_classify(bank * 7, labels, query * 0.1, truth, 2, k=1, temperature=1.0)["top1"] == 100.0


def test_knn_top5_counts_the_true_class_among_the_five_best():
    bank = torch.eye(7)
    labels = torch.arange(7)
    query = torch.tensor([[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.0]])
    assert knn_classify(bank, labels, query, torch.tensor([4]), 7, k=7) == {"top1": 0.0, "top5": 100.0}
    assert knn_classify(bank, labels, query, torch.tensor([6]), 7, k=7) == {"top1": 0.0, "top5": 0.0}


def test_knn_with_more_neighbours_than_bank_entries_uses_them_all():
    x, y = clusters(2, 3)
    assert knn_classify(x, y, x, y, 3, k=20)["top1"] == 100.0


@pytest.mark.parametrize("bad, message", [
    (dict(test_x=torch.zeros(4, 5)), "one C"),
    (dict(train_y=torch.zeros(3, dtype=torch.long)), "labels"),
    (dict(test_y=torch.full((4,), 9)), r"test labels must be in \[0, 3\)"),
    (dict(train_x=torch.full((6, 4), float("nan"))), "not finite"),
    (dict(train_x=torch.zeros(0, 4), train_y=torch.zeros(0, dtype=torch.long)), "must not be empty"),
])
def test_bad_features_fail_clearly(bad, message):
    args = dict(train_x=torch.randn(6, 4), train_y=torch.tensor([0, 1, 2, 0, 1, 2]), test_x=torch.randn(4, 4),
                test_y=torch.tensor([0, 1, 2, 0]))
    args |= bad
    for fn in (knn_classify, linear_probe):
        with pytest.raises(ValueError, match=message):
            fn(args["train_x"], args["train_y"], args["test_x"], args["test_y"], 3)


# -- linear probe ----------------------------------------------------------------------------

def test_linear_probe_is_batchnorm_without_affine_then_linear():
    probe = LinearProbe(8, 3)
    assert isinstance(probe.norm, torch.nn.BatchNorm1d) and not probe.norm.affine and probe.norm.eps == 1e-6
    assert [name for name, _ in probe.named_parameters()] == ["fc.weight", "fc.bias"]


def test_linear_probe_on_separable_features_is_perfect_whatever_their_scale():
    train_x, train_y = clusters(40, 5)
    test_x, test_y = clusters(20, 5, seed=1)
    # a large offset and scale would stall plain SGD; the BatchNorm takes them out
    for scale, offset in ((1.0, 0.0), (1000.0, 5000.0)):
        r = linear_probe(train_x * scale + offset, train_y, test_x * scale + offset, test_y, 5, epochs=30, seed=0)
        assert r["top1"] == 100.0 and r["top5"] == 100.0


def test_linear_probe_needs_a_signal_to_be_perfect():
    # the same labels on noise: the probe cannot reach 100% on unseen noise (the test can fail)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 16, generator=g), torch.arange(200) % 5
    r = linear_probe(x[:150], y[:150], x[150:], y[150:], 5, epochs=30)
    assert r["top1"] < 60.0


def test_linear_probe_is_reproducible_and_leaves_the_global_rng_alone():
    x, y = clusters(10, 3)
    state = torch.get_rng_state()
    a = linear_probe(x, y, x, y, 3, epochs=3, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == linear_probe(x, y, x, y, 3, epochs=3, seed=4)


def test_evenly_spaced_covers_the_split_without_rng():
    assert evenly_spaced(10, 5) == [0, 2, 4, 6, 8]
    assert evenly_spaced(3, 5) == [0, 1, 2]


# -- features from checkpoints -------------------------------------------------------------

def test_feature_head_is_the_classifier_heads_pool_and_norm():
    clf = create_model("convnextv2_debug", num_classes=4).eval()
    torch.nn.init.normal_(clf.head.norm.weight)
    torch.nn.init.normal_(clf.head.norm.bias)
    x = torch.randn(2, 3, 64, 64)
    head = FeatureHead(32, clf.head.norm.weight, clf.head.norm.bias)
    with torch.no_grad():
        assert torch.allclose(clf.head.fc(head(clf.forward_features(x))), clf(x), atol=1e-5)


def test_encoder_from_pretraining_and_fine_tuning_checkpoints(tmp_path):
    fcmae = create_model("fcmae_convnextv2_debug")
    write_state_dict(fcmae.state_dict(), tmp_path / "fcmae.pt", {})
    encoder, head, source = load_encoder(str(tmp_path / "fcmae.pt"), "debug")
    assert torch.equal(encoder.stem[0].weight, fcmae.encoder.stem[0].weight)
    assert head.weight is None and "without affine" in source
    clf = create_model("convnextv2_debug", num_classes=4)
    write_state_dict(clf.state_dict(), tmp_path / "clf.safetensors", {})
    _, head, source = load_encoder(str(tmp_path / "clf.safetensors"), "debug")
    assert torch.equal(head.weight, clf.head.norm.weight) and "head's LayerNorm" in source
    # random init: drawn from the seed, the global RNG untouched
    state = torch.get_rng_state()
    a, _, _ = load_encoder(None, "debug", seed=1)
    b, _, _ = load_encoder(None, "debug", seed=1)
    assert torch.equal(a.stem[0].weight, b.stem[0].weight) and torch.equal(torch.get_rng_state(), state)


def test_a_checkpoint_of_another_variant_is_refused_by_name(tmp_path):
    write_state_dict(create_model("fcmae_convnextv2_debug").state_dict(), tmp_path / "debug.pt", {})
    with pytest.raises(ValueError, match="convnextv2_debug checkpoint but model=atto; pass model=debug"):
        load_encoder(str(tmp_path / "debug.pt"), "atto")


# -- the app ---------------------------------------------------------------------------------

def probe_overrides(**extra) -> list[str]:
    base = {"model": "debug", "finetune/data@data": "fashion_mnist", "data.root": str(SUBSET), "data.size": 64,
            "data.num_workers": 0, "device": "cpu", "linear.epochs": 5}
    return [f"{k}={v}" for k, v in (base | extra).items()]


def test_probe_of_a_random_encoder_on_the_subset(tmp_path):
    r = run_probe(compose_config(probe_overrides(out=tmp_path)))
    assert (r["num_train"], r["num_val"], r["num_classes"], r["feature_dim"]) == (320, 160, 10, 32)
    for method in ("knn", "linear"):
        assert 10.0 < r[method]["top1"] <= r[method]["top5"] <= 100.0  # above chance even at random init
    assert json.loads((tmp_path / "probe.json").read_text())["knn"] == r["knn"]


def test_probe_on_fashion_mnist_shards_gives_the_results_of_the_fashion_mnist_option(tmp_path):
    from sparse_mae.data.prepare import PrepareOptions, prepare_fashion_mnist

    prepare_fashion_mnist(SUBSET, tmp_path / "shards", PrepareOptions(shard_size=200))
    direct = run_probe(compose_config(probe_overrides()))
    sharded = run_probe(compose_config(probe_overrides(**{"finetune/data@data": "shards",
                                                          "data.root": tmp_path / "shards"})))
    # the same pixels (lossless shards), the same centre crops to the bit, the same order and
    # seed: the same features, so the same kNN and linear-probe results, exactly
    assert (sharded["num_train"], sharded["num_val"]) == (direct["num_train"], direct["num_val"]) == (320, 160)
    assert sharded["knn"] == direct["knn"] and sharded["linear"] == direct["linear"]


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sparse_mae.cli", "probe", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_lists_the_probe_keys(tmp_path):
    proc = cli(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "temperature: 0.07  # votes weighted exp(cosine / temperature)" in proc.stdout
    assert "groups, chosen with group=option: model, finetune/data@data" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["data.root=/nonexistent/fmnist"], "apt-get install dataset-fashion-mnist"),
    (["knn.k=0"], "knn.k must be > 0"),
    (["linear.lr=-1"], "linear.lr must be > 0"),
    (["ckpt=/nonexistent.pt"], "checkpoint /nonexistent.pt does not exist"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, args, message):
    base = [a for a in probe_overrides() if not a.startswith(tuple(a.split("=")[0] + "=" for a in args))]
    proc = cli([*base, *args], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def test_wrong_variant_checkpoint_exits_2_naming_the_fix(tmp_path):
    write_state_dict(create_model("fcmae_convnextv2_debug").state_dict(), tmp_path / "debug.pt", {})
    proc = cli([*probe_overrides(), "model=atto", f"ckpt={tmp_path / 'debug.pt'}"], tmp_path)
    assert proc.returncode == 2 and "pass model=debug" in proc.stderr, proc.stderr
