"""MindFormers' GPT model runs in graph mode only: MindFormers' context is built once per session
(its ``build_context`` is a process-wide singleton), and each module here switches to graph mode and
puts the suite's PyNative default back afterwards."""

import mindspore as ms
import pytest

from helpers.mindformers import tiny_config


@pytest.fixture(scope="session")
def mindformers_built():
    from mindformers.core.context.build_context import build_context  # pylint: disable=import-outside-toplevel

    build_context(tiny_config())


@pytest.fixture(scope="module", autouse=True)
def mindformers_context(mindformers_built):  # pylint: disable=redefined-outer-name,unused-argument
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(0)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)
