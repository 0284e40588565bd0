"""Loaded into both runs of Celery's suite (`-p sqs_fix_plugin`): kombu
5.7's SQS consumer stops the whole worker on one 5xx answer from SQS, which
moto gives under load (see dynachord_celery.sqs_fix). Without this, the
suite's one session worker can die mid-run, on either backend, and every
later test waits out its timeout."""

from dynachord_celery.sqs_fix import survive_sqs_server_errors

survive_sqs_server_errors()
