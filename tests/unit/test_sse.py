import pytest

from proxy.sse import StreamEnd, StreamWatcher, end_markers

CHAT = b'data: {"id":"c","choices":[{"delta":{"content":"hi"}}]}\n\n'


def _watch(method, path, *chunks):
    m = end_markers(method, path)
    assert m is not None
    w = StreamWatcher(*m)
    for c in chunks:
        w.feed(c)
    return w.result()


def test_chat_stream_with_done_is_complete():
    assert _watch("POST", "/v1/chat/completions", CHAT, CHAT, b"data: [DONE]\n\n") is StreamEnd.COMPLETE


def test_chat_stream_without_done_is_truncated():
    assert _watch("POST", "/v1/chat/completions", CHAT, CHAT) is StreamEnd.TRUNCATED


def test_marker_split_across_chunks_is_seen():
    whole = CHAT + b"data: [DONE]\n\n"
    for cut in range(len(CHAT), len(whole)):
        assert _watch("POST", "/v1/completions", whole[:cut], whole[cut:]) is StreamEnd.COMPLETE, cut
    # one byte at a time
    assert _watch("POST", "/v1/chat/completions", *[whole[i:i + 1] for i in range(len(whole))]) is StreamEnd.COMPLETE


def test_in_band_error_frame():
    err = b'data: {"error": {"message": "The server had an error", "type": "server_error"}}\n\n'
    assert _watch("POST", "/v1/chat/completions", CHAT, err) is StreamEnd.ERROR_EVENT


def test_token_text_that_looks_like_a_marker_is_escaped_json():
    sneaky = b'data: {"choices":[{"delta":{"content":"data: {\\"error\\" [DONE]"}}]}\n\n'
    assert _watch("POST", "/v1/chat/completions", sneaky) is StreamEnd.TRUNCATED


@pytest.mark.parametrize("terminal", [b"response.completed", b"response.failed", b"response.incomplete"])
def test_responses_terminal_events(terminal):
    ev = b"event: " + terminal + b'\ndata: {"type":"' + terminal + b'","sequence_number":9}\n\n'
    created = b'event: response.created\ndata: {"type":"response.created","sequence_number":0}\n\n'
    assert _watch("POST", "/v1/responses", created, ev) is StreamEnd.COMPLETE
    assert _watch("POST", "/v1/responses", created) is StreamEnd.TRUNCATED
    assert _watch("GET", "/v1/responses/resp_1", created, ev) is StreamEnd.COMPLETE


def test_responses_error_event():
    err = b'event: error\ndata: {"type":"error","code":"server_error","message":"x","sequence_number":3}\n\n'
    assert _watch("POST", "/v1/responses", err) is StreamEnd.ERROR_EVENT


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", "/v1/files"), ("GET", "/v1/chat/completions"),
                                          ("GET", "/v1/responses/resp_1/input_items")])
def test_unknown_endpoints_are_not_judged(method, path):
    assert end_markers(method, path) is None
