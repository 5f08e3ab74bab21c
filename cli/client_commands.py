"""HTTP client commands (``taq submit``, ``status``, ``list``, ``wait``, …) go here.

Register them on the shared app: ``from cli.app import app`` then ``@app.command()``.
``cli/main.py`` imports this module, so nothing else needs to change.
"""

from __future__ import annotations

from cli.app import app  # noqa: F401
