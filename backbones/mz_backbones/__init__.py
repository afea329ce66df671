"""mz_backbones"""
