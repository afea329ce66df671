"""Gradio app for medical segmentation: upload a NIfTI (or load a generated example), pick a trained
run, segment, browse axial/coronal/sagittal slices with the mask overlaid, read per-label volumes
in mL and download the mask.

    python -m mz_apps.medseg --port 7860

Modules: ``handlers`` (pure functions on a :class:`~mz_apps.medseg.handlers.ViewerState`; no gradio)
and ``app`` (the gradio layout and ``main``). Gradio is imported by ``app`` only.
"""
