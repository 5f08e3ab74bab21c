"""Console script ``taq`` (pyproject: ``taq = "cli.main:app"``)."""

from __future__ import annotations

import importlib

from cli.app import app

# importing the command modules registers their commands on `app`
for _module in ("cli.server_commands", "cli.admin_commands", "cli.client_commands", "cli.data_commands"):
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as exc:
        if exc.name != _module:
            raise

__all__ = ["app"]

if __name__ == "__main__":
    app()
