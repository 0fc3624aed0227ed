"""core.cached.cached_attribute: computed once per instance, a value set in ``__dict__`` first
is taken as is, and two threads compute on two instances at the same time (the lock of
``functools.cached_property`` before Python 3.12 made row blocks' keys wait for each other)."""

import threading

import pytest

from sparsestitch.core.cached import cached_attribute
from sparsestitch.localize.selectors import TuneBlock


class Counted:
    calls = 0

    @cached_attribute
    def value(self):
        type(self).calls += 1
        return [type(self).calls]


def test_computed_once_per_instance_and_kept_in_its_dict():
    Counted.calls = 0
    first, second = Counted(), Counted()
    assert first.value is first.value
    assert first.__dict__["value"] == [1]
    assert second.value == [2]
    assert Counted.calls == 2
    assert isinstance(Counted.__dict__["value"], cached_attribute)


def test_a_value_set_before_the_first_access_is_taken():
    instance = Counted()
    Counted.calls = 0
    instance.__dict__["value"] = "given"
    assert instance.value == "given"
    assert Counted.calls == 0


def test_two_threads_compute_on_two_instances_at_once():
    both_inside = threading.Barrier(2, timeout=5)

    class Waits:
        @cached_attribute
        def value(self):
            both_inside.wait()  # each computation waits until the other one has started
            return threading.get_ident()

    instances, errors = [Waits(), Waits()], []

    def access(instance):
        try:
            instance.value
        except threading.BrokenBarrierError as error:
            errors.append(error)

    threads = [threading.Thread(target=access, args=(i,)) for i in instances]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, "the two computations ran one after the other"
    assert instances[0].value != instances[1].value


@pytest.mark.parametrize("name", ["magnitudes", "changed", "keys", "energy"])
def test_row_blocks_use_it(name):
    assert isinstance(TuneBlock.__dict__[name], cached_attribute)
