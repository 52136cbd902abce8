"""System tests: against the real kernel, KVM, userfaultfd, eBPF and QEMU of the machine
they run on (tests/unit holds the pure ones). Every test here is marked `system`; those
that need eBPF or /dev/kvm also `bpf` or `kvm`, and skip, naming the reason, where the
machine lacks it. The fixtures below are shared by the probe tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.probes import build_program, running_probes


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.system)


@pytest.fixture(scope="module")
def toucher(tmp_path_factory) -> Path:
    return build_program(tmp_path_factory, "uffd_toucher")


@pytest.fixture(scope="module")
def follow_all():
    with running_probes(None, follow_all=True) as src:
        yield src


@pytest.fixture(scope="module")
def by_pid():
    with running_probes([], follow_all=False) as src:
        yield src
