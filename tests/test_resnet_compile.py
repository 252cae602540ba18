"""SparK's training step under torch.compile (the bench's +compile rows, what a user of the
dense reference would run): the dense_masked max-pool once failed there in the backward; the
native engine's compiled gather conv is a graph break that must keep its numbers."""
import pytest
import torch

import sparse_mae
from sparse_mae.train.step import fcmae_loss


@pytest.mark.slow  # about a minute and a half of compiling on 2 cores
@pytest.mark.parametrize("backend", ["dense_masked", "native"])
def test_spark_compiles_and_gives_the_eager_loss_and_gradients(backend):
    torch.manual_seed(0)
    model = sparse_mae.create_model("spark_resnet_debug", backend=backend).train()
    batch = {"image": torch.randn(2, 3, 96, 96), "seed": torch.arange(2)}
    # at 0.4 some removed outputs of the max-pool see no visible site in their window
    compiled_loss = fcmae_loss(torch.compile(model), batch, 0.4)
    compiled_loss.backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    eager_loss = fcmae_loss(model, batch, 0.4)
    eager_loss.backward()
    assert compiled_loss.item() == pytest.approx(eager_loss.item(), rel=1e-4)
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(compiled_grads[name], p.grad, rtol=1e-3, atol=1e-6), name
