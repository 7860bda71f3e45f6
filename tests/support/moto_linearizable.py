"""moto_server, with every request handled atomically.

moto's server is threaded and its DynamoDB backend checks a condition and
applies the write without a lock, so two concurrent conditional writes can
both succeed. Real DynamoDB applies a conditional write atomically; the lock
tests depend on that. This wraps the WSGI application so one request at a
time runs inside moto's backends, keeping the threaded server (a slow or held
connection still does not block the others while it waits on the network).

Usage: python moto_linearizable.py -H 127.0.0.1 -p PORT   (moto_server's flags)
"""

import threading

import moto.server as server

_original_call = server.DomainDispatcherApplication.__call__
_backend_lock = threading.Lock()


def _atomic_call(self, environ, start_response):
    with _backend_lock:
        return _original_call(self, environ, start_response)


server.DomainDispatcherApplication.__call__ = _atomic_call

if __name__ == "__main__":
    server.main()
