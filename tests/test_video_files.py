"""Video files: sampled frame indices vs a loop reference, real decoding in several codecs and containers, streaming
memory on a long clip, and every broken-file case as one line."""

from __future__ import annotations

import gc
import math
import tracemalloc

import numpy as np
import pytest
from videos import VFR_PTS, frame_number, write_broken, write_video

from vsectl.data.video_files import (
    FrameSampling,
    UnreadableVideo,
    frames_at,
    probe,
    read_frames,
    sample_indices,
    sample_times,
)
from vsectl.errors import ConfigError

pytest.importorskip("av")  # installed by the dev extra; a plain install without [video] has no decoder


def reference_indices(starts: list[float], duration: float, sampling: FrameSampling) -> list[int]:
    """The obvious loop: n slices of the duration, the middle of each, the frame on screen there."""
    if sampling.frames is not None:
        n = sampling.frames
    else:
        n = max(1, int(math.floor(duration * sampling.fps + 0.5)))
    if sampling.max_frames is not None:
        n = min(n, sampling.max_frames)
    picked = []
    for k in range(n):
        t = (k + 0.5) * duration / n
        on_screen = 0
        for i, start in enumerate(starts):
            if start <= t:
                on_screen = i
        if on_screen not in picked:
            picked.append(on_screen)
    return sorted(picked)


def test_sampled_indices_match_the_loop_reference_for_constant_and_variable_rates():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n_frames = int(rng.integers(1, 60))
        if trial % 2:  # variable frame rate: random gaps
            starts = np.concatenate([[0.0], np.cumsum(rng.uniform(0.01, 0.3, n_frames - 1))]).tolist()
        else:
            starts = [i / 25 for i in range(n_frames)]
        duration = starts[-1] + 0.04
        sampling = (FrameSampling(frames=int(rng.integers(1, 20))) if trial % 3 else
                    FrameSampling(fps=float(rng.uniform(0.3, 12)), max_frames=int(rng.integers(1, 30))))
        got = frames_at(starts, sample_times(duration, sampling))
        assert got == reference_indices(starts, duration, sampling), (trial, starts, sampling)


def test_one_frame_per_second_of_a_ten_second_clip_takes_the_middle_of_each_second():
    starts = [i / 30 for i in range(300)]  # 10 s at 30 fps
    assert frames_at(starts, sample_times(10.0, FrameSampling(fps=1.0))) == [15 + 30 * k for k in range(10)]
    assert frames_at(starts, sample_times(10.0, FrameSampling(fps=1.0, max_frames=4))) == [37, 112, 187, 262]
    assert frames_at(starts[:3], sample_times(0.1, FrameSampling(frames=8))) == [0, 1, 2]  # fewer frames than asked


@pytest.mark.parametrize("sampling", [FrameSampling(frames=5), FrameSampling(fps=3.0)], ids=["uniform5", "fps3"])
@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".avi", ".mkv"])
def test_decoded_frames_are_the_sampled_ones_in_each_codec_and_container(tmp_path, suffix, sampling):
    path = write_video(tmp_path / f"clip{suffix}", 23)  # 23 frames at 10 fps: 2.3 s
    info = probe(path)
    assert (info.n_frames, round(info.duration, 3), info.variable_rate) == (23, 2.3, False)
    expected = reference_indices([i / 10 for i in range(23)], 2.3, sampling)
    frames = list(read_frames(path, sample_indices(info, sampling), info, 32))
    assert [i for i, _ in frames] == expected
    assert [frame_number(f) for _, f in frames] == expected  # the pixels are those frames
    assert all(f.shape == (32, 32, 3) and f.dtype == np.uint8 for _, f in frames)


def test_variable_frame_rate_video_is_sampled_by_presentation_time(tmp_path):
    path = write_video(tmp_path / "vfr.mp4", len(VFR_PTS), pts=VFR_PTS, ticks_per_s=100)
    info = probe(path)
    assert info.variable_rate
    starts = [p / 100 for p in VFR_PTS]
    np.testing.assert_allclose(info.times, starts, atol=1e-3)
    sampling = FrameSampling(frames=4)
    expected = reference_indices(starts, info.duration, sampling)
    assert expected != reference_indices(list(np.linspace(0, starts[-1], len(starts))), info.duration, sampling)
    frames = list(read_frames(path, sample_indices(info, sampling), info, 32))
    assert [frame_number(f) for _, f in frames] == expected


def test_decoding_a_long_clip_holds_one_frame_at_a_time(tmp_path):
    n, size = 400, 64
    path = write_video(tmp_path / "long.mp4", n, size=size, fps=25)
    info = probe(path)
    indices = sample_indices(info, FrameSampling(fps=25.0))
    assert len(indices) == n
    frame_bytes = size * size * 3
    gc.collect()
    tracemalloc.start()
    try:
        count = 0
        for i, frame in read_frames(path, indices, info, size):
            assert frame_number(frame) == i % 256  # eight stripes count to 255
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    assert peak < 20 * frame_bytes, peak  # holding the clip would take n × frame_bytes = 4.9 MB


def test_extraction_loader_hands_over_chunks_not_videos(tmp_path):
    from vsectl.extract.video_files import VideoChunks

    path = write_video(tmp_path / "long.webm", 120, size=32, fps=20)
    items = list(VideoChunks([path], FrameSampling(fps=20.0), size=32, chunk=16))
    sizes = [len(frames) for _, frames, last, _, _ in items if not last]
    assert sizes == [16] * 7 + [8] and items[-1][2] and items[-1][3] == ""
    decoded = [frame_number(f.permute(1, 2, 0).numpy()) for _, frames, _, _, _ in items for f in frames]
    assert decoded == list(range(120))


def test_each_broken_file_is_one_line_of_its_kind(tmp_path):
    kinds = write_broken(tmp_path)
    for name, kind in kinds.items():
        with pytest.raises(UnreadableVideo) as caught:
            path = tmp_path / name
            info = probe(path)
            list(read_frames(path, sample_indices(info, FrameSampling(frames=4)), info, 16))
        assert caught.value.kind == kind, (name, str(caught.value))
        message = str(caught.value)
        assert "\n" not in message and message.startswith(str(tmp_path / name)), message


def test_sampling_settings_are_checked_in_one_line():
    for kwargs in ({}, {"frames": 4, "fps": 1.0}, {"frames": 0}, {"fps": -1.0}, {"fps": float("nan")},
                   {"fps": 1.0, "max_frames": 0}):
        with pytest.raises(ConfigError):
            FrameSampling(**kwargs)
