"""mz_apps"""
