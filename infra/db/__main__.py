"""``python -m infra.db upgrade|current [URL]`` and ``python -m infra.db revision -m MSG``."""

from infra.db.migrate import main

main()
