"""The adapters: MLflow, S3, the files written for DVC, plots, export, the team's servers. Imports core only;
the only layer that imports mlflow and boto3."""
