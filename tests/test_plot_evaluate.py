"""The user-facing outputs: TensorBoard events, plots of runs, evaluation of saved params.

One short real single-process CartPole run (3,000 frames) is shared by the tests; a
distributed layout (bundle*/episodes.csv, learner.jsonl, ps.json) is written synthetically,
also with the ps.json of a server split in 2 shards.
"""

import csv
import importlib.util
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gorila_jax.envs import Episode
from gorila_jax.envs.recording import Recorder
from gorila_jax.io.metrics import RunLogger
from gorila_jax.io.params_file import describe_mismatch
from gorila_jax.run import plots
from gorila_jax.server.server_stats import combine

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"experiments/{script}", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load_script(name: str):
    """An experiments/ script as a module, to call its main() in this process."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "experiments" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory) -> Path:
    """A real single-process run directory with config.yaml, logs and params.msgpack."""
    run_dir = tmp_path_factory.mktemp("cartpole_run")
    result = run_script(
        "cartpole.py", "--single-process", "--seed", "0", "--total-frames", "3000",
        "--learning-starts", "500", "--run-dir", run_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return run_dir


def write_distributed_run(run_dir: Path, bundles: int = 2, episodes: int = 60) -> None:
    """A distributed-layout run: bundle*/episodes.csv and learner.jsonl, and ps.json."""
    rng = np.random.default_rng(0)
    for bundle in range(1, bundles + 1):
        directory = run_dir / f"bundle{bundle}"
        directory.mkdir(parents=True)
        with (directory / "episodes.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(("time", "frames", "bundle", "env", "return", "length"))
            for i in range(episodes):
                length = int(rng.integers(10, 60))
                writer.writerow((0.1 * i + 0.03 * bundle, 50 * (i + 1), bundle, 0, length, length))
        with (directory / "learner.jsonl").open("w") as handle:
            for i in range(10):
                record = {
                    "time": 0.6 * i,
                    "frames": 300 * i,
                    "updates": 100 * i,
                    "loss": 1 / (i + 1),
                }
                handle.write(json.dumps({**record, "mean_q": i, "mean_abs_td": 0.5}) + "\n")
    stats = {
        "version": 1200,
        "updates": 1200,
        "updates_per_second": 310.5,
        "uptime_seconds": 8.0,
        "staleness_histogram": {"0": 3, "1": 20, "2-3": 100, "4-7": 400, "8-15": 500},
        "rejections": {"stale": 2},
        "workers": {"0": {"accepted": 600}, "1": {"accepted": 598, "rejected": 2}},
        "frames": 6000,
    }
    (run_dir / "ps.json").write_text(json.dumps(stats))


SHARD_STATS = (  # (version, uptime_seconds, updates_per_second, num_params) of shards 0 and 1
    (1200, 8.0, 310.5, 100),
    (1190, 7.0, 290.0, 98),
)


def write_sharded_ps_json(run_dir: Path) -> dict:
    """Replace the run's ps.json by that of a server in 2 shards (combined as shard 0 does)."""
    shards = []
    for shard, (version, uptime, rate, num_params) in enumerate(SHARD_STATS):
        shards.append(
            {
                "version": version,
                "updates": version,
                "updates_per_second": rate,
                "uptime_seconds": uptime,
                # An earlier sitting of 100 s: the run's rate divides by both sittings.
                "running_seconds": uptime + 100.0,
                "updates_per_second_run": round(version / (uptime + 100.0), 3),
                "updates_per_second_sitting": rate,
                "staleness_histogram": {"0": 3, "1": 20, "2-3": 100},
                "rejections": {"stale": shard},
                "workers": {"0": {"accepted": 600}, "1": {"accepted": version - 600}},
                "frames": 6000,
                "num_workers": 2,
                "num_params": num_params,
                "server_shard": shard,
                "server_shards": 2,
            }
        )
    stats = combine(shards)
    (run_dir / "ps.json").write_text(json.dumps(stats))
    return stats


def read_tensorboard_tags(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per scalar tag from the TFRecord event files in `directory`."""
    from tensorboardX.proto import event_pb2

    tags: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append((event.step, value.simple_value))
    return tags


# ---- TensorBoard ----------------------------------------------------------------------------


def test_run_logger_writes_tensorboard_events(tmp_path):
    logger = RunLogger(tmp_path, bundle=1)
    logger.episodes([Episode(0, 21.0, 30), Episode(1, -3.5, 12)], frames=400)
    logger.learner({"frames": 800, "updates": 50, "loss": 0.25, "mean_q": 1.5, "mean_abs_td": 0.75})
    logger.close()
    tags = read_tensorboard_tags(tmp_path)
    assert tags["episode/return"] == [(400, 21.0), (400, -3.5)]
    assert tags["episode/length"] == [(400, 30.0), (400, 12.0)]
    assert tags["learner/loss"] == [(800, 0.25)]
    assert tags["learner/mean_q"] == [(800, 1.5)]
    assert tags["learner/mean_abs_td"] == [(800, 0.75)]
    assert (tmp_path / "episodes.csv").read_text().count("\n") == 3  # CSV kept as it was
    assert len((tmp_path / "learner.jsonl").read_text().splitlines()) == 1


def test_a_resumed_logger_starts_from_the_recorded_recent_returns(tmp_path):
    first = RunLogger(tmp_path, bundle=1, recent=3, tensorboard=False)
    assert np.isnan(first.mean_recent_return())
    first.episodes([Episode(0, r, 10) for r in (1.0, 2.0, 4.0, 8.0)], frames=400)
    first.close()
    with (tmp_path / "episodes.csv").open("a") as file:
        file.write("9.0,500,1,0,not-a-number,10\n")  # a damaged row is passed over
    resumed = RunLogger(tmp_path, bundle=1, recent=3, tensorboard=False)
    assert list(resumed.recent_returns) == [2.0, 4.0, 8.0]
    resumed.episodes([Episode(0, 16.0, 10)], frames=600)
    assert resumed.mean_recent_return() == (4.0 + 8.0 + 16.0) / 3
    resumed.close()
    with (tmp_path / "episodes.csv").open("ab") as file:
        file.write(b"\xff\xfe not text\n")  # a file that is not text any more: no crash
    damaged = RunLogger(tmp_path, bundle=1, recent=3, tensorboard=False)
    assert len(damaged.recent_returns) <= 3
    damaged.close()


def test_real_run_has_tensorboard_events(cartpole_run):
    tags = read_tensorboard_tags(cartpole_run)
    episodes = list(csv.DictReader((cartpole_run / "episodes.csv").open()))
    assert len(tags["episode/return"]) == len(episodes) > 0
    assert {"learner/loss", "learner/mean_q", "learner/mean_abs_td", "learner/q_spread"} <= set(
        tags
    )


# ---- plots ----------------------------------------------------------------------------------


def test_smooth_is_a_trailing_mean():
    values = np.array([1.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(plots.smooth(values, 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(plots.smooth(values, 1), values)


def test_distributed_layout_is_merged_by_time(tmp_path):
    write_distributed_run(tmp_path, bundles=2, episodes=60)
    run = plots.load_run(tmp_path)
    assert len(run.returns) == 120
    assert np.all(np.diff(run.time) >= 0)
    assert set(run.bundles) == {1, 2}
    # Frames of the whole run: both bundles' frames added, so about twice one bundle's.
    assert np.all(np.diff(run.frames) >= 0)
    assert run.frames[-1] == pytest.approx(2 * 3000, rel=0.05)
    assert run.server["updates"] == 1200
    assert sorted(run.learner) == [1, 2]


def write_sitting(directory: Path, episodes, records) -> None:
    """Append one sitting's logs to a bundle: its clock starts again at 0, frames go on."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "episodes.csv"
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(("time", "frames", "bundle", "env", "return", "length"))
        for time, frames, ret in episodes:
            writer.writerow((time, frames, 1, 0, ret, 100))
    with (directory / "learner.jsonl").open("a") as handle:
        for time, frames in records:
            record = {"time": time, "frames": frames, "updates": frames // 4, "loss": 0.1}
            handle.write(json.dumps({**record, "mean_q": 0.0, "mean_abs_td": 0.1}) + "\n")


def test_resumed_sittings_are_joined_on_the_learners_clock(tmp_path):
    # Two bundles at 10 frames/s, learner records every 5 s, two sittings of 1000 s each;
    # a game takes long, so a sitting's first episode ends long after its start.
    for bundle, (first, second) in {1: ((900.0, 990.0), 600.0), 2: ((300.0, 950.0), 100.0)}.items():
        directory = tmp_path / f"bundle{bundle}"
        for sitting, ends in enumerate((first, (second,))):
            base = 10_000 * sitting
            episodes = [(t, base + 10 * int(t), float(bundle)) for t in ends]
            records = [(t, base + 10 * t) for t in range(0, 1000, 5)]
            write_sitting(directory, episodes, records)
    run = plots.load_run(tmp_path)
    # The second sitting's episodes sit 1000 s after its start, not right after the last
    # episode of the first sitting (a bundle's 600 s game would otherwise come at 990 s).
    np.testing.assert_allclose(run.time, [300, 900, 950, 990, 1095, 1595], atol=0.5)
    np.testing.assert_array_equal(run.bundles, [2, 1, 2, 1, 2, 1])
    assert np.all(np.diff(run.frames) >= 0)


def test_plot_script_writes_pngs_for_both_layouts(tmp_path, cartpole_run):
    distributed = tmp_path / "distributed"
    write_distributed_run(distributed)
    out = tmp_path / "plots"
    result = run_script("plot.py", cartpole_run, distributed, "--out", out, "--smooth", "5")
    assert result.returncode == 0, result.stderr
    expected = {
        plots.RETURNS_BY_EPISODE: plots.RETURN_FIGSIZE,
        plots.RETURNS_BY_FRAME: plots.RETURN_FIGSIZE,
        plots.RETURNS_BY_HOUR: plots.RETURN_FIGSIZE,
        plots.LEARNER: plots.WIDE_PANEL_FIGSIZE,
        plots.SERVER: plots.PANEL_FIGSIZE,
    }
    for name, (width, height) in expected.items():
        with Image.open(out / name) as image:
            image.load()
            assert image.format == "PNG"
            assert image.size == (round(width * plots.DPI), round(height * plots.DPI))
        assert f"wrote {out / name}" in result.stdout
        # Not blank: the runs' curves or bars are drawn (see data_pixels below).
        assert data_pixels(out / name).sum() > MIN_CURVE_PIXELS, name


def test_sharded_server_figure_has_a_panel_of_rates_by_shard(tmp_path, monkeypatch):
    run_dir = tmp_path / "sharded"
    write_distributed_run(run_dir)
    stats = write_sharded_ps_json(run_dir)
    assert stats["server_shards"] == 2 and len(stats["shards"]) == 2
    # Whole run: each shard's version / its running time (both sittings), not / its
    # uptime (the bug: 421/s drawn for a run that absorbed 25/s); last window: its
    # updates_per_second.
    expected = [
        plots.ShardRate(0, round(1200 / 108.0, 3), 310.5, 100),
        plots.ShardRate(1, round(1190 / 107.0, 3), 290.0, 98),
    ]
    assert plots.shard_rates(stats) == expected  # the same arithmetic, so exactly
    assert plots.shard_rates(stats)[1].whole_run == pytest.approx(11.121, abs=1e-3)
    assert stats["running_seconds"] == 108.0  # combined: the longest shard's
    older = {"shards": [{k: v for k, v in stats["shards"][0].items() if "run" not in k}]}
    assert math.isnan(plots.shard_rates(older)[0].whole_run)  # unknown, not guessed
    assert plots.shard_rates({"version": 3, "server_shards": 1}) == []  # unsharded ps.json
    assert plots.shard_rates(None) == []

    figures = []
    close = plots.plt.close
    monkeypatch.setattr(plots.plt, "close", lambda fig: (figures.append(fig), close(fig)))
    written = plots.make_plots([run_dir], tmp_path / "plots", window=5)
    assert tmp_path / "plots" / plots.SERVER in written
    with Image.open(tmp_path / "plots" / plots.SERVER) as image:
        width, height = plots.SHARDED_PANEL_FIGSIZE
        assert image.size == (round(width * plots.DPI), round(height * plots.DPI))
    server = next(f for f in figures if f.get_suptitle().startswith("Parameter server"))
    titles = [ax.get_title() for ax in server.axes]
    assert len(titles) == 4 and titles[3] == "Updates per second by shard", titles
    shard_ax = server.axes[3]
    whole, last = (
        [bar.get_height() for bar in container] for container in shard_ax.containers
    )  # one series per measure of the one run, one bar per shard
    assert whole == pytest.approx([11.111, 11.121], abs=1e-3)
    assert last == pytest.approx([310.5, 290.0])
    ticks = [tick.get_text() for tick in shard_ax.get_xticklabels()]
    assert ticks == ["shard 0\n(100 params)", "shard 1\n(98 params)"]


def test_plot_one_run_writes_into_its_directory_without_server_plot(cartpole_run, capsys):
    assert load_script("plot.py").main([str(cartpole_run)]) == 0
    written = capsys.readouterr().out.split()
    for name in (plots.RETURNS_BY_EPISODE, plots.RETURNS_BY_FRAME, plots.LEARNER):
        assert str(cartpole_run / name) in written
        assert (cartpole_run / name).stat().st_size > 0
    assert not (cartpole_run / plots.SERVER).exists()


def test_first_reaching_finds_the_first_window_at_the_target(tmp_path, capsys):
    write_distributed_run(tmp_path, bundles=2, episodes=60)
    run = plots.load_run(tmp_path)
    rng = np.random.default_rng(0)
    run.returns = rng.normal(size=len(run.returns))
    run.returns[70:] += 30.0  # from episode 71 on, every return is far above 20
    window = 10
    reached = plots.first_reaching(run, 20.0, window)
    # Reference: the first episode i (1-based) whose last 10 returns average >= 20.
    means = [run.returns[i - window : i].mean() for i in range(window, len(run.returns) + 1)]
    ends = range(window, len(run.returns) + 1)
    first = next(i for i, m in zip(ends, means, strict=True) if m >= 20.0)
    assert reached.episode == first
    assert reached.frames == run.frames[first - 1]
    assert reached.hours == pytest.approx(run.time[first - 1] / 3600)
    never = plots.first_reaching(run, 1e9, window)
    assert never.episode is None and never.best_mean == pytest.approx(max(means))
    assert "never reached" in str(never)
    assert plots.first_reaching(run, 0.0, 10_000).episode is None  # fewer episodes than window
    assert load_script("plot.py").main([str(tmp_path), "--target", "-100", "--out",
                                        str(tmp_path / "p")]) == 0  # fmt: skip
    assert "first reached -100 at episode 100," in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "empty", "header_only"])
def test_plot_errors_are_one_line(tmp_path, capsys, case):
    run_dir = tmp_path / "run"
    if case != "missing":
        run_dir.mkdir()
    if case == "header_only":
        (run_dir / "episodes.csv").write_text("time,frames,bundle,env,return,length\n")
    assert load_script("plot.py").main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert ("not found" if case == "missing" else "no episodes") in err


# ---- evaluation -----------------------------------------------------------------------------


def test_evaluate_writes_json_and_gif(tmp_path, cartpole_run):
    out = tmp_path / "eval"
    result = run_script("evaluate.py", cartpole_run, "--episodes", "3", "--seed", "1", "--out", out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((out / "evaluation.json").read_text())
    for key in ("mean", "median", "std", "min", "max", "episodes", "env_id", "seed", "epsilon"):
        assert key in summary
    assert summary["episodes"] == 3 and len(summary["returns"]) == 3
    assert summary["env_id"] == "CartPole-v1" and summary["seed"] == 1
    assert summary["epsilon"] == 0.05
    assert summary["min"] <= summary["median"] <= summary["max"]
    assert summary["min"] <= summary["mean"] <= summary["max"]
    assert summary["mean"] == pytest.approx(np.mean(summary["returns"]))
    assert summary["std"] >= 0
    assert all(r >= 1 for r in summary["returns"])  # CartPole: +1 per step
    with Image.open(out / "evaluation.gif") as gif:
        assert gif.format == "GIF"
        assert gif.n_frames > 1
    assert f"mean {summary['mean']:.2f}" in result.stdout


def test_evaluate_refuses_params_of_another_network(tmp_path, cartpole_run, capsys):
    import flax.serialization
    import jax

    from gorila_jax.core.networks import MLP

    other = MLP(num_actions=2, hidden=(64,)).init(jax.random.key(0), np.zeros((1, 4)))
    params = tmp_path / "other.msgpack"
    params.write_bytes(flax.serialization.to_bytes(other))
    main = load_script("evaluate.py").main
    assert main([str(cartpole_run), "--params", str(params), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "does not fit" in err and "MLP (128, 128)" in err
    assert not (tmp_path / "evaluation.json").exists()


@pytest.mark.parametrize("case", ["missing_dir", "no_config", "no_params", "not_msgpack"])
def test_evaluate_errors_are_one_line(tmp_path, cartpole_run, capsys, case):
    run_dir = tmp_path / "run"
    args = [str(run_dir)]
    if case == "no_config":
        run_dir.mkdir()
    elif case == "no_params":
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text((cartpole_run / "config.yaml").read_text())
    elif case == "not_msgpack":
        args = [str(cartpole_run), "--params", str(cartpole_run / "config.yaml")]
    assert load_script("evaluate.py").main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")


def test_shape_comparison_names_the_leaf():
    expected = {"params": {"q": {"kernel": np.zeros((512, 6)), "bias": np.zeros(6)}}}
    saved = {"params": {"q": {"kernel": np.zeros((512, 4)), "bias": np.zeros(4)}}}
    problem = describe_mismatch(saved, expected, "")
    assert "params/q/" in problem and "expects" in problem
    assert describe_mismatch(expected, expected, "") is None
    assert "missing params/q" in describe_mismatch({"params": {}}, expected, "")


def test_recorder_keeps_a_bounded_spread_of_the_episode():
    recorder = Recorder(max_frames=10)
    for step in range(1000):
        recorder.add(step, f"step {step}", last=step == 999)
    kept = [snapshot for snapshot, _ in recorder.snapshots]
    assert len(kept) <= 11 and kept[0] == 0 and kept[-1] == 999
    assert np.all(np.diff(kept) > 0)


# ---- plots, read back as pixels ---------------------------------------------------------------


def write_trend_run(
    run_dir: Path, returns, loss, mean_q, mean_abs_td, workers=None, q_spread=None
) -> Path:
    """A single-process run by hand: one episode and one learner record every 10 s (without
    `q_spread` when it is None, as runs logged before it was)."""
    run_dir.mkdir(parents=True)
    with (run_dir / "episodes.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("time", "frames", "bundle", "env", "return", "length"))
        for i, value in enumerate(returns):
            writer.writerow((10.0 * (i + 1), 100 * (i + 1), 0, 0, float(value), 50))
    with (run_dir / "learner.jsonl").open("w") as handle:
        for i, values in enumerate(zip(loss, mean_q, mean_abs_td, strict=True)):
            record = dict(zip(("loss", "mean_q", "mean_abs_td"), map(float, values), strict=True))
            record |= {"time": 10.0 * (i + 1), "frames": 100 * (i + 1), "updates": 10 * i}
            if q_spread is not None:
                record["q_spread"] = float(q_spread[i])
            handle.write(json.dumps(record) + "\n")
    if workers is not None:
        stats = {
            "version": 1200, "updates": 1200, "updates_per_second": 300.0,
            "uptime_seconds": 8.0, "staleness_histogram": {"0": 10, "1": 90}, "rejections": {},
            "frames": 6000, "workers": {str(w): {"accepted": n} for w, n in enumerate(workers)},
        }  # fmt: skip
        (run_dir / "ps.json").write_text(json.dumps(stats))
    return run_dir


def data_pixels(path: Path) -> np.ndarray:
    """Where a PNG is coloured (the runs' tab10 colours), as a bool mask (rows, columns).

    Axes, ticks, grid and text are black or grey, the background white, so a figure without
    data has next to no coloured pixels (a legend's sample line at most)."""
    import matplotlib.image

    image = matplotlib.image.imread(path)[..., :3]
    return (image.max(axis=-1) - image.min(axis=-1)) > 0.3


def slope_sign(mask: np.ndarray) -> float:
    """Correlation of the coloured pixels' rows with their columns: about -1 for a curve
    that rises to the right (rows count downwards), +1 for one that falls."""
    rows, columns = np.nonzero(mask)
    return float(np.corrcoef(columns, rows)[0, 1])


UP = np.linspace(0.0, 100.0, 200)
DOWN = UP[::-1]
MIN_CURVE_PIXELS = 500  # a 2-point-wide line across a panel: some 1,000; the legend alone: < 100


def test_plots_draw_the_data_not_blank_axes(tmp_path):
    """Catches figures saved before (or without) their data is drawn, panels that plot the
    wrong column (loss where mean Q belongs), and curves drawn reversed: a rising series must
    give coloured pixels that climb to the right in its own panel, a falling one the reverse,
    and the figure of other data must differ."""
    rise = write_trend_run(
        tmp_path / "rise", UP, loss=DOWN, mean_q=UP, mean_abs_td=DOWN, q_spread=UP
    )
    fall = write_trend_run(
        tmp_path / "fall", DOWN, loss=UP, mean_q=DOWN, mean_abs_td=UP, q_spread=DOWN
    )
    # A run of one episode and one learner record: axes, titles and legend, no curve.
    empty = write_trend_run(
        tmp_path / "one", [5.0], loss=[1.0], mean_q=[1.0], mean_abs_td=[1.0], q_spread=[1.0]
    )
    # A run logged before q_spread was: its other panels are drawn, the fourth is empty.
    older = write_trend_run(tmp_path / "older", UP, loss=DOWN, mean_q=UP, mean_abs_td=DOWN)
    figures = {}
    for run in (rise, fall, empty, older):
        plots.make_plots([run], tmp_path / f"plots-{run.name}", window=1)
        figures[run.name] = {
            name: data_pixels(tmp_path / f"plots-{run.name}" / name)
            for name in (plots.RETURNS_BY_EPISODE, plots.RETURNS_BY_FRAME,
                         plots.RETURNS_BY_HOUR, plots.LEARNER)
        }  # fmt: skip
    for name in (plots.RETURNS_BY_EPISODE, plots.RETURNS_BY_FRAME, plots.RETURNS_BY_HOUR):
        assert figures["one"][name].sum() < MIN_CURVE_PIXELS  # the threshold tells them apart
        assert figures["rise"][name].sum() > 2 * MIN_CURVE_PIXELS, name
        assert slope_sign(figures["rise"][name]) < -0.6, name
        assert slope_sign(figures["fall"][name]) > 0.6, name
        assert not np.array_equal(figures["rise"][name], figures["fall"][name])
    # The learner figure: loss, mean Q, mean |TD|, Q spread side by side, each panel with its
    # own trend.
    for run, signs in (("rise", (1, -1, 1, -1)), ("fall", (-1, 1, -1, 1))):
        panels = np.array_split(figures[run][plots.LEARNER], 4, axis=1)
        empty_panels = np.array_split(figures["one"][plots.LEARNER], 4, axis=1)
        for index, (panel, sign) in enumerate(zip(panels, signs, strict=True)):
            assert empty_panels[index].sum() < MIN_CURVE_PIXELS
            assert panel.sum() > MIN_CURVE_PIXELS, (run, index)
            assert sign * slope_sign(panel) > 0.6, (run, index, slope_sign(panel))
    older = np.array_split(figures["older"][plots.LEARNER], 4, axis=1)
    assert all(panel.sum() > MIN_CURVE_PIXELS for panel in older[:3])
    assert older[3].sum() < MIN_CURVE_PIXELS
    columns = plots.read_learner(tmp_path / "older" / "learner.jsonl")
    assert len(columns["loss"]) == len(UP) and np.isnan(columns["q_spread"]).all()


def bar_heights(mask: np.ndarray) -> list[int]:
    """Heights in pixels of the bars of one panel, left to right: runs of adjacent columns
    holding coloured pixels, each run's tallest column (a legend's patch is lower)."""
    filled = mask.sum(axis=0)
    heights, current = [], 0
    for value in [*filled, 0]:
        if value >= 3:
            current = max(current, int(value))
        elif current:
            heights.append(current)
            current = 0
    return heights


def test_server_figure_bars_follow_the_pushes_per_bundle(tmp_path):
    """Catches the pushes-per-bundle panel drawing the bundles in the wrong order or the same
    height for each (e.g. every bar from one worker's count): bundle 1 accepted 100 pushes,
    bundle 2 1,100, so the right bar is 11 times the left one; swapped counts swap them."""
    heights = {}
    for name, workers in (("few-many", (100, 1100)), ("many-few", (1100, 100))):
        run = write_trend_run(tmp_path / name, UP, DOWN, UP, DOWN, workers=workers)
        plots.make_plots([run], tmp_path / f"plots-{name}", window=1)
        mask = data_pixels(tmp_path / f"plots-{name}" / plots.SERVER)
        width = mask.shape[1]
        heights[name] = bar_heights(mask[:, 2 * width // 3 :])  # the third of three panels
    left, right = heights["few-many"]
    assert right / left == pytest.approx(11.0, rel=0.1), heights
    assert heights["many-few"] == [right, left], heights
