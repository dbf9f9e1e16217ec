"""Two threads and one engine: what does not need a run never waits for one; a second run is refused at once; only
sd-scripts' output goes to the engine log; only the names sd-scripts imports are swapped."""

import sys
import threading
import types
import warnings

import pytest

from spyke_lora import SpykeLoraError, SpykeLoraWarning
from spyke_lora._engine._engine_log import caller_output, engine_output
from spyke_lora._engine._host import VENDORED, host_for, imported_names
from spyke_lora._engine._run import _RunSlot


def in_thread(target):
    """Run ``target`` in a thread; returns (thread, done event, errors)."""
    done, errors = threading.Event(), []

    def body():
        try:
            target()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, done, errors


def test_the_engine_is_usable_from_another_thread_while_a_run_holds_it():
    """A run's thread keeps the engine active for the whole run; plan() / sd_scripts_argv() in another thread (an
    iter_events loop body) must get in, not wait for the run to end (a deadlock when the run waits for the loop)."""
    host = host_for(None)
    inside, leave = threading.Event(), threading.Event()

    def run():
        with host.active():
            host.train_network()
            inside.set()
            leave.wait(60)

    thread, done, errors = in_thread(run)
    assert inside.wait(60)
    got_in = threading.Event()

    def second():
        with host.active():
            assert "train_network" in sys.modules
            got_in.set()

    t2, d2, e2 = in_thread(second)
    assert got_in.wait(30), "a second user of the engine waited for the run to end"
    assert d2.wait(30) and not e2
    assert "train_network" in sys.modules  # the run still needs them: taken out by the last user only
    leave.set()
    assert done.wait(60) and not errors
    assert "train_network" not in sys.modules and "library" not in sys.modules


def test_a_second_run_from_another_thread_is_refused_at_once():
    slot = _RunSlot()
    holding, release = threading.Event(), threading.Event()

    def first():
        with slot.taken(lambda: False):
            holding.set()
            release.wait(60)

    thread, done, errors = in_thread(first)
    assert holding.wait(10)
    refused = []
    t2, d2, _ = in_thread(lambda: refused.append(pytest.raises(SpykeLoraError, slot.taken(lambda: False).__enter__)))
    assert d2.wait(10), "the second run waited instead of being refused"
    assert "another spyke-lora run is active in this process" in str(refused[0].value)
    with pytest.raises(SpykeLoraError):  # from the run's own thread too (a callback calling train())
        with slot.taken(lambda: False):
            pass
    release.set()
    assert done.wait(10) and not errors


def test_a_run_that_is_ending_is_waited_for():
    """A stream let go of asks its run to stop; the next train() waits for that run to end instead of failing."""
    slot = _RunSlot()
    holding, release = threading.Event(), threading.Event()

    def ending_run():
        with slot.taken(lambda: True):  # its stop was asked for
            holding.set()
            release.wait(60)

    thread, done, errors = in_thread(ending_run)
    assert holding.wait(10)
    got = []

    def next_run():
        with slot.taken(lambda: False):
            got.append(release.is_set())

    t2, d2, e2 = in_thread(next_run)
    assert not d2.wait(0.2)  # still waiting for the ending run
    release.set()
    assert d2.wait(10) and not e2
    assert got == [True]  # it got in after the ending run had ended


def test_only_the_runs_thread_writes_to_the_engine_log(tmp_path, capsys):
    log = tmp_path / "NAME.engine.log"
    with engine_output(log):
        print("sd-scripts: epoch 1/1")
        with caller_output():
            print("a callback's print")
        thread, done, _ = in_thread(lambda: print("the notebook's loop body"))
        assert done.wait(10)
        sys.stderr.write("sd-scripts: a tqdm bar\n")
    assert log.read_text() == "sd-scripts: epoch 1/1\nsd-scripts: a tqdm bar\n"
    captured = capsys.readouterr()
    assert captured.out == "a callback's print\nthe notebook's loop body\n"
    assert "tqdm" not in captured.err


def test_no_log_redirects_nothing(capsys):
    with engine_output(None):
        print("to the console")
    assert capsys.readouterr().out == "to the console\n"


def test_only_the_names_sd_scripts_imports_are_swapped():
    """Its code imports train_network, library and networks; its folder also has tools, tests, docs, setup.py and a
    dummy pytorch_lightning, which are never taken from the caller."""
    assert imported_names(VENDORED) == {"train_network", "library", "networks"}
    assert {"tools", "tests", "setup", "pytorch_lightning", "docs", "configs"} & host_for(None).top_names == set()


def test_callers_modules_of_other_names_stay_and_a_shadowed_one_is_named(monkeypatch):
    host = host_for(None)
    mine = {name: types.ModuleType(name) for name in ("tests", "tools", "setup", "pytorch_lightning", "library")}
    for name, module in mine.items():
        monkeypatch.setitem(sys.modules, name, module)
    host._warned.discard("library")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with host.active():
            for name in ("tests", "tools", "setup", "pytorch_lightning"):
                assert sys.modules[name] is mine[name]
            import library.train_util  # noqa: F401 - sd-scripts' own

            assert sys.modules["library"] is not mine["library"]
            assert str(sys.modules["library"].__file__).startswith(str(VENDORED))
    notes = [str(w.message) for w in caught if issubclass(w.category, SpykeLoraWarning)]
    assert len(notes) == 1 and notes[0].startswith("your module `library` (built in) steps aside while sd-scripts runs")
    assert sys.modules["library"] is mine["library"]  # put back
    assert str(VENDORED) not in sys.path


def test_diffusers_progress_bars_are_text_during_a_run(monkeypatch):
    """In Jupyter with ipywidgets, tqdm.auto is the widget class, and diffusers' pipelines (sd-scripts' sampler)
    bound it at import: one widget per sample in the cell. A run swaps in the text class, and puts it back."""
    import tqdm.auto
    import tqdm.std

    from spyke_lora._engine._engine_log import text_progress_bars

    class Widget(tqdm.std.tqdm):  # what tqdm.auto gives in a kernel with ipywidgets
        pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Widget)
    diffusers_module = types.ModuleType("diffusers.pipelines.fake_pipeline_utils")
    diffusers_module.tqdm = Widget
    callers = types.ModuleType("my_notebook_helpers")
    callers.tqdm = Widget
    monkeypatch.setitem(sys.modules, diffusers_module.__name__, diffusers_module)
    monkeypatch.setitem(sys.modules, callers.__name__, callers)
    with text_progress_bars():
        assert diffusers_module.tqdm is tqdm.std.tqdm
        assert callers.tqdm is Widget  # the caller's own bars are theirs
    assert diffusers_module.tqdm is Widget
