"""The API's routes, one module per resource: thin adapters over infra/."""
