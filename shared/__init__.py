"""lawtune's library, one subpackage per domain, each importing only from the layers below it:

    core <- store <- data <- train <- train.fast <- evaluate <- publish, serve <- cluster <- jobs <- jobs.cli (the `lawtune` command)

tests/test_layering.py walks the imports and fails on a cycle or an upward import.
"""
