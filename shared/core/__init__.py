"""What every stage uses: environment settings, the YAML config schema, artifact URIs, errors and
exit codes, logging, and the job runner that turns exceptions into one line and an exit code.
Imports nothing else of lawtune."""
