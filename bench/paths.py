"""Paths from bench.toml and the command line: ${VAR} and ~ expanded, names that become folders checked."""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import BenchError

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# a dataset, run or profile name becomes one folder: letters, digits, '.', '_', '-'; no '..' or '/'
_PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
MAX_NAME = 100


def expand_path(value: str, key: str, where: str) -> Path:
    """Expand ${VAR} and ~; an unset variable is an error naming it."""
    def sub(m):
        name = m.group(1)
        if name not in os.environ:
            raise BenchError(f"{where}: {key} = {value!r} uses ${{{name}}}, which is not set; "
                             f"export {name}=/path/to/data or write the path into {where}")
        return os.environ[name]
    return Path(os.path.expanduser(_ENV.sub(sub, value)))


def env_names(value: str) -> list[str]:
    return _ENV.findall(value)


def check_plain_name(name: str, what: str) -> str:
    """A name that becomes a folder: plain, short, and never a way out of its parent."""
    if not isinstance(name, str) or not _PLAIN.match(name) or ".." in name or len(name) > MAX_NAME:
        raise BenchError(f"{what} {name!r} must be a plain folder name of at most {MAX_NAME} characters "
                         f"(letters, digits, '.', '_', '-'; not starting with '.' or '-', no '/' or '..')")
    return name
