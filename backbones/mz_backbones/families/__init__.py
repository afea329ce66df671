"""Importing this package registers every backbone family."""
from __future__ import annotations
from . import plainmamba  # noqa: F401
from . import groupmamba  # noqa: F401
from . import vim  # noqa: F401
from . import vmamba  # noqa: F401
from . import segmamba  # noqa: F401
from . import nnmamba  # noqa: F401
from . import mambaout  # noqa: F401
from . import localvim  # noqa: F401
from . import localvmamba  # noqa: F401
from . import mambavision  # noqa: F401
from . import videomamba  # noqa: F401
from . import efficientvmamba  # noqa: F401
from . import seq  # noqa: F401
from . import spatialmamba  # noqa: F401
