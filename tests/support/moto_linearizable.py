"""moto_server, with every request handled atomically.

moto's server is threaded and its DynamoDB backend checks a condition and
applies the write without a lock, so two concurrent conditional writes can
both succeed. Real DynamoDB applies a conditional write atomically; the lock
tests depend on that. This wraps the WSGI application so one request at a
time runs inside moto's backends, keeping the threaded server (a slow or held
connection still does not block the others while it waits on the network).

An SQS long poll (ReceiveMessage with WaitTimeSeconds) is the exception:
moto waits inside its backend, which under the lock would stall every other
request for up to 20 s, as real AWS never does. It is answered by receiving
without a wait, under the lock, every 20 ms until a message comes or the
wait is over, the lock free in between.

Usage: python moto_linearizable.py -H 127.0.0.1 -p PORT   (moto_server's flags)
"""

import io
import json
import threading
import time

import moto.server as server

_original_call = server.DomainDispatcherApplication.__call__
_backend_lock = threading.Lock()
_POLL_INTERVAL = 0.02


def _long_poll_wait(environ):
    """The request body and its wait, for an SQS JSON-protocol long poll."""
    if environ.get("HTTP_X_AMZ_TARGET") != "AmazonSQS.ReceiveMessage":
        return None
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length)
    environ["wsgi.input"] = io.BytesIO(body)
    try:
        request = json.loads(body or b"{}")
    except ValueError:
        return None
    wait = request.get("WaitTimeSeconds") or 0
    if not isinstance(wait, int) or wait <= 0:
        return None
    request["WaitTimeSeconds"] = 0
    return json.dumps(request).encode(), wait


def _call_captured(app, environ, body):
    """One backend call with `body`, under the lock; (status, headers, bytes)."""
    captured = {}

    def start_response(status, headers, exc_info=None):
        captured["status"] = status
        captured["headers"] = headers

    inner = dict(environ)
    inner["wsgi.input"] = io.BytesIO(body)
    inner["CONTENT_LENGTH"] = str(len(body))
    with _backend_lock:
        chunks = b"".join(_original_call(app, inner, start_response))
    return captured["status"], captured["headers"], chunks


def _atomic_call(self, environ, start_response):
    poll = _long_poll_wait(environ)
    if poll is None:
        with _backend_lock:
            return _original_call(self, environ, start_response)
    body, wait = poll
    deadline = time.monotonic() + wait
    while True:
        status, headers, chunks = _call_captured(self, environ, body)
        got = status.startswith("200") and json.loads(chunks or b"{}").get("Messages")
        if got or not status.startswith("200") or time.monotonic() >= deadline:
            start_response(status, headers)
            return [chunks]
        time.sleep(_POLL_INTERVAL)


server.DomainDispatcherApplication.__call__ = _atomic_call

if __name__ == "__main__":
    server.main()
