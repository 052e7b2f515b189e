"""The real components the tests and the benchmarks run against, on loopback only.

- :mod:`testbed.hub`: a local Hugging Face Hub endpoint (``HubServer``);
- :mod:`testbed.s3`: a SeaweedFS S3 server (``start_server``);
- :mod:`testbed.postgres`: fresh PostgreSQL databases (``fresh_database``);
- :mod:`testbed.smollm2`: the real SmolLM2-135M checkpoint and a text corpus;
- :mod:`testbed.tiny_models`: tiny real checkpoints (Llama, GPT-2) and PEFT adapters;
- :mod:`testbed.compat`: the mergekit compatibility set (recipes shaped like real ones);
- :mod:`testbed.api`: the real app in process (``ApiHarness``) and a valid merge job;
- :mod:`testbed.fuzzing`: the schemathesis campaign against the API.

Nothing here imports ``tests``: the pytest fixtures that wrap these live in
``tests/conftest.py``, and ``bench/`` uses the modules directly. A component that is
missing raises :class:`Unavailable` with the command that provides it.
"""


class Unavailable(RuntimeError):
    """A component the tests need is not installed or not running (the message says how
    to get it)."""
