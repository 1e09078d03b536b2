"""What the "auto" choices count as usable device memory (the card is faked: no CUDA query runs)."""

import types

import pytest
import torch
from magihuman.pipeline import runner
from magihuman.pipeline.dit.device_memory import CUDA_CONTEXT_BYTES, INFERENCE_RESERVE_BYTES, held_by_others

GIB = 2**30


def fake_card(monkeypatch, total: int, cached: int, others: int, context: int = CUDA_CONTEXT_BYTES) -> None:
    """A card of ``total`` bytes: this process's allocator caches ``cached``, its CUDA context takes
    ``context``, other programs hold ``others``."""
    free = total - cached - context - others
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: cached)
    properties = types.SimpleNamespace(total_memory=total)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)


@pytest.mark.parametrize("cached", [0, 3 * GIB])
def test_memory_other_programs_hold_is_counted_and_this_process_cache_is_not(monkeypatch, cached):
    fake_card(monkeypatch, 24 * GIB, cached, others=int(1.5 * GIB))  # e.g. a desktop and a browser
    assert held_by_others("cuda") == int(1.5 * GIB)
    assert runner._available_memory("cuda") == 24 * GIB - INFERENCE_RESERVE_BYTES - int(1.5 * GIB)


def test_a_card_to_itself_has_nothing_held_by_others(monkeypatch):
    fake_card(monkeypatch, 16 * GIB, GIB, others=0, context=GIB // 2)  # a smaller context than allowed for
    assert held_by_others("cuda:0") == 0
    assert runner._available_memory("cuda:0") == 16 * GIB - INFERENCE_RESERVE_BYTES


def test_no_cuda_query_off_cuda(monkeypatch):
    def no_query(device):
        raise AssertionError("queried CUDA for a CPU run")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_query)
    assert held_by_others("cpu") == 0 and held_by_others(torch.device("mps")) == 0
    assert runner._available_memory("cpu") is None
