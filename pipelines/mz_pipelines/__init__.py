"""mz_pipelines"""
