"""Running the whole pipeline: the driver behind ``make train`` (stages as local processes)
and its Kubernetes target (stage Jobs from the pipeline chart, with failures explained)."""
