"""Exit codes and the two failure kinds every stage distinguishes.

The pipeline chart's podFailurePolicy fails a Job at once on ``EXIT_CONFIG`` (retrying a bad
config cannot help) and retries ``EXIT_RETRY`` (I/O, preemption).
"""

EXIT_OK = 0
EXIT_RETRY = 1
EXIT_CONFIG = 2


class LawtuneError(Exception):
    """Base for failures that end a stage with one clear line on stderr."""

    exit_code = EXIT_RETRY


class ConfigError(LawtuneError):
    """Bad input or configuration: retrying cannot help."""

    exit_code = EXIT_CONFIG


class DataError(ConfigError):
    """An input file that is not a usable dataset."""


class StorageError(LawtuneError):
    """Artifact store I/O failed (worth retrying)."""


class IntegrityError(LawtuneError):
    """An artifact failed verification: missing manifest, size or checksum mismatch."""

    exit_code = EXIT_CONFIG
