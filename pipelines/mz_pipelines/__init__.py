"""mz_pipelines: the domain pipelines of mambazoo and the runtime they share.

``mz_pipelines.runtime`` holds the shared CLI dispatcher, configs, training engine, checkpoints,
metrics and bench harness; each domain is a subpackage ``mz_pipelines.<domain>`` run as
``mambazoo <domain> <verb>`` or ``python -m mz_pipelines.<domain> <verb>``.
"""
