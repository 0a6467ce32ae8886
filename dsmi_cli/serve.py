"""``dsmi serve``: run the matching service with uvicorn (service.app)."""

from __future__ import annotations

import argparse
import copy
import os
import sys

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default "
                                                            "127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--model-dir", help="exported model folder (dsmi export); default "
                                            "$DSMI_MODEL_DIR, else the bundled model")
    parser.add_argument("--redis-url", help="Redis URL of the gallery cache; default "
                                            "$DSMI_REDIS_URL, else an in-process store that "
                                            "keeps nothing across restarts")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes (default 1; each loads the model; more than "
                             "one needs Redis)")
    parser.add_argument("--log-level", default=None,
                        choices=["critical", "error", "warning", "info", "debug"],
                        help="log level (default $DSMI_LOG_LEVEL, else info)")


def _log_config(level: str) -> dict:
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["service"] = {"handlers": ["default"], "level": level.upper(),
                                    "propagate": False}
    return config


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from service.protocol import PROTOCOL
    from service.settings import Settings

    if args.model_dir:
        os.environ["DSMI_MODEL_DIR"] = str(args.model_dir)
    if args.redis_url:
        os.environ["DSMI_REDIS_URL"] = args.redis_url
    if args.log_level:
        os.environ["DSMI_LOG_LEVEL"] = args.log_level
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        settings = Settings()
    except Exception as exc:  # a bad variable or config file: say which, no traceback
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1 and not settings.redis_url:
        print("error: --workers above 1 needs Redis (--redis-url or DSMI_REDIS_URL): each "
              "worker's in-process store would hold different galleries", file=sys.stderr)
        return 2
    model_dir = settings.resolved_model_dir
    if not (model_dir / "manifest.json").is_file():
        print(f"error: no exported model in {model_dir}: pass --model-dir or set "
              "DSMI_MODEL_DIR to a folder written by 'dsmi export'", file=sys.stderr)
        return 2
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # One folder where the workers add up their metrics (service.metrics); set before
        # the workers start, each reads it at import.
        import tempfile

        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="dsmi-metrics-")
    level = settings.log_level.lower()
    uvicorn.run("service.app:create_app", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level=level, log_config=_log_config(level),
                timeout_keep_alive=settings.keep_alive_seconds,
                http=PROTOCOL)
    return 0
