"""Structured JSON logs on stderr. Callers pass fields in `extra`; never prompts, completions or keys.

Every record goes through the telemetry policy (appliance/telemetry.py, spec/telemetry.md): only the
fields it lists, each checked, and string arguments of a message cut to a bounded length."""

from __future__ import annotations

import json
import logging
import sys
import time

from appliance.telemetry import LogPolicy

__all__ = ["configure_logging", "JsonFormatter"]

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, policy: LogPolicy | None = None) -> None:
        super().__init__()
        self.policy = policy or LogPolicy()

    def _message(self, record: logging.LogRecord) -> str:
        msg = str(record.msg)
        args = record.args
        if not args:
            return msg
        cut = self.policy.cut
        if isinstance(args, dict):
            return msg % {k: cut(v) for k, v in args.items()}
        return msg % tuple(cut(a) for a in args)

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": self._message(record),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type and where it happened; its message may quote request data, so no str(e).
            out["exc_type"] = record.exc_info[0].__name__
            tb = record.exc_info[2]
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            if tb is not None:
                out["exc_at"] = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        return json.dumps(self.policy.apply(out), default=str)


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("appliance", "attestation"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level.upper())
        lg.propagate = False
