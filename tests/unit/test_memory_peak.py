import sys
import threading
import time
import types

import numpy as np
import pytest

from spyke_lora._memory import PeakMeter


def meter_threads():
    return [t for t in threading.enumerate() if t.name == "spyke-lora-peak-meter"]


def can_reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not can_reset_hwm(),
    reason="needs Linux 4.0+ with a writable /proc/self/clear_refs",
)
def test_the_cpu_peak_on_linux_sees_a_freed_array_and_a_new_start_forgets_it():
    size = 300 * 2**20
    with PeakMeter("cpu") as meter:
        assert meter.method == "hwm" and not meter_threads()  # the kernel's high-water mark: no thread
        before = meter.peak()
        array = np.ones(size // 8)  # written, so resident
        del array
        peak = meter.peak()
        assert peak is not None and before is not None and peak - before >= 0.9 * size
        meter.start()  # from now: the freed array is not counted again
        again = meter.peak()
        assert again is not None and again < peak - 0.9 * size
    assert meter.peak() == meter.peak()  # closed: the peak reached is kept, not read again


def test_the_hwm_is_read_from_the_status_file_in_bytes(tmp_path):
    clear_refs, status = tmp_path / "clear_refs", tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t    1964 kB\nVmRSS:\t 1000 kB\n")
    meter = PeakMeter("cpu", clear_refs=clear_refs, status=status, read=lambda: 1 / 0)
    meter.start()
    assert clear_refs.read_text() == "5" and meter.method == "hwm"
    assert meter.peak() == 1964 * 1024
    meter.close()


def test_the_cpu_falls_back_to_polling_where_clear_refs_cannot_be_written(tmp_path):
    readings = iter([10, 30])
    meter = PeakMeter(
        "cpu",
        clear_refs=tmp_path / "no such folder" / "clear_refs",
        status=tmp_path / "status",
        read=lambda: next(readings, 20),
        interval_s=0.001,
    )
    with meter:
        assert meter.method == "poll" and len(meter_threads()) == 1
        deadline = time.monotonic() + 5
        while meter.peak() != 30 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert meter.peak() == 30
    assert not meter_threads()


def test_the_poller_keeps_the_highest_reading_and_stops_its_thread_on_close():
    readings = [5, 70, 40, 90, 10]
    done = threading.Event()

    def read():
        if len(readings) == 1:
            done.set()
            return readings[0]
        return readings.pop(0)

    meter = PeakMeter("mps", read=read, interval_s=0.001)
    assert meter.peak() is None  # not started
    meter.start()
    (thread,) = meter_threads()
    assert thread.daemon
    assert done.wait(5)
    assert meter.peak() == 90
    meter.close()
    assert thread not in threading.enumerate() and not meter_threads()
    assert meter.peak() == 90  # kept after close
    meter.close()  # twice: nothing

    readings[:] = [3, 4]  # started again: the old peak is forgotten
    with meter:
        assert meter.peak() == 4
    assert not meter_threads()


def test_a_poller_whose_reader_fails_keeps_what_it_saw():
    calls = iter([7, 8])

    def read():
        return next(calls)  # StopIteration after two: the device is gone

    with PeakMeter("mps", read=read, interval_s=0.001) as meter:
        deadline = time.monotonic() + 5
        while meter_threads() and time.monotonic() < deadline:  # the thread ends on the failed read
            time.sleep(0.005)
        assert not meter_threads() and meter.peak() == 8


def test_cuda_uses_torchs_peak_counter():
    calls = []

    def reset(device):
        calls.append(("reset", device))

    def max_allocated(device):
        calls.append(("max", device))
        return 123_456

    torch = types.SimpleNamespace(
        cuda=types.SimpleNamespace(reset_peak_memory_stats=reset, max_memory_allocated=max_allocated)
    )
    with PeakMeter("cuda:1", torch=torch) as meter:
        assert meter.method == "cuda" and not meter_threads()
        assert meter.peak() == 123_456
    assert calls == [("reset", "cuda:1"), ("max", "cuda:1"), ("max", "cuda:1")]  # the last one: on close
    assert meter.peak() == 123_456 and len(calls) == 3


def test_an_unknown_device_or_interval_is_refused():
    with pytest.raises(ValueError, match="'xpu'"):
        PeakMeter("xpu")
    with pytest.raises(ValueError, match="interval_s"):
        PeakMeter("cpu", interval_s=0)
