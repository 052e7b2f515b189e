"""Builders and checks the test modules share (checkpoints, recipes, reference merges, the
serve process). Fixtures live in ``tests/conftest.py``; the real servers the tests run
against are in ``testbed/``. Test modules import from here, never from each other."""
