"""The gradio layout of the medseg app and its command line (``python -m mz_apps.medseg``).

The callbacks (``on_*``) are thin: they call :mod:`.handlers` and turn a
:class:`~mz_pipelines.runtime.errors.UserError` into a ``gr.Error`` popup.
"""
from __future__ import annotations

import argparse
import functools
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
import pandas as pd

from mz_pipelines.runtime.errors import UserError

from . import handlers as H

F = TypeVar("F", bound=Callable[..., Any])
_VIEWS = len(H.AXES)


def user_errors(fn: F) -> F:
    """Show a ``UserError`` (bad file, bad checkpoint) as a gradio error popup instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None

    return wrapper  # type: ignore[return-value]


def _paths(files: Any) -> list[str]:
    """Paths from a ``gr.File`` value: ``None``, one path, or a list of paths / file objects."""
    if files is None:
        return []
    items = files if isinstance(files, (list, tuple)) else [files]
    return [str(getattr(f, "name", f)) for f in items]


def _views(state: H.ViewerState, indices: Sequence[int], channel: int) -> list[Any]:
    return [H.slice_views(state, axis, int(i), channel=int(channel)) for axis, i in zip(H.AXES, indices)]


def _table(state: H.ViewerState | None) -> pd.DataFrame:
    return pd.DataFrame(H.volume_rows(state) if state is not None else [], columns=H.VOLUME_HEADERS)


def _describe(state: H.ViewerState) -> str:
    shape = " x ".join(str(n) for n in state.volume.array.shape[1:])
    spacing = " x ".join(f"{s:g}" for s in state.volume.spacing)
    text = f"**{state.name}**: {shape} voxels of {spacing} mm, {state.channels} channel(s)"
    if state.checkpoint is not None:
        text += f"; segmented with `{state.checkpoint}`"
    return text


def shown(state: H.ViewerState) -> tuple[Any, ...]:
    """Every output of a fresh load: state, three views at the middle slices, three sliders, the channel
    slider, an empty volume table, no download, the case description.
    """
    middles = [state.n_slices(axis) // 2 for axis in H.AXES]
    sliders = [
        gr.Slider(minimum=0, maximum=max(state.n_slices(axis) - 1, 1), value=m, step=1, interactive=state.n_slices(axis) > 1)
        for axis, m in zip(H.AXES, middles)
    ]
    # gradio needs minimum < maximum; a single slice or channel gets a frozen 0..1 slider (callbacks clamp)
    channel = gr.Slider(minimum=0, maximum=max(state.channels - 1, 1), value=0, step=1, visible=state.channels > 1)
    return (state, *_views(state, middles, 0), *sliders, channel, _table(None), None, _describe(state))


@user_errors
def on_upload(files: Any) -> tuple[Any, ...]:
    """A NIfTI upload (one file, or one file per channel): show it without a mask."""
    return shown(H.load_volume(_paths(files)))


@user_errors
def on_example(examples_dir: str) -> tuple[Any, ...]:
    """Generate (once) and show a synthetic example case."""
    return shown(H.load_volume(H.example_image(examples_dir)))


def on_slice(state: H.ViewerState | None, axis: str, index: float, channel: float) -> Any:
    """One view after its slider (or the channel) moved; nothing before an image is loaded."""
    if state is None:
        return None
    index = min(max(int(index), 0), state.n_slices(axis) - 1)
    return H.slice_views(state, axis, index, channel=min(max(int(channel), 0), state.channels - 1))


@user_errors
def on_refresh(runs_root: str) -> Any:
    """Re-scan ``<runs_root>/medseg/*`` for checkpoints."""
    found = H.find_checkpoints(runs_root)
    return gr.Dropdown(choices=found, value=found[0] if found else None)


@user_errors
def on_segment(
    state: H.ViewerState | None, chosen: str | None, typed: str | None, ax: float, co: float, sa: float, channel: float,
    *, device: str = "cpu", out_root: str | None = None,
) -> tuple[Any, ...]:
    """Segment with the typed checkpoint path (else the chosen run); views, volume table, mask file
    (in a fresh folder under ``out_root``, default the system temp dir).
    """
    if state is None:
        raise UserError("load an image first (upload a NIfTI file or generate the example)")
    checkpoint = (typed or "").strip() or (chosen or "").strip()
    state = H.segment(state, checkpoint, device=device)
    mask = H.save_mask(state, tempfile.mkdtemp(prefix="mz_medseg_", dir=out_root))
    return (state, *_views(state, (ax, co, sa), channel), _table(state), str(mask), _describe(state))


def build_app(*, runs_root: str = "runs", examples_dir: str | None = None, device: str = "cpu") -> gr.Blocks:
    """The app as a ``gr.Blocks`` (not launched).

    Args:
        runs_root: where trained runs live; ``<runs_root>/medseg/*/best.pt`` fill the checkpoint list.
        examples_dir: cache folder of the generated example (default: a folder in the system temp dir).
        device: torch device the model runs on.
    """
    example_cache = str(examples_dir or Path(tempfile.gettempdir()) / "mambazoo_medseg_examples")
    found = H.find_checkpoints(runs_root)
    with gr.Blocks(title="mambazoo medseg") as demo:
        gr.Markdown(
            "## Medical image segmentation\nUpload a NIfTI image (or generate an example), choose a trained run, "
            "segment, browse the slices and download the mask. Slices are shown with the patient's right on the "
            "left, anterior (axial) or superior (coronal, sagittal) up."
        )
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="NIfTI image (.nii / .nii.gz; one file per channel)", file_count="multiple")
                example = gr.Button("Generate an example case")
                chosen = gr.Dropdown(choices=found, value=found[0] if found else None, label="Trained run (runs/medseg/*)")
                refresh = gr.Button("Rescan runs", size="sm")
                typed = gr.Textbox(label="or a checkpoint path", placeholder="runs/medseg/<name>/best.pt or the run folder")
                run = gr.Button("Segment", variant="primary")
                info = gr.Markdown()
                channel = gr.Slider(minimum=0, maximum=1, value=0, step=1, label="channel", visible=False)
            with gr.Column(scale=3):
                with gr.Row():
                    views = [gr.Image(label=axis, format="png", interactive=False) for axis in H.AXES]
                with gr.Row():
                    sliders = [
                        gr.Slider(minimum=0, maximum=1, value=0, step=1, label=f"{axis} slice", interactive=False)
                        for axis in H.AXES
                    ]
                table = gr.Dataframe(headers=H.VOLUME_HEADERS, label="volumes per label", interactive=False)
                download = gr.File(label="mask (.nii.gz)", interactive=False)

        loaded = [state, *views, *sliders, channel, table, download, info]
        files.upload(on_upload, inputs=files, outputs=loaded, api_name="upload")
        example.click(functools.partial(on_example, example_cache), inputs=None, outputs=loaded, api_name="example")
        for axis, view, slider in zip(H.AXES, views, sliders):
            slider.change(functools.partial(_slice_of, axis), inputs=[state, slider, channel], outputs=view, api_name=f"slice_{axis}")
        channel.change(_all_slices, inputs=[state, *sliders, channel], outputs=views, api_name="channel")
        refresh.click(functools.partial(on_refresh, runs_root), inputs=None, outputs=chosen, api_name="rescan")
        run.click(
            functools.partial(on_segment, device=device),
            inputs=[state, chosen, typed, *sliders, channel],
            outputs=[state, *views, table, download, info],
            api_name="segment",
        )
    return demo


def _slice_of(axis: str, state: H.ViewerState | None, index: float, channel: float) -> Any:
    return on_slice(state, axis, index, channel)


def _all_slices(state: H.ViewerState | None, ax: float, co: float, sa: float, channel: float) -> list[Any]:
    return [on_slice(state, axis, i, channel) for axis, i in zip(H.AXES, (ax, co, sa))]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mz_apps.medseg", description="Medical segmentation app (gradio).")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="open a public gradio.live link (default: off)")
    p.add_argument("--runs-root", default="runs", help="folder holding medseg/<run>/best.pt")
    p.add_argument("--examples-dir", default=None, help="cache folder of the generated example")
    p.add_argument("--device", default="cpu", help="torch device for the model, e.g. cpu or cuda")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"--port must be in 1..65535, got {args.port}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Build the app and serve it until interrupted."""
    args = parse_args(argv)
    demo = build_app(runs_root=args.runs_root, examples_dir=args.examples_dir, device=args.device)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)
