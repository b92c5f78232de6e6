"""eval/bench_members.py: every member of the family trains from one preset, the table and figure are written, and a
re-run takes the finished runs from members.json instead of training them again."""

import json

from eval.bench_members import MEMBERS, main

TINY = ["train.total_nimg=2048", "optim.batch=256", "eval.every_nimg=1024", "eval.num=64",
        "teacher.analytic.student_width=16", "teacher.analytic.student_fit_steps=10", "loss.g_start_nimg=512",
        "loss.gan_start_nimg=1024"]


def test_members_are_ranked_on_one_teacher(tmp_path, capsys):
    out = tmp_path / "members"
    assert main(["--config", "toy_2d", "--out", str(out), "--members", "sid,dmd,sim,sida", "--seeds", "0,1",
                 *TINY]) == 0
    results = json.loads((out / "members.json").read_text())
    assert sorted((r["member"], r["seed"]) for r in results) == sorted(
        (m, s) for m in ("sid", "dmd", "sim", "sida") for s in (0, 1))
    assert all(r["nimg"] == 2048 and r["metric"] == "swd" and len(r["curve"]) == 2 for r in results)
    table = (out / "members.md").read_text()
    assert all(MEMBERS[m][0] in table for m in ("sid", "dmd", "sim", "sida"))
    assert (out / "members.png").stat().st_size > 1000
    stamp = (out / "sid_seed=0" / "metrics.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["--config", "toy_2d", "--out", str(out), "--members", "sid", "--seeds", "0", *TINY]) == 0
    assert (out / "sid_seed=0" / "metrics.jsonl").stat().st_mtime_ns == stamp          # not trained again
    assert "SiD λ = 1.2" in capsys.readouterr().out and "DMD" not in (out / "members.md").read_text()
