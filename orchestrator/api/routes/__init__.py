"""One router per resource, all included by `orchestrator.api.app.create_app`."""
