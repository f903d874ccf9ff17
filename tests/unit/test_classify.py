import asyncio
import json

import aiohttp
import pytest

from proxy.classify import Category, UpstreamUnreachable, classify_exception, classify_status


def _err(type_=None, code=None, message="x"):
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


RATE = ("Rate limit reached for gpt-4 in organization org-x on tokens per min (TPM): Limit 10000, Used 8706, "
        "Requested 2904. Please try again in 9.66s.")
TOO_LARGE = ("Request too large for o3 in organization org-x on tokens per min (TPM): Limit 30000, "
             "Requested 31756. The input or output tokens must be reduced in order to run successfully.")


@pytest.mark.parametrize("status, body, category, permanent", [
    (200, None, Category.OK, False),
    (204, None, Category.OK, False),
    (304, None, Category.OK, False),
    (500, None, Category.SERVER, False),
    (502, b"<html>bad gateway</html>", Category.SERVER, False),
    (503, None, Category.SERVER, False),
    (504, None, Category.SERVER, False),
    (429, _err("tokens", "rate_limit_exceeded", RATE), Category.RATE_LIMIT, False),
    (429, None, Category.RATE_LIMIT, False),
    (429, b"not json", Category.RATE_LIMIT, False),
    (429, _err("insufficient_quota", "insufficient_quota"), Category.QUOTA_EXCEEDED, True),
    (429, _err("insufficient_quota", "credit_balance_exhausted"), Category.QUOTA_EXCEEDED, True),  # type first
    (429, _err(None, "insufficient_quota"), Category.QUOTA_EXCEEDED, True),  # then code
    (429, _err("tokens", "rate_limit_exceeded", TOO_LARGE), Category.RATE_LIMIT, True),
    (429, b'{"type": "insufficient_quota"}', Category.QUOTA_EXCEEDED, True),  # bare error object
    (401, _err("invalid_request_error", "invalid_api_key"), Category.AUTHENTICATION, True),
    (403, None, Category.AUTHENTICATION, True),
    (400, None, Category.CLIENT, True),
    (404, None, Category.CLIENT, True),
    (408, None, Category.CLIENT, True),
    (409, None, Category.CLIENT, True),
    (413, None, Category.CLIENT, True),
    (422, None, Category.CLIENT, True),
])
def test_classify_status(status, body, category, permanent):
    v = classify_status(status, body)
    assert (v.category, v.permanent) == (category, permanent)


@pytest.mark.parametrize("exc, category", [
    (UpstreamUnreachable("api.openai.com:443", "the connection was refused", ConnectionRefusedError()), Category.CONNECT),
    (aiohttp.ConnectionTimeoutError("connect"), Category.CONNECT),  # an asyncio.TimeoutError, yet connect
    (aiohttp.SocketTimeoutError("read"), Category.TIMEOUT),
    (asyncio.TimeoutError(), Category.TIMEOUT),
    (aiohttp.ServerDisconnectedError(), Category.NETWORK),
    (aiohttp.ClientOSError(104, "reset"), Category.NETWORK),
    (ConnectionResetError(), Category.NETWORK),
    (aiohttp.ClientPayloadError("cut"), Category.INVALID_RESPONSE),
])
def test_classify_exception_most_specific_first(exc, category):
    assert classify_exception(exc) is category
