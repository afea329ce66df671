"""Medical image segmentation (MONAI): SegMamba-style 3D and VM-UNet/MSVM-style 2D networks.

    mambazoo medseg synth --out data/medseg
    mambazoo medseg train --set data.path=data/medseg run.name=a
    mambazoo medseg evaluate --set run.name=a
    mambazoo medseg predict --set run.name=a --input case_0000.nii.gz --output out/
    mambazoo medseg bench
    mambazoo medseg export --set run.name=a --out bundle/

Modules: ``synth`` (Decathlon-style synthetic task), ``dataset_json``/``nifti`` (reading and
validating a task), ``transforms``/``data`` (MONAI dict transforms, patch datasets), ``models``
(networks and baselines), ``inference`` (sliding window, TTA), ``metrics``/``report`` (Dice, HD95,
ASSD), ``predict`` (NIfTI in, mask out in the input geometry), ``bundle`` (MONAI bundle export),
``task`` (engine plug-in), ``bench``, ``cli`` (verbs). Heavy libraries load inside the verbs.
"""
