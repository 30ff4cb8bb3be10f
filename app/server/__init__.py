"""The gunicorn integration: how ``onnx-appliance serve`` runs the app.

Modules, bottom up:

- :mod:`~app.server.state`: what the master validated and hands its workers.
- :mod:`~app.server.compat`: every reach into gunicorn's internals, in one place.
- :mod:`~app.server.workers`: the worker classes' shared behaviour and the thread-based ones.
- :mod:`~app.server.gevent_worker`: the default worker class.
- :mod:`~app.server.hooks`: gunicorn's server hooks.
- :mod:`~app.server.options`: gunicorn's settings, derived from ours.
- :mod:`~app.server.arbiter`: the master's loop, with a reload that never drops capacity.
- :mod:`~app.server.application`: the gunicorn application, loaded in each worker.
"""
