"""vsectl data ...: build, import and check datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from vsectl.cli.common import STATE, data_app, fail, json_output, run_guarded


@data_app.command("toy")
def data_toy_cli(
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("data/toy"),
    fmt: Annotated[str, typer.Option("--format", help="precomp | store")] = "precomp",
    seed: int = 0,
) -> None:
    """Generate the synthetic toy dataset (not real data: for smoke runs and tests)."""
    from vsectl.data.toy import make_toy_dataset

    if fmt not in ("precomp", "store"):
        fail(f"--format must be precomp or store, got '{fmt}'")
    typer.echo(str(run_guarded(make_toy_dataset, out, seed=seed, fmt=fmt)))


prepare_app = typer.Typer(no_args_is_help=True, help="Build a raw image-caption dataset (dataset.json, manifest.json).")
data_app.add_typer(prepare_app, name="prepare")
OutDir = Annotated[Path, typer.Option("--out", help="Output dataset folder")]


def _progress():  # noqa: ANN202 - the CLI's rich progress, silent with --quiet
    from vsectl.cli.common import STATE, RichProgress

    return RichProgress(enabled=not STATE.get("quiet", False))


@prepare_app.command("openclipart")
def prepare_openclipart_cli(
    out: OutDir = Path("data/openclipart"),
    cache: Annotated[Path | None, typer.Option(help="Download/unpack folder (default: $VSECTL_CACHE/openclipart, "
                                                    "else ~/.cache/vsectl/openclipart)")] = None,
    from_deb: Annotated[Path | None, typer.Option("--from-deb", help="Use this openclipart-svg .deb")] = None,
    from_dir: Annotated[Path | None, typer.Option("--from-dir", help="Use the SVGs under this folder")] = None,
    size: Annotated[int, typer.Option(help="PNG side in pixels")] = 224,
    max_images: Annotated[int | None, typer.Option("--max-images", help="Keep at most N images")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds allowed per SVG render")] = 10.0,
    workers: Annotated[int, typer.Option(help="Render processes")] = 2,
) -> None:
    """Build the public-domain openclipart demo dataset from Debian's openclipart-svg package."""
    from vsectl.data.openclipart import prepare_openclipart

    path = run_guarded(prepare_openclipart, out, cache=cache, from_deb=from_deb, from_dir=from_dir, size=size,
                       max_images=max_images, timeout=timeout, workers=workers, progress=_progress())
    typer.echo(str(path))


@prepare_app.command("emoji")
def prepare_emoji_cli(
    out: OutDir = Path("data/emoji"),
    cache: Annotated[Path | None, typer.Option(help="Download/unpack folder (default: $VSECTL_CACHE/emoji, "
                                                    "else ~/.cache/vsectl/emoji)")] = None,
    from_debs: Annotated[Path | None, typer.Option("--from-debs", help="Folder holding the fonts-noto-color-emoji, "
                                                   "unicode-data and unicode-cldr-core .debs")] = None,
    size: Annotated[int, typer.Option(help="PNG side in pixels")] = 224,
    max_images: Annotated[int | None, typer.Option("--max-images", help="Keep at most N emoji")] = None,
    min_test: Annotated[int, typer.Option("--min-test", help="Least number of test images")] = 400,
    skin_tones: Annotated[bool, typer.Option("--skin-tones", help="Keep the skin-tone variants")] = False,
    flags: Annotated[bool, typer.Option("--flags", help="Keep the country and region flags")] = False,
    seed: Annotated[int, typer.Option(help="Split order seed")] = 0,
) -> None:
    """Build the emoji dataset: Noto Color Emoji pictures with Unicode CLDR English names and keywords."""
    from vsectl.data.emoji import DEFAULT_EXCLUDE, EmojiRules, prepare_emoji

    rules = EmojiRules(skin_tones=skin_tones, exclude_subgroups=() if flags else DEFAULT_EXCLUDE, split_seed=seed)
    path = run_guarded(prepare_emoji, out, cache=cache, from_debs=from_debs, size=size, max_images=max_images,
                       min_test=min_test, rules=rules, progress=_progress())
    typer.echo(str(path))


@prepare_app.command("karpathy")
def prepare_karpathy_cli(
    json_path: Annotated[Path, typer.Option("--json", help="Karpathy dataset_*.json")],
    images: Annotated[Path, typer.Option(help="Image folder (COCO: holding the filepath subfolders)")],
    out: OutDir,
    video: Annotated[bool, typer.Option("--video", help="Entries name folders of frame images, one per video")] = False,
) -> None:
    """Check a Karpathy JSON and its image folder; write a raw dataset (dataset.json, manifest.json) without copying."""
    from vsectl.data.prepare import prepare_karpathy

    typer.echo(str(run_guarded(prepare_karpathy, json_path, images, out, progress=_progress(), video=video)))


@prepare_app.command("msrvtt")
def prepare_msrvtt_cli(
    annotations: Annotated[list[Path], typer.Option("--json", help="train_val_videodatainfo.json and "
                                                    "test_videodatainfo.json (repeat --json), or MSRVTT_data.json")],
    videos: Annotated[Path, typer.Option(help="Folder holding the video files (<video_id>.mp4, any depth)")],
    out: OutDir = Path("data/msrvtt_raw"),
    train_list: Annotated[Path | None, typer.Option(help="1k-A: MSRVTT_train.9k.csv (or .7k)")] = None,
    test_list: Annotated[Path | None, typer.Option(help="1k-A: MSRVTT_JSFUSION_test.csv")] = None,
) -> None:
    """MSR-VTT: official splits, or 1k-A with the split lists; a raw video dataset (videos are not copied)."""
    from vsectl.data.video_datasets import prepare_msrvtt

    typer.echo(str(run_guarded(prepare_msrvtt, annotations, videos, out, train_list=train_list, test_list=test_list)))


@prepare_app.command("vatex")
def prepare_vatex_cli(
    train: Annotated[Path, typer.Option(help="vatex_training_v1.0.json")],
    val: Annotated[Path, typer.Option(help="vatex_validation_v1.0.json")],
    videos: Annotated[Path, typer.Option(help="Folder holding the video files (<videoID>.mp4, any depth)")],
    out: OutDir = Path("data/vatex_raw"),
    test: Annotated[Path | None, typer.Option(help="A VATEX JSON with English captions as the test split")] = None,
    test_list: Annotated[Path | None, typer.Option(help="Validation video ids (one per line) that form the test "
                                                        "split [default: the second half of --val]")] = None,
) -> None:
    """VATEX: English captions, train / dev / test; a raw video dataset (videos are not copied)."""
    from vsectl.data.video_datasets import prepare_vatex

    typer.echo(str(run_guarded(prepare_vatex, train, val, videos, out, test=test, test_list=test_list)))


@prepare_app.command("video-demo")
def prepare_video_demo_cli(
    source: Annotated[Path, typer.Option("--from", help="The openclipart dataset (vsectl data prepare openclipart)")]
    = Path("data/openclipart"),
    out: OutDir = Path("data/video_demo"),
    size: Annotated[int, typer.Option(help="Frame side in pixels")] = 128,
    fps: Annotated[int, typer.Option(help="Frames per second")] = 8,
    seconds: Annotated[float, typer.Option(help="Seconds per pan or zoom (half per drawing of a sequence)")] = 3.0,
    max_per_split: Annotated[int | None, typer.Option(help="At most N clips per split")] = None,
    seed: Annotated[int, typer.Option(help="Sequence partners and directions")] = 0,
) -> None:
    """The video demo: clip art in pans, zooms and sequences with captions, encoded as H.264 and VP9 files."""
    from vsectl.data.video_demo import DemoSettings, prepare_video_demo

    settings = run_guarded(DemoSettings, size, fps, seconds, max_per_split, seed)
    typer.echo(str(run_guarded(prepare_video_demo, source, out, settings, progress=_progress())))


@data_app.command("import-precomp")
def import_precomp_cli(
    src: Annotated[Path, typer.Argument(help="SCAN precomp folder ({split}_ims.npy, _caps.txt, _ids.txt)")],
    out: OutDir,
    dtype: Annotated[str, typer.Option(help="float16 | float32 on disk")] = "float32",
    splits: Annotated[str | None, typer.Option(help="Comma-separated, e.g. train,dev (default: all found)")] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-import splits whose .h5 exists")] = False,
) -> None:
    """Convert SCAN precomp features into HDF5 stores DST/{split}.h5 (streamed, resumable per split)."""
    from vsectl.data.prepare import import_precomp

    names = [s.strip() for s in splits.split(",") if s.strip()] if splits else None
    paths = run_guarded(import_precomp, src, out, dtype=dtype, splits=names, force=force, progress=_progress())
    for path in paths:
        typer.echo(str(path))


VERIFY_ROWS = (  # (label, report key, how to show it); one row each, so the table stays narrow however many fields
    ("images", "images", str), ("captions", "captions", str), ("captions per image (min/mean/max)",
    "captions_per_image", "mmm"), ("set size (min/mean/max)", "set_size", "mmm"), ("feature dim", "feat_dim", str),
    ("dtype", "dtype", str), ("NaN/inf values", "nonfinite_values", str), ("empty captions", "empty_captions", str),
    ("captions on 2+ images", "shared_captions", str), ("images with such a caption", "images_with_shared_captions",
                                                        str),
    ("missing images", "missing_images", str), ("unreadable images", "unreadable_images", str),
)


def verify_table(report: dict) -> Any:
    """The verify report as a rich table: one column per split, one row per check (fits 80 columns)."""
    from rich.table import Table

    def show(value: Any, how: Any) -> str:
        if value is None:
            return "-"
        if how == "mmm":
            return f"{value['min']:g} / {value['mean']:g} / {value['max']:g}"
        return how(value)

    table = Table(title=f"{report['path']} ({report['kind']})", title_justify="left")
    table.add_column("")
    for name in report["splits"]:
        table.add_column(name, justify="right", no_wrap=True)
    for label, key, how in VERIFY_ROWS:
        table.add_row(label, *(show(r.get(key), how) for r in report["splits"].values()))
    return table


def _verify_table(report: dict) -> None:  # rich table on stderr
    from vsectl.cli.common import err

    err.print(verify_table(report))
    for warning in report["warnings"]:
        err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    for problem in report["problems"]:
        err.print(f"[red]problem:[/red] {problem}", highlight=False)


@data_app.command("verify")
def verify_cli(
    path: Annotated[Path, typer.Argument(help="Data root (precomp or stores), a .h5 store, or a raw dataset folder")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout")] = False,
    noise: Annotated[Path | None, typer.Option(help="Also check a noise index (.npy) or a noisy run's recorded "
                                                    "pairs against PATH's training split")] = None,
) -> None:
    """Check counts, captions, NaN/inf features, split overlap and images; exit 2 if a problem is found.

    The report goes to stderr as tables; with -q only the exit code and the one error line, with --json the report on
    stdout and nothing else."""
    import json

    from vsectl.data.verify import verify_path

    json_output(as_json)
    report = run_guarded(verify_path, path, progress=_progress())
    if not STATE.get("quiet"):
        _verify_table(report)
    if noise is not None:
        report["noise"] = _verify_noise(path, noise)
        report["problems"] += [f"noise: {p}" for p in report["noise"]["problems"]]
    if as_json:
        typer.echo(json.dumps(report, indent=1))
    if report["problems"]:
        fail(f"{len(report['problems'])} problem(s) in {path}; first: {report['problems'][0]}")


def _verify_noise(path: Path, target: Path) -> dict:
    """Check the noisy pairs of `target` against `path` and print them as a table (stderr)."""
    from rich.table import Table

    from vsectl.cli.common import err
    from vsectl.noisy.noise_verify import verify_noise

    report = run_guarded(verify_noise, path, target)
    table = Table(title=f"noisy pairs: {target} ({report['kind']})", title_justify="left", show_header=False)
    shown = {"source": "source", "layout": "layout", "split": "split", "n_captions": "captions",
             "n_noisy": "paired with a wrong image", "ratio": "ratio", "noisy_images": "images of the noisy captions",
             "fingerprint": "fingerprint", "recorded_fingerprint": "fingerprint recorded by the run"}
    for key, label in shown.items():
        if key in report:
            value = report[key]
            table.add_row(label, f"{value:.4f}" if key == "ratio" else str(value)[:16] if "fingerprint" in key
                          else str(value))
    if not STATE.get("quiet"):
        err.print(table)
        for problem in report["problems"]:
            err.print(f"[red]problem:[/red] noise: {problem}", highlight=False)
    return report
