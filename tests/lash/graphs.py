"""CUDA graph capture stood in for on the CPU, for the tests of both decoding adapters.

An FX trace (``make_fx``) is what a CUDA graph is to the host: it fixes every Python value and
tensor address at capture and replays only the recorded tensor ops, so a layer call that passed
a changing value by Python (a column, a length) would replay a stale one here too. The warm-up
run counts host reads, which would make a CUDA capture fail: there must be none. Each replay
writes the same output tensors, as a CUDA graph writes its output buffers, and is invisible to an
:class:`OpCounter` outside it, as one launch is.
"""

import pytest
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import _disable_current_modes

from lash import captured, cuda_graphs

from .counting import OpCounter

try:  # Hugging Face decoding's graphs, where transformers is installed (the "hf" extra)
    from lash.hf.generation import GraphedHFParts

    GRAPHED = (cuda_graphs.GraphedParts, GraphedHFParts)
except ImportError:
    GRAPHED = (cuda_graphs.GraphedParts,)


@pytest.fixture
def traced(monkeypatch):
    """Graphs on the CPU, captured as FX traces; yields the list of captures."""
    captures = []

    def capture(body, pool):
        with OpCounter() as counter:  # the warm-up run, as on CUDA
            body()
        assert not counter.host_reads, counter.host_reads
        graph = make_fx(body)()
        captures.append(graph)
        outputs = []  # as on CUDA, every replay writes the same output buffers

        def replay():  # a graph replay is one launch, whose ops a counter outside it does not see
            with _disable_current_modes():
                fresh = graph()
                if not outputs:
                    outputs.append(fresh)
                for out, new in zip(outputs[0], fresh):
                    if out is not None:
                        out.copy_(new)
            return outputs[0]

        return replay

    monkeypatch.setattr(captured, "available", lambda device: True)
    for parts in GRAPHED:
        monkeypatch.setattr(parts, "capture", staticmethod(capture))
    return captures
