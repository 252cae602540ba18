import os

import pytest
import torch

# Without a GPU the Triton kernels are tested in Triton's CPU interpreter, whose mode is
# fixed when Triton is first imported, and other tests (torch internals) may import it
# first. Switch it on for the whole session, before anything can import Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep tests deterministic and inside the 2-core machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def restore_stop_signal_handlers():
    """Tests that run the CLI in-process leave its stop-signal recorder installed (a real CLI
    process exits instead); each test starts from the handlers the session began with."""
    import signal

    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
    saved = {s: signal.getsignal(s) for s in stop_signals}
    yield
    for s, handler in saved.items():
        if handler is not None and signal.getsignal(s) is not handler:
            signal.signal(s, handler)
