"""On PYTHONPATH in a test's job environment: with STEP_DELAY set, every optimizer step of
every Python process started there sleeps that long first (tests/fault_injection.py does
the same for processes it starts itself; a job started by submitit runs submitit's module)."""
import os

if os.environ.get("STEP_DELAY"):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from tests.fault_injection import slow_down_steps

    slow_down_steps(float(os.environ["STEP_DELAY"]))
