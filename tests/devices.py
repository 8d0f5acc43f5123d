"Stand-ins for the device whose speed bs_find times, so that tests of what follows the advice are deterministic."
import contextlib

import pytest


@contextlib.contextmanager
def fake_timing(per_example: bool = False):
    """bs_find's timing of this CPU replaced by a device whose step costs the same at every batch size (a GPU on a
    small model: the advice grows as far as the noise scale allows) or, `per_example`, whose time is per example
    (a saturated device: the advice shrinks where the noise scale is small), so that the tests of what Apply does
    reach it whatever this machine's timing says (on a CPU the honest advice is often keep)."""
    from gns_widget import engine
    from gns_widget.throughput import Throughput

    def timing(tgt, sizes, amp, saturate_above=None):
        seconds = {b: 1e-4 * b if per_example else 0.01 for b in sizes}
        return Throughput(seconds, device=f"a {'per-example' if per_example else 'step-bound'} test device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "probe_throughput", timing)
        yield
