"""The service layer: what the weightsmith service does, torch-free and HTTP-free.

Submission (validate, pin, check what the tenant may read, record, queue or reuse), the
tenant boundary, schedule fires and the webhook URL policy live here, used alike by the
REST API (``app/``, which only speaks HTTP), the workers (``workers/``) and the CLI.
Below it: ``infra/`` (adapters: database, object storage, queue, Hub client, settings,
logging) and ``schemas/`` (the shared vocabulary). See docs/architecture.md.
"""
