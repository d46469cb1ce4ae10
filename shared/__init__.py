"""lawtune's shared library: settings, config schema, artifact store, data schema, models."""
