"""Integration-test harness: a real Docker engine and real Forward receivers (no mocks).

- ``tests.harness.engine``: :class:`Engine`, a private ``dockerd`` (or ``$DOCKER_HOST``).
- ``tests.harness.receivers``: :class:`ForwardReceiver`, :class:`CountingReceiver`
  (our own Python Forward servers) and :class:`NodeReceiver` (Fluent's ``FluentServer``).
"""
