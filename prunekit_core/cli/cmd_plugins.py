"""``prunekit plugins``: every plugin, what it registers, and the plugins that failed to load."""

from __future__ import annotations

import argparse
from typing import Any

from .options import HelpFormatter, epilog
from .ui import EXIT_OK, UI


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "plugins",
        parents=[common],
        formatter_class=HelpFormatter,
        help="list installed plugins, what they register, and load failures",
        description=(
            "List every prunekit plugin (built-in and installed through the 'prunekit' entry-point group): "
            "name, version, the adapters, metrics and quantization formats it registers, and the plugins that "
            "failed to load (with the error). The list comes from each plugin's catalog (its prunekit_catalog "
            "hook), which needs no torch; --load builds everything the plugins register instead, as a command "
            "that uses a model does, and checks each catalog against it."
        ),
        epilog=epilog("prunekit plugins", "prunekit plugins --json", "prunekit plugins --load"),
    )
    p.add_argument(
        "--load",
        action="store_true",
        help="import every plugin fully and build what it registers (slower: imports torch); a plugin whose "
        "registrations differ from its catalog is listed as failed",
    )
    p.set_defaults(func=cmd_plugins)


def cmd_plugins(args: argparse.Namespace, ui: UI) -> int:
    from rich.table import Table

    from ..registry.plugins import catalog, load_failures, plugins

    if args.load:  # build every adapter, metric and format, checking each catalog (imports torch)
        found, failed = plugins(), load_failures()
    else:  # from the plugins' catalogs: imports no torch
        found, failed = catalog()
    infos = [p.to_dict() for p in found]
    failures = [f.to_dict() for f in failed]
    if ui.json_mode:
        ui.emit_json({"plugins": infos, "failures": failures})
        return EXIT_OK
    table = Table(title="prunekit plugins")
    for col in ("plugin", "version", "builtin", "adapters", "metrics", "quant formats"):
        table.add_column(col)
    for p in infos:
        table.add_row(
            p["name"],
            p["version"] or "-",
            "yes" if p["builtin"] else "no",
            ", ".join(p["adapters"]) or "-",
            ", ".join(p["metrics"]) or "-",
            ", ".join(p["quant_formats"]) or "-",
        )
    ui.table(table)
    if failures:
        fail = Table(title="plugins that failed to load")
        for col in ("plugin", "module", "error"):
            fail.add_column(col)
        for f in failures:
            fail.add_row(f["name"], f["module"], f["error"])
        ui.table(fail)
    elif args.load:
        ui.say("no plugin failed to load")
    else:
        ui.say(
            "no entry-point module failed to import; `prunekit plugins --load` also imports the adapters and "
            "metrics each plugin registers (and imports torch)"
        )
    return EXIT_OK
