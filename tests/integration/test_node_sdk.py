"""The Node SDK streams through the proxy too (the proxy must not be Python-SDK specific)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import pytest

from ..conftest import ROOT, TEST_KEY

NODE_DIR = ROOT / "tests" / "node"


@pytest.fixture
def node() -> str:
    exe = shutil.which("node")
    if exe is None:
        pytest.skip("node is not installed: the Node SDK check needs node (apt-get install nodejs)")
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        pytest.skip("the Node SDK is not installed: run `npm ci --prefix tests/node` (.ci/run does)")
    return exe


async def test_node_sdk_streams_a_chat_completion(node, proxy, mock):
    env = {**os.environ, "OPENAI_BASE_URL": proxy.base_url, "OPENAI_API_KEY": TEST_KEY}
    proc = await asyncio.create_subprocess_exec(
        node, str(NODE_DIR / "stream_chat.mjs"), env=env, cwd=str(NODE_DIR),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out)["tokens"] == [f"tok{i} " for i in range(mock.sse_events)]
    (rec,) = mock.requests_to("/v1/chat/completions")
    assert rec.headers["Authorization"] == f"Bearer {TEST_KEY}"
    assert rec.headers["X-Stainless-Lang"] == "js"
