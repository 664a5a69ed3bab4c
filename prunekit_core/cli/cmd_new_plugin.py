"""``prunekit new-plugin``: write a skeleton plugin distribution for a transformers class."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .options import HelpFormatter, epilog
from .ui import EXIT_OK, UI


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "new-plugin",
        parents=[common],
        formatter_class=HelpFormatter,
        help="write a working skeleton plugin distribution for a model family",
        description=(
            "Write the plugin distribution prunekit-NAME for the transformers class --model-class: pyproject "
            "with the 'prunekit' entry point, an adapter and a conformance test. The adapter is filled in "
            "from the layout the generic adapter discovers in a tiny random model of that class (blocks, "
            "branches, pre-norms, stages), so the skeleton passes the conformance suite as written; refine "
            "it from there (docs/plugins/writing-a-plugin.md)."
        ),
        epilog=epilog(
            "prunekit new-plugin gptj --model-class GPTJForCausalLM --config rotary_dim=8",
            "prunekit new-plugin olmo --model-class OlmoForCausalLM --out plugins/olmo",
        ),
    )
    p.add_argument("name", metavar="NAME", help="plugin and adapter name: a lowercase identifier, e.g. gptj")
    p.add_argument(
        "--model-class",
        required=True,
        metavar="CLASS",
        help="the transformers causal-LM class the plugin describes, e.g. GPTJForCausalLM",
    )
    p.add_argument("--out", type=Path, default=None, help="folder to write (default: ./prunekit-NAME)")
    p.add_argument(
        "--config",
        type=_config_item,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the tiny test model's config (JSON values; repeatable)",
    )
    p.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    p.set_defaults(func=cmd_new_plugin)


def _config_item(value: str) -> tuple[str, Any]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def cmd_new_plugin(args: argparse.Namespace, ui: UI) -> int:
    from ..io.scaffold import new_plugin

    skeleton = new_plugin(
        args.name, model_class=args.model_class, out=args.out, config=dict(args.config), force=args.force
    )
    if ui.json_mode:
        ui.emit_json(skeleton.to_dict())
        return EXIT_OK
    ui.say(f"wrote {skeleton.distribution} ({skeleton.model_class}) in {skeleton.path}:")
    for f in skeleton.files:
        ui.say(f"  {f}")
    ui.say("next:")
    ui.say(
        f"  pip install -e {skeleton.path}      # registers adapter {args.name!r} (entry point group prunekit)"
    )
    ui.say(
        f"  pytest {skeleton.path / 'tests'}     # the conformance suite on a tiny random {skeleton.model_class}"
    )
    return EXIT_OK
