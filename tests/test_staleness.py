"""The staleness study's analysis (experiments/staleness.py), on hand-made rows and records:
when a run counts as solved and at how many frames, medians and spreads, staleness
histograms, the choice of lambda on the tuning seeds, the results file, bad input and the
report. Nothing here trains: every reference value is worked out by hand."""

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("staleness", ROOT / "experiments" / "staleness.py")
staleness = importlib.util.module_from_spec(_spec)
sys.modules["staleness"] = staleness
_spec.loader.exec_module(staleness)

Row = staleness.Row
INF = math.inf
HEADER = "time,frames,bundle,env,return,length\n"


# ---- episodes.csv rows and the moment a run is solved -----------------------------------------


def test_parse_rows_keeps_complete_lines_only():
    text = HEADER + "1.5,40,1,0,22.0,22\nnot,a,row\n2.0,x,1,0,9.0,9\n3.25,80,1,2,31.0,31\n4.0,9"
    assert staleness.parse_rows(text) == [Row(1.5, 40, 1, 22.0), Row(3.25, 80, 1, 31.0)]
    assert staleness.parse_rows("") == []
    assert staleness.parse_rows(HEADER) == []


def two_bundles() -> list:
    """Bundle 1 and 2 alternate; by hand, with a window of 3 and a target of 195:
    returns in time order 100, 190, 200, 200, 200, 200; the means of 3 are 163.3 (up to
    t=3) and 196.7 (up to t=4), so the run is solved at t=4, the 4th episode; then bundle 1
    had logged 300 frames (t=3) and bundle 2 350 (t=4): 650 frames."""
    return [
        Row(1.0, 100, 1, 100.0), Row(3.0, 300, 1, 200.0), Row(5.0, 500, 1, 200.0),
        Row(2.0, 150, 2, 190.0), Row(4.0, 350, 2, 200.0), Row(6.0, 600, 2, 200.0),
    ]  # fmt: skip


def test_solve_point_merges_bundles_by_time_and_sums_their_frames():
    solved = staleness.solve_point(two_bundles(), target=195.0, window=3)
    assert solved.frames == 650
    assert solved.seconds == 4.0
    assert solved.episode == 4
    assert solved.mean == pytest.approx((190 + 200 + 200) / 3)
    shuffled = two_bundles()
    random.Random(0).shuffle(shuffled)
    assert staleness.solve_point(shuffled, target=195.0, window=3) == solved


def test_solve_point_edges():
    # Never reached, and fewer episodes than the window: not solved.
    assert staleness.solve_point(two_bundles(), target=201.0, window=3) is None
    assert staleness.solve_point([Row(1.0, 10, 0, 500.0)] * 19) is None
    # Exactly the target counts; a bundle with no episode yet adds no frames.
    rows = [Row(1.0, 500, 0, 195.0), Row(2.0, 900, 0, 195.0), Row(9.0, 50, 3, 500.0)]
    assert staleness.solve_point(rows, target=195.0, window=2) == (900, 2.0, 2, 195.0)
    # One process, the default window of 20 and target of 195: 19 episodes of 200 and one
    # of 100 average 195 at the 20th.
    rows = [Row(float(t), 100 * t, 0, 200.0) for t in range(1, 20)] + [Row(20.0, 2000, 0, 100.0)]
    assert staleness.solve_point(rows) == (2000, 20.0, 20, 195.0)
    # Episodes that end at the same moment: ordered by bundle, whatever the file order.
    tied = [Row(1.0, 10, 2, 0.0), Row(1.0, 20, 1, 400.0)]
    assert staleness.solve_point(tied, target=200.0, window=1) == (20, 1.0, 1, 400.0)


def test_solve_point_agrees_with_the_end_to_end_tests(tmp_path):
    """The tests' frames_to_solve (tests/test_end_to_end.py) on the same episodes.csv files."""
    from test_end_to_end import frames_to_solve

    generator = random.Random(3)
    paths = []
    for bundle in (1, 2, 3):
        lines, frames = [HEADER], 0
        for episode in range(60):
            frames += generator.randrange(10, 500)
            ret = min(500.0, generator.uniform(0, 60) + 6.0 * episode)
            time_ = round(episode * 1.7 + bundle * 0.31 + generator.random(), 3)
            lines.append(f"{time_},{frames},{bundle},0,{ret},{int(ret)}\n")
        path = tmp_path / f"bundle{bundle}" / "episodes.csv"
        path.parent.mkdir()
        path.write_text("".join(lines))
        paths.append(path)
    rows = staleness.read_rows(tmp_path)
    assert len(rows) == 180
    solved = staleness.solve_point(rows)
    assert solved is not None and solved.frames == frames_to_solve(*paths)


def test_run_frames_and_best_mean():
    assert staleness.run_frames(two_bundles()) == 500 + 600
    assert staleness.run_frames([]) == 0
    assert staleness.best_mean(two_bundles(), window=3) == pytest.approx(200.0)
    assert staleness.best_mean(two_bundles()) is None  # no 20 episodes yet


def test_episode_files_of_either_layout(tmp_path):
    assert staleness.episode_files(tmp_path) == [tmp_path / "episodes.csv"]
    for bundle in (2, 1):
        (tmp_path / f"bundle{bundle}").mkdir()
        (tmp_path / f"bundle{bundle}" / "episodes.csv").write_text(HEADER)
    assert staleness.episode_files(tmp_path) == [
        tmp_path / "bundle1" / "episodes.csv",
        tmp_path / "bundle2" / "episodes.csv",
    ]


# ---- staleness histograms ----------------------------------------------------------------------


def test_merge_histograms_sums_bins_in_order_of_staleness():
    merged = staleness.merge_histograms(
        [{"8-15": 2, "0": 1, "2-3": 4}, None, {"2-3": 1, "256+": 3, "1": 5}, {}]
    )
    assert merged == {"0": 1, "1": 5, "2-3": 5, "8-15": 2, "256+": 3}
    assert list(merged) == ["0", "1", "2-3", "8-15", "256+"]
    # Counts that are not non-negative integers are left out.
    assert staleness.merge_histograms([{"0": -1, "1": 2.5, "2-3": True, "4-7": 7}]) == {"4-7": 7}
    assert staleness.merge_histograms([]) == {}


def test_histogram_median_is_the_bin_of_the_lower_median_push():
    # 4 pushes: the 2nd in order of staleness is in bin "1".
    assert staleness.histogram_median({"0": 1, "1": 1, "2-3": 2}) == "1"
    # 3 pushes, bins in any order: the 2nd is in "1".
    assert staleness.histogram_median({"2-3": 1, "0": 1, "1": 1}) == "1"
    # 6 pushes split evenly: the 3rd (the lower median) is in "0".
    assert staleness.histogram_median({"8-15": 3, "0": 3}) == "0"
    assert staleness.histogram_median({"16-31": 1, "4-7": 0, "32-63": 4}) == "32-63"
    assert staleness.histogram_median({}) is None
    assert staleness.histogram_median({"0": 0}) is None


def test_bin_low():
    assert [staleness.bin_low(b) for b in ("0", "1", "2-3", "64-127", "256+")] == [0, 1, 2, 64, 256]
    with pytest.raises(ValueError):
        staleness.bin_low("stale")


# ---- medians, spreads, lambda ------------------------------------------------------------------


def test_spread_counts_unsolved_runs_above_every_solved_one():
    assert staleness.spread([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0, 3)
    assert staleness.spread([1.0, INF, 3.0, 2.0]) == (2.5, 1.0, INF, 4)
    assert staleness.spread([10.0, INF, INF]) == (INF, 10.0, INF, 3)
    assert staleness.spread([1.0, INF]).median == INF
    assert staleness.spread([]) is None


def test_format_spread():
    def frames(value):
        return staleness.format_count(value, 100_000)

    assert staleness.format_spread(staleness.spread([12000.0, 9000.0, INF]), frames) == (
        "12,000 [9,000–> 100,000]"
    )
    assert staleness.format_spread(staleness.spread([INF, INF]), frames) == "> 100,000"
    assert staleness.format_spread(None, frames) == "–"


def tune(dc_lambda, seed, frames):
    """A tuning run's record (constant form, budget 1000), as results.jsonl holds it."""
    return {
        "config": "async6-dc-constant", "phase": "tune", "seed": seed, "budget": 1000,
        "dc_lambda": dc_lambda, "frames_to_solve": frames, "solved": frames is not None,
    }  # fmt: skip


def test_select_lambda_takes_the_lowest_median_with_unsolved_as_infinite():
    grid = (0.04, 1.0, 25.0, 625.0)
    records = [
        # 0.04: 30000, unsolved, 20000 -> median 30000 (2 solved)
        tune(0.04, 100, 30000), tune(0.04, 101, None), tune(0.04, 102, 20000),
        # 1: 10000, 50000, unsolved -> median 50000
        tune(1.0, 100, 10000), tune(1.0, 101, 50000), tune(1.0, 102, None),
        # 25: 25000, 26000, 27000 -> median 26000: the lowest
        tune(25.0, 100, 25000), tune(25.0, 101, 27000), tune(25.0, 102, 26000),
        # 625: no runs; 7: not in the grid
        tune(7.0, 100, 1),
    ]  # fmt: skip
    chosen, scores = staleness.select_lambda(records, grid)
    assert chosen == 25.0
    assert scores == [(0.04, 2, 3, 30000.0), (1.0, 2, 3, 50000.0), (25.0, 3, 3, 26000.0)]


def test_select_lambda_ties():
    grid = (2.0, 8.0, 32.0)
    # Same median: the one that solved more runs wins (8: 1000, 1000, unsolved; 32: 1000 x3).
    records = [tune(8.0, s, f) for s, f in ((1, 1000), (2, 1000), (3, None))]
    records += [tune(32.0, s, 1000) for s in (1, 2, 3)]
    assert staleness.select_lambda(records, grid)[0] == 32.0
    # Same median and as many solved: the smaller lambda.
    records = [tune(lam, 1, 500) for lam in (32.0, 8.0)]
    assert staleness.select_lambda(records, grid)[0] == 8.0
    # None solved anywhere: the smallest lambda, the weakest change to plain ASGD.
    records = [tune(lam, 1, None) for lam in grid]
    assert staleness.select_lambda(records, grid)[0] == 2.0
    assert staleness.select_lambda([], grid) == (None, [])


def test_chosen_lambdas_use_only_the_tuning_seeds_at_this_budget():
    args = staleness.StudyArgs(seeds=(0,), tune_seeds=(100, 101), budget=1000)
    records = [
        tune(1.0, 100, 9000), tune(1.0, 101, 9000),
        tune(25.0, 100, 8000), tune(25.0, 101, 8000),
        tune(625.0, 0, 10), tune(625.0, 102, 10),  # not a tuning seed of this study
        {**tune(0.04, 100, 10), "budget": 5000},  # another budget
        {**tune(0.04, 101, 10), "phase": "eval"},  # an evaluation run
    ]  # fmt: skip
    assert staleness.chosen_lambdas(records, args) == {
        "async6-dc-constant": 25.0,
        "async6-dc-adaptive": None,
    }


def test_paired_wins_compares_the_same_seeds():
    dc = [{"seed": 0, "frames_to_solve": 100}, {"seed": 1, "frames_to_solve": None},
          {"seed": 2, "frames_to_solve": 300}, {"seed": 3, "frames_to_solve": None},
          {"seed": 9, "frames_to_solve": 1}]  # fmt: skip
    plain = [{"seed": 0, "frames_to_solve": 200}, {"seed": 1, "frames_to_solve": 50},
             {"seed": 2, "frames_to_solve": 300}, {"seed": 3, "frames_to_solve": None}]  # fmt: skip
    assert staleness.paired_wins(dc, plain) == (1, 1, 2)


def test_settings_mismatch_names_what_the_run_did_otherwise(tmp_path):
    setup = staleness.BY_NAME["async6-dc-adaptive"]
    (tmp_path / "config.yaml").write_text(
        "env_id: CartPole-v1\nseed: 3\ntotal_frames: 1000\nworkers: 6\nmode: gorila\n"
        "single_process: false\ndc_asgd: adaptive\ndc_asgd_lambda: 8.0\n"
    )
    settings = staleness.resolved_settings(tmp_path)
    assert settings == {"seed": 3, "total_frames": 1000, "single_process": False,
                        "mode": "gorila", "workers": 6, "dc_asgd": "adaptive",
                        "dc_asgd_lambda": 8.0}  # fmt: skip
    assert staleness.settings_mismatch(settings, setup, 3, 8.0, 1000) is None
    assert staleness.settings_mismatch(settings, setup, 3, 32.0, 1000) == (
        "config.yaml has dc_asgd_lambda 8.0, the study asked for 32.0"
    )
    assert "total_frames" in staleness.settings_mismatch(settings, setup, 3, 8.0, 2000)
    plain = staleness.BY_NAME["async6"]
    assert "dc_asgd" in staleness.settings_mismatch(settings, plain, 3, None, 1000)
    assert staleness.resolved_settings(tmp_path / "missing") == {}


# ---- plans, results file, bad input ------------------------------------------------------------


def test_plans_run_every_configuration_seed_by_seed_and_tune_on_the_grid():
    args = staleness.StudyArgs(seeds=(0, 1), tune_seeds=(100, 101, 102))
    plain = staleness.plain_plans(args)
    assert [(p.setup.name, p.seed) for p in plain[:5]] == [
        ("single", 0), ("sync2", 0), ("async2", 0), ("async6", 0), ("single", 1),
    ]  # fmt: skip
    assert len(plain) == 8
    tuning = staleness.tuning_plans(args)
    assert len(tuning) == 2 * 3 * 4
    assert {p.phase for p in tuning} == {"tune"}
    assert len({p.key(args.budget) for p in tuning}) == len(tuning)
    tuned = staleness.tuned_plans(args, {"async6-dc-constant": 25.0, "async6-dc-adaptive": None})
    assert [(p.setup.name, p.seed, p.dc_lambda) for p in tuned] == [
        ("async6-dc-constant", 0, 25.0), ("async6-dc-constant", 1, 25.0),
    ]  # fmt: skip
    assert staleness.tuning_plans(staleness.StudyArgs(configs=("single",))) == []


def test_results_file_survives_a_cut_off_line(tmp_path):
    path = tmp_path / "out" / "results.jsonl"
    first = {**tune(1.0, 100, 900), "stopped": "solved"}
    staleness.append_result(path, first)
    staleness.append_result(path, {**first, "frames_to_solve": 800})  # the same run again
    with path.open("a") as handle:
        handle.write('{"config": "async6", "phase": "ev')  # a write cut off
    records = staleness.read_results(path)
    assert len(records) == 1 and records[0]["frames_to_solve"] == 800
    assert staleness.record_key(records[0]) == "async6-dc-constant-tune-seed100-budget1000-lambda1"
    assert staleness.read_results(tmp_path / "missing.jsonl") == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--configs", "async9"], "error: --configs: unknown configuration 'async9'"),
        (["--seeds", "a"], "error: Error parsing --seeds"),
        (["--seeds", "1.5"], "error: Error parsing --seeds"),
        (["--budget", "0"], "error: --budget must be a positive number of frames, got 0"),
        (["--budget", "-100"], "error: --budget must be a positive number of frames, got -100"),
        (["--seeds", "0", "100"], "error: --tune-seeds must share no seed with --seeds"),
        (["--seeds", "-1"], "error: --seeds: seeds must be >= 0"),
        (["--run-timeout", "0"], "error: --run-timeout must be > 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_anything_runs(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert staleness.main([*argv, "--out", str(out), "--docs", str(tmp_path / "docs")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith(message)
    assert not out.exists() and not (tmp_path / "docs").exists()


# ---- the report --------------------------------------------------------------------------------


def evaluation(config, seed, frames, histogram=None, dc_lambda=None, stale=0):
    return {
        "config": config, "phase": "eval", "seed": seed, "dc_lambda": dc_lambda,
        "budget": 50_000, "solved": frames is not None,
        "stopped": "solved" if frames is not None else "budget",
        "frames_to_solve": frames, "seconds_to_solve": None if frames is None else frames / 500,
        "run_seconds_to_solve": None if frames is None else frames / 1000,
        "wall_seconds": 100.0, "staleness_histogram": histogram or {},
        "rejections": {"stale": stale} if stale else {},
    }  # fmt: skip


def test_report_from_records(tmp_path):
    args = staleness.StudyArgs(seeds=(0, 1, 2), tune_seeds=(100,), budget=50_000,
                               out=tmp_path / "out", docs=tmp_path / "docs")  # fmt: skip
    records = [evaluation("single", s, f) for s, f in ((0, 10_000), (1, 14_000), (2, 12_000))]
    records += [
        evaluation("async6", 0, 30_000, {"16-31": 5, "4-7": 1}, stale=3),
        evaluation("async6", 1, None, {"32-63": 2}, stale=4),
        evaluation("async6", 2, 24_000, {"8-15": 3}),
    ]
    # On the tuning seed lambda 32 solved and 2 did not: 32 is chosen, its runs reported.
    adaptive = {"budget": 50_000, "config": "async6-dc-adaptive"}
    records += [{**tune(32.0, 100, 20_000), **adaptive}, {**tune(2.0, 100, None), **adaptive}]
    records += [
        evaluation("async6-dc-adaptive", s, f, {"16-31": 1}, dc_lambda=32.0)
        for s, f in ((0, 20_000), (1, 45_000), (2, 25_000))
    ]
    records += [evaluation("async6-dc-adaptive", 0, 1_000, dc_lambda=2.0)]  # not the chosen one
    written = staleness.write_report(records, args)
    names = {path.name for path in written}
    assert names == {"README.md", "results.json", "results.csv", "frames_to_solve.png",
                     "staleness.png"}  # fmt: skip
    for name in ("frames_to_solve.png", "staleness.png"):
        assert (args.docs / name).read_bytes().startswith(b"\x89PNG")
    readme = (args.docs / "README.md").read_text()
    assert "| single process | 3/3 | 12,000 [10,000–14,000] | 24 [20–28] | 12 [10–14] |" in readme
    # async6: 24,000, 30,000 and one unsolved: median 30,000; histogram 4-7: 1, 8-15: 3,
    # 16-31: 5, 32-63: 2, the 6th of 11 pushes in 16-31; 7 pushes refused as too stale.
    assert "| async, 6 bundles | 2/3 | 30,000 [24,000–> 50,000] |" in readme
    assert "| 16-31 | 7 |" in readme
    assert (
        "| async, 6 bundles, DC-ASGD adaptive (lambda 32) | 3/3 | 25,000 [20,000–45,000]" in readme
    )
    assert "| async, 6 bundles, DC-ASGD constant | not run |" in readme
    assert "fewer frames to 195 on 2, more on 1, as many on 0" in readme
    assert "python experiments/staleness.py --seeds 0 1 2 --tune-seeds 100 --budget 50000" in readme
    document = json.loads((args.docs / "results.json").read_text())  # strict JSON: no Infinity
    assert document["chosen_lambda"]["async6-dc-adaptive"] == 32.0
    async6 = next(s for s in document["summary"] if s["config"] == "async6")
    assert async6["frames_to_solve"] == {"median": 30000.0, "low": 24000.0, "high": None,
                                         "count": 3}  # fmt: skip
    assert async6["median_staleness"] == "16-31"
    csv_lines = (args.docs / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 3 + 3 + 3 + 2
    assert csv_lines[0].startswith("config,phase,seed,dc_lambda,budget,solved")


def test_report_only_with_no_results_writes_the_method(tmp_path, capsys):
    code = staleness.main(
        ["--report-only", "--out", str(tmp_path / "out"), "--docs", str(tmp_path / "docs")]
    )
    assert code == 0
    readme = (tmp_path / "docs" / "README.md").read_text()
    assert "## Method" in readme and "| single process | not run |" in readme
    assert "Nothing yet" in readme
    assert not list((tmp_path / "docs").glob("*.png"))
