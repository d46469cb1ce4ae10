"""The artifact contract: the S3/file storage adapter, manifests committed last and verified on
read, and a stage's output folder (skipped when its inputs are unchanged). Built on core."""
