"""The Typer application objects. Command modules register on these:

* ``cli/server_commands.py``: ``serve``, ``api``, ``worker``
* ``cli/admin_commands.py``: ``admin …`` (operators)
* ``cli/client_commands.py``: HTTP client job commands (``submit``, ``status``, ``list``, ``wait``, …)
* ``cli/data_commands.py``: HTTP client artifact and data commands (``profile``, ``download``,
  ``models``, ``datasets …``); what they share is in ``cli/client.py``
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="taq",
    help="TAQ Service: task-aware quantization of LLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
admin = typer.Typer(help="Operator commands (database, API keys, maintenance).", no_args_is_help=True)
app.add_typer(admin, name="admin")
