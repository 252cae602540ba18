"""On PYTHONPATH of a `sparse-mae prepare` started by tests/test_prepare_stop.py:
IMAGE_DELAY=<seconds> makes every image's encode that much longer (a sleep first), so the
pool is busy when the test's signal lands; NO_FLOCK=1 makes flock fail with ENOLCK, as on a
filesystem without it (NFS without lockd, Lustre `noflock`)."""
import os

if os.environ.get("IMAGE_DELAY"):
    import time

    import sparse_mae.data.prepare as prepare

    delay, real_encode = float(os.environ["IMAGE_DELAY"]), prepare.encode

    def slow_encode(*args, **kwargs):
        time.sleep(delay)
        return real_encode(*args, **kwargs)

    prepare.encode = slow_encode

if os.environ.get("NO_FLOCK"):
    import errno
    import fcntl

    def no_flock(f, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    fcntl.flock = no_flock
