"""What the tests share, by purpose; each fixture module is a pytest plugin (tests/conftest.py).

- ``models``: the project's own GGUFs and the engines loaded on them (fixtures, ``load``).
- ``injection``: ``InjectedBackend`` and its kinds, the real engine with a test's hooks.
- ``servers``: app settings, a real uvicorn in a thread, the console script as a process.
- ``clients``: in-process clients and one ``Client`` over every transport (fixtures).
- ``waiting``: polling for an observable condition, never a bare sleep.
"""
