"""Every peer's HTTP API (aiohttp).

- :mod:`ringllm.http.app`: the app (:func:`~ringllm.http.app.make_app`), routes, ``/health``,
  ``/metrics``, authentication and the error middleware.
- :mod:`ringllm.http.validate`: one validator for both APIs' request bodies, into a frozen
  :class:`~ringllm.http.validate.ApiRequest`.
- :mod:`ringllm.http.plumbing`: what the handlers share (app keys, error shapes, running one
  request while watching its client).
- :mod:`ringllm.http.native`: ``POST /ringllm/v1/generate`` (NDJSON).
- :mod:`ringllm.http.openai_api`: the OpenAI-compatible endpoints (JSON and server-sent events).
- :mod:`ringllm.http.page`: the chat page at ``/``, its static files, and the ring view.
- :mod:`ringllm.http.serve`: serving the app on a port (header deadline, connection cap).
- :mod:`ringllm.http.joining`: a starting peer's HTTP (the page, ``/health`` 503 while it
  loads and joins).
"""
