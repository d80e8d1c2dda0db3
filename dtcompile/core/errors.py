"""One user-error hierarchy: the CLI prints these as one line and exits non-zero."""

from __future__ import annotations


class DtcError(Exception):
    """Base class for errors a user can act on; printed without a traceback."""

    exit_code = 2


class RecipeError(DtcError):
    """A recipe file or override is invalid (message names file, line and dotted field)."""


class MissingDependencyError(DtcError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, module: str, extra: str, why: str = "") -> None:
        hint = f" ({why})" if why else ""
        super().__init__(f"'{module}' is not installed{hint}; install it with: pip install 'dtcompile[{extra}]'")
        self.module = module
        self.extra = extra


class UnsupportedError(DtcError):
    """A requested combination (format, backend, arch, model) is not supported."""


class BuildError(DtcError):
    """A build stage failed for a reason the user can act on."""


class VerificationError(DtcError):
    """A numeric or integrity verification failed (parity, refit, checksum)."""


class ArtifactError(DtcError):
    """An artifact or engine file is missing, corrupt, or built for another target."""


class InputError(DtcError):
    """A run's input is out of range or unreadable: an option value (``--guidance``, ``--fps``) or an input file
    (a reference image); the message names the option or file, the value, the valid range and the fix."""
